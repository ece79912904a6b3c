"""`postgres: true` end to end: a real keter, nginx and PostgreSQL, and examples/pgtest."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import yaml
from support.bundles import make_bundle, webapp_config
from support.daemon import failures
from support.net import body, served
from support.wait import wait_for

PGTEST = Path(__file__).parent.parent / "examples" / "pgtest" / "bin" / "pgtest"


def pgtest_bundle(path: Path, version: str) -> Path:
    config = {"exec": "../bin/app", "args": [version], "host": "pg.test", "postgres": True}
    return make_bundle(path, config=config, app_source=PGTEST)


def answer(nginx, path: str = "/") -> dict | None:
    data = body(nginx, "pg.test", path)
    return json.loads(data) if data else None


def serving_version(nginx, version: str) -> dict:
    return wait_for(
        lambda: all((a := answer(nginx)) and a["version"] == version for _ in range(5)) and a,
        30,
        f"pgtest {version} to serve",
    )


def test_data_written_by_one_version_is_read_by_the_next(
    keter_factory, private_nginx, private_postgres, tmp_path
):
    keter = keter_factory(postgres={"admin-dsn": private_postgres.admin_dsn})
    bundle = tmp_path / "pgtest.keter"
    keter.drop(pgtest_bundle(bundle, "v1"))
    first = serving_version(private_nginx, "v1")
    assert answer(private_nginx, "/write?note=written-by-v1")["notes"] == ["written-by-v1"]

    keter.drop(pgtest_bundle(bundle, "v2"))
    second = serving_version(private_nginx, "v2")
    assert second["database"] == first["database"]
    assert second["notes"] == ["written-by-v1"]

    store = keter.root / "etc" / "postgres.yaml"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    entry = yaml.safe_load(store.read_text())["pgtest"]
    assert entry["name"] == first["database"]
    # The credentials never reach keter's log.
    assert entry["pass"] not in keter.log()

    # A keter restart reuses the same database and credentials.
    keter.stop()
    keter.start()
    again = serving_version(private_nginx, "v2")
    assert again["database"] == first["database"]
    assert again["notes"] == ["written-by-v1"]
    assert yaml.safe_load(store.read_text())["pgtest"] == entry


def test_unreachable_server_fails_the_deploy_but_not_the_running_version_or_other_apps(
    keter_factory, private_nginx, tmp_path
):
    # Nothing listens on port 1: the admin login can never succeed.
    keter = keter_factory(
        postgres={"admin-dsn": "host=127.0.0.1 port=1 user=admin", "retry-seconds": 2}
    )
    keter.drop(make_bundle(tmp_path / "plain.keter", config=webapp_config("plain.test", "v1")))
    served(private_nginx, "plain.test", "v1")

    keter.drop(pgtest_bundle(tmp_path / "pgtest.keter", "v1"))
    # An app without a database is not held up while the other one waits for PostgreSQL.
    keter.drop(make_bundle(tmp_path / "plain.keter", config=webapp_config("plain.test", "v2")))
    served(private_nginx, "plain.test", "v2")
    assert failures(keter, "pgtest") == []

    [line] = wait_for(lambda: failures(keter, "pgtest"), 30, "the database deploy to fail")
    assert "database" in line
    assert private_nginx.request("pg.test")[0] == 404
    assert body(private_nginx, "plain.test") == b"v2\n"
