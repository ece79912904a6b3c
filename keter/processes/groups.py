"""Process groups: every app runs in its own session, so "the app" is a group.

Signals go to the whole group, and an app only counts as stopped when nothing
of its group is left (a shell wrapper's grandchildren may hold the port after
the wrapper died).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

log = logging.getLogger(__name__)

KILL_WAIT = 5.0  # how long shutdown waits for SIGKILLed processes to vanish


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a group.

    Zombies do not count: they hold no port and no memory, and an orphan's
    zombie may never be reaped when PID 1 is not a real init. The common
    answer, "nothing left at all", costs one ``kill(-pgid, 0)``; only a group
    that still exists costs a walk of ``/proc``.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # exists, but owned by another user
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(name))
    return members


def wait_group_gone(pgid: int, deadline: float, cancel: threading.Event | None = None) -> bool:
    """Block until no live process of the group remains, or until ``deadline`` (monotonic).

    Only for keter's own start-up and shutdown, when blocking is the point.
    Waits on pidfds of the members; rescans now and then for new forks.
    """
    while True:
        members = group_members(pgid)
        if not members:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (cancel is not None and cancel.is_set()):
            return False
        pidfds = []
        # poll, not select: with a thousand apps running, keter's descriptors go past
        # select's limit of 1024.
        poller = select.poll()
        try:
            for pid in members:
                try:
                    pidfds.append(os.pidfd_open(pid))
                except ProcessLookupError:
                    continue
                poller.register(pidfds[-1], select.POLLIN)
            if pidfds:
                poller.poll(min(remaining, 0.1) * 1000)
        finally:
            for fd in pidfds:
                os.close(fd)


def stop_groups(
    groups: dict[int, str], timeout: float, cancel: threading.Event | None = None
) -> None:
    """SIGTERM every group, SIGKILL what is left after one shared ``timeout``, wait for all.

    ``groups`` maps pgid to a label for the log (``"app: pid 123"``). Setting
    ``cancel`` cuts the grace period short (keter must stop now).
    """
    for pgid in groups:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    stubborn = [pgid for pgid in groups if not wait_group_gone(pgid, deadline, cancel)]
    for pgid in stubborn:
        log.warning("%s: still running %gs after SIGTERM; sending SIGKILL", groups[pgid], timeout)
        signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    for pgid in stubborn:
        if not wait_group_gone(pgid, deadline):
            log.error("%s: still alive after SIGKILL", groups[pgid])
