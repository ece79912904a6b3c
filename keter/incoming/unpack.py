"""Unpacking one bundle safely: ``safe_unpack``, a pure function of a file and a folder.

A bundle is untrusted input: anyone who can drop a file into incoming/ must not
be able to write outside the bundle's folder, create device nodes or setuid
programs, or fill the disk. ``safe_unpack`` therefore checks every member before
writing it and counts what it writes against hard caps. Nor may it make keter
read for hours: a file larger than any bundle within those caps can be
(``bundle_limit``) is refused unread, and at most ``MAX_PADDING`` bytes may
follow the gzip data.

The archive is read once, as a stream (``tarfile`` mode ``"r|"``), from a file
descriptor opened once. A bundle replaced by a rename while being read keeps
being read whole from the old file; one rewritten in place (scp of a newer
version) fails the gzip CRC check, so two versions are never mixed.

Decompression is ours rather than tarfile's ``"r|gz"`` because tarfile's stream
mode never checks the gzip trailer (CRC and length) and takes a cut-off stream
or a corrupt header for the end of the archive, which would deploy half an app
without a word.

Whatever the file holds, ``safe_unpack`` returns or raises ``UnpackError`` with
one short, log-safe reason (names quoted through ``log_text`` and capped), and
on failure leaves nothing behind: the bundle is opened like every file in
incoming/ (``files.open_regular``: never a FIFO, device or link), and
whatever tarfile raises while parsing a hostile header (it is a parser of
untrusted input: ``ValueError`` from a pax ``GNU.sparse.size=x``,
``UnicodeError``, ...) is that archive's refusal, as is any OS or zlib error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from keter.incoming.files import NotABundleFile, open_regular
from keter.names import log_text

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

# What may follow the last gzip member: gzip ignores it, and tools that write to
# blocks pad an archive with a few (tar's own padding, 10 KiB records, is inside the
# gzip data). More is no padding: a 3 KB bundle extended by a hole (``truncate -s 20G``,
# no disk used) made the unpacker hash 20 GiB of zeros (17 s, every other deploy
# waiting behind it) and the archive write them out.
MAX_PADDING = 1 << 20

# pax and GNU long-name headers are read whole into memory by tarfile, so their
# declared size is checked before tarfile reads them.
_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
_MAX_META_BYTES = 1 << 20

# pax headers are read by ``_check_pax`` before tarfile parses them. tarfile's own
# parsing (Pythons before 3.11.10 and 3.12.6: CVE-2024-6232) searches a whole header
# with regular expressions whose time grows with the square of a run of digits: a
# bundle of 1 KiB, one header of a million digits, held the unpacking worker (and
# with it every other deploy) for about 50 minutes. No pax value needs a longer run
# than a time with nanoseconds (20 digits); with runs this short and all of an
# archive's pax headers bounded together, tarfile's work stays within a few seconds
# (a 1 MiB header of the worst kind: about 0.1 s).
_MAX_PAX_DIGITS = 32
_MAX_PAX_TOTAL = 64 << 20  # bytes of all pax headers of one archive (a few 100 a member)
_PAX_DIGITS = re.compile(rb"[0-9]{%d}" % (_MAX_PAX_DIGITS + 1))
# The fixed tarfile reads each record's length with this pattern (and no regex runs
# over a whole header); a Debian backport of the fix has it too.
_TARFILE_FIXED = hasattr(tarfile, "_header_length_prefix_re")
# Records of global pax headers, all together: tarfile applies every one of them to
# every later member (and copies them for each), so 900,000 of them (ten 1 MiB headers)
# made each member cost 0.36 s: hours for a bundle of 2.4 MB. Archivers write a few.
_MAX_GLOBAL_PAX = 64

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


def safe_unpack(
    bundle: Path,
    dest: Path,
    *,
    max_bytes: int,
    max_members: int,
    progress: Callable[[], None] = lambda: None,
) -> str:
    """Extract the gzip tarball ``bundle`` into the new folder ``dest``; return its sha256.

    The hash is of the bytes actually unpacked (the file is read once, from one
    open descriptor), so it names exactly the version that will run.

    ``dest`` must not exist; it is created with mode 0o755. Only regular files
    and directories are accepted, every name must stay inside ``dest``, modes
    lose setuid/setgid/sticky and group/other write bits, and ownership is not
    restored. At most ``max_members`` members and ``max_bytes`` bytes of file
    data are written (counted as written, so lying headers do not matter).

    On any failure ``dest`` is removed entirely and ``UnpackError`` is raised.
    ``progress`` is called with each member, each read of the bundle and each piece
    inflated (the worker's sign of life, ``keter.incoming.worker``).
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
            fd, st = open_regular(bundle)
        except NotABundleFile as exc:
            raise UnpackError(f"{Path(bundle).name} is not a regular file: {exc}") from None
        except OSError as exc:
            raise UnpackError(f"cannot open {bundle}: {exc.strerror}") from None
        with open(fd, "rb") as raw:
            limit = bundle_limit(max_bytes, max_members)
            if st.st_size > limit:
                raise UnpackError(
                    f"the file is {st.st_size} bytes, larger than any bundle keter unpacks "
                    f"({limit} at most)"
                )
            extraction = _Extraction(
                raw, dest, max_bytes=max_bytes, max_members=max_members, progress=progress
            )
            extraction.run()
            digest = extraction.stream.sha256_of_rest()
        done = True
    except UnpackError:
        raise
    except tarfile.TarError as exc:
        raise UnpackError(_tar_reason(exc)) from None
    except OSError as exc:
        raise UnpackError(f"cannot unpack: {exc.strerror or _text(exc)}") from None
    except zlib.error as exc:
        raise UnpackError(f"corrupt gzip data ({_text(exc)})") from None
    except (ValueError, UnicodeError, OverflowError, EOFError, RecursionError) as exc:
        # Raised from deep inside tarfile by a header it could not make sense of.
        raise UnpackError(f"malformed archive ({type(exc).__name__}: {_text(exc)})") from None
    finally:
        if not done:
            _remove(dest, progress)
    return digest


def _remove(dest: Path, progress: Callable[[], None]) -> None:
    """Remove what was unpacked into ``dest``, a sign of life per folder: up to
    ``max_members`` files and as many folders take a while on a cold disk, and the
    worker must not look stuck meanwhile. Links are removed, never followed."""
    for parent, folders, files in os.walk(dest, topdown=False):
        progress()
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(parent, name))
        for name in folders:
            path = os.path.join(parent, name)
            with contextlib.suppress(OSError):
                os.unlink(path) if os.path.islink(path) else os.rmdir(path)
    shutil.rmtree(dest, ignore_errors=True)  # what the walk could not (or dest alone)


def stream_limit(max_bytes: int, max_members: int) -> int:
    """How far the decompressed tar stream of an acceptable bundle can reach.

    File data (``max_bytes``) plus headers and padding for ``max_members``
    members: a stream that inflates past this is refused whatever follows.
    """
    return max_bytes + max_members * _OVERHEAD_PER_MEMBER + _OVERHEAD_FIXED


def bundle_limit(max_bytes: int, max_members: int) -> int:
    """How large the file of an acceptable bundle can be: its tar stream
    (``stream_limit``) as gzip stores what does not compress (deflate adds 5 bytes per
    64 KiB), a MiB for gzip headers, and ``MAX_PADDING``. A larger file is refused
    before a byte of it is read: its size is no bundle's.
    """
    return stream_limit(max_bytes, max_members) * 1001 // 1000 + (1 << 20) + MAX_PADDING


def _name(name: str) -> str:
    """A member name as a reason quotes it: escaped, capped (a hostile archive can
    carry names of a megabyte; TEAM.md decision 5), in single quotes."""
    return "'" + log_text(name).replace("'", "\\'") + "'"


def _text(exc: BaseException) -> str:
    """An exception's own text (which may quote the archive), escaped and capped."""
    return log_text(str(exc))


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

    def __init__(
        self, raw: BinaryIO, limit: int, progress: Callable[[], None] = lambda: None
    ) -> None:
        self._raw = raw
        self._progress = progress  # called at each read of the file and each piece inflated
        self._limit = limit
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        self._buf = b""
        self._pos = 0
        self._started = False
        self._finished = False
        self.produced = 0
        self._sha256 = hashlib.sha256()
        self._raw_read = 0  # bytes of the file read so far
        self._gzip_end = 0  # where the last gzip member ended, once it has
        self._padding = 0  # bytes read after it

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
        """The hash of the whole file, reading what follows the gzip data: padding, of
        at most ``MAX_PADDING`` bytes."""
        while data := self._read_raw():
            self._padding += len(data)
            if self._padding > MAX_PADDING:
                after = os.fstat(self._raw.fileno()).st_size - self._gzip_end
                raise UnpackError(
                    f"{after} bytes after the gzip data (padding is {MAX_PADDING} at most)"
                )
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
                if len(rest) < len(_GZIP_MAGIC):  # a read may end inside the next magic
                    rest += self._read_raw()
                # Anything but another gzip member is trailing padding (gzip ignores it
                # too), of at most MAX_PADDING bytes: ``sha256_of_rest`` reads it.
                if not rest.startswith(_GZIP_MAGIC):
                    self._finished = True
                    self._gzip_end = self._raw_read - len(rest)
                    self._padding = len(rest)
                    break
                self._zlib = zlib.decompressobj(_GZIP_WBITS)
                data = rest
            else:
                data = self._zlib.unconsumed_tail or self._read_raw()
                if not data:
                    raise UnpackError("truncated archive")
            self._progress()
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
        self._progress()
        try:
            data = self._raw.read(_INPUT_CHUNK)
        except OSError as exc:
            raise UnpackError(f"cannot read bundle: {exc.strerror or exc}") from None
        self._sha256.update(data)
        self._raw_read += len(data)
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
    headers are refused before tarfile reads them into memory, and a pax header
    tarfile would take long over, or read as a sparse file's map, before tarfile
    parses it (``_check_pax``).
    """

    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        stream = archive.fileobj
        data = stream.read(self._block(self.size))
        # Counted on the archive's TarFile: the budget is per archive, and this class
        # (given to tarfile.open) is shared by all.
        left = getattr(archive, "keter_pax_left", _MAX_PAX_TOTAL) - len(data)
        if left < 0:
            raise UnpackError(f"pax headers of more than {_MAX_PAX_TOTAL} bytes in all")
        archive.keter_pax_left = left  # type: ignore[attr-defined]
        keywords = _check_pax(data)
        global_records = {*archive.pax_headers, *keywords}
        if self.type == tarfile.XGLTYPE and len(global_records) > _MAX_GLOBAL_PAX:
            raise UnpackError(f"global pax headers of more than {_MAX_GLOBAL_PAX} records")
        # tarfile's parsing reads the header itself: handed the bytes already read.
        archive.fileobj = _Replay(data, stream)
        try:
            return super()._proc_pax(archive)
        finally:
            archive.fileobj = stream

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.InvalidHeaderError as exc:
            raise UnpackError(f"bad tar header ({_text(exc)})") from None
        except tarfile.TruncatedHeaderError:
            raise UnpackError("truncated archive") from None
        if info.type in _META_TYPES and info.size > _MAX_META_BYTES:
            raise UnpackError(f"extended header of {info.size} bytes is too large")
        return info


def _check_pax(data: bytes) -> set[str]:
    """The keywords of a pax header (``data``: its blocks, as tarfile reads them).
    Refused: one that is not records of ``LENGTH KEYWORD=VALUE\\n`` up to the first
    NUL, holds a run of digits an unfixed tarfile would take long over, or describes
    a sparse file (tarfile builds a sparse file's map of any length in memory before
    keter sees the member). Time linear in ``data``.

    tarfile reads records past the header's size, in its last block's padding (and
    so does the fixed one): so does this, or a sparse file's records hidden there
    would reach tarfile.
    """
    if not _TARFILE_FIXED and _PAX_DIGITS.search(data):
        raise UnpackError(f"a pax header holds a run of more than {_MAX_PAX_DIGITS} digits")
    keywords = set()
    pos = 0
    while pos < len(data) and data[pos] != 0:  # NULs pad the records
        space = data.find(b" ", pos, pos + _MAX_PAX_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        record = data[pos : pos + length]
        keyword, equals, _ = record[len(digits) + 1 :].partition(b"=")
        if pos + length > len(data) or not record.endswith(b"\n") or not equals or not keyword:
            raise UnpackError("malformed pax header")
        if keyword.startswith(b"GNU.sparse."):
            raise UnpackError("a member is a sparse file (GNU.sparse pax records)")
        keywords.add(keyword.decode("utf-8", "surrogateescape"))
        pos += length
    return keywords


class _Replay:
    """A stream that gives ``data`` first, then reads on from ``stream``."""

    def __init__(self, data: bytes, stream) -> None:
        self.data = data
        self.stream = stream

    def read(self, size: int) -> bytes:
        if not self.data:
            return self.stream.read(size)
        given, self.data = self.data[:size], self.data[size:]
        if len(given) < size:
            given += self.stream.read(size - len(given))
        return given

    def tell(self) -> int:
        return self.stream.tell() - len(self.data)


def _parsing(parse, *args, **kwargs):
    """Call tarfile's header parsing: whatever it raises is the archive's refusal.

    tarfile parses untrusted headers in many places that raise plain Python
    errors (``int()`` of a pax ``GNU.sparse.size=x`` is a ``ValueError``); the
    only code of ours it runs is the reader and ``_CheckedTarInfo``, which
    raise ``UnpackError`` themselves.
    """
    try:
        return parse(*args, **kwargs)
    except (UnpackError, tarfile.TarError):
        raise
    except MemoryError:  # the worker's address space is bounded (keter.incoming.worker)
        raise UnpackError("a tar header takes more memory than unpacking may use") from None
    except Exception as exc:
        raise UnpackError(f"malformed tar header ({type(exc).__name__}: {_text(exc)})") from None


class _Extraction:
    """One pass over one archive: check each member, then write it."""

    def __init__(
        self,
        raw: BinaryIO,
        dest: Path,
        *,
        max_bytes: int,
        max_members: int,
        progress: Callable[[], None],
    ) -> None:
        self.progress = progress
        self.dest = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.stream = _GzipReader(raw, stream_limit(max_bytes, max_members), progress)
        self.members = 0
        self.written = 0
        # Folders made, those a member's path implies too: at most max_members. A 10 KB
        # bundle of 1000 members, each a path 127 folders deep, made 127,000 of them.
        self.folders = 0
        self.dirs: set[str] = {self.dest}  # folders known to exist
        self.resolved: dict[str, str] = {}  # folder -> its realpath

    def run(self) -> None:
        # Opening reads the first header already.
        tar = _parsing(tarfile.open, fileobj=self.stream, mode="r|", tarinfo=_CheckedTarInfo)
        with tar:
            # next() rather than iteration, and forgetting each member, so a
            # million-member archive is not held in memory.
            while (member := _parsing(tar.next)) is not None:
                tar.members.clear()
                self.progress()
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
                    reason = exc.strerror or _text(exc)
                    raise UnpackError(
                        f"cannot write member {_name(member.name)}: {reason}"
                    ) from None
        if self.members == 0:
            raise UnpackError("empty archive (no members)")
        self.stream.drain()

    def _check(self, member: tarfile.TarInfo) -> str:
        """Refuse anything but a plain file or folder inside dest; return its path."""
        name = member.name
        if "\0" in name:
            raise UnpackError(f"member {_name(name)} has a NUL byte in its name")
        if name.startswith("/"):
            raise UnpackError(f"member {_name(name)} has an absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnpackError(f"member {_name(name)} escapes the bundle")
        if len(parts) > MAX_DEPTH:
            raise UnpackError(
                f"member {_name(name[:60])}... is nested deeper than {MAX_DEPTH} levels"
            )
        kind = _KINDS.get(member.type)
        if kind is None and member.issparse():
            kind = "a sparse file"
        if kind is None and not (member.isreg() or member.isdir()):
            kind = f"of unsupported type {member.type!r}"
        if kind is not None:
            raise UnpackError(
                f"member {_name(name)} is {kind}; only regular files and folders are allowed"
            )
        if not parts and not member.isdir():
            raise UnpackError(f"member {_name(name)} is a file without a name")
        target = self._resolve(parts)
        if os.path.commonpath([self.dest, target]) != self.dest:
            raise UnpackError(f"member {_name(name)} escapes the bundle")
        if _data_filter is not None:
            try:
                _data_filter(member, self.dest)
            except tarfile.FilterError as exc:
                raise UnpackError(
                    f"member {_name(name)} refused by tarfile's filter: {_text(exc)}"
                ) from None
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
            self.folders += 1
            if self.folders > self.max_members:
                raise UnpackError(f"more than {self.max_members} folders")
            try:
                os.mkdir(folder, 0o755)
            except FileExistsError:
                # An earlier member wrote a file here (we never create symlinks).
                if not os.path.isdir(folder):
                    name = os.path.relpath(folder, self.dest)
                    raise UnpackError(f"{_name(name)} is both a file and a folder") from None
            os.chmod(folder, 0o755)  # mkdir's mode was reduced by the umask
            self.dirs.add(folder)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        if self.written + member.size > self.max_bytes:
            raise UnpackError(self._too_big())
        self._make_dir(os.path.dirname(path))
        source = tar.extractfile(member)
        assert source is not None  # regular files always have data
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(path, flags, 0o600), "wb") as out:
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
