"""Fault suite, part 6: PostgreSQL refusing keter's login, slow, down, and back.

Through a real keter. The destructive cases (SIGSTOP, stop) use a cluster of
their own, so the session's shared one (tests/support/postgres.py) is never disturbed;
the refused login only needs a wrong password against the shared one.

Covered elsewhere: an unreachable server failing one app's deploy without
holding up another's (tests/test_postgres_deploy.py); keter crashing between
saving credentials, creating the role and creating the database, and a lost or
malformed postgres.yaml (tests/test_postgres.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support.bundles import make_bundle, webapp_config
from support.daemon import KeterDaemon, failures
from support.faults import (
    NO_JOURNAL,
    assert_one_error,
    error_records,
    settled_generation,
)
from support.net import app_port_range, body, served
from support.postgres import PrivatePostgres
from support.wait import wait_for


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PrivatePostgres]:
    """A cluster these tests may stop and freeze; a folder the postgres user can enter."""
    base = Path(tempfile.mkdtemp(prefix="keter-faults-pg-"))
    server = PrivatePostgres(base)
    try:
        server.init()
        yield server
    finally:
        if server.is_running():
            os.kill(postmaster_pid(server), signal.SIGCONT)
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def postmaster_pid(server: PrivatePostgres) -> int:
    return int((server.data / "postmaster.pid").read_text().split()[0])


def start_keter(keter_factory, dsn: str, retry: float) -> KeterDaemon:
    keter = keter_factory(
        start=False,
        **{"port-range": app_port_range()},
        postgres={"admin-dsn": dsn, "retry-seconds": retry},
    )
    keter.start(env=NO_JOURNAL)
    return keter


def db_bundle(path: Path, host: str, version: str) -> Path:
    return make_bundle(path, config=webapp_config(host, version, postgres=True))


def test_refused_login_fails_the_deploy_in_one_line_without_the_password(
    keter_factory, private_nginx, private_postgres, tmp_path: Path
) -> None:
    wrong = "not-the-password-" + os.urandom(4).hex()
    dsn = make_conninfo(private_postgres.admin_dsn, password=wrong)
    keter = start_keter(keter_factory, dsn, retry=1)
    bundle = tmp_path / "auth.keter"
    keter.drop(make_bundle(bundle, config=webapp_config("auth.test", "v1")))
    served(private_nginx, "auth.test", "v1")
    config = private_nginx.config_file.read_bytes()

    offset = len(keter.log())
    keter.drop(db_bundle(bundle, "auth.test", "v2"))
    wait_for(lambda: error_records(keter.log()[offset:]), 30, "the deploy to fail")
    assert_one_error(
        keter.log()[offset:],
        "auth",
        "database server unavailable for 1s",
        "password authentication failed",
    )
    assert wrong not in keter.log()
    assert body(private_nginx, "auth.test") == b"v1\n"
    assert private_nginx.config_file.read_bytes() == config
    assert not (keter.root / "etc" / "postgres.yaml").exists()  # nothing half-made


def keter_connected_to(keter: KeterDaemon, port: int) -> bool:
    """Whether keter (its admin helper, a child) has a TCP connection open to ``port``
    (it waits on the server)."""
    daemon = psutil.Process(keter.proc.pid)
    connections = []
    for process in [daemon, *daemon.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            connections += process.net_connections(kind="tcp")
    return any(c.raddr and c.raddr.port == port for c in connections)


def test_slow_server_is_waited_for_while_other_apps_deploy(
    keter_factory, private_nginx, own_postgres, tmp_path: Path
) -> None:
    keter = start_keter(keter_factory, own_postgres.admin_dsn, retry=30)
    postmaster = postmaster_pid(own_postgres)
    os.kill(postmaster, signal.SIGSTOP)  # accepts in the kernel, answers nothing
    try:
        keter.drop(db_bundle(tmp_path / "slowdb.keter", "slowdb.test", "s1"))
        wait_for(lambda: keter_connected_to(keter, own_postgres.port), 20, "keter to ask")
        # The provisioner waits on the server; the rest of keter does not.
        keter.drop(make_bundle(tmp_path / "plain.keter", config=webapp_config("plain.test", "p1")))
        served(private_nginx, "plain.test", "p1")
        assert private_nginx.request("slowdb.test")[0] == 404
    finally:
        os.kill(postmaster, signal.SIGCONT)
    served(private_nginx, "slowdb.test", "s1")
    assert error_records(keter.log()) == []
    assert "slowdb" in yaml.safe_load((keter.root / "etc" / "postgres.yaml").read_text())


def test_server_down_then_back_during_the_retry_window_deploys(
    keter_factory, private_nginx, own_postgres, tmp_path: Path
) -> None:
    keter = start_keter(keter_factory, own_postgres.admin_dsn, retry=60)
    own_postgres.stop()
    try:
        keter.drop(db_bundle(tmp_path / "back.keter", "back.test", "b1"))
        wait_for(
            lambda: "back: database server unavailable, retrying" in keter.log(), 20, "a retry"
        )
    finally:
        own_postgres.start()
    served(private_nginx, "back.test", "b1", timeout=30)
    assert error_records(keter.log()) == []


def test_server_down_for_good_fails_the_new_version_and_keeps_the_old(
    keter_factory, private_nginx, own_postgres, tmp_path: Path
) -> None:
    keter = start_keter(keter_factory, own_postgres.admin_dsn, retry=1)
    bundle = tmp_path / "gone.keter"
    keter.drop(db_bundle(bundle, "gone.test", "g1"))
    served(private_nginx, "gone.test", "g1")
    store = (keter.root / "etc" / "postgres.yaml").read_bytes()
    config = private_nginx.config_file.read_bytes()
    generation = settled_generation(private_nginx)

    own_postgres.stop()
    try:
        offset = len(keter.log())
        keter.drop(db_bundle(bundle, "gone.test", "g2"))
        wait_for(lambda: error_records(keter.log()[offset:]), 30, "the deploy to fail")
        line = assert_one_error(
            keter.log()[offset:], "gone", "database", "database server unavailable for 1s"
        )
        # libpq's reason names the server, never the admin password.
        assert conninfo_to_dict(own_postgres.admin_dsn)["password"] not in line
        assert body(private_nginx, "gone.test") == b"g1\n"
        assert private_nginx.config_file.read_bytes() == config
        assert settled_generation(private_nginx) == generation
        assert (keter.root / "etc" / "postgres.yaml").read_bytes() == store
        assert re.search(r"gone: deploy #1 keeps serving", keter.log()[offset:])
    finally:
        own_postgres.start()
    # Back up: the same credentials serve the next version.
    keter.drop(db_bundle(bundle, "gone.test", "g3"))
    served(private_nginx, "gone.test", "g3")
    assert (keter.root / "etc" / "postgres.yaml").read_bytes() == store


def test_keter_restarted_while_the_server_is_down_serves_the_app_once_it_is_back(
    keter_factory, private_nginx, own_postgres, tmp_path: Path
) -> None:
    # A reboot where PostgreSQL comes up late (or keter restarted during an outage):
    # the deploy of every database app failed after retry-seconds and was never tried
    # again; each app answered 404 until an operator acted.
    keter = start_keter(keter_factory, own_postgres.admin_dsn, retry=1)
    keter.drop(db_bundle(tmp_path / "reboot.keter", "reboot.test", "r1"))
    served(private_nginx, "reboot.test", "r1")
    keter.stop()
    own_postgres.stop()
    try:
        keter.start(env=NO_JOURNAL)
        wait_for(lambda: failures(keter, "reboot"), 30, "the deploy at start to fail")
        retrying = "reboot: database server unavailable and nothing serves the app"
        wait_for(lambda: retrying in keter.log(), 10, "a retry to be announced")
        assert private_nginx.request("reboot.test")[0] == 404
    finally:
        own_postgres.start()
    served(private_nginx, "reboot.test", "r1", timeout=60)
