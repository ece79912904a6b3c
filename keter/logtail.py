"""Reading app logs: the last lines of a file, and following it across rotations.

``keter.processes.applog`` rotates ``app-NAME.log`` by renaming it to ``app-NAME.log.1``
and opening a fresh file under the old name. A follower therefore keeps its
descriptor on the old file until that is drained, then reopens the name.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

_BLOCK = 1 << 16
# How long a follower waits for inotify before checking the file anyway: a safety
# net for events lost to a full queue, not the normal way of noticing new lines.
RECHECK_SECONDS = 2.0
# How many looks at the rotated files a follower takes before it waits for the next change.
_LOOKS = 20


def tail_lines(path: Path, count: int, max_bytes: int | None = None) -> list[str]:
    """The last ``count`` lines of a text file (decoded leniently), oldest first.

    Reads backwards in blocks, so a large log costs only what is shown; with
    ``max_bytes``, never more than that (the first line may then be a line's end).
    Raises OSError (FileNotFoundError, PermissionError) like open().
    """
    with open(path, "rb") as f:
        f.seek(start_of_last_lines(f, count, max_bytes))
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line.decode("utf-8", "replace") for line in lines]


def start_of_last_lines(f: BinaryIO, count: int, max_bytes: int | None = None) -> int:
    """The offset in ``f`` where its last ``count`` lines begin (an unfinished one counts),
    or ``max_bytes`` before its end if they begin earlier.

    Each block is read and searched once, however long the lines (an app that
    writes no newline makes lines of 64 KiB).
    """
    end = f.seek(0, os.SEEK_END)
    if count <= 0:
        return end
    floor = 0 if max_bytes is None else max(0, end - max_bytes)
    position = end
    wanted = count  # line starts still to find, each the byte after a newline
    while position > floor:
        step = min(_BLOCK, position - floor)
        position -= step
        f.seek(position)
        block = f.read(step)
        # The newline that ends the file does not start a line; every one before it does.
        stop = len(block) - 1 if position + len(block) == end and block.endswith(b"\n") else None
        found = block.count(b"\n", 0, stop)
        if found >= wanted:
            cut = len(block) if stop is None else stop
            for _ in range(wanted):
                cut = block.rindex(b"\n", 0, cut)
            return position + cut + 1
        wanted -= found
    return floor


class _Wakeup(FileSystemEventHandler):
    def __init__(self, name: str, event: threading.Event) -> None:
        self.name = name
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(os.path.basename(str(p)).startswith(self.name) for p in paths if p):
            self.event.set()


class LogFollower:
    """Yields the last ``backlog`` lines of ``path``, then every line appended, across rotations.

    Use as a context manager; ``lines()`` runs until ``stop()`` is called (from
    any thread) and waits on inotify events in between, never on a timer alone.
    The backlog and the new lines come from one open file, so none is lost or
    shown twice.
    """

    def __init__(self, path: Path, backlog: int = 0) -> None:
        self.path = Path(path)
        self._changed = threading.Event()
        self._stopped = threading.Event()
        self._observer = Observer()
        self._observer.schedule(_Wakeup(self.path.name, self._changed), str(self.path.parent))
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._file.seek(start_of_last_lines(self._file, backlog))
        self._partial = b""

    def __enter__(self) -> LogFollower:
        self._observer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        self._stopped.set()
        self._changed.set()

    def close(self) -> None:
        self.stop()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join()
        self._file.close()

    def lines(self) -> Iterator[str]:
        while not self._stopped.is_set():
            # Cleared before reading, so a write during the read wakes the next wait.
            self._changed.clear()
            yield from self._read_available()
            if self._rotated():
                yield from self._read_available()  # what the old file got before the rename
                if self._partial:
                    yield self._partial.decode("utf-8", "replace")
                    self._partial = b""
                if self._reopen():
                    continue
                # A rotation is under way: its renames wake the wait below.
            self._changed.wait(RECHECK_SECONDS)
        if self._partial:
            yield self._partial.decode("utf-8", "replace")
            self._partial = b""

    def _read_available(self) -> Iterator[str]:
        while data := self._file.read(_BLOCK):
            parts = (self._partial + data).split(b"\n")
            self._partial = parts.pop()
            for line in parts:
                yield line.decode("utf-8", "replace")

    def _rotated(self) -> bool:
        """Whether the name now points to a different (or truncated) file."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False  # between the rename and the new file: keep reading the old one
        mine = os.fstat(self._file.fileno())
        return (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino) or (
            current.st_size < self._file.tell()
        )

    def _reopen(self) -> bool:
        """Go on with the file written after the current one; False if it cannot be told yet.

        Rotation renames ``path.1`` to ``path.2`` ... and ``path`` to ``path.1``, so a
        follower that fell behind by several rotations finds its file in that chain and
        reads every newer one in turn instead of skipping to ``path``.

        A look taken while a rotation renames files sees a gap (``path.1`` already
        renamed to ``path.2``, ``path`` not yet renamed to ``path.1``), no ``path``, or
        one file under two names. So every ``path.N`` counts, gap or not, and the chain
        is only trusted when two looks in a row agree and ``path`` exists. (A look that
        stopped at the first missing number once saw only ``path`` in that moment, and
        the follower skipped every file in between.)
        """
        chain = self._settled_chain()
        if chain is None:
            return False  # keep the old file; the rotation's renames wake us to look again
        mine = os.fstat(self._file.fileno())
        ids = [file_id for _, file_id in chain]
        me = (mine.st_dev, mine.st_ino)
        if me == ids[-1]:
            # Ours is still the current file, so it was truncated in place: start again.
            self._file.seek(0)
            return True
        # The next file; if ours is in the chain no more (it was the oldest backup and is
        # deleted), every file left is newer.
        path, expected = chain[ids.index(me) + 1 if me in ids else 0]
        try:
            new = open(path, "rb")  # noqa: SIM115 - replaces self._file
        except FileNotFoundError:
            return False
        found = os.fstat(new.fileno())
        if (found.st_dev, found.st_ino) != expected:
            new.close()  # renamed since the look: look again
            return False
        self._file.close()
        self._file = new
        return True

    def _settled_chain(self) -> list[tuple[Path, tuple[int, int]]] | None:
        """The log's files, oldest first, as two looks in a row saw them; None if they differ."""
        previous = self._chain()
        for _ in range(_LOOKS):
            current = self._chain()
            if current == previous and current and current[-1][0] == self.path:
                return current
            previous = current
        return None

    def _chain(self) -> list[tuple[Path, tuple[int, int]]]:
        """The log's files, oldest first: ``path.N`` ... ``path.1``, ``path`` as (path, file id).

        Every ``path.N`` in the folder counts, so a gap left by a rename under way (or by
        an operator who deleted one backup) does not hide the older ones.
        """
        numbered = []
        for name in os.listdir(self.path.parent):
            match = re.fullmatch(re.escape(self.path.name) + r"\.([0-9]+)", name)
            if match:
                numbered.append((int(match[1]), self.path.with_name(name)))
        candidates = [path for _, path in sorted(numbered, reverse=True)] + [self.path]
        found = []
        for path in candidates:
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue
            found.append((path, (info.st_dev, info.st_ino)))
        return found
