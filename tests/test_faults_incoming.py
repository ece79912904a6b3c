"""Fault suite, incoming/: whatever lies in incoming/ or in a tar stream fails alone.

Against the real daemon with real nginx and real inotify. One keter (module
scope, ``support.faults.Rig``) serves a good app while each case puts one odd
entry or bundle into incoming/, then checks that keter is alive, the good app
still answers through nginx, and exactly one ERROR line names the file and the
reason (nothing else changed). The regressions, each of which used to stop or
hang keter (and again at every restart, the file staying in incoming/):

* a FIFO named ``x.keter`` (the watcher's gzip check blocked on it forever);
* a socket, a device, a link to itself (ELOOP killed the watcher), a link out
  of incoming/ to a 0600 file (read as root);
* a tar member with a malformed pax header (``GNU.sparse.size=x``: a
  ValueError out of tarfile killed the unpacker);
* 4 MB and 50 MB bundles of compressed zeros at start-up (the completeness
  check inflated them whole: 9 s and minutes before READY=1).

Then issue 10's fuzz test, tar half: hypothesis feeds the running keter
arbitrary tar headers (``support.tars``), each bundle refused with one line or,
when it happens to be valid, deployed.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import tars
from support.bundles import APPS, bundle_bytes, make_bundle, member, webapp_config, zero_gzip
from support.entries import NOT_REGULAR, OpenWatch, poke
from support.faults import (
    GOOD,
    NO_JOURNAL,
    Rig,
    assert_one_error,
    error_records,
    settled_generation,
)
from support.net import body, served
from support.wait import wait_for

MIB = 1 << 20
MAX_BYTES = 64 * MIB  # the module's unpack cap: the completeness check stops about here


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(
        tmp_path_factory.mktemp("incoming"),
        **{"max-unpacked-bytes": MAX_BYTES, "max-members": 500, "health-check-timeout": 5},
    )
    try:
        yield rig
    finally:
        rig.close()


def alive(rig: Rig) -> None:
    assert rig.keter.proc is not None and rig.keter.proc.poll() is None, "keter has exited"
    assert body(rig.nginx, GOOD) == b"g1\n"


def remove_app(rig: Rig, app: str) -> None:
    """Remove a bundle this module deployed; wait until its process, folder and site are gone."""
    mark = len(rig.keter.log())
    (rig.keter.incoming / f"{app}.keter").unlink()
    wait_for(
        lambda: re.search(rf"{app}: deploy #\d+ stopped and removed", rig.keter.log()[mark:]),
        20,
        f"{app} to be removed",
    )
    wait_for(
        lambda: [p.name for p in (rig.keter.root / "temp").iterdir()] == ["good-1"],
        10,
        f"{app}'s folder to go",
    )
    settled_generation(rig.nginx)


def rescan(rig: Rig) -> None:
    """SIGHUP, and wait for the rescan it causes (a second look at every entry)."""
    count = rig.keter.log().count("incoming: rescanning")
    rig.keter.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: rig.keter.log().count("incoming: rescanning") > count, 10, "the rescan")


# -- entries that are no regular file --------------------------------------------------------


def secret(rig: Rig) -> Path:
    """A 0600 file outside incoming/ (a valid bundle even: a link to it is still refused)."""
    folder = rig.base / "secrets"
    path = folder / "secret.keter"
    if not path.exists():
        folder.mkdir(exist_ok=True)
        path.write_bytes(bundle_bytes(config=webapp_config("secret.test", "s")))
        path.chmod(0o600)
    return path


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_an_entry_that_is_no_regular_file_is_refused_in_one_line(rig: Rig, kind: str) -> None:
    make, what = NOT_REGULAR[kind]
    outside = secret(rig)  # before the checkpoint: it is part of what must stay unchanged
    before = rig.checkpoint()
    watch = OpenWatch(rig.base / "secrets")
    path = rig.keter.incoming / f"{kind}.keter"
    try:
        make(path, outside)
        wait_for(lambda: error_records(rig.log_since(before)), 10, f"{kind}.keter's line")
        # Touched again and rescanned: still the one line, still nothing opened.
        poke(path)
        rescan(rig)
        assert_one_error(rig.log_since(before), f"{kind}.keter", "refused", f"it is a {what}")
        assert "deploy" not in rig.log_since(before)
        alive(rig)
        rig.assert_unchanged(before)
        assert watch.opened == [], "keter opened a file through a link"
    finally:
        watch.close()
        path.unlink(missing_ok=True)
    # The watcher neither hung on it nor died of it: a bundle still deploys.
    rig.drop("after.keter", bundle_bytes(config=webapp_config("after.test", kind)))
    served(rig.nginx, "after.test", kind)
    remove_app(rig, "after")


def test_a_bundle_replaced_by_a_link_keeps_serving_its_version(rig: Rig) -> None:
    rig.drop("keep.keter", bundle_bytes(config=webapp_config("keep.test", "k1")))
    served(rig.nginx, "keep.test", "k1")
    before = rig.checkpoint()
    path = rig.keter.incoming / "keep.keter"
    link = rig.keter.incoming / ".keep.keter.new"
    os.symlink(secret(rig), link)
    os.replace(link, path)  # the app's bundle is now a link
    wait_for(lambda: error_records(rig.log_since(before)), 10, "the link's line")
    rescan(rig)
    assert_one_error(rig.log_since(before), "keep.keter", "refused", "symbolic link")
    assert "keep: bundle removed" not in rig.log_since(before)
    assert body(rig.nginx, "keep.test") == b"k1\n"
    alive(rig)
    remove_app(rig, "keep")  # the name gone, the app goes


# -- a malformed tar header ------------------------------------------------------------------


def pax_member(name: str, data: bytes, pax: dict[str, str]) -> tuple[tarfile.TarInfo, bytes]:
    info, data = member(name, data)
    info.pax_headers = pax
    return info, data


@pytest.mark.parametrize(
    "pax",
    [{"GNU.sparse.size": "x"}, {"GNU.sparse.map": "1,x"}],
    ids=["sparse-size", "sparse-map"],
)
def test_a_malformed_pax_header_is_refused_in_one_line(rig: Rig, pax: dict[str, str]) -> None:
    app = "pax" + str(len(rig.keter.log()))
    before = rig.checkpoint()
    data = bundle_bytes(
        config=webapp_config(f"{app}.test", "p1"),
        members=[pax_member("static/file", b"hello", pax)],  # tarfile writes pax by default
    )
    rig.drop(f"{app}.keter", data)
    # Once tarfile's ValueError (int() of "x"); refused before tarfile reads them now.
    rig.refused(before, app, f"cannot unpack {app}.keter", "a member is a sparse file")
    alive(rig)
    # The unpacker is still there: the next bundle deploys.
    rig.drop(f"{app}.keter", bundle_bytes(config=webapp_config(f"{app}.test", "p2")))
    served(rig.nginx, f"{app}.test", "p2")
    remove_app(rig, app)


# -- a bundle followed by a hole -------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "reason"),
    [(1 << 40, "larger than any bundle keter unpacks"), (8 * MIB, "bytes after the gzip data")],
    ids=["a terabyte", "within the size cap"],
)
def test_a_bundle_followed_by_a_hole_is_refused_and_holds_up_no_other_deploy(
    rig: Rig, size: int, reason: str
) -> None:
    # A 3 KB bundle extended by a hole (`truncate -s 20G`: no disk used) was read and hashed
    # whole (17 s; 14 minutes for 1 TiB) while every other deploy waited, then deployed and
    # archived: the archive wrote the zeros out.
    app = "hole" + str(len(rig.keter.log()))
    before = rig.checkpoint()
    hidden = rig.keter.incoming / f".{app}.keter.part"
    hidden.write_bytes(bundle_bytes(config=webapp_config(f"{app}.test", "h1")))
    os.truncate(hidden, size)
    os.replace(hidden, rig.keter.incoming / f"{app}.keter")
    wait_for(lambda: f"{app}: bundle seen" in rig.log_since(before), 10, f"{app} to be seen")
    rig.drop("other.keter", bundle_bytes(config=webapp_config("other.test", "o1")))
    served(rig.nginx, "other.test", "o1")  # the unpacker took the hole's bundle first
    line = assert_one_error(rig.log_since(before), app, f"cannot unpack {app}.keter", reason)
    assert re.match(rf"{app}: deploy #\d+ failed: ", line), line
    assert not (rig.keter.root / "archive" / app).exists()
    (rig.keter.incoming / f"{app}.keter").unlink()
    remove_app(rig, "other")
    alive(rig)


# -- issue 10 (a), the tar half: a fuzz test against the running keter -----------------------

_names = itertools.count(1)
FUZZ_HOST = "fuzz.test"


def app_members(host: str) -> bytes:
    """The members of a valid bundle serving ``host`` (no end-of-archive blocks)."""
    source = (APPS / "versioned_app.py").read_text()
    if source.startswith("#!"):
        source = source.split("\n", 1)[1]
    config = f"exec: ../bin/app\nhost: {host}\nenv: {{VERSION: fuzz}}\n"
    app = f"#!{sys.executable}\n{source}"
    return tars.tar_members({"config/keter.yaml": config.encode(), "bin/app": app.encode()})


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzzed_tar_headers_fail_alone(rig: Rig, data: st.DataObject) -> None:
    app = f"fuzz{next(_names)}"
    # Mostly hostile throughout; sometimes a valid app's members, then hostile headers
    # or only odd framing (so some examples are valid bundles, which must deploy).
    # One host for every example (each deployed one is removed before the next):
    # what is drawn must not depend on the app's name, or hypothesis, replaying an
    # example, would draw something else.
    valid = app_members(FUZZ_HOST)
    bundle = data.draw(
        st.one_of(
            tars.hostile_bundles(),
            tars.hostile_bundles(),
            tars.hostile_bundles(prefix=valid),
            tars.odd_but_valid(valid),
        ),
        label="bundle",
    )
    before = rig.checkpoint()
    rig.drop(f"{app}.keter", bundle)
    outcome = wait_for(
        lambda: re.search(
            rf"^.*{app}: deploy #\d+ (failed|now serving)", rig.log_since(before), re.M
        ),
        30,
        f"{app} to be refused or deployed",
    )
    event(outcome[1])  # how many were refused and how many deployed (--hypothesis-show-statistics)
    if outcome[1] == "failed":
        assert_one_error(rig.log_since(before), app, "deploy #")
        rig.refused(before, app)  # and nothing else changed; removes the bundle
    else:  # the hostile part happened to be harmless: a valid bundle, deployed
        try:
            assert error_records(rig.log_since(before)) == []
            served(rig.nginx, FUZZ_HOST, "fuzz")
        finally:
            remove_app(rig, app)
    alive(rig)


# -- start-up --------------------------------------------------------------------------------

# Start-up without anything odd takes a second or two; the 4 MB bundle of zeros alone
# used to take 9 s before READY=1, the 50 MB one far longer than systemd's 90 s.
READY_DEADLINE = 15.0


def test_odd_entries_and_zero_bombs_delay_neither_ready_nor_other_apps(
    keter_factory, private_nginx, tmp_path: Path
) -> None:
    # Caps that make the unpack limit 265 MiB: the check of each bomb stops there.
    keter = keter_factory(start=False, **{"max-unpacked-bytes": 256 * MIB, "max-members": 1000})
    keter.incoming.mkdir(parents=True)
    make_bundle(keter.incoming / "good.keter", config=webapp_config(GOOD, "g1"))
    zero_gzip(keter.incoming / "zeros4.keter", 4 * MIB)
    zero_gzip(keter.incoming / "zeros50.keter", 50 * MIB)
    os.mkfifo(keter.incoming / "fifo.keter")
    os.symlink("loop.keter", keter.incoming / "loop.keter")

    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(READY_DEADLINE)
        started = time.monotonic()
        keter.start(wait_ready=False, env={"NOTIFY_SOCKET": address, **NO_JOURNAL})
        assert sock.recv(4096) == b"READY=1"
        ready_after = time.monotonic() - started
    print(f"READY=1 after {ready_after:.2f}s")
    assert ready_after < READY_DEADLINE

    served(private_nginx, GOOD, "g1")
    for name, reason in [
        ("fifo.keter", "refused: it is a FIFO"),
        ("loop.keter", "refused: it is a symbolic link"),
        ("zeros4", "deploy #"),
        ("zeros50", "deploy #"),
    ]:
        wait_for(lambda n=name, r=reason: f"{n}: {r}" in keter.log(), 30, f"{name}'s line")
    errors = error_records(keter.log_since_start())
    assert len(errors) == 4, errors
    for name in ("fifo.keter", "loop.keter", "zeros4", "zeros50"):
        assert len([e for e in errors if e.startswith(f"{name}: ")]) == 1, errors
    assert "empty archive" in next(e for e in errors if e.startswith("zeros50: "))
    assert keter.proc.poll() is None
    assert body(private_nginx, GOOD) == b"g1\n"
