"""Keter's own configs (issue 15), at the parser: every key Keter 2.3.5 reads is acted on
or accepted with one warning saying what keter does instead, and none stops keter.

The key lists below were built from Keter 2.3.5's parsers (src/Keter/Config/V04.hs,
V10.hs, Common.hs, Rewrite.hs, Config/Middleware.hs, Plugin/Postgres.hs). Keter's
sample configs (shared/keter-fixtures) each parse, or fail only for a reason listed in
README's "Differences from Keter" table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.samples import keter_sample

from keter.bundle import BundleConfig, BundleConfigError, parse_bundle_config
from keter.bundle.model import PostgresServer

CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def bundle(tmp_path: Path, text: str | bytes, *executables: str) -> Path:
    folder = tmp_path / "bundle"
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "public").mkdir(exist_ok=True)
    for program in ("hello", "worker", *executables):
        (folder / program).parent.mkdir(parents=True, exist_ok=True)
        (folder / program).write_text("#!/bin/sh\nexit 0\n")
        (folder / program).chmod(0o755)
    (folder / "config" / "cert.pem").write_bytes(CERT)
    (folder / "config" / "key.pem").write_bytes(KEY)
    data = text.encode() if isinstance(text, str) else text
    (folder / "config" / "keter.yaml").write_bytes(data)
    return folder


def parse(tmp_path: Path, text: str | bytes, *executables: str) -> BundleConfig:
    return parse_bundle_config(bundle(tmp_path, text, *executables), "app")


def refused(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(BundleConfigError) as info:
        parse(tmp_path, text)
    return info.value.problems


def sample(name: str) -> bytes:
    path = keter_sample(name)
    if not path.exists():
        pytest.skip("shared Keter fixtures are not here")
    return path.read_bytes()


# -- several web apps ------------------------------------------------------------------


def test_several_webapps_with_their_own_settings(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas:\n"
        "- {type: webapp, exec: ../hello, host: a.test, env: {ROLE: web}}\n"
        "- {type: webapp, exec: ../worker, hosts: [b.test], port-env-vars: [HTTP_PORT],\n"
        "   ensure-alive-time-bound: 5000000}\n"
        "- {type: background, exec: ../worker}\n",
    )
    first, second = config.webapps
    assert (first.hosts, dict(first.env)) == (("a.test",), {"ROLE": "web"})
    assert (second.hosts, second.port_env_vars, second.ensure_alive) == (
        ("b.test",),
        ("HTTP_PORT",),
        5.0,
    )
    assert len(config.backgrounds) == 1 and config.webapp == first


# -- environment precedence ------------------------------------------------------------


def test_a_bundle_setting_keters_own_variables_is_warned_once_each(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas:\n"
        "- type: webapp\n  exec: ../hello\n  host: a.test\n  port-env-vars: [YESOD_PORT]\n"
        "  env: {PORT: '1', APPROOT: 'http://x', YESOD_PORT: '2', PGHOST: db, OTHER: ok}\n"
        "  forward-env: [PORT, HOME]\n"
        "- type: background\n  exec: ../worker\n  env: {PORT: '3', PGUSER: u}\n",
    )
    warned = sorted(w.split(":")[0] for w in config.warnings)
    # Without a database, the PG* variables are the bundle's own; a worker has no PORT.
    assert warned == [
        "stanzas[0].env.APPROOT",
        "stanzas[0].env.PORT",
        "stanzas[0].env.YESOD_PORT",
        "stanzas[0].forward-env[0]",
    ]
    assert all("keter sets" in w and "wins" in w for w in config.warnings)
    assert config.webapp.env["PORT"] == "1"  # kept in the model; keter.environment overrides


def test_with_a_database_its_variables_are_keters_too(tmp_path) -> None:
    config = parse(
        tmp_path,
        "exec: ../hello\nhost: a.test\npostgres: true\n"
        "env: {PGHOST: db, PGPASSWORD: x, DATABASE_URL: y, PGAPPNAME: mine}\n",
    )
    assert sorted(w.split(":")[0] for w in config.warnings) == [
        "env.DATABASE_URL",
        "env.PGHOST",
        "env.PGPASSWORD",
    ]


# -- postgres ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("plugins: {postgres: true}", None),
        ("plugins: {postgres: [{server: db.internal, port: 6432}]}", ("db.internal", 6432)),
        ("plugins: {postgres: [{server: 10.0.0.5}]}", ("10.0.0.5", 5432)),
        ("plugins: {postgres: [{server: '::1', port: 5433}]}", ("::1", 5433)),
    ],
)
def test_postgres_plugin_and_its_server_list(tmp_path, text, server) -> None:
    config = parse(tmp_path, f"stanzas: [{{type: webapp, exec: ../hello, host: a.test}}]\n{text}")
    assert config.postgres is True
    expected = PostgresServer(host=server[0], port=server[1]) if server else None
    assert config.postgres_server == expected


def test_only_the_first_postgres_server_counts_as_in_keter(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: webapp, exec: ../hello, host: a.test}]\n"
        "plugins: {postgres: [{server: a.db, port: 1}, {server: b.db, port: 2}]}\n",
    )
    assert config.postgres_server == PostgresServer(host="a.db", port=1)
    assert config.warnings == (
        "plugins.postgres: 2 servers listed; as in Keter only the first is used",
    )


def test_a_postgres_server_with_a_zone_id_is_refused(tmp_path) -> None:
    [problem] = refused(
        tmp_path,
        "stanzas: [{type: webapp, exec: ../hello, host: a.test}]\n"
        "plugins: {postgres: [{server: 'fe80::1%eth0', port: 5432}]}\n",
    )
    assert problem.startswith("plugins.postgres[0].server: ") and "zone id" in problem
