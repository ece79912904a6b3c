"""keter.netlink: the framing sock_diag and nf_tables answers share (pure)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keter import netlink
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
