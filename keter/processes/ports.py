"""The pool of ports handed to apps; owned by the supervisor alone."""

from __future__ import annotations

import os
import socket


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
    """Whether nothing holds ``port`` on any address, IPv4 or IPv6 (a listener elsewhere
    would take the app's traffic, or a health probe would reach a stranger; the monitor
    counts a stranger on any address, so a test of IPv4 alone had an app moved back, again
    and again, onto a port an IPv6 listener held)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 in this kernel: IPv4 is every address there is
        sock, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families at once
        address = ("::", port)
    with sock:
        # SO_REUSEADDR as servers set it: a port whose old connections are in TIME_WAIT is usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def user_pids(uid: int) -> list[int]:
    """The processes running as ``uid`` (the owner of their /proc folder): where to look
    for a socket of that user's, without reading every process's file descriptors."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                continue  # gone meanwhile
    return pids


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
