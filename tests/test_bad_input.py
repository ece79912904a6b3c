"""Bad bundles and a misbehaving nginx: refused with one clear line, nothing else changes."""

from __future__ import annotations

import os
import socket
import tarfile
import uuid
from pathlib import Path

import pytest
from support.bundles import config_member, make_bundle, member, webapp_config
from support.daemon import failures
from support.net import body, served
from support.wait import wait_for

GOOD = "good.test"


@pytest.fixture
def running(keter, private_nginx, tmp_path):
    """A keter already serving one good app, which every bad bundle must leave alone."""
    keter.drop(make_bundle(tmp_path / "good.keter", config=webapp_config(GOOD, "good-v1")))
    served(private_nginx, GOOD, "good-v1")
    return keter


def assert_refused(keter, nginx, app: str, reason: str, tmp_path: Path, marker: str = "") -> None:
    line = wait_for(lambda: failures(keter, app), 20, f"{app} to be refused")
    assert len(line) == 1, line
    assert reason in line[0], line[0]
    # Other apps keep serving and nothing of the bad bundle serves.
    assert body(nginx, GOOD) == b"good-v1\n"
    if marker:
        # Wherever a "../" chain from the unpack folder could have put it, and the test's tree.
        places = [*(keter.root / "temp" / app).parents, Path("/tmp")]
        written = [p for p in places if (p / f"{marker}.txt").exists()]
        written += list(tmp_path.rglob(f"{marker}*"))
        assert written == [], written
    wait_for(
        lambda: [p.name for p in (keter.root / "temp").iterdir()] == ["good-1"],
        10,
        "only the good app's folder to remain",
    )


def test_path_traversal_is_refused(running, private_nginx, tmp_path):
    marker = f"escaped-{uuid.uuid4().hex}"
    bundle = make_bundle(
        tmp_path / "trav.keter",
        config=None,
        app_source=None,
        members=[config_member(), member(f"../../{marker}.txt", b"gotcha")],
    )
    running.drop(bundle)
    assert_refused(running, private_nginx, "trav", "escapes", tmp_path, marker)


def test_absolute_path_is_refused(running, private_nginx, tmp_path):
    marker = f"absolute-{uuid.uuid4().hex}"
    bundle = make_bundle(
        tmp_path / "abs.keter",
        config=None,
        app_source=None,
        members=[config_member(), member(f"/tmp/{marker}.txt", b"x")],
    )
    running.drop(bundle)
    assert_refused(running, private_nginx, "abs", "absolute", tmp_path, marker)
    assert not Path(f"/tmp/{marker}.txt").exists()


def test_symlink_escape_is_refused(running, private_nginx, tmp_path):
    marker = f"through-link-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    outside.mkdir()
    bundle = make_bundle(
        tmp_path / "link.keter",
        config=None,
        app_source=None,
        members=[
            config_member(),
            member("data", type=tarfile.SYMTYPE, linkname=str(outside)),
            member(f"data/{marker}.txt", b"x"),
        ],
    )
    running.drop(bundle)
    assert_refused(running, private_nginx, "link", "link", tmp_path, marker)
    assert list(outside.iterdir()) == []


def test_not_gzip_is_refused(running, private_nginx, tmp_path):
    (tmp_path / "junk.keter").write_bytes(os.urandom(4096))
    running.drop(tmp_path / "junk.keter")
    assert_refused(running, private_nginx, "junk", "gzip", tmp_path)


def test_missing_config_is_refused(running, private_nginx, tmp_path):
    bundle = make_bundle(
        tmp_path / "noconf.keter",
        config=None,
        app_source=None,
        members=[member("bin/app", b"#!/bin/sh\n", mode=0o755)],
    )
    running.drop(bundle)
    assert_refused(running, private_nginx, "noconf", "config/keter.yaml", tmp_path)


def test_exec_outside_the_bundle_is_refused(running, private_nginx, tmp_path):
    bundle = make_bundle(
        tmp_path / "outside.keter", config={"exec": "../../../../bin/sh", "host": "outside.test"}
    )
    running.drop(bundle)
    assert_refused(running, private_nginx, "outside", "escapes the bundle", tmp_path)


@pytest.mark.parametrize("host", ["bad host", "a;b.test", "x{y}.test", "1.2.3.4", "_under.test"])
def test_invalid_host_is_refused(running, private_nginx, tmp_path, host):
    bundle = make_bundle(tmp_path / "badhost.keter", config=webapp_config(host, "v1"))
    before = Path(private_nginx.config_file).read_bytes()
    running.drop(bundle)
    assert_refused(running, private_nginx, "badhost", "host", tmp_path)
    assert Path(private_nginx.config_file).read_bytes() == before


def test_duplicate_host_is_refused_and_names_the_owner(running, private_nginx, tmp_path):
    bundle = make_bundle(tmp_path / "thief.keter", config=webapp_config(GOOD, "stolen"))
    running.drop(bundle)
    assert_refused(running, private_nginx, "thief", "already served by app good", tmp_path)


# -- nginx refusing the new config ------------------------------------------------------


def redeploy_good(keter, tmp_path) -> None:
    """A new version of GOOD with one more host: its routes change, so the switch goes
    through nginx (a redeploy with the very same routes is a kernel switch alone)."""
    config = webapp_config(GOOD, "good-v2", **{"extra-hosts": ["more.good.test"]})
    keter.drop(make_bundle(tmp_path / "good.keter", config=config))


def test_nginx_test_failure_keeps_the_old_version(running, private_nginx, tmp_path):
    (private_nginx.extra_dir / "broken.conf").write_text("this is not nginx;\n")
    before = Path(private_nginx.config_file).read_bytes()
    redeploy_good(running, tmp_path)
    [line] = wait_for(lambda: failures(running, "good"), 30, "the deploy to fail")
    assert "nginx" in line and "unknown directive" in line
    assert body(private_nginx, GOOD) == b"good-v1\n"
    assert Path(private_nginx.config_file).read_bytes() == before
    # Once nginx is fixed, the next deploy goes through.
    (private_nginx.extra_dir / "broken.conf").unlink()
    redeploy_good(running, tmp_path)
    served(private_nginx, GOOD, "good-v2")


def test_reload_that_nginx_does_not_take_keeps_the_old_version(running, private_nginx, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        # nginx -t does not bind ports, so this passes the test but the reload fails to bind.
        (private_nginx.extra_dir / "taken.conf").write_text(
            f"server {{ listen 127.0.0.1:{port}; return 204; }}\n"
        )
        redeploy_good(running, tmp_path)
        [line] = wait_for(lambda: failures(running, "good"), 40, "the deploy to fail")
    assert "previous configuration" in line
    assert body(private_nginx, GOOD) == b"good-v1\n"
