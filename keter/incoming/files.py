"""What a file in incoming/ must be before keter reads a byte of it.

keter runs as root and anyone who can write to incoming/ chooses what lies
there, so a name ending in ``.keter`` proves nothing. Only a regular file is a
bundle:

* a FIFO would block the reader forever (opening it waits for a writer,
  reading it waits for data), a socket cannot be opened at all and a device
  may do anything when opened or read;
* a symbolic link is never followed, wherever it points: root would read
  whatever it names (``/etc/shadow``, ``/dev/zero``, a link to itself), and
  checking where a link leads before opening it is a race the link's owner
  can win. A bundle is copied or renamed into incoming/, never linked.

A hard link is no link to follow but the file itself under a second name, and
the kernel's ``fs.protected_hardlinks`` (on by default) lets nobody make one to
a file they could not read and write already.

``look`` (an ``lstat``, which follows nothing) tells the watcher what a name
is; ``open_regular`` is the only way keter opens a bundle: non-blocking, never
following a link, and checked again on the open descriptor, so a file swapped
for a FIFO or a link between the look and the open is refused all the same.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# What each kind of non-regular entry is called in a refusal.
_KINDS = {
    stat.S_IFLNK: "a symbolic link (keter never follows links in incoming/; copy or rename "
    "the bundle in)",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class NotABundleFile(Exception):
    """The name exists but is not a regular file; ``str()`` says what it is."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Stamp:
    """What identifies one version of an entry in incoming/ (of any kind)."""

    kind: int  # stat.S_IFMT of the mode: S_IFREG for a possible bundle
    ino: int
    size: int
    mtime_ns: int
    # When anything last changed it: not part of its identity (a chmod is no new version).
    ctime_ns: int = field(compare=False)

    @classmethod
    def of_stat(cls, st: os.stat_result) -> Stamp:
        return cls(
            kind=stat.S_IFMT(st.st_mode),
            ino=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    @property
    def regular(self) -> bool:
        return self.kind == stat.S_IFREG

    def refusal(self) -> str | None:
        """Why an entry of this kind cannot be a bundle, or None for a regular file."""
        if self.regular:
            return None
        return "it is " + _KINDS.get(self.kind, f"not a regular file (type {self.kind:o})")


def look(path: Path) -> Stamp | None:
    """The entry ``path`` names, without following a link; None if there is none."""
    try:
        return Stamp.of_stat(os.lstat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if, and only if, it is a regular file; (fd, its fstat).

    Never blocks and never follows a link. Raises ``NotABundleFile`` for
    anything else and ``OSError`` for the usual reasons (missing, no access).
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise NotABundleFile("it is " + _KINDS[stat.S_IFLNK]) from None
        if exc.errno == errno.ENXIO:  # a socket (or a FIFO without a writer, on some systems)
            raise NotABundleFile("it is not a regular file (a socket)") from None
        raise
    try:
        st = os.fstat(fd)
        reason = Stamp.of_stat(st).refusal()
        if reason is not None:
            raise NotABundleFile(reason)
        os.set_blocking(fd, True)  # a regular file: reads never wait anyway
    except BaseException:
        os.close(fd)
        raise
    return fd, st
