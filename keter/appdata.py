"""What an app keeps between versions: its user and its data folder, ``ROOT/data/APP``.

Every version of an app is unpacked into a fresh folder that is deleted when
the version retires, so an app has nowhere else to keep files. ``ROOT/data/APP``
is its place: made before its first process starts (by the process monitor,
at the spawn, see ``keter.processes.spawn``), owned by the app's user, mode
0700, passed as ``KETER_DATA_DIR``. Nothing in keter deletes it: not a new
version, a restart, a keter upgrade, nor the removal of the bundle. Only
``keter data purge APP`` does (``purge_data_dir``).

``ROOT/data`` itself is root's, mode 0711: an app can reach its own folder by
name but cannot list the others, and cannot replace its folder with a link.

``app_user`` is the one place that names the OS user an app's processes,
release command and database tools run as; None means the app's own uid
(``keter.users``, issue 11) where keter allocates them, else keter's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from keter.config import KeterConfig

log = logging.getLogger(__name__)

DATA_MODE = 0o700
PARENT_MODE = 0o711
MAX_DEPTH = 4096  # levels of folders keter walks (each holds a descriptor meanwhile)


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
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, DATA_MODE)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{folder} is not a folder")
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


def _walk(
    folder: Path, leave: Callable[[_Level, _Level | None], None] | None = None
) -> Iterator[tuple[_Level, os.DirEntry]]:
    """(level, entry) for everything under ``folder``, a folder before its contents;
    ``leave(level, parent)`` once a folder's contents are done. Links are not followed.

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
                try:
                    if leave is not None:
                        leave(level, stack[-1] if stack else None)
                finally:
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


def _remove_tree(folder: Path) -> None:
    """rm -rf ``folder`` without following links (iteratively, see ``_walk``)."""

    def remove_folder(level: _Level, parent: _Level | None) -> None:
        if parent is not None:
            os.rmdir(os.path.basename(level.path), dir_fd=parent.fd)

    for level, entry in _walk(folder, leave=remove_folder):
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.name, dir_fd=level.fd)
    os.rmdir(folder)


def purge_data_dir(folder: Path) -> bool:
    """Delete ``folder`` and everything in it; False if there was none.

    It is renamed away first, so a version that starts meanwhile gets a fresh
    empty folder rather than one being deleted under it.
    """
    doomed = folder.with_name(f".purged-{folder.name}-{secrets.token_hex(4)}")
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:
        return False
    _remove_tree(doomed)  # links inside are removed, never followed
    return True
