"""Crash-safe file replacement, and folders made safely."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path

# What atomic_write (and the archive's copy_hashed) write to before their rename:
# mkstemp's ".NAME." + 8 random characters + ".tmp".
_PARTIAL = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix.

    The bytes go to a temporary file in the same folder, are fsynced, then
    renamed over ``path``; the folder is fsynced so the rename survives a
    power cut. ``durable=False`` skips both fsyncs, for files that matter only
    while the machine stays up (the rename alone keeps readers from seeing a
    partial file). On any error (a full disk included) the old file is untouched
    and the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def make_folder(folder: Path, mode: int) -> os.stat_result:
    """Make ``folder`` (``mode``) unless there is one; what is there now (lstat).

    Raises NotADirectoryError when that is anything but a folder (a link to one
    included: whoever may write beside it could have put it there) and OSError."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, mode)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{folder} is not a folder")
    return info


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_writes(
    folder: Path, depth: int = 0, skip: frozenset[str] = frozenset(), quiet: float = 0.0
) -> int:
    """Remove the temporary files of atomic writes a killed keter left in ``folder`` and
    its subfolders down to ``depth`` levels (but those named in ``skip``, and those
    changed within ``quiet`` seconds); how many.

    Only keter writes there, and only one keter runs per ROOT: at its start none of
    them is being written. Only folders keter's own user owns are entered, each
    through a descriptor opened without following links, and no deeper than where
    keter writes: an app's /tmp (under run/) or an uploader's folder in incoming/
    may be a tree deep enough to end a recursive walk, and a folder on the way
    swapped for a link had root delete files elsewhere.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0  # not there (yet), or a link: nothing of keter's
    try:
        return _remove_partial_in(fd, depth, skip, time.time() - quiet)
    finally:
        os.close(fd)


def _remove_partial_in(fd: int, depth: int, skip: frozenset[str], before: float) -> int:
    removed = 0
    with os.scandir(fd) as entries:
        listed = list(entries)
    for entry in listed:
        with contextlib.suppress(OSError):  # gone meanwhile, or unreadable: left
            info = entry.stat(follow_symlinks=False)
            partial = stat.S_ISREG(info.st_mode) and _PARTIAL.fullmatch(entry.name)
            if partial and info.st_mtime < before:
                os.unlink(entry.name, dir_fd=fd)
                removed += 1
            elif stat.S_ISDIR(info.st_mode) and depth > 0 and entry.name not in skip:
                if info.st_uid != os.geteuid():
                    continue  # not keter's: an app's or an uploader's
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                child = os.open(entry.name, flags, dir_fd=fd)
                try:
                    removed += _remove_partial_in(child, depth - 1, frozenset(), before)
                finally:
                    os.close(child)
    return removed
