"""Keter's full bundle format: every stanza type and key, Keter's own samples, and the
pure step from a parsed bundle to what nginx serves (``keter.routes``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.bundles import make_bundle
from support.samples import keter_sample
from support.tls import make_certificate

from keter.bundle import (
    AutoheadConfig,
    Background,
    BasicAuthConfig,
    BundleConfig,
    BundleConfigError,
    HeadersConfig,
    LocalConfig,
    RateAlgorithm,
    RateIdentifier,
    RateLimiterConfig,
    Redirect,
    RedirectAction,
    ReverseProxy,
    StaticFiles,
    Throttle,
    TlsConfig,
    parse_bundle_config,
)
from keter.config import KeterConfig, Listener, NginxSettings
from keter.environment import app_environment
from keter.messages import (
    BasicAuth,
    LocalOnly,
    ProxyApp,
    ProxyRemote,
    RedirectRule,
    Route,
    SendRedirect,
    ServeFiles,
    Site,
    TlsFiles,
)
from keter.routes import approot, dashboard_site, deploy_problems, sites_for
from keter.switch.nft import Table

EXECUTABLES = ("hello", "worker", "nc.sh", "chat", "bin/backend")


def unpacked(tmp_path: Path, config: str | bytes, *folders: str) -> Path:
    """An unpacked bundle: config/keter.yaml, the samples' executables and ``folders``."""
    return make_bundle(
        tmp_path / "bundle",
        config=config,
        folders=["config", *folders],
        executables=EXECUTABLES,
        app_source=None,
        unpacked=True,
    )


def parse(tmp_path: Path, config: str | bytes, *folders: str) -> BundleConfig:
    return parse_bundle_config(unpacked(tmp_path, config, *folders), "app")


def problems(tmp_path: Path, config: str, *folders: str) -> list[str]:
    with pytest.raises(BundleConfigError) as info:
        parse(tmp_path, config, *folders)
    return info.value.problems


def only_problem(tmp_path: Path, stanza: str) -> str:
    """The one problem a bundle made of ``stanza`` has."""
    found = problems(tmp_path, f"stanzas: [{stanza}]")
    assert len(found) == 1, found
    return found[0]


def sample(name: str) -> bytes:
    path = keter_sample(name)
    if not path.exists():
        pytest.skip("shared Keter fixtures are not here")
    return path.read_bytes()


# -- Keter's own samples -----------------------------------------------------------------


def test_v10_sample_with_roots_outside_the_bundle_is_refused_naming_each(tmp_path) -> None:
    found = problems(tmp_path, sample("foo1_0.keter.yaml"))
    roots = [problem for problem in found if ".root:" in problem]
    assert roots == [
        'stanzas[2].root: "../../" escapes the bundle folder; '
        "static files must come from the bundle",
        'stanzas[3].root: "/home" escapes the bundle folder; '
        "static files must come from the bundle",
    ]
    # The four WAI middlewares nginx cannot carry out are refused too (issue 12).
    refused = ["accept-override", "jsonp", "method-override", "method-override-post"]
    assert [problem.split(" cannot be")[0] for problem in found[2:]] == [
        f"stanzas[3].middleware[{i}]: {name}" for i, name in enumerate(refused, start=1)
    ]
    # Its hosts (keter1_0, ...) carry '_', which keter accepts as Keter does.
    assert len(found) == 6, found


def test_v04_sample_with_roots_outside_the_bundle_is_refused_naming_each(tmp_path) -> None:
    found = problems(tmp_path, sample("foo-v04.keter.yaml"))
    assert [problem.split(":")[0] for problem in found] == [
        "static-hosts[1].root",
        "static-hosts[2].root",
    ]
    assert '"../../" escapes the bundle folder' in found[0]
    assert '"/home" escapes the bundle folder' in found[1]


def test_v10_sample_parses_into_the_model_once_its_roots_are_inside(tmp_path) -> None:
    text = sample("foo1_0.keter.yaml").replace(b"root: ../../", b"root: ../public")
    for refused in (b"accept-override", b"jsonp", b"method-override-post", b"method-override"):
        text = text.replace(b"         - " + refused + b"\n", b"")
    config = parse(tmp_path, text.replace(b"root: /home", b"root: ../public/home"), "public/home")
    folder = (tmp_path / "bundle").resolve()
    webapp = config.webapp
    assert webapp is not None
    assert webapp.exec == folder / "hello"
    assert webapp.args == ("Hello World v1.0",)
    assert webapp.hosts == ("keter1_0", "pong1_0")
    assert dict(webapp.env) == {"FROM_KETER_CONFIG": "foo bar baz"}
    assert webapp.forward_env == ("FROM_SYSTEM_ENV", "ANOTHER_ENV_VAR")
    assert webapp.ssl is False
    assert config.backgrounds == (
        Background(
            exec=folder / "worker",
            args=("Keter Background Worker",),
            env={"FROM_KETER_CONFIG": "foo bar baz"},
            forward_env=("ENV_VAR_FOR_BACKGROUND",),
            restart_count=10,
            restart_delay=6.0,
        ),
    )
    listed, protected = config.static_files
    assert listed == StaticFiles(
        root=folder / "public",
        hosts=("unsafe1_1_0",),
        directory_listing=True,
        requires_secure=True,
    )
    assert protected.root == folder / "public/home"
    assert protected.hosts == ("unsafe2_1_0",)
    assert protected.directory_listing is False
    assert protected.middleware == (
        AutoheadConfig(),
        LocalConfig(status=405, message="Keter Rocks (local status message)"),
        BasicAuthConfig(realm="Keter Basic Auth", credentials=(("jon", "rocks"), ("bla", "dada"))),
        HeadersConfig(headers=(("Access-Control-Allow-Origin", "*"),)),
    )
    assert config.reverse_proxies == (
        ReverseProxy(hosts=("localhost",), reversed_host="www.yesodweb.com", reversed_port=80),
    )
    assert config.redirects == (
        Redirect(
            hosts=("asome.com", "www.asome.com", "bsome.com", "www.bsome.com"),
            status=303,
            actions=(RedirectAction(host="keter1_0", secure=True),),
        ),
    )
    assert config.postgres is False
    assert config.warnings == ()
    assert set(config.all_hosts) == {
        "keter1_0", "pong1_0", "unsafe1_1_0", "unsafe2_1_0", "localhost",
        "asome.com", "www.asome.com", "bsome.com", "www.bsome.com",
    }  # fmt: skip


def test_v04_sample_parses_into_the_model_once_its_roots_are_inside(tmp_path) -> None:
    text = sample("foo-v04.keter.yaml").replace(b"root: ../../", b"root: ../a")
    config = parse(tmp_path, text.replace(b"root: /home", b"root: ../b"), "a", "b")
    folder = (tmp_path / "bundle").resolve()
    assert config.webapp is not None
    assert config.webapp.args == ("Hello World 1",)
    assert config.webapp.hosts == (
        "tealc-mint", "pong", "www.mysite.com", "*.example.com", "baz.example.com",
    )  # fmt: skip
    # Keter 0.4's static hosts listed their folders.
    assert [(s.hosts, s.root, s.directory_listing) for s in config.static_files] == [
        (("foobar",), folder, True),
        (("unsafe1",), folder / "a", True),
        (("unsafe2",), folder / "b", True),
        (("qux.example.com",), folder, True),
    ]
    # ... and redirected every path of a host to another with a 301.
    assert config.redirects == (
        Redirect(
            hosts=("mysite.com",), status=301, actions=(RedirectAction(host="www.mysite.com"),)
        ),
    )
    assert config.postgres is True
    assert config.warnings == ()


def test_nc_sample_has_an_ensure_alive_bound_in_microseconds(tmp_path) -> None:
    config = parse(tmp_path, sample("nc.keter.yaml"))
    assert config.webapp is not None
    assert config.webapp.hosts == ("localhost",)
    assert config.webapp.ensure_alive == 15.0
    assert config.warnings == ()


def test_websockets_sample(tmp_path) -> None:
    config = parse(tmp_path, sample("websockets.keter.yaml"))
    assert config.webapp is not None
    assert config.webapp.hosts == ("keter-websockets",)
    assert config.warnings == ()


def test_middleware_sample_reads_the_rate_limiter(tmp_path) -> None:
    config = parse(tmp_path, sample("middleware.keter.yaml"))
    assert config.webapp is not None
    assert config.webapp.hosts == ("rl.test", "xff.test")
    assert config.webapp.ensure_alive == 3.0
    throttle = Throttle(
        name="ip",
        limit=4,
        period=5,
        algorithm=RateAlgorithm.FIXED_WINDOW,
        identifier=RateIdentifier.IP,
    )
    assert config.webapp.middleware == (RateLimiterConfig(throttles=(throttle,)),)
    assert config.warnings == ()


# -- webapp --------------------------------------------------------------------------------


def test_every_webapp_key(tmp_path) -> None:
    certificate, key = make_certificate(tmp_path / "certs", "own", "a.test")
    config = parse(
        tmp_path,
        f"""
        stanzas:
          - type: webapp
            exec: ../hello
            args: [serve, 8]
            env: {{MODE: prod}}
            forward-env: [HOME, LANG, HOME]
            hosts: [A.test, b.test]
            ssl: {{certificate: {certificate}, key: {key}}}
            port-env-vars: [HTTP_PORT, WARP_PORT]
            ensure-alive-time-bound: 2500000
            connection-time-bound: 1500
            requires-secure: true
            health-check-path: /healthz
        plugins: {{postgres: true}}
        """,
    )
    webapp = config.webapp
    assert webapp is not None
    assert webapp.args == ("serve", "8")
    assert dict(webapp.env) == {"MODE": "prod"}
    assert webapp.forward_env == ("HOME", "LANG")  # listed once
    assert webapp.hosts == ("a.test", "b.test")
    assert webapp.ssl == TlsConfig(certificate=certificate, key=key)
    assert webapp.port_env_vars == ("HTTP_PORT", "WARP_PORT")
    assert webapp.ensure_alive == 2.5
    assert webapp.time_bound == 1.5
    assert webapp.requires_secure is True
    assert webapp.health_check_path == "/healthz"
    assert config.postgres is True
    assert config.warnings == ()


def test_keters_own_secrets_are_never_forwarded(tmp_path, monkeypatch) -> None:
    # An admin password in keter's environment (PGPASSWORD, kept out of the config
    # file) was any bundle's for the asking: forward-env: [PGPASSWORD].
    config = parse(
        tmp_path,
        """
        stanzas:
          - type: webapp
            exec: ../hello
            host: a.test
            forward-env: [PGPASSWORD, NOTIFY_SOCKET, REGION]
        """,
    )
    assert [w for w in config.warnings if "never forwarded" in w] == [
        "stanzas[0].forward-env[0]: keter's own PGPASSWORD is never forwarded to an app; ignored",
        "stanzas[0].forward-env[1]: keter's own NOTIFY_SOCKET is never forwarded to an app; "
        "ignored",
    ]
    for name, value in (("PGPASSWORD", "s3cret"), ("NOTIFY_SOCKET", "@n"), ("REGION", "eu")):
        monkeypatch.setenv(name, value)
    env = app_environment(KeterConfig(root=tmp_path / "root"), config.webapp, 4001, None)
    assert env["REGION"] == "eu" and "PGPASSWORD" not in env and "NOTIFY_SOCKET" not in env


def test_webapp_ssl_true_uses_the_listener_certificate(tmp_path) -> None:
    config = parse(tmp_path, "stanzas: [{type: webapp, exec: ../hello, host: a, ssl: true}]")
    assert config.webapp is not None and config.webapp.ssl is True


def test_ssl_certificate_paths_are_relative_to_the_config_folder(tmp_path) -> None:
    folder = unpacked(tmp_path, "")
    make_certificate(folder / "certs", "own", "a")
    (folder / "config/keter.yaml").write_text(
        "stanzas:\n  - {type: webapp, exec: ../hello, host: a,\n"
        "     ssl: {certificate: ../certs/own.crt, key: ../certs/own.key,"
        " chain-certificates: [../certs/own.crt]}}\n"
    )
    webapp = parse_bundle_config(folder, "app").webapp
    assert webapp is not None
    assert webapp.ssl == TlsConfig(
        certificate=folder / "certs/own.crt",
        key=folder / "certs/own.key",
        chain=(folder / "certs/own.crt",),
    )


def test_bad_certificates_fail_the_bundle_naming_the_file(tmp_path) -> None:
    certificate, key = make_certificate(tmp_path / "certs", "own", "a")
    base = "stanzas: [{type: webapp, exec: ../hello, host: a, ssl: {certificate: %s, key: %s}}]"
    found = problems(tmp_path, base % (tmp_path / "nope.crt", key))
    assert found == [f"stanzas[0].ssl.certificate: {tmp_path}/nope.crt cannot be read: "
                     "No such file or directory"]  # fmt: skip
    (tmp_path / "bundle").rename(tmp_path / "one")
    found = problems(tmp_path, base.replace("}}]", ", x: 1}}]") % (certificate, key))
    assert found == ["stanzas[0].ssl.x: unknown key"]
    (tmp_path / "bundle").rename(tmp_path / "two")
    # Swapped files: a certificate is no key, and a key no certificate.
    found = problems(tmp_path, base % (key, certificate))
    assert found == [
        f"stanzas[0].ssl.certificate: {key} is not a PEM certificate",
        f"stanzas[0].ssl.key: {certificate} is not a PEM private key",
    ]


@pytest.mark.parametrize(
    ("stanza", "expected"),
    [
        ("{type: webapp, host: a}", "stanzas[0].exec: missing; a webapp stanza needs the program"),
        ("{type: webapp, exec: ../hello}", "stanzas[0].host: missing; at least one host"),
        ("{type: webapp, exec: ../hello, host: a, ssl: on-ish}", "stanzas[0].ssl: expected true"),
        ("{type: webapp, exec: ../hello, host: a, ssl: {key: k.pem}}",
         "stanzas[0].ssl: missing certificate"),
        ("{type: webapp, exec: ../hello, host: a, forward-env: HOME}",
         'stanzas[0].forward-env: expected a list of variable names, got "HOME"'),
        ("{type: webapp, exec: ../hello, host: a, port-env-vars: [1PORT]}",
         'stanzas[0].port-env-vars[0]: expected a variable name'),
        ("{type: webapp, exec: ../hello, host: a, ensure-alive-time-bound: 0}",
         "stanzas[0].ensure-alive-time-bound: expected a positive number of microseconds"),
        ("{type: webapp, exec: ../hello, host: a, connection-time-bound: -1}",
         "stanzas[0].connection-time-bound: expected a number of milliseconds from 0"),
        ("{type: webapp, exec: ../hello, host: a, requires-secure: 1}",
         "stanzas[0].requires-secure: expected true or false, got 1"),
        ("{type: webapp, exec: ../../x, host: a}", 'stanzas[0].exec: "../../x" escapes the bundle'),
        ("{type: webapp, exec: ../hello, hosts: [a, 'b c']}", 'stanzas[0].hosts[1]: "b c" is not'),
    ],
)  # fmt: skip
def test_webapp_mistakes_name_their_key(tmp_path, stanza: str, expected: str) -> None:
    problem = only_problem(tmp_path, stanza)
    assert problem.startswith(expected), problem


def test_several_webapp_stanzas_each_become_a_web_app(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas:\n  - {type: webapp, exec: ../hello, host: a}\n"
        "  - {type: webapp, exec: ../hello, hosts: [b, c], args: [two]}\n",
    )
    assert [w.hosts for w in config.webapps] == [("a",), ("b", "c")]
    assert config.webapps[1].args == ("two",)
    assert config.webapp == config.webapps[0]  # the first, for callers that know one
    assert config.all_hosts == ("a", "b", "c")


def test_two_web_apps_cannot_share_a_host(tmp_path) -> None:
    found = problems(
        tmp_path,
        "stanzas:\n  - {type: webapp, exec: ../hello, host: a}\n"
        "  - {type: webapp, exec: ../hello, hosts: [b, a]}\n",
    )
    assert found == ["stanzas[1]: host a is already claimed by stanzas[0]"]


# -- background ------------------------------------------------------------------------------


def test_background_defaults_are_keters(tmp_path) -> None:
    config = parse(tmp_path, "stanzas: [{type: background, exec: ../worker}]")
    folder = (tmp_path / "bundle").resolve()
    assert config.webapp is None
    assert config.backgrounds == (Background(exec=folder / "worker"),)
    worker = config.backgrounds[0]
    assert (worker.restart_count, worker.restart_delay) == (None, 5.0)  # unlimited, 5 s
    assert config.runs_something and not config.serves_http


def test_background_keys(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: background, exec: ../worker, args: [-v], env: {A: 1},"
        " forward-env: [TZ], restart-count: 0, restart-delay-seconds: 0.5}]",
    )
    [worker] = config.backgrounds
    assert (worker.args, dict(worker.env), worker.forward_env) == (("-v",), {"A": "1"}, ("TZ",))
    assert (worker.restart_count, worker.restart_delay) == (0, 0.5)
    assert parse(tmp_path / "u", "stanzas: [{type: background, exec: ../worker, "
                 "restart-count: unlimited}]").backgrounds[0].restart_count is None  # fmt: skip


@pytest.mark.parametrize(
    ("stanza", "expected"),
    [
        ("{type: background}", "stanzas[0].exec: missing; a background stanza needs the program"),
        ("{type: background, exec: ../worker, restart-count: -1}",
         'stanzas[0].restart-count: expected a number of restarts or "unlimited", got -1'),
        ("{type: background, exec: ../worker, restart-count: forever}",
         "stanzas[0].restart-count: expected"),
        ("{type: background, exec: ../worker, restart-delay-seconds: soon}",
         'stanzas[0].restart-delay-seconds: expected a number of seconds from 0'),
        ("{type: background, exec: ../nope}", 'stanzas[0].exec: "../nope" does not exist'),
    ],
)  # fmt: skip
def test_background_mistakes_name_their_key(tmp_path, stanza: str, expected: str) -> None:
    problem = only_problem(tmp_path, stanza)
    assert problem.startswith(expected), problem


def test_background_keys_of_a_webapp_are_warned_about(tmp_path) -> None:
    config = parse(tmp_path, "stanzas: [{type: background, exec: ../worker, host: a}]")
    assert config.warnings == ("stanzas[0].host: unknown key; ignored",)


# -- static files ----------------------------------------------------------------------------


def test_static_files_keys(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: static-files, root: ../public, hosts: [s.test, t.test],"
        " directory-listing: true, requires-secure: true, ssl: true}]",
        "public",
    )
    assert config.static_files == (
        StaticFiles(
            root=(tmp_path / "bundle/public").resolve(),
            hosts=("s.test", "t.test"),
            directory_listing=True,
            requires_secure=True,
            ssl=True,
        ),
    )
    assert config.webapp is None and config.serves_http


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("../../", '"../../" escapes the bundle folder'),
        ("/home", '"/home" escapes the bundle folder'),
        ("../public/../../", '"../public/../../" escapes the bundle folder'),
        ("../link", '"../link" escapes the bundle folder'),  # a symlink out of the bundle
        ("../missing", '"../missing" is not a folder in the bundle'),
        ("../hello", '"../hello" is not a folder in the bundle'),
    ],
)
def test_a_static_root_outside_the_bundle_is_refused(tmp_path, root: str, expected: str) -> None:
    folder = unpacked(tmp_path, f"stanzas: [{{type: static-files, root: '{root}', host: s}}]")
    (folder / "public").mkdir()
    (folder / "link").symlink_to(tmp_path)
    with pytest.raises(BundleConfigError) as info:
        parse_bundle_config(folder, "app")
    assert info.value.problems == [f"stanzas[0].root: {expected}" + (
        "; static files must come from the bundle" if "escapes" in expected else "")]  # fmt: skip


def test_static_files_need_a_root_and_a_host(tmp_path) -> None:
    assert problems(tmp_path, "stanzas: [{type: static-files}]") == [
        "stanzas[0].root: missing; the bundle folder to serve",
        "stanzas[0].host: missing; at least one host is needed (host or hosts)",
    ]


def test_static_connection_time_bound_has_no_effect(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: static-files, root: .., host: s, connection-time-bound: 5}]",
    )
    assert config.warnings == (
        "stanzas[0].connection-time-bound: has no effect on files nginx serves; ignored",
    )


# -- redirect --------------------------------------------------------------------------------


def test_redirect_keys_and_defaults(tmp_path) -> None:
    config = parse(
        tmp_path,
        """
        stanzas:
          - type: redirect
            host: old.test
            actions:
              - {path: /docs, url: "https://docs.example.com/start?x=1"}
              - {path: /shop, host: shop.test, secure: true, port: 8443}
              - {host: new.test}
          - type: redirect
            hosts: [a.test]
            status: 308
            requires-secure: true
            actions: [{url: /elsewhere}]
        """,
    )
    first, second = config.redirects
    assert first == Redirect(
        hosts=("old.test",),
        status=303,  # Keter's default
        actions=(
            RedirectAction(path="/docs", url="https://docs.example.com/start?x=1"),
            RedirectAction(path="/shop", host="shop.test", secure=True, port=8443),
            RedirectAction(host="new.test"),
        ),
    )
    assert (second.status, second.requires_secure, second.actions) == (
        308,
        True,
        (RedirectAction(url="/elsewhere"),),
    )


@pytest.mark.parametrize(
    ("stanza", "expected"),
    [
        ("{type: redirect, host: a, actions: [{host: b}], status: 200}",
         "stanzas[0].status: expected one of 301, 302, 303, 307, 308, got 200"),
        ("{type: redirect, host: a}", "stanzas[0].actions: expected a list like"),
        ("{type: redirect, host: a, actions: []}", "stanzas[0].actions: expected a list like"),
        ("{type: redirect, host: a, actions: [b]}", "stanzas[0].actions[0]: expected a mapping"),
        ("{type: redirect, host: a, actions: [{}]}",
         "stanzas[0].actions[0]: missing url or host"),
        ("{type: redirect, host: a, actions: [{url: /x, host: b}]}",
         "stanzas[0].actions[0]: give url or host, not both"),
        ("{type: redirect, host: a, actions: [{url: 'http://x y'}]}",
         "stanzas[0].actions[0].url: expected an absolute URL"),
        ("{type: redirect, host: a, actions: [{url: 'http://x/\"'}]}",
         "stanzas[0].actions[0].url: percent-encode quotes"),
        ("{type: redirect, host: a, actions: [{host: '*.b'}]}",
         "stanzas[0].actions[0].host: expected one host name, not a wildcard"),
        ("{type: redirect, host: a, actions: [{host: b, port: 0}]}",
         "stanzas[0].actions[0].port: expected an integer 1-65535, got 0"),
        ("{type: redirect, host: a, actions: [{host: b, path: 'x'}]}",
         'stanzas[0].actions[0].path: expected a URL path starting with "/"'),
        ("{type: redirect, host: a, actions: [{host: b, path: '/a;b'}]}",
         "stanzas[0].actions[0].path: expected a URL path"),
        ("{type: redirect, host: a, actions: [{host: b, secure: yes-ish}]}",
         "stanzas[0].actions[0].secure: expected true or false"),
        ("{type: redirect, host: a, actions: [{host: b, to: c}]}",
         "stanzas[0].actions[0].to: unknown key"),
    ],
)  # fmt: skip
def test_redirect_mistakes_name_their_key(tmp_path, stanza: str, expected: str) -> None:
    problem = only_problem(tmp_path, stanza)
    assert problem.startswith(expected), problem


# -- reverse proxy ---------------------------------------------------------------------------


def test_reverse_proxy_keys(tmp_path) -> None:
    config = parse(
        tmp_path,
        """
        stanzas:
          - type: reverse-proxy
            reversed-host: 127.0.0.1
            reversed-port: 9000
            reversed-ssl: true
            reversing-host: API.test
            preserve-host: true
            timeout: 2000000
            requires-secure: true
            rewrite-request: [{header: X, from: a, to: b}]
          - type: reverse-proxy
            reversed-host: "::1"
            reversed-port: 9001
            reversing-host: v6.test
            connection-time-bound: 250
        """,
    )
    first, second = config.reverse_proxies
    assert first == ReverseProxy(
        hosts=("api.test",),
        reversed_host="127.0.0.1",
        reversed_port=9000,
        reversed_ssl=True,
        preserve_host=True,
        timeout=2.0,  # Keter's microseconds
        requires_secure=True,
    )
    assert (second.reversed_host, second.timeout) == ("::1", 0.25)
    assert config.warnings == (
        "stanzas[0].rewrite-request: header rewriting is not supported; skipped",
    )


@pytest.mark.parametrize(
    ("stanza", "expected"),
    [
        ("{type: reverse-proxy, reversed-port: 80, reversing-host: a}",
         "stanzas[0].reversed-host: missing"),
        ("{type: reverse-proxy, reversed-host: 'x y', reversed-port: 80, reversing-host: a}",
         'stanzas[0].reversed-host: "x y" is not a valid host name'),
        ("{type: reverse-proxy, reversed-host: b, reversing-host: a}",
         "stanzas[0].reversed-port: expected an integer 1-65535, got nothing"),
        ("{type: reverse-proxy, reversed-host: b, reversed-port: 80}",
         "stanzas[0].reversing-host: missing; the host this proxy answers for"),
        ("{type: reverse-proxy, reversed-host: b, reversed-port: 80, reversing-host: a, "
         "timeout: 1.5}", "stanzas[0].timeout: expected a positive number of microseconds"),
    ],
)  # fmt: skip
def test_reverse_proxy_mistakes_name_their_key(tmp_path, stanza: str, expected: str) -> None:
    problem = only_problem(tmp_path, stanza)
    assert problem.startswith(expected), problem


# -- middleware ------------------------------------------------------------------------------


def test_middleware_defaults_are_keters(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: webapp, exec: ../hello, host: a,"
        " middleware: [{basic-auth: {creds: {u: 1234}}}, {local: {}}, autohead]}]",
    )
    assert config.webapp is not None
    assert config.webapp.middleware == (
        BasicAuthConfig(realm="keter", credentials=(("u", "1234"),)),
        LocalConfig(status=401, message="Unauthorized Accessing from Localhost ONLY"),
        AutoheadConfig(),
    )
    assert config.warnings == ()


def test_basic_auth_without_creds_lets_nobody_in(tmp_path) -> None:
    config = parse(
        tmp_path, "stanzas: [{type: webapp, exec: ../hello, host: a, middleware: [basic-auth: ]}]"
    )
    assert config.webapp is not None
    assert config.webapp.middleware == (BasicAuthConfig(),)
    assert config.warnings == (
        "stanzas[0].middleware[0].basic-auth: no creds, so nobody can get through",
    )


@pytest.mark.parametrize(
    ("middleware", "expected"),
    [
        ("[basic_auth: {creds: {a: b}}]",
         'stanzas[0].middleware[0]: unknown middleware "basic_auth" (did you mean basic-auth?)'),
        ("[gzip]", 'stanzas[0].middleware[0]: unknown middleware "gzip"'),
        ("[5]", "stanzas[0].middleware[0]: expected a middleware name or a one-key mapping"),
        ("autohead", 'stanzas[0].middleware: expected a list of middleware, got "autohead"'),
        ("[basic-auth: {creds: {'a:b': pw}}]",
         'stanzas[0].middleware[0].basic-auth.creds."a:b": expected a user name'),
        ("[basic-auth: {creds: {a: [pw]}}]",
         "stanzas[0].middleware[0].basic-auth.creds.a: expected a password string, got a list"),
        ("[basic-auth: {creds: {a: \"x\\ny\"}}]",
         "stanzas[0].middleware[0].basic-auth.creds.a: the password is empty, has control"),
        ("[basic-auth: {realm: \"a\\nb\"}]", "stanzas[0].middleware[0].basic-auth.realm: expected"),
        ("[headers: {'X Bad': v}]", 'stanzas[0].middleware[0].headers."X Bad": expected a header'),
        ("[headers: {X-A: \"a\\r\\nSet-Cookie: x\"}]",
         "stanzas[0].middleware[0].headers.X-A: expected printable ASCII"),
        ("[headers: {}]", "stanzas[0].middleware[0].headers: expected a mapping"),
        ("[local: {status: 99}]", "stanzas[0].middleware[0].local.status: expected an HTTP status"),
        ("[local: {message: 5}]", "stanzas[0].middleware[0].local.message: expected printable"),
    ],
)  # fmt: skip
def test_middleware_mistakes_name_their_key(tmp_path, middleware: str, expected: str) -> None:
    found = problems(
        tmp_path, f"stanzas: [{{type: webapp, exec: ../hello, host: a, middleware: {middleware}}}]"
    )
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_passwords_never_appear_in_problems_or_repr(tmp_path) -> None:
    found = problems(
        tmp_path,
        "stanzas: [{type: webapp, exec: ../hello, host: a, middleware: [basic-auth: {creds: "
        '{a: "hunter2\\u0007", b: [sekrit]}}]}]',
    )
    assert not any("hunter2" in p or "sekrit" in p for p in found)
    config = parse(
        tmp_path / "ok",
        "stanzas: [{type: webapp, exec: ../hello, host: a,"
        " middleware: [basic-auth: {creds: {a: hunter2}}]}]",
    )
    assert "hunter2" not in repr(config)


# -- the stanza list ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stanzas: []", "stanzas: expected a list of stanzas like [{type: webapp}], got []"),
        ("stanzas: {type: webapp}", "stanzas: expected a list of stanzas"),
        ("stanzas: [webapp]", 'stanzas[0]: expected a mapping with a type, got "webapp"'),
        ("stanzas: [{exec: ../hello}]", "stanzas[0].type: missing; one of webapp, background"),
        ("stanzas: [{type: [webapp]}]", 'stanzas[0].type: expected one of webapp, background'),
        ("stanzas: [{type: web-app}]",
         'stanzas[0].type: unknown stanza type "web-app" (did you mean webapp?)'),
        ("stanzas:\n  - {type: webapp, exec: ../hello, host: a}\n"
         "  - {type: redirect, hosts: [b, a], actions: [{host: c}]}",
         "stanzas[1]: host a is already claimed by stanzas[0]"),
    ],
)  # fmt: skip
def test_stanza_list_mistakes(tmp_path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_unknown_keys_in_a_stanza_or_beside_the_list_are_warnings(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas: [{type: webapp, exec: ../hello, host: a, extra-hosts: [b], hots: [c]}]\n"
        "exec: ../hello\n",
    )
    assert config.webapp is not None and config.webapp.hosts == ("a",)
    assert config.warnings == (
        "exec: unknown key; ignored",
        "stanzas[0].extra-hosts: unknown key (did you mean hosts?); ignored",
        "stanzas[0].hots: unknown key (did you mean hosts?); ignored",
    )


def test_every_problem_of_every_stanza_is_reported_at_once(tmp_path) -> None:
    found = problems(
        tmp_path,
        "stanzas:\n  - {type: webapp, exec: ../nope, host: a}\n  - {type: background}\n"
        "  - {type: static-files, root: /etc, host: s}\n  - {type: nonsense}\n",
    )
    assert [p.split(":")[0] for p in found] == [
        "stanzas[0].exec", "stanzas[1].exec", "stanzas[2].root", "stanzas[3].type",
    ]  # fmt: skip


# -- Keter 0.4's flat extras ------------------------------------------------------------------


def test_flat_static_hosts_redirects_and_ssl(tmp_path) -> None:
    config = parse(
        tmp_path,
        "exec: ../hello\nhost: a\nssl: true\n"
        "static-hosts: [{host: s, root: ../public}]\nredirects: [{from: old, to: a}]\n",
        "public",
    )
    assert config.webapp is not None and config.webapp.ssl is True
    assert config.static_files == (
        StaticFiles(
            root=(tmp_path / "bundle/public").resolve(), hosts=("s",), directory_listing=True
        ),
    )
    assert config.redirects == (
        Redirect(hosts=("old",), status=301, actions=(RedirectAction(host="a"),)),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("static-hosts: {host: s}", "static-hosts: expected a list like"),
        ("static-hosts: [{host: s}]", "static-hosts[0].root: missing"),
        ("static-hosts: [{host: s, root: .., listing: true}]", "static-hosts[0].listing: unknown"),
        ("redirects: [{from: a}]", "redirects[0]: expected a mapping with from and to"),
        ("redirects: [{from: a, to: '*.b'}]", "redirects[0].to: expected one host name"),
        ("exec: ../hello\nhost: a\nstatic-hosts: [{host: a, root: ..}]",
         "static-hosts[0]: host a is already claimed by host"),
    ],
)  # fmt: skip
def test_flat_extras_mistakes(tmp_path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


# -- from a bundle to nginx sites -------------------------------------------------------------


def settings(tmp_path: Path, *listeners: Listener, **keys) -> KeterConfig:
    keys.setdefault("nginx", NginxSettings(config_file=tmp_path / "nginx/keter.conf"))
    return KeterConfig(root=tmp_path / "root", listeners=listeners or (Listener("*", 80),), **keys)


def test_sites_for_a_plain_webapp_is_the_old_site(tmp_path) -> None:
    config = parse(tmp_path, "exec: ../hello\nhosts: [a.test, b.test]\n")
    [site] = sites_for("app", config, tmp_path / "bundle", (4001,), settings(tmp_path))
    assert site.all_routes == Site(app="app", hosts=("a.test", "b.test"), port=4001).all_routes


def test_sites_for_every_stanza(tmp_path) -> None:
    certificate, key = make_certificate(tmp_path / "certs", "own", "a.test")
    config = parse(
        tmp_path,
        f"""
        stanzas:
          - type: webapp
            exec: ../hello
            host: a.test
            ssl: {{certificate: {certificate}, key: {key}, chain-certificates: [{certificate}]}}
            requires-secure: true
            connection-time-bound: 2000
            middleware:
              - basic-auth: {{realm: Team, creds: {{jon: rocks}}}}
              - basic-auth: {{creds: {{bla: dada}}}}
              - headers: {{X-One: "1"}}
              - headers: {{X-Two: "2"}}
              - local: {{status: 403, message: go away}}
          - type: static-files
            root: ../public
            host: s.test
            directory-listing: true
          - type: redirect
            host: r.test
            status: 301
            actions: [{{path: /a, url: "https://x.test/"}}, {{host: a.test, secure: true}}]
          - type: reverse-proxy
            reversed-host: up.test
            reversed-port: 8080
            reversing-host: p.test
          - type: reverse-proxy
            reversed-host: "::1"
            reversed-port: 443
            reversed-ssl: true
            reversing-host: q.test
          - type: reverse-proxy
            reversed-host: up.test
            reversed-port: 80
            reversing-host: k.test
            preserve-host: true
          - type: background
            exec: ../worker
        """,
        "public",
    )
    folder = (tmp_path / "bundle").resolve()
    [site] = sites_for("app", config, folder, (4001,), settings(tmp_path))
    assert site.app == "app"
    assert site.hosts == () and site.port is None
    webapp, static, redirect, proxy, proxy_v6, preserving = site.routes
    assert webapp == Route(
        hosts=("a.test",),
        action=ProxyApp(port=4001, timeout=2.0),
        # The nginx writer copies the files and writes the htpasswd file when it applies.
        tls=TlsFiles(certificate=certificate, key=key, chain=(certificate,)),
        requires_secure=True,
        basic_auth=BasicAuth(realm="Team", credentials=(("jon", "rocks"), ("bla", "dada"))),
        headers=(("X-One", "1"), ("X-Two", "2")),
        local_only=LocalOnly(status=403, text="go away"),
    )
    assert static == Route(
        hosts=("s.test",), action=ServeFiles(root=folder / "public", listing=True)
    )
    assert redirect == Route(
        hosts=("r.test",),
        action=SendRedirect(
            status=301,
            rules=(
                RedirectRule(path="/a", url="https://x.test/"),
                RedirectRule(host="a.test", secure=True),
            ),
        ),
    )
    # Keter's proxy sends reversed-host (with a non-default port) as the Host header.
    assert proxy.action == ProxyRemote(host="up.test", port=8080, host_header="up.test:8080")
    assert proxy_v6.action == ProxyRemote(host="::1", port=443, ssl=True, host_header="[::1]")
    assert preserving.action == ProxyRemote(host="up.test", port=80, host_header=None)
    assert "rocks" not in repr(site)


def test_sites_for_without_a_port_or_hosts(tmp_path) -> None:
    config = parse(tmp_path, "stanzas: [{type: background, exec: ../worker}]")
    assert sites_for("app", config, tmp_path / "bundle", (), settings(tmp_path)) == ()
    webapp = parse(tmp_path / "w", "exec: ../hello\nhost: a\n")
    # A web app not started yet is not routed.
    assert sites_for("app", webapp, tmp_path / "w/bundle", (None,), settings(tmp_path)) == ()


def test_sites_for_refuses_a_root_outside_the_folder(tmp_path) -> None:
    config = parse(tmp_path, "stanzas: [{type: static-files, root: .., host: s}]")
    with pytest.raises(ValueError, match="outside"):
        sites_for("app", config, tmp_path / "elsewhere", (), settings(tmp_path))


def test_deploy_problems_need_a_tls_listener_for_ssl_and_requires_secure(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas:\n  - {type: webapp, exec: ../hello, host: a, ssl: true}\n"
        "  - {type: static-files, root: .., hosts: [s, t], requires-secure: true}\n",
    )
    assert deploy_problems(config, settings(tmp_path)) == [
        "hosts a: ssl is set, but keter-config.yaml has no TLS listener (a listener with "
        "certificate and key) to serve HTTPS on",
        "hosts s, t: requires-secure redirects to HTTPS, but keter-config.yaml has no TLS "
        "listener (nor an external-https-port served elsewhere)",
    ]
    certificate, key = make_certificate(tmp_path / "certs", "default", "x")
    tls = Listener("*", 443, certificate=certificate, key=key)
    assert deploy_problems(config, settings(tmp_path, Listener("*", 80), tls)) == []
    # TLS ended by a load balancer in front: requires-secure is fine, ssl is not.
    behind = settings(tmp_path, external_https_port=443)
    assert len(deploy_problems(config, behind)) == 1


def test_deploy_problems_need_a_resolver_for_a_reverse_proxy_to_a_name(tmp_path) -> None:
    config = parse(
        tmp_path,
        "stanzas:\n  - {type: reverse-proxy, reversing-host: p, reversed-host: api.test, "
        "reversed-port: 80}\n  - {type: reverse-proxy, reversing-host: q, "
        "reversed-host: 127.0.0.1, reversed-port: 80}\n",
    )
    none = NginxSettings(config_file=tmp_path / "nginx/keter.conf", resolver=())
    assert deploy_problems(config, settings(tmp_path, nginx=none)) == [
        "hosts p: reverse-proxy to the host name api.test needs a DNS resolver: set "
        "nginx.resolver in keter-config.yaml (or use an IP address)"
    ]
    resolving = NginxSettings(config_file=tmp_path / "nginx/keter.conf", resolver=("127.0.0.53",))
    assert deploy_problems(config, settings(tmp_path, nginx=resolving)) == []


def test_a_reverse_proxy_to_an_apps_port_or_a_stable_address_is_refused(tmp_path) -> None:
    """A bundle's reverse proxy to 127.0.0.1:PORT of another app, or to keter's stable
    address, reached that app past its basic-auth, `local` and rate limits: nginx's
    workers are not kept off apps' ports as apps are."""
    stable = Table.for_root(tmp_path / "root").address
    targets = {
        "a": ("127.0.0.1", 4001),
        "b": ("::1", 4500),
        "c": ("::ffff:127.0.0.1", 4999),
        "d": ("0.0.0.0", 4000),
        "e": (stable, 7000),
        "f": ("127.0.0.1", 5432),  # outside port-range: a local service of the operator's
        "g": ("10.1.2.3", 4001),  # another machine
        "h": ("api.test", 4001),  # a name: resolved by nginx when a request comes
        "i": ("localhost", 4002),  # which nginx is given as 127.0.0.1
    }
    stanzas = "".join(
        f"  - {{type: reverse-proxy, reversing-host: {name}, reversed-host: '{host}', "
        f"reversed-port: {port}}}\n"
        for name, (host, port) in targets.items()
    )
    config = parse(tmp_path, "stanzas:\n" + stanzas)
    resolving = NginxSettings(config_file=tmp_path / "nginx/keter.conf", resolver=("127.0.0.53",))
    problems = deploy_problems(config, settings(tmp_path, nginx=resolving, port_range=(4000, 4999)))
    assert [problem.split(":")[0] for problem in problems] == [
        "hosts a",
        "hosts b",
        "hosts c",
        "hosts d",
        "hosts e",
        "hosts i",
    ]
    assert "is in keter's port-range (4000-4999)" in problems[0]
    assert problems[4] == f"hosts e: reverse-proxy: {stable} is keter's own stable address"


def test_the_dashboard_host_is_redirected_to_https_where_nginx_can_do_it(tmp_path) -> None:
    """Its basic-auth password and the page that restarts apps crossed the network in
    clear, with a TLS listener right there."""
    certificate, key = make_certificate(tmp_path / "certs", "default", "dash.test")
    dashboard = {
        "status_listen": ("127.0.0.1", 8999),
        "dashboard_host": "dash.test",
        "dashboard_users": (("ops", "pw"),),
    }
    plain = dashboard_site(settings(tmp_path, **dashboard))
    assert plain is not None and not plain.routes[0].requires_secure
    tls = Listener("*", 443, certificate=certificate, key=key)
    both = dashboard_site(settings(tmp_path, Listener("*", 80), tls, **dashboard))
    assert both is not None and both.routes[0].requires_secure


def test_a_reverse_proxy_to_keters_status_api_is_refused(tmp_path) -> None:
    """Apps are kept off the status API, but a bundle's host proxied to it published it
    on the web, past dashboard-host and the operator's choice of a local address."""
    stanzas = "".join(
        f"  - {{type: reverse-proxy, reversing-host: {name}, reversed-host: '{host}', "
        f"reversed-port: 7900}}\n"
        for name, host in (
            ("a", "127.0.0.1"),
            ("b", "::ffff:127.0.0.1"),
            ("c", "0.0.0.0"),
            ("d", "10.9.8.7"),  # another machine
            ("e", "127.0.0.2"),  # another local service: the API is on 127.0.0.1 alone
            ("f", "::1"),
        )
    )
    config = parse(tmp_path, "stanzas:\n" + stanzas)
    keter = settings(tmp_path, status_listen=("127.0.0.1", 7900), port_range=(4000, 4999))
    problems = deploy_problems(config, keter)
    assert [problem.split(":")[0] for problem in problems] == ["hosts a", "hosts b", "hosts c"]
    everywhere = settings(tmp_path, status_listen=("::", 7900), port_range=(4000, 4999))
    problems = deploy_problems(config, everywhere)
    assert [problem.split(":")[0] for problem in problems] == [
        "hosts a",
        "hosts b",
        "hosts c",
        "hosts e",
        "hosts f",
    ]
    assert "reverse-proxy: [::1]:7900 is keter's status API" in problems[-1]
    said = "127.0.0.1:7900 is keter's status API (status-listen): no bundle may publish it"
    assert problems[0].endswith(said)


def test_deploy_problems_read_the_certificates_again(tmp_path) -> None:
    certificate, key = make_certificate(tmp_path / "certs", "own", "a")
    config = parse(
        tmp_path,
        f"stanzas: [{{type: webapp, exec: ../hello, host: a, ssl: "
        f"{{certificate: {certificate}, key: {key}}}}}]",
    )
    default, default_key = make_certificate(tmp_path / "certs", "default", "x")
    keter = settings(
        tmp_path, Listener("*", 80), Listener("*", 443, certificate=default, key=default_key)
    )
    assert deploy_problems(config, keter) == []
    key.unlink()
    [problem] = deploy_problems(config, keter)
    assert re.fullmatch(
        rf"hosts a: ssl key: {key} cannot be read: No such file or directory", problem
    )


@pytest.mark.parametrize(
    ("listeners", "keys", "secure", "expected"),
    [
        ([Listener("*", 80)], {}, False, "http://a.test"),
        ([Listener("*", 8080)], {}, False, "http://a.test:8080"),
        ([Listener("*", 8080)], {"external_http_port": 80}, False, "http://a.test"),
        ([Listener("*", 80)], {}, True, "https://a.test"),
        ([Listener("*", 80), Listener("*", 8443, certificate=Path("/c"), key=Path("/k"))], {},
         True, "https://a.test:8443"),
        ([Listener("*", 80)], {"external_https_port": 450}, True, "https://a.test:450"),
    ],
)  # fmt: skip
def test_approot(tmp_path, listeners, keys, secure: bool, expected: str) -> None:
    keter = settings(tmp_path, *listeners, **keys)
    assert approot("a.test", secure=secure, settings=keter) == expected
    assert approot("*.a.test", secure=secure, settings=keter) == expected
