"""Reading nginx's access spool, ``ROOT/run/access.spool``, and giving its space back.

nginx appends records (buffered, at least once a second) to this one file;
keter reads what is new from where it stopped and then punches a hole over
what it has read (``fallocate(PUNCH_HOLE)``): the file's length only grows,
but the disk holds only what keter has not read yet. The file is never
truncated or renamed under nginx, so no record is ever lost to a race. When
keter starts again it resumes at the first byte it had not read: everything
before is a hole or zeros. (On a file system without holes, ext4, xfs, btrfs
and tmpfs all have them, the spool keeps its read records; one line says so.)
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time
PUNCH_EVERY = 1 << 20  # read bytes given back at a time
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


SPOOL_NAME = "access.spool"


def spool_path(root: Path) -> Path:
    """Where nginx logs the requests of ``keter ROOT``'s apps."""
    return Path(root) / "run" / SPOOL_NAME


def create(path: Path) -> None:
    """Make the spool if it is missing: root's only (it holds every app's requests)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class Spool:
    """The reading end of the spool: ``read_lines`` returns each complete new line once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Read and write: giving space back (fallocate) needs a writable descriptor.
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.position = self._resume()
        self._punched = self.position  # everything before this is a hole already
        self._holes = True
        # The spool made again after it was removed by hand: nginx writes to it from its
        # next reload, and the old one is read until then (``follow``).
        self._next: int | None = None
        self._old_size = -1  # the old one's length at the last look, while _next waits

    def read_lines(self, limit: int = CHUNK) -> list[bytes]:
        """The complete lines written since the last call (at most about ``limit`` bytes)."""
        data = os.pread(self._fd, limit, self.position)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= limit:  # one line longer than the chunk: not nginx's; skipped
                self.position += len(data)
            return []
        self.position += end + 1
        lines = data[:end].split(b"\n")
        if self.position - self._punched >= PUNCH_EVERY:
            self._punch()
        return lines

    def follow(self) -> str | None:
        """Keep reading the spool nginx writes, should it be cut short or removed by hand
        (its length only grows: it invites a clean-up); what changed, for a log line.
        Called about once a second.

        Cut short (``: > access.spool``), it is read from its first record again: keter
        had waited for the length it knew, weeks of records. Removed or replaced, it is
        made again at once, root's only (nginx would make it readable by every local
        user, and it holds every app's requests); nginx goes on writing to the one it
        has open until its next reload, and that one is read (and its space given
        back) until nginx writes to the new one and the old has stopped growing.
        """
        held = os.fstat(self._fd)
        if held.st_size < self.position:
            self.position = self._punched = self._resume()
            return f"{self.path} was cut short; read again from its first record"
        if self._next is not None:
            self._switch_when_nginx_has(held.st_size)
            return None
        try:
            there = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
            return None
        create(self.path)  # refuses a link planted there (O_NOFOLLOW)
        self._next = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        return (
            f"{self.path} was removed or replaced; made again, root's only: nginx writes "
            "to it from its next reload, and the one it writes to now is read until then"
        )

    def _switch_when_nginx_has(self, old_size: int) -> None:
        """Read the new spool once nginx writes to it and the old one, read to its end,
        has not grown since the last look (old workers flush their last records there)."""
        assert self._next is not None
        quiet = old_size == self._old_size and self.position >= old_size
        self._old_size = old_size
        if not quiet or os.fstat(self._next).st_size == 0:
            return
        self._punch()
        os.close(self._fd)
        self._fd, self._next, self._old_size = self._next, None, -1
        self.position = self._punched = self._resume()

    def pending(self) -> int:
        """Bytes written but not read yet."""
        return max(0, os.fstat(self._fd).st_size - self.position)

    def close(self) -> None:
        self._punch()
        os.close(self._fd)
        if self._next is not None:
            os.close(self._next)

    def _resume(self) -> int:
        """Where reading starts: the first byte not read before.

        Read bytes are holes, and read parts of a block that could not be
        freed are zeros; a record never holds a NUL byte (nginx escapes
        every byte below 32), so the first byte that is not NUL is new.
        """
        size = os.fstat(self._fd).st_size
        try:
            position = os.lseek(self._fd, 0, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but holes (or empty): all read
                return size
            raise
        while position < size:
            block = os.pread(self._fd, CHUNK, position)
            if not block:
                break
            stripped = block.lstrip(b"\0")
            position += len(block) - len(stripped)
            if stripped:
                return position
        return size

    def _punch(self) -> None:
        if not self._holes or self.position <= self._punched:
            return
        length = self.position - self._punched
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, self._punched, length) != 0:
            error = ctypes.get_errno()
            self._holes = False
            log.warning(
                "keter: cannot give back the space of %s (%s); it grows until keter restarts",
                self.path,
                os.strerror(error),
            )
            return
        self._punched = self.position
