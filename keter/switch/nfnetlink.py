"""Changing the elements of an nftables map by talking netlink to the kernel directly,
and hearing when a table is deleted behind keter's back (``TableWatch``).

Every switch changes one or a few elements of keter's map (``keter.switch.nft``).
Running ``nft -f`` for that costs a process (3 ms of CPU: starting it, loading
libnftables, reading the table's state back); 1000 apps deployed at once made
about 300 of them, a twentieth of the machine's CPU over the whole drop. The
message itself is small: one nf_tables batch (``BATCH_BEGIN``, a ``DELSETELEM``
and/or a ``NEWSETELEM``, ``BATCH_END``), which the kernel applies as one
transaction, exactly as it applies nft's. Only the map's elements are changed
here; making and deleting the table stays with nft (once per run).

The same writer changes the isolation set (``SetWriter``), whose elements are
``uid . inet_service`` pairs: see ``keter.switch.nft``.

The encoding follows ``include/uapi/linux/netfilter/nf_tables.h`` and
``nfnetlink.h`` (the framing is ``keter.netlink``'s); the map's keys and values
are ``inet_service`` (2 bytes, network order), the set's keys ``own_key``'s.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterable, Sequence

from keter import netlink

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NLM_F_CREATE = 0x400
NLA_F_NESTED = netlink.NLA_F_NESTED
NFNLGRP_NFTABLES = 7  # the multicast group of every nf_tables change
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFTA_TABLE_NAME = 1

# Attributes (enum nft_set_elem_list_attributes, nft_set_elem_attributes, nft_data_attributes).
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (network order)
_ATTR = netlink.ATTRIBUTE  # nlattr: length, type
_PORT = struct.Struct("!H")  # an inet_service, in network order
_RECEIVE_SIZE = 1 << 16


class NetlinkError(OSError):
    """The kernel refused the change (nothing of it was applied), or did not answer."""


class _Writer:
    """Changes the elements of one set or map of one table over a netlink socket it keeps.

    The socket stays open between changes: closing one that sent a transaction
    waits for the kernel to finish freeing the transaction's old state (8-25 ms
    here), which would stall every switch. One thread uses it at a time.
    """

    def __init__(
        self, table: str, set_name: str, timeout: float = 10.0, family: int = NFPROTO_IPV4
    ) -> None:
        self.table, self.set_name, self.timeout, self.family = table, set_name, timeout, family
        self._sock: socket.socket | None = None
        # Below 2**24, 4 more per change: a billion changes before 32 bits run out.
        self._sequence = int.from_bytes(os.urandom(3), "big")

    def _send(self, remove: Sequence[bytes], add: Sequence[tuple[bytes, bytes | None]]) -> None:
        if not remove and not add:
            return
        self._sequence += 4
        batch, last = encode(
            self.table, self.set_name, remove, add, self._sequence, family=self.family
        )
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                self._sock.settimeout(self.timeout)
            self._sock.sendall(batch)
            _await_ack(self._sock, self._sequence, last)
        except NetlinkError:
            raise  # the socket is fine: a late answer to this batch is told apart by number
        except OSError as exc:
            self.close()  # a socket that failed or kept silent is not trusted again
            if isinstance(exc, TimeoutError):
                raise NetlinkError(errno.ETIMEDOUT, "the kernel did not answer") from None
            raise NetlinkError(exc.errno, f"netlink: {exc.strerror}") from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class MapWriter(_Writer):
    """Changes the elements of the map ``ip TABLE MAP`` (stable port -> app port)."""

    def __init__(self, table: str, map_name: str, timeout: float = 10.0) -> None:
        super().__init__(table, map_name, timeout, NFPROTO_IPV4)

    @property
    def map_name(self) -> str:
        return self.set_name

    def change(self, remove: Sequence[int], add: Sequence[tuple[int, int]]) -> None:
        """In one transaction: delete the ``remove`` keys, then add the ``add`` elements
        (key, value). Raises NetlinkError: a refusal changed nothing."""
        self._send(
            [_PORT.pack(key) for key in remove],
            [(_PORT.pack(key), _PORT.pack(value)) for key, value in add],
        )


class SetWriter(_Writer):
    """Changes the elements of the isolation set ``inet TABLE SET`` (``own_key`` pairs)."""

    def __init__(self, table: str, set_name: str, timeout: float = 10.0) -> None:
        super().__init__(table, set_name, timeout, NFPROTO_INET)

    def change(self, remove: Sequence[tuple[int, int]], add: Sequence[tuple[int, int]]) -> None:
        """In one transaction: delete the ``remove`` (uid, port) pairs, then add ``add``.
        Raises NetlinkError: a refusal changed nothing."""
        self._send(
            [own_key(uid, port) for uid, port in remove],
            [(own_key(uid, port), None) for uid, port in add],
        )


def own_key(uid: int, port: int) -> bytes:
    """An element of type ``uid . inet_service``: each part of a concatenation fills whole
    32-bit registers; a uid is in host order, a port in network order then 2 bytes of
    padding (what ``nft --debug=netlink`` shows nft itself sending)."""
    return struct.pack("=I", uid) + _PORT.pack(port) + b"\0\0"


def encode(
    table: str,
    set_name: str,
    remove: Sequence[bytes],
    add: Sequence[tuple[bytes, bytes | None]],
    first: int,
    *,
    family: int = NFPROTO_IPV4,
) -> tuple[bytes, int]:
    """The batch's bytes, its messages numbered from ``first``, and the sequence number
    of its last change (the one acked). Keys and values are already encoded; a set's
    elements have no value (None)."""
    names = _attr(NFTA_SET_ELEM_LIST_TABLE, _string(table)) + _attr(
        NFTA_SET_ELEM_LIST_SET, _string(set_name)
    )
    changes = []
    if remove:
        elements = (_element(key) for key in remove)
        changes.append((NFT_MSG_DELSETELEM, 0, names + _elements(elements)))
    if add:
        elements = (_element(key, value) for key, value in add)
        changes.append((NFT_MSG_NEWSETELEM, NLM_F_CREATE, names + _elements(elements)))
    messages = [_message(NFNL_MSG_BATCH_BEGIN, 0, first, 0, NFNL_SUBSYS_NFTABLES)]
    sequence = first
    for index, (kind, flags, body) in enumerate(changes):
        sequence += 1
        # Only the last change asks for an ack: the kernel answers every message
        # that fails, in order, and a failure aborts the whole batch.
        ack = netlink.NLM_F_ACK if index == len(changes) - 1 else 0
        messages.append(
            _message(NFNL_SUBSYS_NFTABLES << 8 | kind, flags | ack, sequence, family, 0, body)
        )
    messages.append(_message(NFNL_MSG_BATCH_END, 0, sequence + 1, 0, NFNL_SUBSYS_NFTABLES))
    return b"".join(messages), sequence


def _await_ack(sock: socket.socket, first: int, last: int) -> None:
    """Read answers until the last change is acked; raise at the first refusal of any
    message of this batch (numbered ``first`` to ``last + 1``: begin, changes, end)."""
    while True:
        for kind, sequence, payload in netlink.split(sock.recv(_RECEIVE_SIZE)):
            if kind == netlink.NLMSG_ERROR:
                code = netlink.error_code(payload)
                if code and first <= sequence <= last + 1:
                    raise NetlinkError(code, os.strerror(code))
                if sequence == last:
                    return


def _message(kind: int, flags: int, sequence: int, family: int, resource: int, body=b"") -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(resource)) + body
    return netlink.request(kind, flags, sequence, payload)


def _elements(elements: Iterable[bytes]) -> bytes:
    return _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, b"".join(elements))


def _element(key: bytes, value: bytes | None = None) -> bytes:
    body = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key))
    if value is not None:
        body += _attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, value))
    return _attr(NFTA_LIST_ELEM | NLA_F_NESTED, body)


def _attr(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (netlink.align(length) - length)


def _string(text: str) -> bytes:
    return text.encode("ascii") + b"\0"  # table and map names are keter's own


class TableWatch:
    """Hears the kernel announce nf_tables changes; ``wait`` returns when ``table`` may
    be gone.

    Whoever deletes keter's table, typically ``nft flush ruleset`` at the top of
    /etc/nftables.conf when the nftables service restarts, takes every stable
    address with it. The kernel announces each committed change to the
    ``NFNLGRP_NFTABLES`` group; a ``DELTABLE`` naming the table (or naming none)
    means look. Every other announcement, keter's own map changes included, is
    read and dropped. Announcements lost to a full receive buffer (``ENOBUFS``)
    may have held the deletion, so they also mean look. Needs CAP_NET_ADMIN.
    """

    def __init__(self, table: str) -> None:
        self.table = table
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))  # unbound, it is sent nothing the group hears
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:
            self._sock.close()
            raise
        self._wake_read, self._wake_write = os.pipe()
        # poll, not select: keter holds thousands of descriptors with 1000 apps.
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN)
        self._poller.register(self._wake_read, select.POLLIN)

    def wait(self) -> bool:
        """Block until an announcement may mean the table is gone (True), or until
        ``stop`` (False). Raises OSError when the socket fails."""
        while True:
            ready = {fd for fd, _ in self._poller.poll()}
            if self._wake_read in ready:
                return False
            try:
                data = self._sock.recv(_RECEIVE_SIZE)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return True
                raise
            if any(
                kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELTABLE
                and table_name(payload) in (None, self.table)
                for kind, _, payload in netlink.split(data)
            ):
                return True

    def stop(self) -> None:
        """Make ``wait`` return False (from any thread)."""
        os.write(self._wake_write, b"s")

    def close(self) -> None:
        self._sock.close()
        os.close(self._wake_read)
        os.close(self._wake_write)


def table_name(payload: bytes) -> str | None:
    """The ``NFTA_TABLE_NAME`` of a table message (after its nfgenmsg), if it has one."""
    value = netlink.attribute(payload, _NFGEN.size, NFTA_TABLE_NAME)
    return value.split(b"\0", 1)[0].decode("ascii", "replace") if value is not None else None
