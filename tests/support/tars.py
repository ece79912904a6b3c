"""Hypothesis strategies for hostile bundles: arbitrary tar headers under gzip.

What a careless or hostile user can put in a ``.keter`` file, layer by layer:

* members made by tarfile from arbitrary fields (names with control
  characters, surrogates, ``..`` and absolute paths; every type byte; sizes
  that lie; modes, times and ids out of range) in ustar, GNU and pax format;
* pax extended headers with any keys and values (``GNU.sparse.size=x``,
  ``GNU.sparse.map=1,x``, 400-digit numbers, ``hdrcharset``), with record
  lengths that lie; GNU long-name and long-link headers;
* raw 512-byte headers of random bytes, made plausible (magic, type, size,
  a correct checksum) so tarfile gets past its first checks;
* odd padding, missing end-of-archive blocks, truncation anywhere,
  concatenated archives;
* the gzip layer whole, cut short, split into several members, or absent.

``prefix`` can put a valid bundle's members first, and ``odd_but_valid`` frames
valid members oddly but legally, so some examples are bundles keter deploys.
"""

from __future__ import annotations

import gzip
import tarfile

from hypothesis import strategies as st

BLOCK = 512

_TYPES = [bytes([c]) for c in b"0123456789gxLKSVMNAD"] + [b"\0", b"\xff"]
types = st.one_of(st.sampled_from(_TYPES), st.binary(min_size=1, max_size=1))

names = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "config/keter.yaml",
            "bin/app",
            "..",
            "../escaped",
            "/etc/escaped",
            "a/../../escaped",
            ".",
            "",
            "a//b/",
            "x" * 300,
            "\x1b[31mred",
            "\udcff\udc80",
            "a\x00b",
        ]
    ),
    st.lists(st.sampled_from(["a", "..", ".", "", "config", "\udcff", "\n"]), max_size=6).map(
        "/".join
    ),
)

numbers = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["x", "", "-1", "1,x", "0,0", "1,2,3", "1e9", " 5", "0x10", "9" * 400]),
    st.text(max_size=12),
)

PAX_KEYS = [
    "path",
    "linkpath",
    "size",
    "mtime",
    "atime",
    "ctime",
    "uid",
    "gid",
    "uname",
    "gname",
    "hdrcharset",
    "comment",
    "GNU.sparse.size",
    "GNU.sparse.numblocks",
    "GNU.sparse.offset",
    "GNU.sparse.numbytes",
    "GNU.sparse.map",
    "GNU.sparse.name",
    "GNU.sparse.realsize",
    "GNU.sparse.major",
    "GNU.sparse.minor",
    "SCHILY.xattr.user.x",
]
pax_keys = st.one_of(st.sampled_from(PAX_KEYS), st.text(min_size=1, max_size=16))
pax_values = st.one_of(numbers, names)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


@st.composite
def raw_header(draw) -> bytes:
    """512 random bytes, made plausible enough to get past tarfile's first checks."""
    block = bytearray(draw(st.binary(min_size=BLOCK, max_size=BLOCK)))
    if draw(st.booleans()):
        block[257:265] = draw(st.sampled_from([b"ustar\x0000", b"ustar  \x00"]))
    if draw(st.booleans()):
        block[156:157] = draw(types)
    if draw(st.booleans()):
        block[124:136] = b"%011o\0" % draw(st.integers(0, 3 * BLOCK))
    if draw(st.booleans()):
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@st.composite
def member(draw) -> bytes:
    """A header tarfile itself writes from arbitrary fields, and some data."""
    info = tarfile.TarInfo(draw(names))
    info.type = draw(types)
    data = draw(st.binary(max_size=1500))
    info.size = draw(st.one_of(st.just(len(data)), st.integers(0, 4 * BLOCK)))
    info.mode = draw(st.integers(0, 0o7777777))
    info.mtime = draw(st.one_of(st.integers(0, 2**33), st.integers(-(2**70), 2**70)))
    info.uid = draw(st.integers(-10, 2**40))
    info.gid = draw(st.integers(0, 2**21))
    info.linkname = draw(names)
    info.uname = draw(st.text(max_size=40))
    info.pax_headers = draw(st.dictionaries(pax_keys, pax_values, max_size=4))
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    try:
        header = info.tobuf(fmt, "utf-8", "surrogateescape")
    except Exception:  # fields tarfile will not write: a raw header takes its place
        header = draw(raw_header())
    body = _padded(data) if draw(st.booleans()) else data
    return header + body


@st.composite
def pax_member(draw) -> bytes:
    """An extended header of hand-made records (lengths may lie), then a member."""
    records = b""
    for key, value in draw(st.lists(st.tuples(pax_keys, pax_values), max_size=4)):
        rest = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        length = len(rest) + len(str(len(rest)))
        length += len(str(length)) - len(str(len(rest)))  # the length counts its own digits
        length += draw(st.sampled_from([0, 0, 0, -1, 1, 40, -length]))
        records += str(length).encode() + rest
    records += draw(st.sampled_from([b"", b"", b"garbage", b"5 x\n", b"99999999 a=b\n"]))
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = draw(st.sampled_from([tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE]))
    info.size = len(records) + draw(st.sampled_from([0, 0, 0, -1, 1, BLOCK]))
    info.size = max(info.size, 0)
    return info.tobuf(tarfile.USTAR_FORMAT) + _padded(records) + draw(member())


@st.composite
def gnu_long(draw) -> bytes:
    """A GNU long name or long link header, then a member it applies to."""
    name = draw(names).encode("utf-8", "surrogateescape") + draw(st.sampled_from([b"\0", b""]))
    info = tarfile.TarInfo("././@LongLink")
    info.type = draw(st.sampled_from([tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]))
    info.size = len(name) + draw(st.sampled_from([0, 0, 1, -1, 2 * BLOCK]))
    info.size = max(info.size, 0)
    return info.tobuf(tarfile.GNU_FORMAT) + _padded(name) + draw(member())


pieces = st.one_of(
    member(),
    member(),
    pax_member(),
    gnu_long(),
    raw_header(),
    st.just(bytes(BLOCK)),
    st.binary(max_size=700),
)


@st.composite
def tar_stream(draw, prefix: bytes = b"") -> bytes:
    """An archive of hostile pieces, maybe after ``prefix``, ended (or not) and maybe cut."""
    data = prefix + b"".join(draw(st.lists(pieces, min_size=0 if prefix else 1, max_size=4)))
    data += draw(st.sampled_from([b"", bytes(BLOCK), bytes(2 * BLOCK), bytes(20 * BLOCK)]))
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def hostile_bundles(draw, prefix: bytes = b"") -> bytes:
    """A whole ``.keter`` file: hostile tar data under a gzip layer that may itself be odd."""
    data = draw(tar_stream(prefix))
    if draw(st.integers(0, 4)) == 0:  # two archives back to back
        data += draw(tar_stream())
    layer = draw(st.sampled_from(["gzip", "gzip", "gzip", "members", "cut", "none"]))
    if layer == "none":
        return data
    if layer == "members":  # the same stream as several gzip members, as gzip allows
        cut = draw(st.integers(0, len(data)))
        return gzip.compress(data[:cut], mtime=0) + gzip.compress(data[cut:], mtime=0)
    packed = gzip.compress(data, compresslevel=1, mtime=0)
    if layer == "cut":
        return packed[: draw(st.integers(0, len(packed) - 1))]
    return packed


@st.composite
def odd_but_valid(draw, members: bytes) -> bytes:
    """A valid bundle of ``members`` in unusual but legal framing: any number of
    end-of-archive blocks, one gzip member or several, padding after the gzip data."""
    data = members + draw(st.sampled_from([b"", bytes(BLOCK), bytes(2 * BLOCK), bytes(20 * BLOCK)]))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        packed = gzip.compress(data[:cut], mtime=0) + gzip.compress(data[cut:], mtime=0)
    else:
        packed = gzip.compress(data, compresslevel=draw(st.integers(0, 9)), mtime=0)
    return packed + draw(st.sampled_from([b"", bytes(BLOCK), b"trailing padding"]))


def tar_members(files: dict[str, bytes]) -> bytes:
    """Valid tar members (no end-of-archive blocks) for ``prefix``."""
    out = b""
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o755
        out += info.tobuf(tarfile.PAX_FORMAT) + _padded(data)
    return out
