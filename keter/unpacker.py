"""Unpacking bundles safely, and the actor that does it for the supervisor.

A bundle is untrusted input: anyone who can drop a file into incoming/ must not
be able to write outside the bundle's folder, create device nodes or setuid
programs, or fill the disk. ``safe_unpack`` therefore checks every member before
writing it and counts what it writes against hard caps.

The archive is read once, as a stream (``tarfile`` mode ``"r|"``), from a file
descriptor opened once. A bundle replaced by a rename while being read keeps
being read whole from the old file; one rewritten in place (scp of a newer
version) fails the gzip CRC check, so two versions are never mixed.

Decompression is ours rather than tarfile's ``"r|gz"`` because tarfile's stream
mode never checks the gzip trailer (CRC and length) and takes a cut-off stream
or a corrupt header for the end of the archive, which would deploy half an app
without a word.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from keter.actor import Actor
from keter.bundle import BundleConfigError, parse_bundle_config
from keter.messages import (
    BundleUnpacked,
    FailureKind,
    RemoveFolder,
    UnpackBundle,
    UnpackFailed,
)
from keter.processes.forkgate import FORK_GATE

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20  # bytes per read when copying a member's data
_INPUT_CHUNK = 1 << 16  # compressed bytes fed to zlib at a time
# Upper bound on what one zlib call may produce: keeps a gzip bomb's memory use
# flat (deflate expands up to ~1000x, so 64 KiB of input could become 64 MiB).
_OUTPUT_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer, not raw deflate

# The tar stream may exceed the file bytes by headers and padding. pax headers
# for long names make a member cost up to a few KiB; this is generous for that
# and still bounds the work a hostile stream can cause.
_OVERHEAD_PER_MEMBER = 8192
_OVERHEAD_FIXED = 1 << 20

# pax and GNU long-name headers are read whole into memory by tarfile, so their
# declared size is checked before tarfile reads them.
_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
_MAX_META_BYTES = 1 << 20

# shutil.rmtree recurses once per folder level, so a deeper tree could not be
# removed again (RecursionError); real apps nest far less.
MAX_DEPTH = 128

_KINDS = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


class UnpackError(Exception):
    """A bundle was refused; ``str()`` is one clear reason."""


def safe_unpack(bundle: Path, dest: Path, *, max_bytes: int, max_members: int) -> str:
    """Extract the gzip tarball ``bundle`` into the new folder ``dest``; return its sha256.

    The hash is of the bytes actually unpacked (the file is read once, from one
    open descriptor), so it names exactly the version that will run.

    ``dest`` must not exist; it is created with mode 0o755. Only regular files
    and directories are accepted, every name must stay inside ``dest``, modes
    lose setuid/setgid/sticky and group/other write bits, and ownership is not
    restored. At most ``max_members`` members and ``max_bytes`` bytes of file
    data are written (counted as written, so lying headers do not matter).

    On any failure ``dest`` is removed entirely and ``UnpackError`` is raised.
    """
    dest = Path(dest)
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        raise UnpackError(f"destination {dest} already exists") from None
    except OSError as exc:
        raise UnpackError(f"cannot create {dest}: {exc.strerror}") from None

    done = False
    try:
        os.chmod(dest, 0o755)  # mkdir's mode was reduced by the umask
        try:
            raw = open(bundle, "rb")  # noqa: SIM115 - closed below, error mapped separately
        except OSError as exc:
            raise UnpackError(f"cannot open {bundle}: {exc.strerror}") from None
        with raw:
            extraction = _Extraction(raw, dest, max_bytes=max_bytes, max_members=max_members)
            extraction.run()
            digest = extraction.stream.sha256_of_rest()
        done = True
    except tarfile.TarError as exc:
        raise UnpackError(_tar_reason(exc)) from None
    finally:
        if not done:
            shutil.rmtree(dest, ignore_errors=True)
    return digest


def _tar_reason(exc: tarfile.TarError) -> str:
    """Turn tarfile's terse messages into reasons a deployer understands."""
    text = str(exc)
    if text == "empty file":
        return "empty archive (no members)"
    if text == "unexpected end of data":
        return "truncated archive"
    return f"bad tar archive: {text}"


class _GzipReader:
    """A read-only stream of the decompressed tar data, checked as it goes.

    Verifies what tarfile's ``"r|gz"`` does not (magic, CRC, length, a complete
    stream), counts every decompressed byte against ``limit`` and holds at most
    one output chunk in memory. Concatenated gzip members are read as one
    stream, as gzip does.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        self._buf = b""
        self._pos = 0
        self._started = False
        self._finished = False
        self.produced = 0
        self._sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = _COPY_CHUNK
        while self._pos >= len(self._buf):
            if not self._fill():
                return b""
        chunk = self._buf[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def sha256_of_rest(self) -> str:
        """The hash of the whole file, reading what follows the gzip data (padding)."""
        while self._read_raw():
            pass
        return self._sha256.hexdigest()

    def drain(self) -> None:
        """Read to the end so the gzip trailer (CRC and length) gets checked."""
        while self._fill():
            pass

    def _fill(self) -> bool:
        """Decompress the next piece into the buffer; False at the end of the data."""
        while not self._finished:
            if self._zlib.eof:
                rest = self._zlib.unused_data or self._read_raw()
                # Anything but another gzip member is trailing padding; gzip ignores it too.
                if not rest.startswith(_GZIP_MAGIC):
                    self._finished = True
                    break
                self._zlib = zlib.decompressobj(_GZIP_WBITS)
                data = rest
            else:
                data = self._zlib.unconsumed_tail or self._read_raw()
                if not data:
                    raise UnpackError("truncated archive")
            try:
                out = self._zlib.decompress(data, _OUTPUT_CHUNK)
            except zlib.error as exc:
                raise UnpackError(f"corrupt gzip data ({str(exc).rpartition(': ')[2]})") from None
            if out:
                self.produced += len(out)
                if self.produced > self._limit:
                    raise UnpackError(f"archive expands to more than {self._limit} bytes")
                self._buf, self._pos = out, 0
                return True
        return False

    def _read_raw(self) -> bytes:
        try:
            data = self._raw.read(_INPUT_CHUNK)
        except OSError as exc:
            raise UnpackError(f"cannot read bundle: {exc.strerror or exc}") from None
        self._sha256.update(data)
        if not self._started:
            self._started = True
            if not data:
                raise UnpackError("bundle file is empty")
            if not data.startswith(_GZIP_MAGIC):
                raise UnpackError("not a gzip file")
        return data


class _CheckedTarInfo(tarfile.TarInfo):
    """Header parsing that refuses what tarfile would silently accept.

    tarfile in stream mode treats a bad or cut-off header after the first one
    as the end of the archive; here it is an error. Oversized pax / long-name
    headers are refused before tarfile reads them into memory.
    """

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.InvalidHeaderError as exc:
            raise UnpackError(f"bad tar header ({exc})") from None
        except tarfile.TruncatedHeaderError:
            raise UnpackError("truncated archive") from None
        if info.type in _META_TYPES and info.size > _MAX_META_BYTES:
            raise UnpackError(f"extended header of {info.size} bytes is too large")
        return info


class _Extraction:
    """One pass over one archive: check each member, then write it."""

    def __init__(self, raw: BinaryIO, dest: Path, *, max_bytes: int, max_members: int) -> None:
        self.dest = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.max_members = max_members
        limit = max_bytes + max_members * _OVERHEAD_PER_MEMBER + _OVERHEAD_FIXED
        self.stream = _GzipReader(raw, limit)
        self.members = 0
        self.written = 0
        self.dirs: set[str] = {self.dest}  # folders known to exist
        self.resolved: dict[str, str] = {}  # folder -> its realpath

    def run(self) -> None:
        with tarfile.open(fileobj=self.stream, mode="r|", tarinfo=_CheckedTarInfo) as tar:
            # next() rather than iteration, and forgetting each member, so a
            # million-member archive is not held in memory.
            while (member := tar.next()) is not None:
                tar.members.clear()
                self.members += 1
                if self.members > self.max_members:
                    raise UnpackError(f"more than {self.max_members} members")
                try:
                    target = self._check(member)
                    if member.isdir():
                        self._make_dir(target)
                    else:
                        self._write_file(tar, member, target)
                except OSError as exc:  # reading errors became UnpackError in the reader
                    reason = exc.strerror or str(exc)
                    raise UnpackError(f"cannot write member {member.name!r}: {reason}") from None
        if self.members == 0:
            raise UnpackError("empty archive (no members)")
        self.stream.drain()

    def _check(self, member: tarfile.TarInfo) -> str:
        """Refuse anything but a plain file or folder inside dest; return its path."""
        name = member.name
        if "\0" in name:
            raise UnpackError(f"member {name!r} has a NUL byte in its name")
        if name.startswith("/"):
            raise UnpackError(f"member {name!r} has an absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnpackError(f"member {name!r} escapes the bundle")
        if len(parts) > MAX_DEPTH:
            raise UnpackError(f"member {name[:60]!r}... is nested deeper than {MAX_DEPTH} levels")
        kind = _KINDS.get(member.type)
        if kind is None and member.issparse():
            kind = "a sparse file"
        if kind is None and not (member.isreg() or member.isdir()):
            kind = f"of unsupported type {member.type!r}"
        if kind is not None:
            raise UnpackError(
                f"member {name!r} is {kind}; only regular files and folders are allowed"
            )
        if not parts and not member.isdir():
            raise UnpackError(f"member {name!r} is a file without a name")
        target = self._resolve(parts)
        if os.path.commonpath([self.dest, target]) != self.dest:
            raise UnpackError(f"member {name!r} escapes the bundle")
        if _data_filter is not None:
            try:
                _data_filter(member, self.dest)
            except tarfile.FilterError as exc:
                raise UnpackError(f"member {name!r} refused by tarfile's filter: {exc}") from None
        return target

    def _resolve(self, parts: list[str]) -> str:
        """``dest/parts`` with symlinks resolved, like ``os.path.realpath``.

        Only this extraction creates entries in dest and never a symlink, so a
        folder's resolution cannot change; caching it per folder saves the
        lstat of every path component for every member. The last component
        is opened with O_NOFOLLOW, so it cannot lead elsewhere either.
        """
        if not parts:
            return self.dest
        folder = os.path.join(self.dest, *parts[:-1])
        resolved = self.resolved.get(folder)
        if resolved is None:
            resolved = self.resolved[folder] = os.path.realpath(folder)
        return os.path.join(resolved, parts[-1])

    def _make_dir(self, path: str) -> None:
        """Create ``path`` and any missing parents as plain 0o755 folders."""
        missing = []
        while path not in self.dirs:  # ends at dest: _check keeps every path inside it
            missing.append(path)
            path = os.path.dirname(path)
        for folder in reversed(missing):
            try:
                os.mkdir(folder, 0o755)
            except FileExistsError:
                # An earlier member wrote a file here (we never create symlinks).
                if not os.path.isdir(folder):
                    name = os.path.relpath(folder, self.dest)
                    raise UnpackError(f"{name!r} is both a file and a folder") from None
            os.chmod(folder, 0o755)  # mkdir's mode was reduced by the umask
            self.dirs.add(folder)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        if self.written + member.size > self.max_bytes:
            raise UnpackError(self._too_big())
        self._make_dir(os.path.dirname(path))
        source = tar.extractfile(member)
        assert source is not None  # regular files always have data
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        # No spawn may fork while an executable is open for writing ("Text file busy").
        gate = FORK_GATE.writing_executable() if member.mode & 0o111 else contextlib.nullcontext()
        with gate, open(os.open(path, flags, 0o600), "wb") as out:
            while chunk := source.read(_COPY_CHUNK):
                # Counted as written: the header's size is only a first check.
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise UnpackError(self._too_big())
                out.write(chunk)
            out.flush()  # a later write would undo the mtime set below
            fd = out.fileno()
            os.fchmod(fd, _file_mode(member.mode))
            # An unrepresentable timestamp is no reason to refuse a bundle.
            with contextlib.suppress(OverflowError, ValueError):
                os.utime(fd, (member.mtime, member.mtime))

    def _too_big(self) -> str:
        return f"unpacked size exceeds the limit of {self.max_bytes} bytes"


def _file_mode(mode: int) -> int:
    """The mode tarfile's data filter gives a file: no special or group/other write bits."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111  # executable only if the owner may execute it
    return mode | 0o600  # keter must always be able to read and replace its own files


_data_filter = getattr(tarfile, "data_filter", None)


class Unpacker(Actor):
    """Unpacks bundles into folders under ``temp_dir`` and removes old ones."""

    def __init__(
        self, temp_dir: Path, *, max_bytes: int, max_members: int, report_to: queue.Queue
    ) -> None:
        super().__init__("unpacker", report_to)
        self.temp_dir = Path(temp_dir)
        self.max_bytes = max_bytes
        self.max_members = max_members

    def on_start(self) -> None:
        """Remove the folders a previous run left behind: no process uses them now."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.temp_dir.iterdir()):
            self._remove(entry, why="stale ")

    def handle(self, message: object) -> None:
        match message:
            case UnpackBundle():
                self._unpack(message)
            case RemoveFolder(path=path):
                self._remove(path)
            case _:
                self.unexpected(message)

    def _unpack(self, msg: UnpackBundle) -> None:
        if not self._inside_temp(msg.dest):
            self._failed(msg, f"destination {msg.dest} is not inside {self.temp_dir}")
            return
        try:
            sha256 = safe_unpack(
                msg.bundle, msg.dest, max_bytes=self.max_bytes, max_members=self.max_members
            )
        except UnpackError as exc:
            self._failed(msg, f"cannot unpack {msg.bundle.name}: {exc}")
            return
        try:
            config = parse_bundle_config(msg.dest, msg.app)
        except (BundleConfigError, OSError) as exc:
            shutil.rmtree(msg.dest, ignore_errors=True)
            self._failed(msg, f"bad config in {msg.bundle.name}: {exc}", FailureKind.CONFIG)
            return
        log.info("%s: unpacked %s into %s", msg.app, msg.bundle.name, msg.dest)
        self.report(
            BundleUnpacked(
                app=msg.app,
                deploy_id=msg.deploy_id,
                folder=msg.dest,
                config=config,
                warnings=tuple(config.warnings),
                sha256=sha256,
            )
        )

    def _failed(
        self, msg: UnpackBundle, reason: str, kind: FailureKind = FailureKind.UNPACK
    ) -> None:
        # The supervisor logs the failure ("APP: deploy failed: REASON"); once is enough.
        log.debug("%s: %s", msg.app, reason)
        self.report(UnpackFailed(app=msg.app, deploy_id=msg.deploy_id, reason=reason, kind=kind))

    def _remove(self, path: Path, why: str = "") -> None:
        if not self._inside_temp(path):
            log.error("unpacker: refusing to remove %s: not inside %s", path, self.temp_dir)
            return
        if not os.path.lexists(path):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)  # a stray file, or a symlink (never followed)
        except OSError as exc:
            log.error("unpacker: cannot remove %s%s: %s", why, path, exc)
            return
        log.info("unpacker: removed %s%s", why, path)

    def _inside_temp(self, path: Path) -> bool:
        """True if ``path`` names an entry strictly below ``temp_dir``.

        The parent is resolved but the last component is not, so a symlink
        placed in temp_dir is itself removed, never what it points to.
        """
        root = os.path.realpath(self.temp_dir)
        path = Path(path)
        if path.name in ("", ".", ".."):
            return False
        return os.path.commonpath([root, os.path.realpath(path.parent)]) == root
