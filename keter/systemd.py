"""The few lines of systemd's notify protocol keter needs (sd_notify(3))."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("keter")

_warned = False  # a NOTIFY_SOCKET keter cannot reach is said once, not at every notice


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd,
    or when that socket cannot be reached (one warning; keter runs on)."""
    global _warned
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    shown = address
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        # A socket left in the environment by a unit keter no longer runs under (or one
        # gone): systemd is not listening, so there is nobody to tell.
        if not _warned:
            _warned = True
            log.warning(
                "keter: cannot notify systemd on NOTIFY_SOCKET %r (%s); keter runs on without",
                shown,
                exc.strerror or exc,
            )
        return False
    return True
