"""keter.netlink: the framing sock_diag and nf_tables answers share (pure)."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keter import netlink, sockdiag
from keter.sockdiag import DiagError


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6))
def test_a_datagram_splits_into_the_messages_it_was_made_of(messages) -> None:
    data = b""
    for sequence, (kind, payload) in enumerate(messages):
        message = netlink.request(kind, 0, sequence, payload)
        data += message + bytes(netlink.align(len(message)) - len(message))  # padding
    assert list(netlink.split(data)) == [(k, n, p) for n, (k, p) in enumerate(messages)]


def test_a_length_that_does_not_fit_is_refused_with_the_callers_error() -> None:
    message = netlink.request(netlink.NLMSG_DONE, 0, 7, b"abcd")
    cut = message[:-1]
    with pytest.raises(OSError) as plain:
        list(netlink.split(cut))
    assert plain.value.errno == errno.EPROTO
    with pytest.raises(DiagError):
        list(netlink.split(cut, DiagError))
    too_short = netlink.HEADER.pack(4, 0, 0, 0, 0)  # a length below the header's own
    with pytest.raises(OSError):
        list(netlink.split(too_short))


def test_an_error_message_tells_its_errno_and_an_ack_zero() -> None:
    assert netlink.error_code(netlink.ERROR.pack(-errno.ENOENT)) == errno.ENOENT
    assert netlink.error_code(netlink.ERROR.pack(0)) == 0


def test_listeners_read_the_kernels_tables_alike_when_sock_diag_cannot_answer(
    monkeypatch,
) -> None:
    """keter.sockdiag.listeners falls back to /proc/net/tcp and tcp6: the same
    owners and inodes as sock_diag's, IPv4 and IPv6, and nothing for a port only
    connected to (not listened on)."""
    v4 = socket.create_server(("127.0.0.1", 0))
    port = v4.getsockname()[1]
    v6 = socket.create_server(("::1", port), family=socket.AF_INET6)
    client = socket.create_connection(("127.0.0.1", port))
    try:
        by_diag = sorted(sockdiag.listeners(port), key=lambda listener: listener.inode)
        assert len(by_diag) == 2
        assert {listener.uid for listener in by_diag} == {os.geteuid()}

        def refused(_port: int) -> list:
            raise DiagError("no sock_diag here")

        monkeypatch.setattr(sockdiag, "listening", refused)
        # The same sockets, without their cgroup (the kernel's tables do not say it).
        by_table = sorted(sockdiag.listeners(port), key=lambda listener: listener.inode)
        assert [(each.uid, each.inode, each.cgroup) for each in by_table] == [
            (each.uid, each.inode, 0) for each in by_diag
        ]
        assert sockdiag.listeners(client.getsockname()[1]) == []
    finally:
        client.close()
        v6.close()
        v4.close()


def test_a_failed_exchange_with_the_kernel_is_a_diag_error_and_listeners_fall_back(
    monkeypatch,
) -> None:
    """Not only a refused socket: a send or receive that fails (ENOBUFS when the
    kernel's answer did not fit) is the kernel not answering too, so whoever has a
    fallback (``listeners``: /proc/net/tcp) takes it instead of failing."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    real_socket = socket.socket

    class Overrun(real_socket):
        def recv(self, *args):
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))

    try:
        expected = sockdiag.listeners(port)
        assert len(expected) == 1
        monkeypatch.setattr(sockdiag.socket, "socket", Overrun)
        with pytest.raises(DiagError) as raised:
            sockdiag.listening(port)
        assert raised.value.errno == errno.ENOBUFS
        assert [(each.uid, each.inode) for each in sockdiag.listeners(port)] == [
            (each.uid, each.inode) for each in expected
        ]
    finally:
        server.close()
