"""Per-app log files: app output with timestamps, rotated by size.

One ``AppLog`` exists per log file and is shared by every version of the app
that writes to it (old and new versions overlap during a deploy), so writes
are serialised by a lock and rotation happens in one place. Each running
process gets its own ``OutputCapture``, which cuts its byte stream into lines
and remembers the last few for crash reports.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from keter.names import LOG_LIMIT, log_text

log = logging.getLogger(__name__)

TAIL_LINES = 50
MAX_PARTIAL = 64 * 1024  # a "line" longer than this is written in pieces
TAIL_LINE_LIMIT = LOG_LIMIT  # characters of one quoted output line (then "... (N more ...)")
_TAIL_KEEP = 4 * TAIL_LINE_LIMIT + 4  # bytes kept of a line: enough for TAIL_LINE_LIMIT characters


def timestamp() -> bytes:
    """The ISO-8601 prefix put in front of every logged line."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").encode() + b" "


class AppLog:
    """An append-only log file rotated to ``path.1`` ... ``path.N`` when it exceeds ``max_bytes``.

    At most ``backups + 1`` files exist, each at most ``max_bytes`` long unless
    a single line is longer. Thread-safe.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path  # not a copy: keter holds one per app already (the spec's)
        self.max_bytes = max(1, max_bytes)
        self.backups = max(0, backups)
        self._lock = threading.Lock()
        self._closed = False  # by close(): no more writes
        self._failing = False  # the last write failed (and was said once)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: io.FileIO | None = None  # None after a reopen failed: retried at each write
        self._size = 0
        self._reopen("ab")

    def write_line(self, line: bytes) -> None:
        """Append one line (without its newline), prefixed with the current time."""
        self.write_lines([line], timestamp())

    def append(self, lines: list[bytes], stamp: bytes, who: str) -> None:
        """``write_lines`` for keter's readers, which must go on whatever the disk does: a
        failure is logged once, naming ``who``, until a write works again (said once too)."""
        try:
            self.write_lines(lines, stamp)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.error("%s: cannot write %s: %s", who, self.path, exc)
            return
        if self._failing:
            self._failing = False
            log.info("%s: writing %s again", who, self.path)

    def write_lines(self, lines: list[bytes], stamp: bytes) -> None:
        """Append lines that arrived together, each prefixed with ``stamp``. Raises
        OSError if they cannot be written (a full disk)."""
        with self._lock:
            if self._closed or not lines:
                return
            if self._file is None:  # a rotation could not make the new file: again now
                self._reopen("ab")
            # Stamped in one join, not line by line: an app printing short lines as fast
            # as it can ("yes") must not cost keter a Python loop per line.
            block = stamp + (b"\n" + stamp).join(lines) + b"\n"
            if self._size + len(block) <= self.max_bytes:
                self._write(block)
                return
            pending = bytearray()  # a rotation falls inside: line by line
            for line in lines:
                record = stamp + line + b"\n"
                if self._size + len(pending) > 0 and (
                    self._size + len(pending) + len(record) > self.max_bytes
                ):
                    self._write(pending)
                    pending.clear()
                    self._rotate()
                pending += record
            self._write(pending)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()

    def _reopen(self, mode: str) -> None:
        # Unbuffered: every batch is one write() that reaches the file at once,
        # so the log is current when an app dies and keter is killed. Never through a
        # link: keter writes as root what an app chose, wherever the link leads.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
        fd = os.open(self.path, flags, 0o644)
        self._file = open(fd, mode, buffering=0)  # noqa: SIM115 - lives as long as the log
        self._size = self._file.seek(0, os.SEEK_END)

    def _write(self, data: bytes | bytearray) -> None:
        if data:
            assert self._file is not None
            self._file.write(data)
            self._size += len(data)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None  # until the new file is open: a failed open is retried
        try:
            for n in range(self.backups - 1, 0, -1):
                older = self._backup(n)
                if older.exists():
                    os.replace(older, self._backup(n + 1))
            if self.backups:
                os.replace(self.path, self._backup(1))
        finally:
            # Reopen even if a rename failed, so logging goes on (and retries the rotation).
            self._reopen("ab" if self.backups else "wb")

    def _backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")


class LogRegistry:
    """Hands out one shared ``AppLog`` per path and closes it when its last user lets go."""

    def __init__(self, max_bytes: int, backups: int) -> None:
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        self._logs: dict[Path, tuple[AppLog, int]] = {}

    def acquire(self, path: Path) -> AppLog:
        with self._lock:
            applog, users = self._logs.get(path, (None, 0))
            if applog is None:
                applog = AppLog(path, self._max_bytes, self._backups)
            self._logs[path] = (applog, users + 1)
            return applog

    def release(self, applog: AppLog) -> None:
        with self._lock:
            _, users = self._logs[applog.path]
            if users > 1:
                self._logs[applog.path] = (applog, users - 1)
                return
            del self._logs[applog.path]
        applog.close()


class OutputCapture:
    """Splits one process's output into lines for its ``AppLog`` and keeps the last ones.

    ``feed`` is called by the output reader's thread; ``tail`` may be called
    from any thread. The tail is what keter quotes of an app (crash lines,
    failed deploys, history): each line comes out escaped and capped by
    ``log_text``, so an app cannot put control characters, escape sequences
    or line breaks into keter's own log, and no line is longer than a few
    hundred characters.
    """

    def __init__(self, app: str, applog: AppLog, *, tail_lines: int = TAIL_LINES) -> None:
        self.app = app
        self.applog = applog
        self._partial = b""
        # (the line's first bytes, how many more it had): decoded and escaped only
        # when asked for, since most output is never quoted.
        self._tail: collections.deque[tuple[bytes, int]] = collections.deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        """Log every complete line in ``data``; keep an unfinished last line for later."""
        # A line's "\r" before its "\n" goes (CRLF output); replaced in the whole chunk at
        # once. An unfinished line may end in the "\r" of a "\r\n" cut by the read.
        lines = (self._partial + data).replace(b"\r\n", b"\n").split(b"\n")
        self._partial = lines.pop()
        # A writer that never ends its line must not grow memory without bound.
        while len(self._partial) >= MAX_PARTIAL:
            lines.append(self._partial[:MAX_PARTIAL])
            self._partial = self._partial[MAX_PARTIAL:]
        self._emit(lines)

    def flush(self) -> None:
        """Log the unfinished last line, if any (the process has exited)."""
        if self._partial:
            line, self._partial = self._partial, b""
            self._emit([line.removesuffix(b"\r")])

    def tail(self, n: int = TAIL_LINES) -> tuple[str, ...]:
        """The last ``n`` lines the process printed, oldest first, escaped and capped."""
        with self._tail_lock:
            lines = tuple(self._tail)
        return tuple(_quoted(head, more) for head, more in (lines[-n:] if n > 0 else ()))

    def _emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        recent = [
            (line[:_TAIL_KEEP], max(0, len(line) - _TAIL_KEEP))
            for line in lines[-self._tail.maxlen :]
        ]
        with self._tail_lock:
            self._tail.extend(recent)
        # A full disk must not stop the reader: it also detects the exit.
        self.applog.append(lines, timestamp(), self.app)


def _quoted(head: bytes, more: int) -> str:
    """One kept output line as keter quotes it."""
    text = log_text(head.decode("utf-8", "replace"), TAIL_LINE_LIMIT)
    return f"{text} [{len(head) + more} bytes in all]" if more else text
