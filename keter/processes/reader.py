"""Reading app output and noticing exits: one reader thread per run.

The thread selects on the run's output pipe *and* a pidfd of its leader, so an
exit is seen at once even when a daemonised grandchild keeps the pipe open,
and calls ``on_exit`` (which posts ``_Exited`` to the monitor).
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from keter.processes.applog import LogRegistry, OutputCapture

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
MAX_PIPE_BUFFER = 1024 * 1024  # Linux's default /proc/sys/fs/pipe-max-size
FAILURE_TAIL = 20  # output lines sent with an exit report

# on_exit(key, returncode, last output lines)
ExitCallback = Callable[[object, int, tuple[str, ...]], None]


@dataclass(eq=False)
class _Watched:
    key: object
    proc: subprocess.Popen
    capture: OutputCapture
    wake_w: int
    thread: threading.Thread | None = field(default=None)
    released: bool = False


class OutputReader:
    """Copies each run's output to its log and reports its leader's exit."""

    def __init__(self, logs: LogRegistry, on_exit: ExitCallback) -> None:
        self._logs = logs
        self._on_exit = on_exit
        self._watched: dict[object, _Watched] = {}

    def watch(self, key: object, proc: subprocess.Popen, capture: OutputCapture) -> None:
        """Start reading ``proc``'s stdout; ``on_exit(key, ...)`` when its leader exits."""
        # The pidfd is opened before anyone can reap the child, so it refers to it.
        pidfd = os.pidfd_open(proc.pid)
        wake_r, wake_w = os.pipe()
        watched = _Watched(key=key, proc=proc, capture=capture, wake_w=wake_w)
        watched.thread = threading.Thread(
            target=self._pump,
            args=(watched, pidfd, wake_r),
            name=f"keter-output-{capture.app}",
            daemon=True,
        )
        self._watched[key] = watched
        watched.thread.start()

    def release(self, key: object) -> None:
        """The run's group is gone: read what is left and stop watching it."""
        watched = self._watched.pop(key, None)
        if watched is not None and not watched.released:
            watched.released = True
            os.close(watched.wake_w)  # EOF on the reader's wake pipe

    def join(self, keys: list[object], timeout: float) -> None:
        threads = [w.thread for k in keys if (w := self._watched.get(k)) and w.thread]
        for key in keys:
            self.release(key)
        for thread in threads:
            thread.join(timeout=timeout)

    def _pump(self, watched: _Watched, pidfd: int, wake_r: int) -> None:
        """Copy the run's output to its log; report the leader's exit the moment it happens."""
        proc, capture = watched.proc, watched.capture
        out = proc.stdout
        assert out is not None
        fd = out.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ, "out")
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        selector.register(wake_r, selectors.EVENT_READ, "wake")
        pipe_open, exited, woken = True, False, False
        try:
            # Ends when the leader is reaped and either the pipe is closed (the whole
            # group is gone) or the monitor says the group is gone (then whoever still
            # holds the pipe has escaped the group, and we will not wait for it).
            while not (exited and (woken or not pipe_open)):
                for key, _ in selector.select():
                    if key.data == "out":
                        if pipe_open and read_once(capture, fd) is False:
                            selector.unregister(fd)
                            pipe_open = False
                    elif key.data == "exit":
                        # Everything the leader wrote is in the pipe by now: take it
                        # first so the exit report shows its last words.
                        if pipe_open and not drain(capture, fd):
                            selector.unregister(fd)
                            pipe_open = False
                        capture.flush()
                        returncode = proc.wait()
                        selector.unregister(pidfd)
                        exited = True
                        self._on_exit(watched.key, returncode, capture.tail(FAILURE_TAIL))
                    elif key.data == "wake":
                        selector.unregister(wake_r)
                        woken = True
            if pipe_open:
                drain(capture, fd)
        except Exception:
            log.exception("processes: output reader of pid %d failed", proc.pid)
            if not exited:  # without the exit report the entry would hang forever
                self._on_exit(watched.key, proc.wait(), capture.tail(FAILURE_TAIL))
        finally:
            capture.flush()
            selector.close()
            out.close()
            os.close(pidfd)
            os.close(wake_r)
            self._logs.release(capture.applog)


def read_once(capture: OutputCapture, fd: int) -> bool | None:
    """One chunk from the pipe into the log.

    True when data was read, None when there is none right now (a
    non-blocking pipe), False at end of file.
    """
    try:
        data = os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None
    if not data:
        return False
    capture.feed(data)
    return True


def drain(capture: OutputCapture, fd: int) -> bool:
    """Read what the pipe holds right now without waiting; False at end of file.

    Reads at most the largest pipe buffer: enough for everything a dead
    leader wrote, and a chatty grandchild cannot keep us here forever.
    """
    os.set_blocking(fd, False)
    for _ in range(MAX_PIPE_BUFFER // READ_CHUNK):
        got = read_once(capture, fd)
        if got is not True:
            return got is None
    return True
