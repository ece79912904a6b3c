"""What other threads ask of a selector thread: a queue, and a pipe that wakes it.

The output reader and the health prober each run one thread that waits on a
selector. A ``queue.Queue`` cannot wake a ``select``; a pipe can, so a request
is appended to a deque (appends and pops are atomic) and a byte is written to
the pipe, whose read end sits in the thread's selector.
"""

from __future__ import annotations

import collections
import contextlib
import os


class Mailbox:
    """Items for a selector thread; ``fileno`` becomes readable when one is put."""

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def put(self, item: object) -> None:
        """From any thread. Once closed, nothing: the pipe's descriptor numbers may belong
        to another file by then."""
        if self._closed:
            return
        self._items.append(item)
        # A full pipe holds wake-ups already: the thread will look.
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"x")

    def take(self) -> list[object]:
        """In the selector's thread: every item put so far, oldest first."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        taken = []
        while self._items:
            taken.append(self._items.popleft())
        return taken

    def close(self) -> None:
        self._closed = True
        os.close(self._read)
        os.close(self._write)
