"""Served bundles kept for rollback, and copying a bundle into incoming/ safely.

``ROOT/archive/APP/SHA256.keter`` holds the last few versions of each app
that reached serving; the file's mtime is when that version last started
serving, so "newest first" needs no index. Every copy is hashed as it is
written and checked against the version's sha256, so the archive only ever
holds exactly the bytes that were deployed.

Archiving is on every deploy's way to "serving", so ``store`` does not wait for
the disk: the copy is renamed into place unsynced (visible, and checked, at
once) and ``sync`` makes the copies made since durable in one go, shortly
after (the status component's timer). A copy a power cut damaged before that
is caught by its size when the version is archived again, and by its sha256
when it is restored.

Bundles land in incoming/ the way careful users copy them: under a name
starting with "." (which the watcher ignores), then renamed over
``APP.keter`` in one step, so the watcher never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from keter.config import KeterConfig
from keter.fsutil import fsync_dir
from keter.incoming.files import NotABundleFile, open_regular
from keter.incoming.unpack import bundle_limit

SUFFIX = ".keter"
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_version(text: str) -> bool:
    """Whether ``text`` can name a version: a prefix of its sha256, 4 to 64 hex digits."""
    return re.fullmatch(r"[0-9a-fA-F]{4,64}", text) is not None


class ArchiveError(Exception):
    """An archive operation was refused; ``str()`` is the reason."""


class HashMismatch(ArchiveError):
    """The bytes copied are not the version they were meant to be."""


@dataclass(frozen=True, slots=True)
class ArchivedBundle:
    sha256: str
    path: Path
    served_at: float  # when this version last started serving (the file's mtime)

    @property
    def version(self) -> str:
        return self.sha256[:12]


def copy_hashed(
    source: BinaryIO,
    folder: Path,
    name: str,
    *,
    mode: int = 0o644,
    expected: str | None = None,
    durable: bool = True,
    unless: Callable[[], str | None] = lambda: None,
    max_bytes: int | None = None,
) -> str:
    """Copy ``source`` to ``folder/name`` atomically; return the sha256 of what was written.

    The data goes to a hidden temporary file in the same folder, is fsynced
    (unless not ``durable``: the caller syncs later), and is renamed over
    ``name`` only when complete, and only if its sha256 is ``expected`` (when
    given; else HashMismatch is raised and nothing changes), and only if
    ``unless()``, asked last, gives no reason not to (else ArchiveError(reason)).
    A source longer than ``max_bytes`` is ArchiveError as soon as the copy passes it.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        digest = _write_hashed(source, fd, mode, durable, max_bytes)
        if expected is not None and digest != expected:
            raise HashMismatch(f"got sha256 {digest[:12]}, expected {expected[:12]}")
        if reason := unless():
            raise ArchiveError(reason)
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(folder)
    return digest


def _write_hashed(
    source: BinaryIO, fd: int, mode: int, durable: bool = True, max_bytes: int | None = None
) -> str:
    digest = hashlib.sha256()
    copied = 0
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)
        while chunk := source.read(_CHUNK):
            copied += len(chunk)
            if max_bytes is not None and copied > max_bytes:
                raise ArchiveError(f"more than {max_bytes} bytes to copy")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        if durable:
            os.fsync(out.fileno())
    return digest.hexdigest()


def install_bundle(source: BinaryIO, incoming: Path, app: str) -> str:
    """Put a bundle into incoming/ as ``APP.keter`` in one rename; returns its sha256."""
    return copy_hashed(source, incoming, app + SUFFIX)


class BundleArchive:
    """``ROOT/archive``: per app, the last ``keep`` versions that were served.

    ``limit`` is the largest bundle keter unpacks (``unpack.bundle_limit``): a file in
    incoming/ larger than that is no version that was deployed, and is not copied.
    """

    def __init__(
        self,
        folder: Path,
        keep: int,
        limit: int = bundle_limit(KeterConfig.max_unpacked_bytes, KeterConfig.max_members),
    ) -> None:
        self.folder = Path(folder)
        self.keep = max(1, keep)
        self.limit = limit
        self._unsynced: set[Path] = set()  # copies made since the last sync

    def store(self, app: str, bundle: Path, sha256: str, served_at: float) -> ArchivedBundle:
        """Archive the version ``sha256`` of ``app`` from ``bundle``, then drop the oldest.

        Raises ArchiveError when ``bundle`` no longer holds that version (it was
        replaced after the deploy read it) or cannot be read.
        """
        if not _SHA256.fullmatch(sha256):
            raise ArchiveError(f"no valid sha256 for this version ({sha256!r})")
        folder = self.folder / app
        target = folder / f"{sha256}{SUFFIX}"
        if not self._whole(target, bundle):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.folder, 0o700)  # bundles may hold secrets in their config
            try:
                fd, st = open_regular(bundle)  # never a FIFO's wait, never a link's target
                with os.fdopen(fd, "rb") as source:
                    # Replaced since its deploy by a file no deploy reads (a hole of
                    # terabytes costs no disk in incoming/ but would here): not read.
                    if st.st_size > self.limit:
                        raise ArchiveError(
                            f"{bundle.name} is {st.st_size} bytes now, larger than any "
                            "bundle keter unpacks"
                        )
                    copy_hashed(
                        source,
                        folder,
                        target.name,
                        mode=0o600,
                        expected=sha256,
                        durable=False,
                        max_bytes=self.limit,
                    )
                self._unsynced.add(target)
            except FileNotFoundError:
                raise ArchiveError(f"{bundle.name} is no longer in incoming/") from None
            except NotABundleFile as exc:
                raise ArchiveError(f"{bundle.name} is no bundle now: {exc}") from None
            except HashMismatch:
                raise ArchiveError(
                    f"{bundle.name} has changed since version {sha256[:12]} was deployed"
                ) from None
        os.utime(target, (served_at, served_at))
        self._prune(app)
        return ArchivedBundle(sha256, target, served_at)

    def sync(self) -> None:
        """Make the copies ``store`` made since the last call durable (their data, then
        their folders' entries): one batch for many deploys, off their way."""
        folders = set()
        for path in sorted(self._unsynced):
            with contextlib.suppress(FileNotFoundError):  # pruned since: nothing to keep
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                folders.add(path.parent)
        self._unsynced.clear()
        for folder in sorted(folders):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)

    @staticmethod
    def _whole(target: Path, bundle: Path) -> bool:
        """Whether ``target`` already holds the version: it exists with the bundle's size
        (a copy a power cut left empty or short is made again)."""
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            return False
        try:
            return size == bundle.lstat().st_size
        except FileNotFoundError:
            return True  # nothing to copy from anyway; what is there stays

    def versions(self, app: str) -> list[ArchivedBundle]:
        """The app's archived versions, the one served most recently first."""
        found = []
        try:
            entries = list(os.scandir(self.folder / app))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            sha256 = entry.name.removesuffix(SUFFIX)
            if entry.name.endswith(SUFFIX) and _SHA256.fullmatch(sha256):
                with contextlib.suppress(FileNotFoundError):
                    found.append(ArchivedBundle(sha256, Path(entry.path), entry.stat().st_mtime))
        return sorted(found, key=lambda b: b.served_at, reverse=True)

    def find(self, app: str, version: str) -> ArchivedBundle:
        """The archived version whose sha256 starts with ``version``; raises ArchiveError."""
        wanted = version.lower()
        if not is_version(wanted):
            raise ArchiveError(f"{version!r} is not a version (4 to 64 hex digits)")
        versions = self.versions(app)
        matches = [b for b in versions if b.sha256.startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ArchiveError(f"version {version} is ambiguous; give more digits")
        shown = ", ".join(b.version for b in versions) or "none"
        raise ArchiveError(f"version {version} of {app} is not archived (archived: {shown})")

    def restore(
        self,
        app: str,
        archived: ArchivedBundle,
        incoming: Path,
        unless: Callable[[], str | None] = lambda: None,
    ) -> None:
        """Copy an archived bundle into incoming/ as ``APP.keter``, checking its bytes
        (and ``unless``, as ``copy_hashed`` does)."""
        try:
            source = open(archived.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ArchiveError(
                f"version {archived.version} was just removed from the archive"
            ) from None
        with source:
            try:
                copy_hashed(source, incoming, app + SUFFIX, expected=archived.sha256, unless=unless)
            except HashMismatch:
                raise ArchiveError(f"archived version {archived.version} is damaged") from None

    @staticmethod
    def check(archived: ArchivedBundle) -> None:
        """Whether the archived bundle still holds its version's bytes: raises
        ArchiveError (what ``restore`` would find) before anything depends on it."""
        try:
            with open(archived.path, "rb") as source:
                digest = hashlib.file_digest(source, "sha256")
        except FileNotFoundError:
            raise ArchiveError(
                f"version {archived.version} was just removed from the archive"
            ) from None
        if digest.hexdigest() != archived.sha256:
            raise ArchiveError(f"archived version {archived.version} is damaged")

    def _prune(self, app: str) -> None:
        for old in self.versions(app)[self.keep :]:
            with contextlib.suppress(FileNotFoundError):
                old.path.unlink()
