"""Fault and bad-input suite, part 1: hostile archives, bad names and bad configs.

Every case goes through a real keter with a real nginx. One keter (module scope)
serves a good app while each case drops one bad bundle under its own app name,
then checks what issue 7 asks of every fault: exactly one ERROR line naming the
bundle and the rule, nothing written outside keter's folders, the good app still
answering through nginx, and nginx's config unchanged. The module's keter has
small caps (``max-members``, ``max-unpacked-bytes``) so bombs are refused early;
its memory and its writes are measured from /proc while they are. Two good
bundles go through it too: one with hostile modes (checked on disk once
deployed) and one copied three times in a row (deployed once, whole). The host
list fuzzing at the end is pure: validate_host and keter.nginx.render.

The helpers (``Rig``, ``error_records``, ``assert_one_error``, ...) live in
tests/support/faults.py, shared with the other ``test_faults_*`` modules.

Covered elsewhere, not repeated here: absolute and ``..`` member names, a
symlink out of the bundle, not-gzip, a missing keter.yaml, exec outside the
bundle, invalid and duplicate hosts, a broken file in nginx's tree and a reload
nginx does not take (tests/test_bad_input.py); still-growing and renamed-in
bundles (tests/test_deploy.py); every unpacker refusal as a unit
(tests/test_unpacker.py).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.bundles import Zeros, bundle_bytes, config_member, make_bundle, member, webapp_config
from support.faults import Rig, assert_one_error, error_records
from support.net import served
from support.wait import wait_for

from keter.bundle import validate_host
from keter.incoming.watcher import CLOSED_QUIET
from keter.messages import Site
from keter.names import is_wildcard, log_text, nginx_server_name
from keter.nginx import render

MIB = 1 << 20
MAX_BYTES = 4 * MIB
MAX_MEMBERS = 1000


# -- memory and writes, from /proc -------------------------------------------------------------


def proc_status(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmHWM: peak resident memory), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def bytes_written(pid: int) -> int:
    """Bytes ``pid`` has passed to write(2) so far (Linux I/O accounting)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["wchar"])


# -- one keter serving one good app, shared by a module's cases ----------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(
        tmp_path_factory.mktemp("faults"),
        **{"max-unpacked-bytes": MAX_BYTES, "max-members": MAX_MEMBERS, "health-check-timeout": 5},
    )
    try:
        yield rig
    finally:
        rig.close()


# -- archives ------------------------------------------------------------------------------


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=kind, linkname=target)


HOSTILE = {
    # A chain of symlinks that ends outside: refused at its first link.
    "symchain": (
        lambda marker: [
            _link("bin", "b1", tarfile.SYMTYPE),
            _link("b1", "b2", tarfile.SYMTYPE),
            _link("b2", "/tmp", tarfile.SYMTYPE),
            member(f"bin/{marker}", b"x"),
        ],
        "member 'bin' is a symlink; only regular files and folders are allowed",
    ),
    # Hard links in a chain towards a system file.
    "hardchain": (
        lambda marker: [
            _link(marker, "h2", tarfile.LNKTYPE),
            _link("h2", "/etc/passwd", tarfile.LNKTYPE),
        ],
        "is a hard link; only regular files and folders are allowed",
    ),
    # A hard link to a symlink (a way round checks that only resolve symlinks).
    "hardtosym": (
        lambda marker: [
            _link(marker, "s", tarfile.LNKTYPE),
            _link("s", "/etc/shadow", tarfile.SYMTYPE),
        ],
        "is a hard link; only regular files and folders are allowed",
    ),
    "chardev": (
        lambda marker: [member(marker, type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
        "is a character device",
    ),
    "blockdev": (
        lambda marker: [member(marker, type=tarfile.BLKTYPE, devmajor=8, devminor=0)],
        "is a block device",
    ),
    "fifo": (lambda marker: [member(marker, type=tarfile.FIFOTYPE)], "is a FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused_and_nothing_lands_anywhere(rig: Rig, case: str) -> None:
    build, rule = HOSTILE[case]
    marker = f"faults-{uuid.uuid4().hex}"
    before = rig.checkpoint()
    rig.drop(
        f"{case}.keter",
        bundle_bytes(
            config=None, app_source=None, members=[config_member(f"{case}.test"), *build(marker)]
        ),
    )
    rig.refused(before, case, f"cannot unpack {case}.keter", rule, marker=marker)


def corrupt_checksum(data: bytes, index: int) -> bytes:
    """A tar stream with a byte of member ``index``'s header name flipped: its checksum fails."""
    damaged = bytearray(data)
    damaged[index * 1024 + 3] ^= 0x01  # members of <= 512 bytes: one header + one data block
    return bytes(damaged)


def plain_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def truncated_bundle(bundles: Path) -> bytes:
    whole = make_bundle(
        bundles / "whole.keter", config=webapp_config("cut.test", "v1")
    ).read_bytes()
    return whole[: len(whole) * 2 // 3]


BROKEN = {
    "empty": (lambda rig: b"", "bundle file is empty"),
    "badsum": (
        lambda rig: gzip.compress(
            corrupt_checksum(
                plain_tar([config_member("badsum.test"), member("bin/app", b"#!/bin/sh\n")]), 1
            )
        ),
        "bad tar header (bad checksum)",
    ),
    # A cut-off upload renamed into place: complete by construction for the watcher,
    # so the unpacker is what must notice.
    "cut": (lambda rig: truncated_bundle(rig.bundles), "truncated archive"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_archive_is_refused(rig: Rig, case: str) -> None:
    build, rule = BROKEN[case]
    before = rig.checkpoint()
    rig.drop(f"{case}.keter", build(rig))
    rig.refused(before, case, f"cannot unpack {case}.keter", rule)


def test_copied_three_times_in_a_second_deploys_the_complete_file_once(rig: Rig) -> None:
    """cp of the same bundle three times in a row (each a truncating rewrite in chunks):
    one deploy, of the whole file, and no failed unpack of a half-written copy."""
    data = make_bundle(
        rig.bundles / "thrice.keter",
        config=webapp_config("thrice.test", "t1"),
        files={"padding.bin": os.urandom(300_000)},  # incompressible: many chunks per copy
    ).read_bytes()
    offset = len(rig.keter.log())
    target = rig.keter.incoming / "thrice.keter"
    try:
        # The longest pause between one copy's close and the next one's truncation: a
        # pause longer than keter's quiet period is a second copy made later, which
        # rightly deploys again (seen once with the machine loaded by a benchmark).
        pause, closed = 0.0, None
        for _ in range(3):
            if closed is not None:
                pause = max(pause, time.monotonic() - closed)
            with open(target, "wb", buffering=0) as out:
                for start in range(0, len(data), 64 * 1024):
                    out.write(data[start : start + 64 * 1024])
            closed = time.monotonic()
        served(rig.nginx, "thrice.test", "t1")
        log = wait_for(
            lambda: (
                "thrice: deploy" in (text := rig.keter.log()[offset:])
                and "now serving" in text
                and text
            ),
            10,
            "the deploy",
        )
        assert f"thrice: bundle seen ({len(data)} bytes)" in log
        if pause < CLOSED_QUIET / 2:
            assert log.count("thrice: bundle seen") == 1, log
            assert len(re.findall(r"thrice: deploy #\d+ now serving", log)) == 1
            assert error_records(log) == []  # no copy was unpacked half-written
    finally:
        # The rig's keter serves the module's other tests: leave it as it was.
        target.unlink(missing_ok=True)
    wait_for(lambda: rig.nginx.request("thrice.test")[0] == 404, 15, "thrice.test to go")


def test_modes_are_made_safe_in_the_deployed_folder(rig: Rig) -> None:
    """setuid, setgid, sticky and group/other write bits never reach the disk."""
    bundle = make_bundle(
        rig.bundles / "modes.keter", config=webapp_config("modes.test", "m1"), files={}
    )
    # Rewrite the archive with hostile modes on every kind of member.
    with tarfile.open(bundle) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    modes = {"bin/app": 0o6777, "config/keter.yaml": 0o666}
    entries = []
    for info, data in members:
        info.mode = modes[info.name]
        entries.append((info, data))
    entries.append((member("shared", type=tarfile.DIRTYPE, mode=0o1777)[0], b""))
    entries.append(member("shared/world", b"w", mode=0o777))
    entries.append(member("shared/setgid", b"g", mode=0o2711))
    rig.drop("modes.keter", bundle_bytes(config=None, app_source=None, members=entries))
    served(rig.nginx, "modes.test", "m1")
    [folder] = [p for p in (rig.keter.root / "temp").iterdir() if p.name.startswith("modes-")]
    found = {str(p.relative_to(folder)): stat.S_IMODE(p.lstat().st_mode) for p in folder.rglob("*")}
    assert found == {
        "bin": 0o755,
        "bin/app": 0o755,
        "config": 0o755,
        "config/keter.yaml": 0o644,
        "shared": 0o755,
        "shared/world": 0o755,
        "shared/setgid": 0o711,
    }
    assert all(p.lstat().st_uid == os.geteuid() for p in folder.rglob("*"))
    # A successful deploy is the one case that may change nginx's config; undo it.
    (rig.keter.incoming / "modes.keter").unlink()
    wait_for(lambda: rig.nginx.request("modes.test")[0] == 404, 15, "modes.test to go")
    wait_for(lambda: not folder.exists(), 15, "its folder removed")


# -- bombs: refused at the caps with memory and disk bounded ---------------------------------


def gzip_bomb(path: Path, size: int) -> Path:
    """A small gzip tarball whose one member is ``size`` zero bytes."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        info, data = config_member("bomb.test")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, Zeros(size))
    return path


def million_members(path: Path, members: int = 1_000_000, per_chunk: int = 1000) -> Path:
    """A gzip tarball of ``members`` empty files, as concatenated gzip members.

    One chunk of ``per_chunk`` headers is compressed once and repeated, so the
    file is a few MB and quick to make; names repeat between chunks, which tar
    allows (a later member replaces an earlier one), and every header counts.
    """
    headers = b"".join(
        tarfile.TarInfo(f"many/{i:05d}").tobuf(tarfile.USTAR_FORMAT) for i in range(per_chunk)
    )
    chunk = gzip.compress(headers, compresslevel=9)
    with open(path, "wb") as out:
        for _ in range(members // per_chunk):
            out.write(chunk)
        out.write(gzip.compress(bytes(1024)))  # the end-of-archive marker
    return path


def test_gzip_bomb_is_refused_at_the_byte_cap_with_memory_and_writes_bounded(rig: Rig) -> None:
    bomb = gzip_bomb(rig.bundles / "bomb.keter", 256 * MIB)
    assert bomb.stat().st_size < MIB // 2
    pid = rig.keter.proc.pid
    peak, written = proc_status(pid, "VmHWM"), bytes_written(pid)
    before = rig.checkpoint()
    rig.keter.drop(bomb)
    rig.refused(before, "bomb", f"unpacked size exceeds the limit of {MAX_BYTES} bytes")
    # Memory: one decompressed chunk at a time, whatever the archive expands to.
    assert proc_status(pid, "VmHWM") - peak < 32 * MIB
    # Disk: at most the cap was written before the refusal (plus keter's log lines).
    assert bytes_written(pid) - written < MAX_BYTES + MIB


def test_million_member_archive_is_refused_at_the_member_cap(rig: Rig) -> None:
    many = million_members(rig.bundles / "many.keter")
    assert many.stat().st_size < 16 * MIB
    pid = rig.keter.proc.pid
    peak, written = proc_status(pid, "VmHWM"), bytes_written(pid)
    before = rig.checkpoint()
    rig.keter.drop(many)
    rig.refused(before, "many", f"more than {MAX_MEMBERS} members")
    assert proc_status(pid, "VmHWM") - peak < 32 * MIB
    assert bytes_written(pid) - written < MIB


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("up..here", 'the name contains ".."'),
        ("-rf", "must start with a letter or digit"),
        ("my app", "only letters, digits"),
        ("new\nline", "only letters, digits"),
        ("tab\there", "only letters, digits"),
        ("x" * 65, "65 characters long; at most 64"),
    ],
    ids=["dots", "dash", "space", "newline", "tab", "65-chars"],
)
def test_bad_bundle_name_is_ignored_in_one_line(rig: Rig, name: str, rule: str) -> None:
    before = rig.checkpoint()
    good = make_bundle(rig.bundles / "named.keter", config=webapp_config("named.test", "n1"))
    rig.keter.drop(good, name=f"{name}.keter")
    wait_for(lambda: "ignored" in rig.log_since(before), 10, "the name to be refused")
    # The file's name (escaped by log_text when it would break the line), then the rule.
    shown = log_text(f"{name}.keter")
    assert_one_error(rig.log_since(before), f"{shown}", "ignored", rule)
    assert "deploy" not in rig.log_since(before)
    rig.assert_unchanged(before)
    (rig.keter.incoming / f"{name}.keter").unlink()


# -- config/keter.yaml -----------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """YAML's "billion laughs": each level lists the one before nine times (9**9 leaves)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


CONFIGS = {
    "malformed": ("exec: ../bin/app\nhost: [unclosed\n", None, "not valid YAML"),
    "typed": (
        yaml.safe_dump({"exec": ["../bin/app"], "host": 42, "args": "--no-list"}),
        None,
        "exec: expected a path",
    ),
    "aliasbomb": (alias_bomb(), None, "anchors/aliases"),
    "absexec": (yaml.safe_dump({"exec": "/bin/sh", "host": "a.test"}), None, "escapes the bundle"),
    "direxec": (yaml.safe_dump({"exec": "../bin", "host": "a.test"}), None, "not a regular file"),
    "noexec": (
        yaml.safe_dump({"exec": "../data.txt", "host": "a.test"}),
        {"data.txt": "not a program\n"},
        "not executable",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_keter_yaml_is_refused(rig: Rig, case: str) -> None:
    text, files, rule = CONFIGS[case]
    before = rig.checkpoint()
    bundle = make_bundle(rig.bundles / f"{case}.keter", config=text, files=files)
    rig.keter.drop(bundle)
    rig.refused(before, case, f"bad config in {case}.keter", rule)


def test_exec_that_is_a_symlink_is_refused(rig: Rig) -> None:
    before = rig.checkpoint()
    entries = [
        member("config/keter.yaml", b"exec: ../bin/app\nhost: link.test\n"),
        _link("bin/app", "/bin/sh", tarfile.SYMTYPE),
    ]
    rig.drop("execlink.keter", bundle_bytes(config=None, app_source=None, members=entries))
    rig.refused(before, "execlink", "member 'bin/app' is a symlink")


# -- host names: fuzzed into nginx's config (pure) ----------------------------------------------

_TOKEN = re.compile(r'#[^\n]*|"(?:\\.|[^"\\])*"|[{};]|[^\s{};"#]+')


def nginx_tokens(text: str) -> list[str]:
    """nginx's own tokens: words, quoted strings and ``{ } ;``; comments dropped."""
    tokens = [t for t in _TOKEN.findall(text) if not t.startswith("#")]
    # Whatever the lexer did not consume must be white space: nothing hides between tokens.
    assert re.sub(_TOKEN, "", text).strip() == "", "unlexable text in the config"
    return tokens


def skeleton(tokens: list[str]) -> list[str]:
    """The tokens with every ``server_name`` argument replaced by one placeholder."""
    shape, in_names = [], False
    for token in tokens:
        if in_names and token != ";":
            shape.append("<host>")
            continue
        in_names = token == "server_name"
        shape.append(token)
    return shape


def server_names(tokens: list[str]) -> list[list[str]]:
    names, current = [], None
    for token in tokens:
        if current is not None:
            if token == ";":
                names.append(current)
                current = None
            else:
                current.append(token)
        elif token == "server_name":
            current = []
    return names


class _Listener:
    host = "127.0.0.1"
    port = 8080


_hostile = st.text(
    alphabet=st.sampled_from(
        list("abcxyz09-.*_") + list(" \t\n\r;{}#$\"'\\/:@!") + ["\x00", "\u212a", "é", "\u2028"]
    ),
    max_size=40,
)
_valid = st.from_regex(
    r"(\*\.)?[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z][a-z0-9-]{0,10})*", fullmatch=True
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_hostile, _valid, st.text(max_size=30)), min_size=1, max_size=6))
@example(["ok.test", "evil.test;}server{listen 1;", "x\nserver_name y"])
@example(["\u212a.test", "k.test"])
@example(["*.ok.test", "OK.TEST", "ok.test."])
def test_fuzzed_host_list_never_changes_the_config_structure(hosts: list[str]) -> None:
    accepted = []
    for host in hosts:
        try:
            checked = validate_host(host)
        except ValueError:
            continue
        if checked not in accepted:
            accepted.append(checked)
    other = Site(app="other", hosts=("other.test",), port=4001)
    if not accepted or "other.test" in accepted:
        return
    text = render([Site(app="fuzz", hosts=tuple(accepted), port=4000), other], [_Listener()], 7)
    # A wildcard gets servers of its own (nginx tries regex names in config order).
    placeholders = tuple(
        f"*.h{i}.example" if is_wildcard(host) else f"h{i}.example"
        for i, host in enumerate(accepted)
    )
    reference = render([Site(app="fuzz", hosts=placeholders, port=4000), other], [_Listener()], 7)
    tokens = nginx_tokens(text)
    # Same directives, blocks and arguments as a config made of harmless names...
    assert skeleton(tokens) == skeleton(nginx_tokens(reference))
    # ... and the hosts are exactly the accepted names, one token each.
    exact = sorted(host for host in accepted if not is_wildcard(host))
    wildcards = [[nginx_server_name(host)] for host in accepted if is_wildcard(host)]
    for expected in ([exact] if exact else []) + wildcards:
        assert expected in server_names(tokens)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(_hostile, st.text(max_size=30)), min_size=1, max_size=4))
def test_render_refuses_what_validation_would_have_refused(hosts: list[str]) -> None:
    """Defence in depth: unvalidated names either render with an unchanged structure or
    are refused by the renderer itself."""
    unique = tuple(dict.fromkeys(hosts))
    try:
        text = render([Site(app="raw", hosts=unique, port=4000)], [_Listener()], 3)
    except ValueError:
        return
    placeholders = tuple(f"h{i}.example" for i in range(len(unique)))
    reference = render([Site(app="raw", hosts=placeholders, port=4000)], [_Listener()], 3)
    assert skeleton(nginx_tokens(text)) == skeleton(nginx_tokens(reference))
