"""nginx's error log, read for the lines that say why nginx refused a reload.

nginx checks a config (``nginx -t``) without binding its ports or opening
every file; a reload can still fail, and nginx then logs an ``[emerg]`` line
and keeps the config it runs. The writer watches for such a line while it
waits for nginx to serve a new generation, so a refused reload fails the
deploy at once and says why.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from keter import names

# nginx's own level field, right after its timestamp: "2026/12/01 12:00:00 [emerg] 7#7: ".
# "[emerg]" elsewhere in a line is a client's text that nginx quotes (the request line
# of a failed request), which must not pass for nginx refusing a reload.
_EMERG = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[emerg\] \d+#\d+: ")


class ErrorLog:
    """nginx's error log from the moment this is made: the ``[emerg]`` lines nginx
    writes when it refuses a reload (a listen port taken, a file it cannot open).

    Read as keter's other inputs are: without blocking (a FIFO named as the log
    cannot hang the writer), regular files only, at most ``READ_LIMIT`` bytes at a
    time. Each complete line is read once: the writer asks every few ms. A log
    rotated meanwhile (another file, or the same one cut shorter: logrotate's
    copytruncate) is read from its start: nginx's line may be the first of it.
    """

    READ_LIMIT = 1 << 20

    MARK = 64  # bytes just before the offset that must still be there (not truncated)

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file, self.offset = self._where()  # the file, and its first byte not read yet
        self._mark = b""  # the MARK bytes before the offset, as they were
        if self.offset:
            fd = self._open()
            if fd is not None:
                with os.fdopen(fd, "rb") as f:
                    self._mark = _before(f, self.offset)
        self._emerg: str | None = None

    def refused(self) -> bool:
        """Whether nginx logged an ``[emerg]`` line since."""
        return self.last_emerg() is not None

    def last_emerg(self) -> str | None:
        """The last ``[emerg]`` line nginx logged since (escaped for a log line), or None."""
        if self.path is None:
            return self._emerg
        file, size = self._where()
        if file != self._file or size < self.offset:  # rotated since
            self._file, self.offset = file, 0
        if size > self.offset:
            self._read_new_lines()
        return self._emerg

    def _open(self) -> int | None:
        assert self.path is not None
        try:
            return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None

    def _read_new_lines(self) -> None:
        fd = self._open()
        if fd is None:
            return
        with os.fdopen(fd, "rb") as f:
            try:
                # Other bytes before the offset: the log was cut and written again past
                # where reading had got to (copytruncate). Read it from its start.
                if _before(f, self.offset) != self._mark:
                    self.offset = 0
                f.seek(self.offset)
                data = f.read(self.READ_LIMIT)
            except OSError:
                return
            complete = data[: data.rfind(b"\n") + 1]  # a line nginx is still writing: later
            if not complete and len(data) >= self.READ_LIMIT:
                complete = data  # no line is that long (nginx cuts its own at 2 KiB): skipped
            self.offset += len(complete)
            self._mark = _before(f, self.offset)
        text = complete.decode(errors="replace")
        lines = [line for line in text.splitlines() if _EMERG.match(line)]
        if lines:
            self._emerg = names.log_text(lines[-1].strip(), 1000)

    def _where(self) -> tuple[tuple[int, int] | None, int]:
        """The log's identity (device, inode) and size if it is a regular file (else
        None and 0: nothing to read)."""
        if self.path is None:
            return None, 0
        try:
            info = self.path.stat()
        except OSError:
            return None, 0
        if not stat.S_ISREG(info.st_mode):
            return None, 0
        return (info.st_dev, info.st_ino), info.st_size


def _before(f: BinaryIO, offset: int) -> bytes:
    """The ``ErrorLog.MARK`` bytes of ``f`` before ``offset`` (none at 0)."""
    size = min(ErrorLog.MARK, offset)
    try:
        return os.pread(f.fileno(), size, offset - size) if size else b""
    except OSError:
        return b""
