"""Each host's certificate as operators see it (issue 12.3), of record: a real keter with
a private nginx and a private pebble.

Two apps ask for ``ssl: acme``: pebble issues shop.test's certificate, and
its challenge for broken.test fails (the private DNS sends pebble to
127.0.0.2, where nginx does not listen). ``keter certs``, the status API,
``/metrics`` and the dashboard then show the certificate nginx actually serves
(read from a TLS handshake, by SNI) and the failure with its detail and the
next attempt.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.acme import PrivatePebble
from support.browser import ARTIFACTS
from support.bundles import TERMINAL_CONTROL, make_bundle, webapp_config
from support.daemon import KeterDaemon, keter_cli, status_api
from support.faults import settled_generation
from support.net import free_port
from support.wait import wait_for

from keter.client import KeterClient

USER = ("ops", "certs-pw")
GOOD, BROKEN = "shop.test", "broken.test"
DAY = 86400.0
NOTHING = "\u2013"  # the dashboard's dash for no value


@dataclass
class Served:
    """The certificate nginx serves for a host, read from a TLS handshake."""

    issuer: str
    not_after: float


@dataclass
class AcmeKeter:
    keter: KeterDaemon
    client: KeterClient
    pebble: PrivatePebble
    tls_port: int
    status_port: int
    pebble_root: Path

    def served(self, host: str) -> Served:
        """A handshake with SNI ``host`` that trusts pebble's root only."""
        context = ssl.create_default_context(cafile=str(self.pebble_root))
        with (
            socket.create_connection(("127.0.0.1", self.tls_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        return Served(leaf.issuer.rfc4514_string(), leaf.not_valid_after_utc.timestamp())

    def rows(self) -> dict[str, dict]:
        return {row["host"]: row for row in self.client.certificates()["certificates"]}


@pytest.fixture
def acme_keter(keter_factory, private_nginx, tmp_path) -> Iterator[AcmeKeter]:
    """keter with a TLS listener and pebble as its CA, serving shop and broken (ssl: acme),
    once shop.test is served over HTTPS and broken.test's first attempt has failed."""
    pebble = PrivatePebble(tmp_path / "pebble", http_port=private_nginx.port)
    pebble.start()
    try:
        pebble.dns.add(BROKEN, "127.0.0.2")  # pebble's challenge finds nothing there
        settings, tls_port = pebble.keter_settings(tmp_path / "listener")
        status_port = free_port()
        keter = keter_factory(
            **settings,
            **{"status-listen": f"127.0.0.1:{status_port}", "dashboard-users": dict([USER])},
        )
        for app, host in (("shop", GOOD), ("broken", BROKEN)):
            config = webapp_config(host, "v1", ssl="acme")
            keter.drop(make_bundle(tmp_path / f"{app}.keter", config={"stanzas": [
                {"type": "webapp", **config}]}))  # fmt: skip
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_ca())
        made = AcmeKeter(keter, status_api(keter), pebble, tls_port, status_port, root)

        def served() -> Served | None:
            try:
                return made.served(GOOD)
            except (OSError, ssl.SSLError):
                return None  # plain HTTP only until the certificate comes

        wait_for(served, 60, f"{GOOD} over HTTPS with pebble's certificate")
        # One worker with the certificate answered; retiring ones may still hold the
        # config from before it for a moment (keter waits for them, the test must too).
        settled_generation(private_nginx)
        wait_for(lambda: made.rows().get(BROKEN), 60, f"{BROKEN}'s first attempt")
        wait_for(lambda: made.rows().get(GOOD), 10, f"{GOOD}'s certificate in the status")
        yield made
    finally:
        pebble.stop()


def expiry_text(not_after: float, now: float) -> str:
    date = datetime.datetime.fromtimestamp(not_after, datetime.UTC)
    return f"{date:%Y-%m-%d %H:%M} UTC (in {int((not_after - now) // DAY)} days)"


def test_certs_api_and_metrics_show_the_certificate_nginx_serves_and_a_failure(
    acme_keter: AcmeKeter,
) -> None:
    served = acme_keter.served(GOOD)
    assert served.issuer.startswith("CN=Pebble Intermediate CA")
    assert served.not_after > time.time() + 30 * DAY

    # The API: pebble's certificate, and the failure with its detail and a next attempt.
    rows = acme_keter.rows()
    assert list(rows) == [BROKEN, GOOD]
    good, broken = rows[GOOD], rows[BROKEN]
    assert good["apps"] == ["shop"]
    assert good["outcome"] == "issued"
    assert (good["issuer"], good["not_after"]) == (served.issuer, served.not_after)
    assert time.time() - 120 < good["last_attempt"] < time.time()
    assert good["next_attempt"] > time.time() + 20 * DAY  # renewed weeks before expiry
    assert broken["outcome"] == "failed"
    assert (broken["issuer"], broken["not_after"]) == (None, None)
    assert "connection" in broken["detail"], broken["detail"]
    assert broken["next_attempt"] >= broken["last_attempt"] + 30  # a backoff, not a storm
    assert acme_keter.client.app("shop")["certificates"] == [good]
    assert acme_keter.client.app("broken")["certificates"] == [broken]

    # /metrics: the gauge for the host with a certificate, with that certificate's expiry.
    metrics = acme_keter.client.text("/metrics")
    [family] = [
        f
        for f in text_string_to_metric_families(metrics)
        if f.name == "keter_certificate_expiry_timestamp_seconds"
    ]
    assert family.type == "gauge"
    assert {s.labels["host"]: s.value for s in family.samples} == {GOOD: served.not_after}

    # keter certs: one line per host.
    before = time.time()
    shown = keter_cli(acme_keter.keter.root, "certs")
    after = time.time()
    assert shown.returncode == 0, shown.stderr
    header, *lines = shown.stdout.splitlines()
    assert header.split() == [
        "HOST", "ISSUER", "EXPIRES", "LAST", "ATTEMPT", "OUTCOME", "NEXT", "DETAIL"
    ]  # fmt: skip
    [broken_line, good_line] = lines
    assert good_line.startswith(f"{GOOD} ")
    assert f"  {served.issuer}  " in good_line
    expected = {expiry_text(served.not_after, now) for now in (before, after)}
    assert any(f"  {text}  " in good_line for text in expected), (good_line, expected)
    assert " issued " in good_line and " ago " in good_line
    assert broken_line.startswith(f"{BROKEN} ")
    assert " failed " in broken_line and " in " in broken_line  # the next attempt
    assert broken_line.endswith(broken["detail"])
    assert not TERMINAL_CONTROL.search(shown.stdout.replace("\n", ""))

    as_json = keter_cli(acme_keter.keter.root, "certs", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert '"not_after": ' + repr(served.not_after) in as_json.stdout


def test_dashboard_draws_the_certificates_table(acme_keter: AcmeKeter, browser) -> None:
    served = acme_keter.served(GOOD)
    browser.log_in(*USER)
    browser.open(f"http://127.0.0.1:{acme_keter.status_port}/")
    rows = """[...document.querySelectorAll('#certificates tbody tr')].map(tr => Object.fromEntries(
        [...tr.querySelectorAll('td')].map(td => [td.classList[0], td.textContent])))"""
    drawn = wait_for(lambda: len(browser.js(rows) or []) == 2 and browser.js(rows), 10, "rows")
    assert browser.js("document.getElementById('certificates-block').hidden") is False
    broken, good = drawn
    assert good["host"] == GOOD
    assert good["issuer"] == served.issuer
    assert good["outcome"] == "issued"
    days = int((served.not_after - time.time()) // DAY)
    assert good["expires"].endswith((f"(in {days} days)", f"(in {days - 1} days)")), good
    assert good["detail"] == ""
    assert broken["host"] == BROKEN
    assert broken["outcome"] == "failed"
    assert (broken["issuer"], broken["expires"]) == (NOTHING, NOTHING)
    assert broken["next"].startswith("in ")
    assert broken["detail"] == acme_keter.rows()[BROKEN]["detail"]
    browser.screenshot(ARTIFACTS / "dashboard-certificates.png")

    # The app's page shows its own host's certificate only.
    browser.open(f"http://127.0.0.1:{acme_keter.status_port}/app/shop")
    hosts = (
        "[...document.querySelectorAll('#certificates tbody td.host')].map(td => td.textContent)"
    )
    wait_for(lambda: browser.js(hosts) == [GOOD], 10, "shop's certificate on its page")


def test_after_a_restart_certs_shows_the_stored_certificate_and_the_retry_still_due(
    acme_keter: AcmeKeter,
) -> None:
    """keter.acme reports what state.json holds at start: a stored certificate before any
    app is back, and a host whose first order failed with its backoff kept."""
    served = acme_keter.served(GOOD)
    before = acme_keter.rows()
    acme_keter.keter.stop()
    acme_keter.pebble.stop()  # what is shown now comes from ROOT/etc/acme, not a new order
    acme_keter.keter.start()
    client = status_api(acme_keter.keter)
    rows = wait_for(
        lambda: len(acme_keter.rows()) == 2 and acme_keter.rows(), 20, "both hosts again"
    )
    good, broken = rows[GOOD], rows[BROKEN]
    assert good["outcome"] == "stored"
    for field in ("issuer", "not_after", "last_attempt", "next_attempt"):
        assert good[field] == before[GOOD][field], field
    assert broken == before[BROKEN]  # failed, same detail, the same retry time: no storm
    assert acme_keter.served(GOOD).not_after == served.not_after
    shown = keter_cli(acme_keter.keter.root, "certs")
    assert " stored " in shown.stdout and " failed " in shown.stdout
    assert f'keter_certificate_expiry_timestamp_seconds{{host="{GOOD}"}}' in client.text("/metrics")
