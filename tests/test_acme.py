"""HTTPS that runs itself (issue 12): keter.acme against Debian's pebble, served by a real
private nginx.

A certificate is issued by HTTP-01 (answered by nginx from keter's folder) and
served with SNI for each host; a restart reuses stored certificates without a
new order; renewal happens 30 days before expiry (the clock is moved); a CA
that is down or a challenge that fails is one line and a later retry, and the
site keeps serving over plain HTTP.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.acme import PrivatePebble, wanted
from support.bundles import make_bundle
from support.net import Backend, free_port, https_get
from support.nginx import PrivateNginx, WriterRig
from support.tls import make_certificate
from support.wait import wait_for

from keter.acme import AcmeManager
from keter.bundle import AcmeTls, BundleConfig, WebApp
from keter.config import AcmeSettings, KeterConfig
from keter.config import Listener as KeterListener
from keter.daemon import ACME_GRACE
from keter.messages import (
    CertificateIssued,
    CertificateOutcome,
    CertificateState,
    ProxyApp,
    Route,
    Site,
    TlsFiles,
)
from keter.nginx import ProxyOptions
from keter.nginx.render import acme_challenges
from keter.routes import deploy_problems

HOSTS = ("one.test", "two.test")


class Rig:
    """A private nginx (plain + TLS) with a writer, a backend, pebble, and managers."""

    def __init__(self, nginx: PrivateNginx, base: Path, authz_reuse: int = 0) -> None:
        self.nginx = nginx
        self.base = base
        self.backend = Backend("app")
        self.pebble = PrivatePebble(base / "pebble", http_port=nginx.port, authz_reuse=authz_reuse)
        self.pebble.start()
        self.challenges = acme_challenges(nginx.config_file)
        options = ProxyOptions(acme_challenges=self.challenges)
        self.writer_rig = WriterRig(nginx, base / "listener", ("default.test",), options)
        self.managers: list[AcmeManager] = []
        self.reports: queue.Queue = queue.Queue()

    def settings(self, **changes: object) -> AcmeSettings:
        values = {"directory": self.pebble.directory, "ca_bundle": self.pebble.tls_certificate}
        return AcmeSettings(**{**values, **changes})

    def manager(self, clock=time.time, **changes: object) -> AcmeManager:
        manager = AcmeManager(
            settings=self.settings(**changes),
            folder=self.base / "etc" / "acme",
            challenges=self.challenges,
            report_to=self.reports,
            clock=clock,
        )
        manager.start()
        self.managers.append(manager)
        return manager

    def serve(self, certificates: dict[str, CertificateIssued]) -> None:
        """Route HOSTS to the backend, with ssl: acme and whatever certificates there are."""
        routes = tuple(
            Route(
                hosts=(host,),
                action=ProxyApp(port=self.backend.port),
                acme=True,
                tls=TlsFiles(certificate=c.certificate, key=c.key)
                if (c := certificates.get(host))
                else None,
            )
            for host in HOSTS
        )
        self.writer_rig.apply(Site(app="web", routes=routes))

    def next(self, kind: type, timeout: float = 60) -> object:
        """The next report of ``kind`` from the managers (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.reports.get(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(message, kind):
                return message

    def https(self, host: str, root: Path) -> int:
        context = ssl.create_default_context(cafile=str(root))
        with (
            socket.create_connection(("127.0.0.1", self.writer_rig.tls.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return int(tls.recv(100).split()[1])

    def close(self) -> None:
        for manager in self.managers:
            manager.stop()
            manager.join(timeout=15)
        self.writer_rig.stop()
        self.pebble.stop()
        self.backend.close()


@pytest.fixture
def rig(
    request: pytest.FixtureRequest, private_nginx: PrivateNginx, tmp_path: Path
) -> Iterator[Rig]:
    made = Rig(private_nginx, tmp_path, getattr(request, "param", 0))  # param: authz_reuse
    yield made
    made.close()


def issue_all(rig: Rig, manager: AcmeManager) -> dict[str, CertificateIssued]:
    if rig.writer_rig.generation == 0:
        rig.serve({})  # keter's config answers the challenges on every plain server
    manager.tell(wanted(*HOSTS))
    issued = {}
    while len(issued) < len(HOSTS):
        message = rig.next(CertificateIssued)
        issued[message.host] = message
    return issued


def test_pebble_issues_a_certificate_per_host_and_nginx_serves_it_with_sni(
    rig: Rig, tmp_path: Path
) -> None:
    rig.serve({})  # plain HTTP only until the certificates come
    assert rig.nginx.request("one.test")[0] == 200
    manager = rig.manager()
    issued = issue_all(rig, manager)
    rig.serve(issued)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(rig.pebble.root_ca())
    for host in HOSTS:
        assert rig.https(host, root) == 200  # verified against pebble's root, by SNI
    for message in issued.values():
        assert message.key.stat().st_mode & 0o777 == 0o600
        assert message.not_after > time.time() + 30 * 24 * 3600
    state = json.loads((tmp_path / "etc" / "acme" / "state.json").read_text())
    assert {host: row["outcome"] for host, row in state.items()} == dict.fromkeys(HOSTS, "issued")
    # No challenge answer is left behind.
    assert list(rig.challenges.iterdir()) == []


def test_a_restart_reuses_stored_certificates_without_a_new_order(rig: Rig) -> None:
    issued = issue_all(rig, rig.manager())
    rig.managers[0].stop()
    rig.managers[0].join(timeout=15)
    rig.pebble.stop()  # nothing could be ordered now
    again = rig.manager()
    stored = {}
    while len(stored) < len(HOSTS):
        message = rig.next(CertificateIssued, timeout=10)
        stored[message.host] = message
    assert stored == issued
    again.tell(wanted(*HOSTS))
    state = rig.next(CertificateState, timeout=10)
    assert state.outcome is CertificateOutcome.STORED
    assert state.next_attempt > time.time() + 20 * 24 * 3600  # not due for weeks


# 100: every renewal is given the authorization its first order made valid (Let's Encrypt
# reuses them for 30 days); it needs no answer, and answering it again fails the order.
@pytest.mark.parametrize("rig", [0, 100], indirect=True, ids=["fresh", "reused-authz"])
def test_a_certificate_is_renewed_thirty_days_before_it_expires(rig: Rig) -> None:
    issued = issue_all(rig, rig.manager())
    rig.managers[0].stop()
    rig.managers[0].join(timeout=15)
    # The clock moved on to 29 days before the first certificate expires (and back once
    # both are renewed: the new ones, good for years, would be due at the moved clock too).
    offset = [issued["one.test"].not_after - 29 * 24 * 3600 - time.time()]
    renewing = rig.manager(clock=lambda: time.time() + offset[0])
    for _ in HOSTS:  # the stored ones, reported at start
        rig.next(CertificateIssued, timeout=10)
    renewing.tell(wanted(*HOSTS))
    renewed = {}
    while len(renewed) < len(HOSTS):
        message = rig.next(CertificateIssued)
        renewed[message.host] = message  # a second renewal replaces the first
    offset[0] = 0.0
    # Until the clock moved back a renewed certificate was due again, and a second
    # renewal may have replaced the first: the last one counts.
    renewing.stop()
    renewing.join(timeout=15)
    while not rig.reports.empty():
        message = rig.reports.get_nowait()
        if isinstance(message, CertificateIssued):
            renewed[message.host] = message
    for host in HOSTS:
        assert renewed[host].certificate != issued[host].certificate
        assert renewed[host].not_after >= issued[host].not_after
        # The pair in use and the one it replaced (a deploy in flight may still copy it),
        # no older one: nginx reads keter's copies.
        assert renewed[host].certificate.exists()
        assert len(list(renewed[host].certificate.parent.iterdir())) <= 4
    rig.serve(renewed)


def test_a_ca_that_is_down_is_retried_later_and_the_site_stays_on_http(rig: Rig, caplog) -> None:
    rig.serve({})
    manager = rig.manager(directory=f"https://localhost:{free_port()}/dir")
    manager.tell(wanted("one.test"))
    state = rig.next(CertificateState)
    assert state.outcome is CertificateOutcome.FAILED
    assert state.next_attempt > time.time() + 30  # backoff, not a retry storm
    assert "one.test: no certificate (attempt 1" in caplog.text
    assert rig.nginx.request("one.test")[0] == 200
    # Asking again does not order again before the backoff is over.
    manager.tell(wanted("one.test"))
    with pytest.raises(queue.Empty):
        rig.next(CertificateState, timeout=2)


def test_a_failing_challenge_is_one_line_and_a_retry(rig: Rig, caplog) -> None:
    # Pebble asks nginx for the challenge answer, but nothing routes two.test here
    # and the answer is written where nginx does not look.
    manager = AcmeManager(
        settings=rig.settings(),
        folder=rig.base / "etc" / "acme",
        challenges=rig.base / "elsewhere",
        report_to=rig.reports,
    )
    (rig.base / "elsewhere").mkdir()
    manager.start()
    rig.managers.append(manager)
    manager.tell(wanted("two.test"))
    state = rig.next(CertificateState)
    assert state.outcome is CertificateOutcome.FAILED
    assert "unauthorized" in state.detail or "404" in state.detail, state.detail
    lines = [r for r in caplog.records if "two.test: no certificate" in r.getMessage()]
    assert len(lines) == 1


def test_a_wildcard_host_is_refused_with_a_line(tmp_path: Path, caplog) -> None:
    settings = KeterConfig(
        root=tmp_path, listeners=(KeterListener("*", 80), KeterListener("*", 443,
        certificate=tmp_path / "c", key=tmp_path / "k"))
    )  # fmt: skip
    webapp = WebApp(exec=tmp_path / "app", hosts=("*.example.com", "a.test"), ssl=AcmeTls())
    [problem] = deploy_problems(BundleConfig(app="w", webapps=(webapp,)), settings)
    assert "*.example.com" in problem and "wildcard" in problem
    reports: queue.Queue = queue.Queue()
    manager = AcmeManager(
        settings=AcmeSettings(), folder=tmp_path / "acme", challenges=tmp_path, report_to=reports
    )
    manager.start()
    try:
        manager.tell(wanted("*.example.com"))
        state = reports.get(timeout=10)
        assert state.outcome is CertificateOutcome.REFUSED
    finally:
        manager.stop()
        manager.join(timeout=15)
    assert "*.example.com: a wildcard host cannot be validated by HTTP-01" in caplog.text


# -- end to end: a bundle with ssl: acme on a real keter ----------------------------------------


def test_keter_serves_an_acme_site_over_http_then_https(
    keter_factory, private_nginx: PrivateNginx, tmp_path: Path
) -> None:
    pebble = PrivatePebble(tmp_path / "pebble", http_port=private_nginx.port)
    pebble.start()
    try:
        settings, tls_port = pebble.keter_settings(tmp_path / "certs")
        keter = keter_factory(**settings)
        stanza = {"type": "webapp", "exec": "../bin/app", "env": {"VERSION": "v1"},
                  "host": "auto.test", "ssl": "acme", "requires-secure": True}  # fmt: skip
        keter.drop(make_bundle(tmp_path / "auto.keter", config={"stanzas": [stanza]}))
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_ca())

        def https() -> tuple[int, dict[str, str], bytes]:
            return https_get(tls_port, "auto.test", root)  # trusting pebble's root only

        status, _, data = wait_for(https, 60, "auto.test over HTTPS with pebble's certificate")
        assert status == 200 and data.endswith(b"v1\n")
        # Now that the certificate is there, plain HTTP redirects (requires-secure).
        wait_for(lambda: private_nginx.request("auto.test")[0] == 301, 10, "the redirect")
        assert "auto.test: certificate issued" in keter.log()
    finally:
        pebble.stop()


def test_sigterm_abandons_a_certificate_order_the_ca_never_answers(
    keter_factory, private_nginx: PrivateNginx, tmp_path: Path
) -> None:
    """A CA that takes the order's first request and never answers holds the ACME
    component; SIGTERM still stops keter within ACME_GRACE, saying so."""
    ca = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        certificate, key = make_certificate(tmp_path / "certs", "default", "default.test")
        keter = keter_factory(
            listeners=[
                {"host": "127.0.0.1", "port": private_nginx.port},
                {"host": "127.0.0.1", "port": free_port(),
                 "certificate": str(certificate), "key": str(key)},
            ],
            acme={"directory": f"http://127.0.0.1:{ca.getsockname()[1]}/directory"},
        )  # fmt: skip
        stanza = {"type": "webapp", "exec": "../bin/app", "env": {"VERSION": "v1"},
                  "host": "hung.test", "ssl": "acme"}  # fmt: skip
        keter.drop(make_bundle(tmp_path / "hung.keter", config={"stanzas": [stanza]}))
        wait_for(lambda: select.select([ca], [], [], 0)[0], 30, "the order to reach the CA")

        began = time.monotonic()
        assert keter.stop() == 0
        assert time.monotonic() - began < ACME_GRACE + 5
        log = keter.log()
        assert "acme is still ordering a certificate: the order is abandoned" in log
        assert "threads still run: keter-acme" in log
        assert "keter: stopped" in log
    finally:
        ca.close()
