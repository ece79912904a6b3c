"""Which TCP sockets a port holds, asked of the kernel (sock_diag netlink).

The questions ``ss -tln`` and ``ss -tn state established '( sport = :PORT )'``
ask, without running ``ss``, without reading ``/proc/net/tcp`` (whose cost grows
with every socket on the machine, TIME_WAIT included):

* ``listeners(port)``: who listens on a port (owner uid and socket inode). The
  kernel walks its table of listening sockets only and answers with the port's
  own: cheap however busy the machine is. (Where sock_diag cannot answer, the
  same is read from ``/proc/net/tcp`` and ``tcp6``.)
* ``connections(low, high)``: how many live connections each port in a range
  holds (an old version is drained when its ports hold none). One dump, both
  address families at once, filtered by the kernel; its cost grows with the
  machine's sockets (the kernel walks its connection table), so callers ask
  once for every port they watch, a few times a second at most.
* ``accepted_on(port, peer_port)``: whether the connection keter just made from
  ``peer_port`` was accepted on ``port``, i.e. a new version really gets new
  connections through its stable address. One exact lookup, no walk.

An app listening on ``::`` holds IPv4 connections as IPv6 sockets with mapped
addresses; both are counted. Needs no privilege.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from keter import netlink

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18  # the older request: its dumps cover IPv4 and IPv6 in one walk
SOCK_DESTROY = 21  # close a socket as if its process had (CONFIG_INET_DIAG_DESTROY)
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_CGROUP_ID = 21  # an answer's attribute: the socket's cgroup v2 id (u64)
NO_COOKIE = 0xFFFFFFFF

# TCP states (include/net/tcp_states.h). A connection in SYN_RECV or ESTABLISHED may
# still carry a request; in the others one side has closed, so the app owes nothing.
TCP_ESTABLISHED = 1
TCP_SYN_RECV = 3
TCP_LISTEN = 10
LIVE_STATES = (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_RECV)

# Filter opcodes (include/uapi/linux/inet_diag.h): source port >= and <=.
_S_GE, _S_LE = 2, 3

_HEAD = struct.Struct("=BBBB")  # family, then protocol (or lengths), ext, pad / state ...
_SOCKID = struct.Struct("!HH16s16s")  # ports and addresses, network order (then if, cookie)
_TAIL = struct.Struct("=III")  # the socket id's interface and cookie
_OWNER = struct.Struct("=II")  # inet_diag_msg after expires, rqueue, wqueue: uid, inode
_OWNER_AT = _HEAD.size + _SOCKID.size + _TAIL.size + 12
_MESSAGE_SIZE = _OWNER_AT + _OWNER.size  # struct inet_diag_msg; its attributes follow
_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
_RECEIVE_SIZE = 1 << 16


class DiagError(OSError):
    """The kernel cannot answer (no sock_diag in this kernel, or a refused request)."""


def connections(low: int, high: int) -> collections.Counter[int]:
    """How many live TCP connections each local port in ``low..high`` holds.

    Listening sockets are not connections; nor are those one side has closed.
    Raises DiagError when the kernel cannot answer.
    """
    found = collections.Counter()
    for message in _dump(LIVE_STATES, low, high):
        source, _dest, _src, _dst = _SOCKID.unpack_from(message, _HEAD.size)
        found[source] += 1
    return found


@dataclass(frozen=True)
class Listener:
    """A TCP socket listening on a port: who owns it, its inode, and the cgroup v2 (its
    id: the inode of the cgroup's folder) of the process that made it, 0 if unknown."""

    uid: int
    inode: int
    cgroup: int = 0


def listeners(port: int) -> list[Listener]:
    """The sockets listening on TCP ``port``, any address, IPv4 and IPv6."""
    try:
        return listening(port)
    except DiagError:
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


def listening(port: int) -> list[Listener]:
    """Each socket listening on TCP ``port``, any address.

    The cgroup comes with every answer (Linux 5.7 and later): it tells whose a socket
    is without reading the file descriptors of every process, which an app holding
    millions of them made last tens of seconds. Raises DiagError when the kernel cannot
    answer.
    """
    found = []
    for message in _dump(1 << TCP_LISTEN, port, port):
        uid, inode = _OWNER.unpack_from(message, _OWNER_AT)
        found.append(Listener(uid=uid, inode=inode, cgroup=_cgroup_id(message)))
    return found


def destroy_listeners(port: int, owned: Callable[[int], bool]) -> int:
    """Close each socket listening on TCP ``port`` whose owner's uid ``owned`` accepts,
    whatever process holds it (the kernel closes it as if that process had; connections
    not yet accepted are reset); how many were closed.

    Raises DiagError when the kernel cannot (no ``CONFIG_INET_DIAG_DESTROY``, no
    ``CAP_NET_ADMIN``).
    """
    closed = 0
    for message in _dump(1 << TCP_LISTEN, port, port):
        uid, _ = _OWNER.unpack_from(message, _OWNER_AT)
        if not owned(uid):
            continue
        # The answer's own family and socket id (its cookie included) name it exactly.
        ident = message[_HEAD.size : _HEAD.size + _SOCKID.size + _TAIL.size]
        body = _HEAD.pack(message[0], socket.IPPROTO_TCP, 0, 0)
        body += struct.pack("=I", 1 << TCP_LISTEN) + ident
        try:
            _ask(SOCK_DESTROY, netlink.NLM_F_ACK, body)
        except DiagError as exc:
            if exc.errno == errno.ENOENT:
                continue  # closed meanwhile
            raise
        closed += 1
    return closed


def _cgroup_id(message: bytes) -> int:
    """The INET_DIAG_CGROUP_ID attribute after the inet_diag_msg, 0 if there is none."""
    value = netlink.attribute(message, _MESSAGE_SIZE, INET_DIAG_CGROUP_ID)
    return struct.unpack("=Q", value)[0] if value is not None and len(value) == 8 else 0


def _dump(states: int, low: int, high: int) -> list[bytes]:
    """Every TCP socket in one of ``states`` whose local port is in ``low..high``."""
    bytecode = _OP.pack(_S_GE, 8, 20) + _OP.pack(0, 0, low)
    bytecode += _OP.pack(_S_LE, 8, 12) + _OP.pack(0, 0, high)
    attribute = struct.pack("=HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    # struct inet_diag_req: family AF_UNSPEC (both), no lengths, no extensions, an empty
    # socket id, the states, no tables.
    body = _HEAD.pack(0, 0, 0, 0) + bytes(_SOCKID.size + _TAIL.size)
    body += struct.pack("=II", states, 0) + attribute
    return _ask(TCPDIAG_GETSOCK, netlink.NLM_F_DUMP, body)


def accepted_on(port: int, peer_port: int, address: str = "127.0.0.1") -> bool:
    """Whether a live connection from ``address:peer_port`` was accepted on ``address:port``.

    Asked in both families (an IPv6 listener holds it with mapped addresses).
    """
    for family, packed in (
        (socket.AF_INET, ipaddress.IPv4Address(address).packed.ljust(16, b"\0")),
        (socket.AF_INET6, ipaddress.IPv6Address(f"::ffff:{address}").packed),
    ):
        body = _HEAD.pack(family, socket.IPPROTO_TCP, 0, 0) + struct.pack("=I", LIVE_STATES)
        body += _SOCKID.pack(port, peer_port, packed, packed) + _TAIL.pack(0, NO_COOKIE, NO_COOKIE)
        try:
            answers = _ask(SOCK_DIAG_BY_FAMILY, 0, body)
        except DiagError as exc:
            if exc.errno in (errno.ENOENT, errno.EAFNOSUPPORT):
                continue
            raise
        for message in answers:
            state = message[1]
            source, dest, _src, _dst = _SOCKID.unpack_from(message, _HEAD.size)
            # An exact lookup falls back to the listener; only the connection itself counts.
            if (1 << state) & LIVE_STATES and (source, dest) == (port, peer_port):
                return True
    return False


def _ask(kind: int, flags: int, body: bytes) -> list[bytes]:
    """Send one sock_diag request; the answers' payloads (each an inet_diag_msg).

    Any failure is a DiagError (the kernel cannot answer), so that callers with a
    fallback need to catch that alone.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
            return _exchange(sock, kind, flags, body)
    except DiagError:
        raise
    except OSError as exc:  # no netlink socket, or its send or receive failed (ENOBUFS)
        raise DiagError(exc.errno, f"sock_diag: {exc.strerror or exc}") from None


def _exchange(sock: socket.socket, kind: int, flags: int, body: bytes) -> list[bytes]:
    """One request on ``sock`` and its answers."""
    answers: list[bytes] = []
    sock.sendall(netlink.request(kind, flags, 1, body))
    while True:
        data = sock.recv(_RECEIVE_SIZE)
        if not data:
            return answers
        for answer, _sequence, payload in netlink.split(data, DiagError):
            if answer == netlink.NLMSG_DONE:
                return answers
            if answer == netlink.NLMSG_ERROR:
                code = netlink.error_code(payload)
                if code == 0:
                    return answers
                raise DiagError(code, f"sock_diag: {os.strerror(code)}")
            answers.append(payload)
        if not flags & netlink.NLM_F_DUMP:
            return answers  # an exact lookup answers in one datagram
