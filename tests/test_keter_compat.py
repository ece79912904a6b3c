"""Keter's own configs (issue 15), at the parser: every key Keter 2.3.5 reads is acted on
or accepted with one warning saying what keter does instead, and none stops keter.

The key lists below were built from Keter 2.3.5's parsers (src/Keter/Config/V04.hs,
V10.hs, Common.hs, Rewrite.hs, Config/Middleware.hs, Plugin/Postgres.hs). Keter's
sample configs (shared/keter-fixtures) each parse, or fail only for a reason listed in
README's "Differences from Keter" table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import KeterDaemon, keter_settings
from support.faults import NO_JOURNAL
from support.net import body, served
from support.samples import keter_sample

from keter.bundle import BundleConfig, BundleConfigError, parse_bundle_config
from keter.bundle.model import PostgresServer
from keter.config import ConfigError, KeterConfig, Listener, PostgresSettings, parse_config
from keter.yamlcheck import load_yaml

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


def test_the_operators_policy_may_forbid_a_server(tmp_path) -> None:
    text = (
        "stanzas: [{type: webapp, exec: ../hello, host: a.test}]\n"
        "plugins: {postgres: [{server: db.elsewhere, port: 5432}]}\n"
    )
    folder = bundle(tmp_path, text)
    assert parse_bundle_config(folder, "app").postgres_server.host == "db.elsewhere"
    with pytest.raises(BundleConfigError) as info:
        parse_bundle_config(folder, "app", postgres=PostgresSettings())
    assert info.value.problems == [
        "plugins.postgres[0]: asks for a database on db.elsewhere port 5432, but keter "
        "provisions databases only on the local server port 5432 (postgres.admin-dsn in "
        "keter-config.yaml)"
    ]
    allowed = PostgresSettings(admin_dsn="host=db.elsewhere port=5432 user=keter")
    assert parse_bundle_config(folder, "app", postgres=allowed).postgres is True


@pytest.mark.parametrize(
    ("dsn", "host", "port", "allowed"),
    [
        ("", "localhost", 5432, True),
        ("", "127.0.0.1", 5432, True),
        ("", "::1", 5432, True),
        ("", "localhost", 5433, False),
        ("host=/run/postgresql port=5433", "127.0.0.1", 5433, True),
        ("host=DB.example port=6432", "db.example", 6432, True),
        ("host=db.example,db2.example", "db2.example", 5432, False),
        ("postgresql://u:p@db.example:7000/x", "db.example", 7000, True),
        ("host=db.example", "localhost", 5432, False),
    ],
)
def test_postgres_server_policy(dsn, host, port, allowed) -> None:
    assert (PostgresSettings(admin_dsn=dsn).server_problem(host, port) is None) is allowed


# -- Keter's sample bundles ---------------------------------------------------------------

# Every reason a Keter sample may be refused for; each is a row of README's
# "Differences from Keter" table.
DOCUMENTED_REFUSALS = [
    "escapes the bundle folder; static files must come from the bundle",
    # jsonp, accept-override, method-override, method-override-post (issue 12)
    "cannot be carried out by keter",
]
REFUSED_MIDDLEWARE = rb"\s*- (accept-override|jsonp|method-override-post|method-override)\n"


@pytest.mark.parametrize(
    ("name", "executables", "refusals", "warnings"),
    [
        ("foo1_0.keter.yaml", (), 6, 0),  # roots ../../ and /home; 4 middleware refused
        ("foo-v04.keter.yaml", (), 2, 0),  # roots ../../ and /home
        ("nc.keter.yaml", ("nc.sh",), 0, 0),
        ("websockets.keter.yaml", ("chat",), 0, 0),
        ("middleware.keter.yaml", ("bin/backend",), 0, 0),  # rate-limiter: nginx's limit_req
    ],
)
def test_keters_sample_bundles(tmp_path, name, executables, refusals, warnings) -> None:
    text = sample(name)
    if refusals:
        found = refused_with(tmp_path, text, *executables)
        assert len(found) == refusals, found
        for problem in found:
            assert any(reason in problem for reason in DOCUMENTED_REFUSALS), problem
        # With its roots moved inside the bundle (and without the middleware nginx cannot
        # carry out), the same config deploys as Keter's.
        text = re.sub(rb"root: (\.\./\.\./|/home)\n", b"root: ../public\n", text)
        text = re.sub(REFUSED_MIDDLEWARE, b"\n", text)
        (tmp_path / "again").mkdir()
        tmp_path = tmp_path / "again"
    config = parse(tmp_path, text, *executables)
    assert len(config.warnings) == warnings, config.warnings
    assert config.serves_http


def refused_with(tmp_path: Path, text: bytes, *executables: str) -> list[str]:
    with pytest.raises(BundleConfigError) as info:
        parse(tmp_path, text, *executables)
    return info.value.problems


V04 = "foo-v04.keter.yaml"


def test_keters_v04_sample_reads_as_keter_reads_it(tmp_path) -> None:
    text = re.sub(
        rb"root: (\.\./\.\./|/home)\n", b"root: ../public\n", sample("foo-v04.keter.yaml")
    )
    config = parse(tmp_path, text)
    [webapp] = config.webapps
    assert webapp.hosts == (
        "tealc-mint",
        "pong",
        "www.mysite.com",
        "*.example.com",
        "baz.example.com",
    )
    assert webapp.args == ("Hello World 1",)
    assert config.postgres is True and config.postgres_server is None
    assert [s.hosts for s in config.static_files] == [
        ("foobar",),
        ("unsafe1",),
        ("unsafe2",),
        ("qux.example.com",),
    ]
    assert all(s.directory_listing for s in config.static_files)  # as Keter 0.4 did
    [redirect] = config.redirects
    assert (redirect.hosts, redirect.status) == (("mysite.com",), 301)


@pytest.mark.parametrize(
    "host", ["*.example.com", "foo.*.example.com", "example.*", "*.*.example.com", "a_b.*"]
)
def test_keters_wildcards_in_any_label(tmp_path, host) -> None:
    config = parse(tmp_path, f"stanzas: [{{type: webapp, exec: ../hello, host: '{host}'}}]\n")
    assert config.webapp.hosts == (host,)


def test_keters_underscore_hosts_are_accepted(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: webapp, exec: ../hello, hosts: [keter1_0, pong1_0, a_b.example]}]\n",
    )
    assert config.webapp.hosts == ("keter1_0", "pong1_0", "a_b.example")


# -- the global config -----------------------------------------------------------------------

EPHEMERAL = (32768, 60999)


def global_config(tmp_path: Path, text: str) -> KeterConfig:
    (tmp_path / "etc").mkdir(exist_ok=True)
    return parse_config(
        load_yaml(text), root=tmp_path, base=tmp_path / "etc", ephemeral_range=EPHEMERAL
    )


def global_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        global_config(tmp_path, text)
    return info.value.problems


def test_graceful_drain_micros_sets_the_drain(tmp_path) -> None:
    assert global_config(tmp_path, "graceful-drain-micros: 1500000").drain_seconds == 1.5
    assert global_config(tmp_path, "graceful-drain-micros: 0").drain_seconds == 0
    both = global_config(tmp_path, "graceful-drain-micros: 1500000\ndrain-seconds: 3")
    assert both.drain_seconds == 3
    assert both.warnings == ("graceful-drain-micros: ignored: drain-seconds is given and wins",)
    for bad in ("-1", "1.5", "yes", "9" * 400):
        [problem] = global_problems(tmp_path, f"graceful-drain-micros: {bad}")
        assert problem.startswith("graceful-drain-micros: expected a number of microseconds")


def test_app_crash_hook_is_one_warning(tmp_path) -> None:
    config = global_config(tmp_path, "app-crash-hook: /usr/local/bin/notify")
    [warning] = config.warnings
    assert warning.startswith("app-crash-hook: accepted for compatibility with Keter; ")
    assert "no crash hook" in warning and "healthcheck-path" in warning
    assert config.healthcheck_path is None


def test_keters_04_listener_keys_become_listeners(tmp_path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "cert.pem").write_bytes(CERT)
    (tmp_path / "etc" / "key.pem").write_bytes(KEY)
    config = global_config(
        tmp_path,
        "host: 127.0.0.1\nport: 8080\n"
        "ssl: {certificate: cert.pem, key: key.pem, port: 8443, session: true}\n",
    )
    assert config.listeners == (
        Listener("127.0.0.1", 8080),
        Listener(
            "*",
            8443,
            certificate=tmp_path / "etc/cert.pem",
            key=tmp_path / "etc/key.pem",
            session=True,
        ),
    )
    assert config.warnings == ()
    assert global_config(tmp_path, "port: 8081").listeners == (Listener("*", 8081),)
    assert global_config(tmp_path, "host: '*4'").listeners == (Listener("0.0.0.0", 80),)
    ignored = global_config(tmp_path, "listeners: [{port: 8082}]\nhost: 127.0.0.1\nport: 1")
    assert ignored.listeners == (Listener("*", 8082),)
    assert ignored.warnings == (
        "host: Keter 0.4's listener key; ignored because listeners is given",
        "port: Keter 0.4's listener key; ignored because listeners is given",
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ssl: {certificate: cert.pem}", "ssl: needs both certificate and key"),
        ("ssl: true", "ssl: expected a mapping like {certificate: ..., key: ...}, got true"),
        ("host: localhost", 'host: expected "*", "*4", "*6", "!4", "!6" or an IP address'),
        ("port: 0", "port: expected an integer 1-65535, got 0"),
        ("port: 443\nssl: {certificate: cert.pem, key: key.pem}",
         "ssl: port 443 is also the plain listener's (port)"),
    ],
)  # fmt: skip
def test_keters_04_listener_mistakes(tmp_path, text, problem) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "cert.pem").write_bytes(CERT)
    (tmp_path / "etc" / "key.pem").write_bytes(KEY)
    found = global_problems(tmp_path, text)
    assert found[0].startswith(problem), found


@pytest.mark.parametrize("uid", ["0", "'0'"])
def test_a_numeric_setuid_is_a_uid(tmp_path, uid) -> None:
    assert global_config(tmp_path, f"setuid: {uid}").setuid == "root"


def test_listener_host_spellings_of_warp(tmp_path) -> None:
    config = global_config(tmp_path, "listeners: [{host: '!4', port: 81}, {host: '!6', port: 82}]")
    assert [(x.host, x.port) for x in config.listeners] == [("0.0.0.0", 81), ("::", 82)]


def test_a_global_env_cannot_set_keters_own_variables(tmp_path) -> None:
    config = global_config(tmp_path, "env: {PORT: '1', APPROOT: x, OTHER: y}")
    assert config.warnings == (
        "env.PORT: keter sets PORT for each app itself; this value is ignored",
        "env.APPROOT: keter sets APPROOT for each app itself; this value is ignored",
    )


def _every_key_config(tmp_path: Path) -> str:
    etc = tmp_path / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for page in ("unknown.html", "missing.html", "exception.html"):
        (etc / page).write_text("<p>sorry</p>")
    return (
        "root: ..\n"
        "port-manager: {}\n"
        "setuid: root\n"
        "ip-from-header: true\n"
        "external-http-port: 8080\n"
        "external-https-port: 8443\n"
        "env: {GREETING: hello}\n"
        "connection-time-bound: 60000\n"
        "cli-port: 1234\n"
        "unknown-host-response-file: unknown.html\n"
        "missing-host-response-file: missing.html\n"
        "proxy-exception-response-file: exception.html\n"
        "rotate-logs: false\n"
        "app-crash-hook: /usr/local/bin/notify\n"
        "graceful-drain-micros: 500000\n"
        "healthcheck-path: /keter-health\n"
    )


def test_a_keter_style_global_config_with_every_key(tmp_path) -> None:
    """Every key Keter 2.3.5's KeterConfig parser reads (V10.hs), plus the healthcheck-path
    its sample documents: each acted on, or one warning for the four keter does not."""
    text = _every_key_config(tmp_path) + "listeners: [{host: '*4', port: 8000}]\n"
    config = global_config(tmp_path, text)
    assert config.root == tmp_path
    assert config.setuid == "root" and config.ip_from_header
    assert (config.external_http_port, config.external_https_port) == (8080, 8443)
    assert dict(config.env) == {"GREETING": "hello"}
    assert config.connection_time_bound == 60000
    assert config.unknown_host_response_file == tmp_path / "etc/unknown.html"
    assert config.drain_seconds == 0.5 and config.healthcheck_path == "/keter-health"
    assert config.listeners == (Listener("0.0.0.0", 8000),)
    assert [w.split(":")[0] for w in config.warnings] == [
        "port-manager",
        "cli-port",
        "rotate-logs",
        "app-crash-hook",
    ]


def test_a_keter_04_style_global_config(tmp_path) -> None:
    """Every key of Keter 0.4's KeterConfig (V04.hs), which Keter still reads."""
    config = global_config(
        tmp_path,
        "root: ..\nport-manager: {}\nhost: 127.0.0.1\nport: 8000\nsetuid: root\n"
        "reverse-proxy: [{reversed-host: a, reversed-port: 80, reversing-host: b}]\n"
        "ip-from-header: false\nconnection-time-bound: 1000\n",
    )
    assert config.listeners == (Listener("127.0.0.1", 8000),)
    assert config.connection_time_bound == 1000
    assert [w.split(":")[0] for w in config.warnings] == ["port-manager", "reverse-proxy"]


# -- against the real daemon -------------------------------------------------------------------


def test_keter_starts_with_keters_global_keys_and_says_what_it_does_instead(
    private_nginx, tmp_path
) -> None:
    """A Keter-style keter-config.yaml (0.4 listener keys and every 2.3.5 key) starts keter:
    one warning per key keter does not act on, and apps deploy through the 0.4 listener."""
    settings = keter_settings(private_nginx)
    del settings["listeners"], settings["drain-seconds"]
    settings.update(load_yaml(_every_key_config(tmp_path / "root")))
    del settings["root"], settings["setuid"], settings["external-http-port"]
    settings.update({"host": "127.0.0.1", "port": private_nginx.port})
    daemon = KeterDaemon(tmp_path / "root", settings)
    daemon.start(env=NO_JOURNAL)
    try:
        daemon.drop(make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1")))
        served(private_nginx, "hello.test", "v1")
        warnings = re.findall(r"WARNING\s+keter: (\S+): accepted for compatibility", daemon.log())
        assert sorted(warnings) == ["app-crash-hook", "cli-port", "port-manager", "rotate-logs"]
    finally:
        daemon.stop()


def test_keters_host_forms_are_served_through_nginx(keter, private_nginx, tmp_path) -> None:
    """'_' in a label and a wildcard in the middle, as Keter's samples use them."""
    config = webapp_config("keter1_0.test", "w1", hosts=["foo.*.wild.test"])
    keter.drop(make_bundle(tmp_path / "wild.keter", config=config))
    served(private_nginx, "keter1_0.test", "w1")
    assert body(private_nginx, "foo.bar.wild.test") == b"w1\n"
    assert body(private_nginx, "foo.wild.test") is None  # a * is exactly one label
    assert body(private_nginx, "foo.a.b.wild.test") is None
