"""Running a short command keter waits for (``nginx -t``, nginx's reload command): bounded
in time and in what keter keeps of its output, with nothing of it left behind.

The command is the operator's (a wrapper script, ``sudo nginx -t``), so it may hang, leave
children, print without end or print bytes that are no UTF-8. ``subprocess.run`` with a
timeout kills only the direct child: a wrapper's own ``nginx -t`` or ``sleep`` lived on,
one more after every apply that timed out, and its output was all kept in memory. Here
the command leads a process group of its own, and at the deadline the whole group is
killed. A command that exits in time is not waited for past its exit (a child of it may
hold its output) and what it left is left alone: it may be a daemon it started (``nginx -s
reload || nginx``), still forking its way out of the group. The exit is heard on a pidfd,
which becomes readable before the child is reaped; at the deadline the child has not
exited, so its pid, the group's id, cannot belong to another program's group.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_KEPT = 64 * 1024  # bytes of output kept (what nginx says fits in a few lines)


@dataclass(frozen=True, kw_only=True)
class Ran:
    """How a command ended: its exit status (None: killed at the deadline) and the start
    of its output (stdout and stderr together, decoded with replacement characters)."""

    returncode: int | None
    output: str


def run_short(command: Sequence[str], timeout: float) -> Ran:
    """Run ``command`` until it exits or ``timeout`` seconds pass. Raises OSError if it
    cannot be started."""
    child = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a group of its own: every process of it can be killed
        close_fds=True,
    )
    assert child.stdout is not None
    try:
        exited = os.pidfd_open(child.pid)
    except OSError:  # pragma: no cover - Linux before 5.3
        child.kill()
        child.wait()
        raise
    deadline = time.monotonic() + timeout
    kept = bytearray()
    done = False
    with child.stdout as pipe, contextlib.closing(selectors.DefaultSelector()) as selector:
        os.set_blocking(pipe.fileno(), False)
        selector.register(pipe, selectors.EVENT_READ)
        selector.register(exited, selectors.EVENT_READ)
        while not done and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                if key.fileobj == exited:
                    done = True
            # Read before deciding: what it wrote just before it exited counts.
            if not _read(pipe.fileno(), kept) and pipe in selector.get_map():
                selector.unregister(pipe)  # end of output; the exit is still awaited
    os.close(exited)
    if not done:  # hung: all of its group goes
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    status = child.wait()
    return Ran(returncode=status if done else None, output=kept.decode("utf-8", "replace"))


def _read(fd: int, kept: bytearray) -> bool:
    """Read what the pipe holds now, keeping up to ``OUTPUT_KEPT`` bytes in all; False at
    the end of the output."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        kept += chunk[: max(OUTPUT_KEPT - len(kept), 0)]  # the rest is read and dropped
