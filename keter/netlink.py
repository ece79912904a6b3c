"""Netlink framing, shared by keter's conversations with the kernel.

``keter.sockdiag`` (which sockets a port holds) and ``keter.switch.nfnetlink``
(keter's nftables map) speak different protocols over the same framing: each
message is an ``nlmsghdr`` (``include/uapi/linux/netlink.h``) and its payload,
padded to 4 bytes, several to a datagram. Here: building a request, splitting
a datagram of answers into messages, and finding an attribute in one.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
ERROR = struct.Struct("=i")  # nlmsgerr's error: a negative errno, or 0 for an ack

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3


def align(length: int) -> int:
    """``length`` rounded up to netlink's 4-byte alignment."""
    return (length + 3) & ~3


def request(kind: int, flags: int, sequence: int, payload: bytes) -> bytes:
    """One request message (``NLM_F_REQUEST`` and ``flags``) carrying ``payload``."""
    header = HEADER.pack(HEADER.size + len(payload), kind, NLM_F_REQUEST | flags, sequence, 0)
    return header + payload


def split(data: bytes, error: type[OSError] = OSError) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence, payload) of each message in one datagram from the kernel.

    Raises ``error`` (EPROTO) at a message whose length does not fit the datagram.
    """
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _flags, sequence, _port = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            raise error(errno.EPROTO, "a malformed answer from the kernel")
        yield kind, sequence, data[offset + HEADER.size : offset + length]
        offset += align(length)


ATTRIBUTE = struct.Struct("=HH")  # nlattr (rtattr): length, type
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000


def attribute(payload: bytes, offset: int, kind: int) -> bytes | None:
    """The value of the first attribute of type ``kind`` in ``payload`` from ``offset``
    (where a message's fixed part ends), its flag bits aside; None if there is none."""
    while offset + ATTRIBUTE.size <= len(payload):
        length, found = ATTRIBUTE.unpack_from(payload, offset)
        if length < ATTRIBUTE.size:
            return None
        if found & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) == kind:
            return payload[offset + ATTRIBUTE.size : offset + length]
        offset += align(length)
    return None


def error_code(payload: bytes) -> int:
    """The errno an ``NLMSG_ERROR`` message reports (0: an acknowledgement)."""
    return -ERROR.unpack_from(payload)[0]
