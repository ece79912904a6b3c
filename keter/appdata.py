"""What an app keeps between versions: its user and its data folder, ``ROOT/data/APP``.

Every version of an app is unpacked into a fresh folder that is deleted when
the version retires, so an app has nowhere else to keep files. ``ROOT/data/APP``
is its place: made before its first process starts (by the process monitor,
at the spawn, see ``keter.processes.spawn``), owned by the app's user, mode
0700, passed as ``KETER_DATA_DIR``. Nothing in keter deletes it: not a new
version, a restart, a keter upgrade, nor the removal of the bundle. Only
``keter data purge APP`` does (``purge_data_dir``), at any depth, and it also
finishes what an earlier purge of the app renamed away but could not delete.

``ROOT/data`` itself is root's, mode 0711: an app can reach its own folder by
name but cannot list the others, and cannot replace its folder with a link.

``app_user`` is the one place that names the OS user an app's processes,
release command and database tools run as; None means the app's own uid
(``keter.users``, issue 11) where keter allocates them, else keter's own.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keter.config import KeterConfig
from keter.fsutil import make_folder

log = logging.getLogger(__name__)

DATA_MODE = 0o700
PARENT_MODE = 0o711
MAX_DEPTH = 4096  # levels of folders a handover walks (each holds a descriptor meanwhile)


def app_user(config: KeterConfig, app: str) -> str | None:
    """The named OS user ``app`` runs as: the global ``setuid`` (one user for all apps).

    None: the app's own uid from ``keter.users`` when the process monitor and
    the backups component are given one (issue 11), else keter's own user.
    """
    return config.setuid


def data_dir(config: KeterConfig, app: str) -> Path:
    """``ROOT/data/APP``: the app name is checked by the bundle's grammar already."""
    return config.data_dir / app


def prepare_data_dir(folder: Path, uid: int, gid: int) -> None:
    """Make ``folder`` exist as a folder owned by ``uid:gid`` with mode 0700.

    The parent (``ROOT/data``) is made root's with mode 0711. A folder that
    exists with another owner (``setuid`` changed, or issue 11's per-app users
    arrived) is given to the new owner, contents included; links are never
    followed, and a file with several hard links is left alone (it may be a
    link to a file outside the folder) with a warning. Raises OSError.
    """
    parent = folder.parent
    parent.mkdir(mode=PARENT_MODE, parents=True, exist_ok=True)
    info = os.lstat(parent)
    if stat.S_IMODE(info.st_mode) != PARENT_MODE or info.st_uid != os.getuid():
        os.chown(parent, os.getuid(), os.getgid(), follow_symlinks=False)
        os.chmod(parent, PARENT_MODE)
    info = make_folder(folder, DATA_MODE)
    if (info.st_uid, info.st_gid) != (uid, gid):
        _give(folder, uid, gid)
    if stat.S_IMODE(info.st_mode) != DATA_MODE:
        os.chmod(folder, DATA_MODE)


def _give(folder: Path, uid: int, gid: int) -> None:
    """chown -R without following links or touching multiply-linked files."""
    os.chown(folder, uid, gid, follow_symlinks=False)
    for level, entry in _walk(folder):
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
            log.warning(
                "keter: %s/%s has several hard links; its owner is kept", level.path, entry.name
            )
            continue
        os.chown(entry.name, uid, gid, dir_fd=level.fd, follow_symlinks=False)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Level:
    """One folder on the walk's current path: its path, descriptor and entries left."""

    path: str
    fd: int
    left: Iterator[os.DirEntry]

    @classmethod
    def open(cls, path: str, name: str | Path, parent_fd: int | None = None) -> _Level:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            with os.scandir(fd) as listing:
                return cls(path, fd, iter(list(listing)))
        except BaseException:
            os.close(fd)
            raise


def _walk(folder: Path) -> Iterator[tuple[_Level, os.DirEntry]]:
    """(level, entry) for everything under ``folder``, a folder before its contents.
    Links are not followed.

    Iterative, a descriptor open per level of the current path only: an app may nest
    its folders deeper than Python recursion goes (os.fwalk and shutil.rmtree recurse
    and raise RecursionError), and deeper than ``MAX_DEPTH`` is refused (OSError).
    """
    stack = [_Level.open(str(folder), folder)]
    try:
        while stack:
            level = stack[-1]
            entry = next(level.left, None)
            if entry is None:
                stack.pop()
                os.close(level.fd)
                continue
            yield level, entry
            if entry.is_dir(follow_symlinks=False):
                if len(stack) >= MAX_DEPTH:
                    raise OSError(f"{level.path}: folders nested deeper than {MAX_DEPTH}")
                stack.append(_Level.open(f"{level.path}/{entry.name}", entry.name, level.fd))
    finally:
        for level in stack:
            os.close(level.fd)


def remove_tree(folder: Path) -> None:
    """rm -rf ``folder`` without following links, however deep, one descriptor open.

    An app may nest its folders as deep as the file system lets it, and what it left
    must go with a purge whatever its shape: no depth bound here (``MAX_DEPTH`` bounds
    the handover, whose walk keeps a descriptor per level). Down is by name from the
    folder's descriptor (``O_NOFOLLOW``); up is by ".." checked against the identity
    of the folder it came from, so a tree moved meanwhile is refused, never followed.
    Per level only its name, its parent's identity and the parent's entries still to
    remove are kept (each folder is listed once: a wide one is not read again).
    """
    fd = os.open(folder, _DIR_FLAGS)
    # For each folder entered below ``folder``: its name, its parent's identity and the
    # parent's entries left.
    above: list[tuple[str, tuple[int, int], Iterator[os.DirEntry]]] = []
    try:
        left = _entries(fd)
        while True:
            entry = next(left, None)
            if entry is None:
                if not above:
                    break
                name, parent, left = above.pop()
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = up
                if _identity(fd) != parent:
                    raise OSError(f"{folder}: a folder in it was moved while it was deleted")
                os.rmdir(name, dir_fd=fd)
            elif entry.is_dir(follow_symlinks=False):
                here = _identity(fd)
                inner = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
                above.append((entry.name, here, left))
                left = _entries(fd)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(folder)


def _entries(fd: int) -> Iterator[os.DirEntry]:
    with os.scandir(fd) as listing:
        return iter(list(listing))


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def purge_data_dir(folder: Path) -> bool:
    """Delete ``folder`` and everything in it; False if there was none.

    It is renamed away first, so a version that starts meanwhile gets a fresh
    empty folder rather than one being deleted under it. What an earlier purge of
    the app renamed away and could not delete (it failed midway, keter was killed)
    goes too: no command reaches it otherwise.
    """
    found = False
    for victim in (folder, *_purged_before(folder)):
        doomed = folder.with_name(f".purged-{folder.name}-{secrets.token_hex(4)}")
        try:
            os.rename(victim, doomed)  # a purge running at once takes each one only once
        except FileNotFoundError:
            continue
        found = True
        remove_tree(doomed)  # links inside are removed, never followed
    return found


def _purged_before(folder: Path) -> list[Path]:
    """The app's folders an earlier purge renamed away (not another app's: APP-b of app
    APP-b is not APP's, the random part being exactly 8 hex digits)."""
    pattern = re.compile(rf"\.purged-{re.escape(folder.name)}-[0-9a-f]{{8}}")
    try:
        names = os.listdir(folder.parent)
    except FileNotFoundError:
        return []
    return [folder.with_name(name) for name in sorted(names) if pattern.fullmatch(name)]
