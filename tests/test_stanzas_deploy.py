"""Keter's full bundle format end to end: a real keter daemon deploys each stanza type,
and every answer is requested through the real (private) nginx."""

from __future__ import annotations

import base64
import json
import os
import re
import signal

import psutil
import pytest
from support.bundles import make_bundle
from support.daemon import failures
from support.net import Backend, body, free_port, get, https_get, served
from support.samples import keter_sample
from support.tls import make_certificate
from support.wait import wait_for


def webapp(host: str | list[str], version: str, **keys) -> dict:
    """A webapp stanza running tests/apps/versioned_app.py."""
    stanza = {"type": "webapp", "exec": "../bin/app", "env": {"VERSION": version}, **keys}
    stanza["hosts" if isinstance(host, list) else "host"] = host
    return stanza


def worker(version: str, **keys) -> dict:
    """A background stanza: versioned_app.py without a PORT just waits."""
    return {"type": "background", "exec": "../bin/app", "args": ["--version", version], **keys}


def processes(keter, marker: str) -> list[psutil.Process]:
    """The app processes run with ``marker`` among their arguments: not the start's
    chain (unshare, its shell, and a child it forked, a mount, before that child's exec,
    whose arguments are the shell's: that had counted twice)."""
    found = []
    for process in keter.children():
        try:
            command = process.cmdline()
            chain = command[:2] == ["/bin/sh", "-c"] or command[0].endswith("/unshare")
            if marker in command and not chain:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def settled(nginx, predicate, what: str, timeout: float = 20) -> None:
    """Wait until ``predicate`` holds, then until only nginx's newest workers take requests.

    For about 100 ms after a reload nginx's old workers still accept connections
    with the old config, so one good answer does not mean the next is good.
    """
    wait_for(predicate, timeout, what)
    header = nginx.config_file.read_text().split("\n", 2)[1]
    nginx.wait_generation(int(header.removeprefix("# generation ")))


def logged(keter, pattern: str) -> list[str]:
    return re.findall(pattern, keter.log(), re.M)


# -- static files, redirects, reverse proxies: bundles without a process ------------------------


def test_static_files_bundle_is_served_by_nginx_alone(keter, private_nginx, tmp_path):
    config = {
        "stanzas": [
            {"type": "static-files", "root": "../public", "host": "files.test"},
            {"type": "static-files", "root": "../public", "host": "list.test",
             "directory-listing": True},
        ]
    }  # fmt: skip
    files = {"public/index.html": "<h1>docs</h1>", "public/css/site.css": "h1 {}"}
    keter.drop(make_bundle(tmp_path / "docs.keter", config=config, files=files, app_source=None))
    settled(
        private_nginx,
        lambda: body(private_nginx, "files.test") == b"<h1>docs</h1>",
        "the static site",
    )
    status, headers, data = get(private_nginx.port, "files.test", "/css/site.css")
    assert (status, headers["content-type"], data) == (200, "text/css; charset=utf-8", b"h1 {}")
    assert get(private_nginx.port, "files.test", "/../config/keter.yaml")[0] == 400
    assert get(private_nginx.port, "files.test", "/css/")[0] == 403  # listing off
    assert b'href="site.css"' in get(private_nginx.port, "list.test", "/css/")[2]
    assert "docs: deploy #1 runs no web app, switching" in keter.log()
    assert keter.children() == []  # nginx serves it; keter runs nothing

    (keter.incoming / "docs.keter").unlink()
    settled(
        private_nginx, lambda: get(private_nginx.port, "files.test")[0] == 404, "the site to go"
    )
    wait_for(lambda: list((keter.root / "temp").iterdir()) == [], 10, "its folder removed")


def test_redirect_bundle(keter, private_nginx, tmp_path):
    config = {
        "stanzas": [
            {
                "type": "redirect",
                "hosts": ["old.test", "www.old.test"],
                "actions": [
                    {"path": "/docs", "url": "https://docs.example.com/"},
                    {"host": "new.test", "secure": True},
                ],
            }
        ]
    }
    keter.drop(make_bundle(tmp_path / "moved.keter", config=config, app_source=None))
    settled(private_nginx, lambda: get(private_nginx.port, "old.test")[0] == 303, "the redirect")
    status, headers, _ = get(private_nginx.port, "www.old.test", "/a/b?c=1")
    assert (status, headers["location"]) == (303, "https://new.test/a/b?c=1")
    status, headers, data = get(private_nginx.port, "old.test", "/docs")
    assert (status, headers.get("location")) == (303, "https://docs.example.com/"), data


def test_reverse_proxy_bundle_reaches_a_second_server(keter, private_nginx, tmp_path):
    upstream = Backend("upstream")
    try:
        config = {
            "stanzas": [
                {
                    "type": "reverse-proxy",
                    "reversed-host": "127.0.0.1",
                    "reversed-port": upstream.port,
                    "reversing-host": "api.test",
                }
            ]
        }
        keter.drop(make_bundle(tmp_path / "api.keter", config=config, app_source=None))
        settled(private_nginx, lambda: get(private_nginx.port, "api.test")[0] == 200, "the proxy")
        reply = json.loads(get(private_nginx.port, "api.test", "/x?y=1")[2])
        assert reply["name"] == "upstream"
        assert reply["headers"]["host"] == f"127.0.0.1:{upstream.port}"  # Keter's Host
    finally:
        upstream.close()


# -- web apps ---------------------------------------------------------------------------------


def test_two_hosts_forward_env_and_port_env_vars(
    keter_factory, private_nginx, tmp_path, monkeypatch
):
    monkeypatch.setenv("KETER_TEST_FORWARDED", "from keter's environment")
    monkeypatch.setenv("KETER_TEST_NOT_FORWARDED", "secret")
    keter = keter_factory()
    stanza = webapp(
        ["one.test", "two.test"],
        "v1",
        **{"forward-env": ["KETER_TEST_FORWARDED", "KETER_TEST_ABSENT"],
           "port-env-vars": ["HTTP_PORT", "WARP_PORT"]},
    )  # fmt: skip
    keter.drop(make_bundle(tmp_path / "envy.keter", config={"stanzas": [stanza]}))
    served(private_nginx, "one.test", "v1")
    served(private_nginx, "two.test", "v1")
    env = json.loads(body(private_nginx, "two.test", "/env"))
    assert env["KETER_TEST_FORWARDED"] == "from keter's environment"
    assert "KETER_TEST_ABSENT" not in env
    assert "KETER_TEST_NOT_FORWARDED" not in env
    assert env["HTTP_PORT"] == env["WARP_PORT"] == env["PORT"]
    assert env["APPROOT"] == f"http://one.test:{private_nginx.port}"


# -- background workers -------------------------------------------------------------------------


def test_background_worker_runs_restarts_on_crash_and_follows_its_version(
    keter, private_nginx, tmp_path
):
    bundle = tmp_path / "jobs.keter"
    config = {"stanzas": [webapp("jobs.test", "v1"), worker("worker-v1")]}
    keter.drop(make_bundle(bundle, config=config))
    served(private_nginx, "jobs.test", "v1")
    [first] = wait_for(lambda: processes(keter, "worker-v1"), 10, "the worker to start")
    assert "PORT" not in first.environ()
    # Its output reaches the app's log (once the process has started up).
    log = keter.root / "log/app-jobs.log"
    wait_for(lambda: "starting version worker-v1" in log.read_text(), 10, "the worker's output")

    first.send_signal(signal.SIGKILL)
    [again] = wait_for(
        lambda: [p for p in processes(keter, "worker-v1") if p.pid != first.pid],
        15,
        "the worker to be restarted",
    )
    assert again.is_running()

    # A new version brings its own worker; the old one stops after it started.
    config = {"stanzas": [webapp("jobs.test", "v2"), worker("worker-v2")]}
    keter.drop(make_bundle(bundle, config=config))
    served(private_nginx, "jobs.test", "v2")
    wait_for(lambda: processes(keter, "worker-v2"), 10, "the new worker")
    wait_for(lambda: not processes(keter, "worker-v1"), 15, "the old worker to stop")
    log = keter.log()
    [(new, workers)] = re.findall(r"jobs: deploy #(\d+) starts background worker #(\d+)", log)[1:]
    assert log.index(f"deploy #{new} starts background worker") < log.index("stopping deploy #1")
    wait_for(lambda: f"jobs: background worker #{workers} started pid" in keter.log(), 10)
    wait_for(lambda: len(list((keter.root / "temp").iterdir())) == 1, 10, "the old folder gone")


def test_background_worker_past_its_restart_count_stays_down(keter, private_nginx, tmp_path):
    config = {"stanzas": [worker("once-only", **{"restart-count": 0})]}
    keter.drop(make_bundle(tmp_path / "once.keter", config=config))
    [process] = wait_for(lambda: processes(keter, "once-only"), 20, "the worker to start")
    process.send_signal(signal.SIGKILL)
    wait_for(lambda: logged(keter, r"once: background worker #\d+ stopped"), 15, "the give-up")
    assert logged(keter, r"once: .*restart-count reached, not restarting")
    assert processes(keter, "once-only") == []


# -- TLS, requires-secure, basic auth ----------------------------------------------------------


@pytest.fixture
def tls_keter(keter_factory, private_nginx, tmp_path):
    """keter with a TLS listener whose default certificate is for default.test."""
    certificate, key = make_certificate(tmp_path / "certs", "default", "default.test")
    tls_port = free_port()
    listeners = [
        {"host": "127.0.0.1", "port": private_nginx.port},
        {"host": "127.0.0.1", "port": tls_port, "certificate": str(certificate), "key": str(key)},
    ]
    keter = keter_factory(listeners=listeners)
    keter.tls_port = tls_port
    keter.default_certificate = certificate
    return keter


def test_https_host_with_its_own_certificate(tls_keter, private_nginx, tmp_path):
    certificate, key = make_certificate(tmp_path / "certs", "own", "secure.test")
    stanza = webapp("secure.test", "v1", ssl={"certificate": str(certificate), "key": str(key)})
    tls_keter.drop(make_bundle(tmp_path / "secure.keter", config={"stanzas": [stanza]}))
    served(private_nginx, "secure.test", "v1")
    status, _, data = https_get(tls_keter.tls_port, "secure.test", certificate)
    assert (status, data) == (200, b"v1\n")
    env = json.loads(https_get(tls_keter.tls_port, "secure.test", certificate, "/env")[2])
    assert env["APPROOT"] == f"https://secure.test:{tls_keter.tls_port}"


def test_requires_secure_redirects_to_https(tls_keter, private_nginx, tmp_path):
    stanza = webapp("shop.test", "v1", **{"requires-secure": True})
    tls_keter.drop(make_bundle(tmp_path / "shop.keter", config={"stanzas": [stanza]}))
    settled(private_nginx, lambda: get(private_nginx.port, "shop.test")[0] == 301, "the redirect")
    status, headers, _ = get(private_nginx.port, "shop.test", "/cart?x=1")
    assert headers["location"] == f"https://shop.test:{tls_keter.tls_port}/cart?x=1"
    # Over HTTPS it is served, with the listener's certificate (it has none of its own).
    status, _, data = https_get(
        tls_keter.tls_port, "shop.test", tls_keter.default_certificate, sni="default.test"
    )
    assert (status, data) == (200, b"v1\n")


def test_basic_auth_guards_a_webapp(keter, private_nginx, tmp_path):
    middleware = [{"basic-auth": {"realm": "Staff", "creds": {"jon": "rocks"}}}]
    stanza = webapp("staff.test", "v1", middleware=middleware)
    keter.drop(make_bundle(tmp_path / "staff.keter", config={"stanzas": [stanza]}))
    settled(
        private_nginx, lambda: get(private_nginx.port, "staff.test")[0] == 401, "the guarded app"
    )
    token = base64.b64encode(b"jon:rocks").decode()
    status, _, data = get(
        private_nginx.port, "staff.test", headers={"Authorization": f"Basic {token}"}
    )
    assert (status, data) == (200, b"v1\n")
    wrong = base64.b64encode(b"jon:nope").decode()
    assert (
        get(private_nginx.port, "staff.test", headers={"Authorization": f"Basic {wrong}"})[0] == 401
    )
    [htpasswd] = (private_nginx.config_file.parent / ".keter.conf.d").glob("apps/*/*.htpasswd")
    assert "rocks" not in htpasswd.read_text()
    assert "rocks" not in keter.log()


# -- refusals before nginx is touched ------------------------------------------------------------


def test_a_missing_certificate_fails_the_deploy_before_nginx(tls_keter, private_nginx, tmp_path):
    certificate, key = make_certificate(tmp_path / "certs", "gone", "gone.test")
    key.unlink()
    stanza = webapp("gone.test", "v1", ssl={"certificate": str(certificate), "key": str(key)})
    before = private_nginx.config_file.read_bytes()
    tls_keter.drop(make_bundle(tmp_path / "gone.keter", config={"stanzas": [stanza]}))
    [line] = wait_for(lambda: failures(tls_keter, "gone"), 20, "the deploy to fail")
    assert f"ssl.key: {key} cannot be read" in line
    assert private_nginx.config_file.read_bytes() == before
    assert processes(tls_keter, "../bin/app") == []


def test_ssl_without_a_tls_listener_is_refused(keter, private_nginx, tmp_path):
    stanza = webapp("nossl.test", "v1", ssl=True)
    keter.drop(make_bundle(tmp_path / "nossl.keter", config={"stanzas": [stanza]}))
    [line] = wait_for(lambda: failures(keter, "nossl"), 20, "the deploy to fail")
    assert "no TLS listener" in line
    assert "nossl.test" not in private_nginx.served_config()


def test_sample_with_roots_outside_the_bundle_is_refused_as_a_whole(keter, private_nginx, tmp_path):
    sample = keter_sample("foo1_0.keter.yaml")
    if not sample.exists():
        pytest.skip("shared Keter fixtures are not here")
    files = {"hello": "#!/bin/sh\n", "worker": "#!/bin/sh\n"}
    bundle = make_bundle(
        tmp_path / "foo1_0.keter", config=sample.read_text(), files=files, app_source=None
    )
    keter.drop(bundle)
    [line] = wait_for(lambda: failures(keter, "foo1_0"), 20, "the refusal")
    assert "stanzas[2].root" in line and "stanzas[3].root" in line
    assert "keter1_0" not in private_nginx.served_config()
    assert os.listdir(keter.root / "temp") == []
