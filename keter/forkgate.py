"""Spawning must not overlap with writing an executable ("Text file busy").

Between fork and exec, a child holds a copy of every file descriptor of
keter, including one the unpacker has open for writing an app's ``bin/app``.
If that app is exec'd while any such child still holds the copy, its exec
fails with ETXTBSY ("Text file busy"; Go guards the same race with its
``syscall.ForkLock``). Seen with 1000 bundles dropped at once: a few apps
failed to start.

The gate: spawns pass it together (``spawning``), writing a file that may be
executed takes it alone (``writing_executable``), so no child can be between
fork and exec while such a file is open for writing. Only executables wait:
other files are written freely.

keter's own unpacking now runs in its worker process (``keter.incoming.worker``),
where nothing forks, so there the gate is never contended; it keeps
``safe_unpack`` safe wherever else it runs beside spawns (the tests, the bench).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ForkGate:
    """A shared/exclusive lock: many spawns at once, or one writer of executables."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spawns = 0
        self._writing = False

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        with self._lock:
            self._lock.wait_for(lambda: not self._writing)
            self._spawns += 1
        try:
            yield
        finally:
            with self._lock:
                self._spawns -= 1
                self._lock.notify_all()

    @contextlib.contextmanager
    def writing_executable(self) -> Iterator[None]:
        with self._lock:
            self._lock.wait_for(lambda: not self._writing)  # one writer at a time
            # Writers go first: new spawns wait while one is waiting or writing.
            self._writing = True
            self._lock.wait_for(lambda: self._spawns == 0)
        try:
            yield
        finally:
            with self._lock:
                self._writing = False
                self._lock.notify_all()


FORK_GATE = ForkGate()
