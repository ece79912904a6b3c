"""The pool of ports handed to apps; owned by the supervisor alone."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import psutil

from keter import sockdiag


class NoFreePort(Exception):
    pass


class PortPool:
    """Hands each port to one app at a time; a port comes back only when its process is gone.

    Ports are handed out round-robin, so a port just released (whose old
    connections may linger in TIME_WAIT) is the last to be reused.
    """

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self._in_use: set[int] = set()
        self._next = low

    def allocate(self) -> int:
        size = self.high - self.low + 1
        for i in range(size):
            port = self.low + (self._next - self.low + i) % size
            if port in self._in_use or not port_is_free(port):
                # Not bindable: something outside keter (or a leftover app) holds it.
                continue
            self._in_use.add(port)
            self._next = port + 1 if port < self.high else self.low
            return port
        raise NoFreePort(
            f"no free port in {self.low}-{self.high} ({len(self._in_use)} in use by apps)"
        )

    def release(self, port: int) -> None:
        self._in_use.discard(port)

    def __contains__(self, port: int) -> bool:
        return port in self._in_use


def port_is_free(port: int) -> bool:
    """Whether nothing holds ``port`` on any address (a listener elsewhere would take the
    app's traffic, or a health probe would reach a stranger)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as servers set it: a port whose old connections are in TIME_WAIT is usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def port_holders(port: int) -> list[int]:
    """Pids of the processes listening on TCP ``port`` (any address)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted(
        {
            c.pid
            for c in connections
            if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        }
    )


@dataclass(frozen=True)
class Listener:
    """A TCP socket listening on a port: who owns it (from /proc/net/tcp and tcp6)."""

    uid: int
    inode: int


def listeners(port: int) -> list[Listener]:
    """The sockets listening on TCP ``port``, any address, IPv4 and IPv6.

    Asked of the kernel's listening table (``keter.sockdiag``), which stays cheap
    however many connections the machine has: done when an app is about to be
    trusted with traffic (its health check passed, or it restarts).
    """
    try:
        return [Listener(uid=uid, inode=inode) for uid, inode in sockdiag.listening(port)]
    except sockdiag.DiagError:
        pass  # no sock_diag: read the kernel's tables (their cost grows with every socket)
    found = []
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(wanted):
                        found.append(Listener(uid=int(fields[7]), inode=int(fields[9])))
        except OSError:
            continue
    return found


def socket_pids(inode: int, pids: list[int] | None = None) -> list[int]:
    """Which of ``pids`` (default: every process) hold the socket ``inode`` open."""
    target = f"socket:[{inode}]"
    if pids is None:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    holders = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    holders.append(pid)
                    break
            except OSError:
                continue
    return holders
