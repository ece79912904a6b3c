"""Issue 15's tests of record against the real daemon, real nginx and real PostgreSQL:
Keter's own sample bundles deploy (their outside static roots moved inside, the one
documented refusal), and several web apps of one bundle switch together under load.
"""

from __future__ import annotations

import re
import threading

import pytest
import yaml
from support.bundles import make_bundle, member
from support.daemon import failures
from support.net import Load, body, free_port, get, served
from support.samples import keter_sample
from support.tls import make_certificate
from support.wait import wait_for

# The executables each sample names, relative to the bundle: web apps get the tests'
# versioned app, workers a process that just waits.
WEB = "web"
WORKER = "worker"
SAMPLES = {
    "foo1_0.keter.yaml": {"hello": WEB, "worker": WORKER},
    "foo-v04.keter.yaml": {"hello": WEB},
    "nc.keter.yaml": {"nc.sh": WEB},
    "websockets.keter.yaml": {"chat": WEB},
    "middleware.keter.yaml": {"bin/backend": WEB},
}


# Middleware keter refuses rather than skip (README's "Differences from Keter").
UNHONOURED = {"accept-override", "jsonp", "method-override", "method-override-post"}


def sample_bundle(tmp_path, name: str, version: str, *, honoured_only: bool = False):
    """Keter's sample ``name`` as a bundle, its static roots moved inside (README's table);
    ``honoured_only`` also drops the middleware keter refuses."""
    path = keter_sample(name)
    if not path.exists():
        pytest.skip(f"{name} is not beside the checkout")
    text = re.sub(r"root: (\.\./\.\./|/home)\n", "root: ../public\n", path.read_text())
    config = yaml.safe_load(text)
    for stanza in config.get("stanzas", []) if honoured_only else []:
        if "middleware" in stanza:
            stanza["middleware"] = [
                m for m in stanza["middleware"] if not (isinstance(m, str) and m in UNHONOURED)
            ]
    members = [member("public/index.html", b"static files\n")]
    for exe, kind in SAMPLES[name].items():
        # The sample's own arguments mean nothing to the tests' app: a wrapper drops them.
        if kind == WEB:
            data = f"#!/bin/sh\nVERSION={version} exec ./bin/app\n"
        else:
            data = "#!/bin/sh\nexec sleep 100000\n"
        members.append(member(exe, data.encode(), mode=0o755))
    bundle = tmp_path / f"{name.split('.')[0].replace('-', '_')}.keter"
    return make_bundle(bundle, config=config, members=members), config


@pytest.fixture
def keter_with_tls(keter_factory, private_nginx, private_postgres, tmp_path):
    """keter with a TLS listener (foo1_0 requires-secure) and a database (foo-v04)."""
    certificate, key = make_certificate(tmp_path / "certs", "default", "keter1_0")
    tls_port = free_port()
    listeners = private_nginx.keter_config()["listeners"]
    listeners.append(
        {"host": "127.0.0.1", "port": tls_port, "certificate": str(certificate), "key": str(key)}
    )
    return keter_factory(listeners=listeners, postgres={"admin-dsn": private_postgres.admin_dsn})


@pytest.mark.parametrize("name", list(SAMPLES))
def test_keters_sample_bundles_deploy(keter_with_tls, private_nginx, tmp_path, name):
    keter = keter_with_tls
    bundle, config = sample_bundle(tmp_path, name, "v1")
    app = bundle.name.removesuffix(".keter")
    if any(m in UNHONOURED for s in config.get("stanzas", []) for m in middleware_names(s)):
        # Refused for the documented reason alone; without that middleware it deploys.
        keter.drop(bundle)
        [line] = wait_for(lambda: failures(keter, app), 30, f"{name} to be refused")
        problems = line.split(f"bad config in {bundle.name}: ", 1)[1]
        refusal = (
            r"stanzas\[\d+\]\.middleware\[\d+\]: ([a-z-]+) cannot be carried out by keter "
            r"\([^)]*\); remove it rather than serve the site without it(; )?"
        )
        refused = {name for name, _ in re.findall(refusal, problems)}
        assert refused and refused <= UNHONOURED, problems
        assert re.sub(refusal, "", problems) == "", problems  # and nothing else
        bundle, config = sample_bundle(tmp_path, name, "v1", honoured_only=True)
    keter.drop(bundle)
    wait_for(
        lambda: re.search(rf"{app}: deploy #\d+ now serving", keter.log()),
        60,
        f"{name} to deploy",
    )
    stanzas = config.get("stanzas") or [dict(config, type="webapp")]
    for stanza in stanzas:
        hosts = stanza.get("hosts") or [stanza.get("host")]
        hosts += stanza.get("extra-hosts", [])
        for host in filter(None, hosts):
            if "*" in host:
                host = host.replace("*", "any")
            match stanza["type"]:
                case "webapp":
                    served(private_nginx, host, "v1")
                case "static-files" if stanza.get("requires-secure"):
                    assert get(private_nginx.port, host)[0] == 301
                case "static-files" if has_basic_auth(stanza):
                    assert get(private_nginx.port, host)[0] == 401
                    status, _, data = get(private_nginx.port, host, headers=AUTH)
                    assert (status, data) == (200, b"static files\n")
                case "static-files":
                    assert body(private_nginx, host) == b"static files\n"
                case "redirect":
                    assert get(private_nginx.port, host)[0] in (301, 303)
                case "reverse-proxy":
                    # Its upstream (www.yesodweb.com) is out of reach here: nginx answers
                    # for the host (a gateway error), it does not fall to the 404 default.
                    assert get(private_nginx.port, host)[0] in (502, 504)
    for static in config.get("static-hosts", []):
        # Keter 0.4 lists folders; a moved root serves the sample's index page.
        status, _, data = get(private_nginx.port, static["host"])
        assert status == 200
        assert data == b"static files\n" or b"Index of /" in data


# foo1_0's basic-auth user (jon: rocks).
AUTH = {"Authorization": "Basic am9uOnJvY2tz"}


def middleware_names(stanza: dict) -> list[str]:
    return [m if isinstance(m, str) else next(iter(m)) for m in stanza.get("middleware", [])]


def has_basic_auth(stanza: dict) -> bool:
    return any(isinstance(m, dict) and "basic-auth" in m for m in stanza.get("middleware", []))


def two_webapps(version: str, broken: str | None = None) -> dict:
    def stanza(host: str) -> dict:
        args = ["--exit-at-start", "3"] if host == broken else []
        return {
            "type": "webapp",
            "exec": "../bin/app",
            "args": args,
            "host": host,
            "env": {"VERSION": f"{version}-{host.split('.')[0]}"},
        }

    return {"stanzas": [stanza("front.test"), stanza("api.test")]}


def test_several_webapps_of_one_bundle_switch_together_under_load(keter, private_nginx, tmp_path):
    bundle = tmp_path / "duo.keter"
    keter.drop(make_bundle(bundle, config=two_webapps("v1")))
    served(private_nginx, "front.test", "v1-front")
    served(private_nginx, "api.test", "v1-api")

    loads = [Load(port=private_nginx.port, host=host) for host in ("front.test", "api.test")]
    threads: list[threading.Thread] = []
    for load in loads:
        threads += load.run(clients=4)
    try:
        for version in ("v2", "v3"):
            keter.drop(make_bundle(bundle, config=two_webapps(version)))
            served(private_nginx, "front.test", f"{version}-front")
            served(private_nginx, "api.test", f"{version}-api")
        # One web app failing fails the whole version: both keep serving v3.
        keter.drop(make_bundle(bundle, config=two_webapps("v4", broken="api.test")))
        [line] = wait_for(lambda: failures(keter, "duo"), 30, "v4 to fail")
        assert "status 3" in line
        assert body(private_nginx, "front.test") == b"v3-front\n"
        assert body(private_nginx, "api.test") == b"v3-api\n"
    finally:
        for load in loads:
            load.stop.set()
        for thread in threads:
            thread.join(15)
    for load in loads:
        assert load.errors == [], load.errors[:5]
        assert load.requests > 100
    # Each host only ever got its own web app's answers.
    assert {b.split(b"-")[1] for b in loads[0].bodies} == {b"front\n"}
    assert {b.split(b"-")[1] for b in loads[1].bodies} == {b"api\n"}
