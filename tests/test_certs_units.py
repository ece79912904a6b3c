"""Each host's certificate as operators see it (issue 12.3), the fast part: the status
board's state, the API route, the metric and `keter certs`' formatting, on a real
StatusServer fed the messages keter.acme sends through the supervisor.

tests/test_certs.py shows the same against a real keter, nginx and pebble.
"""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support.browser import ARTIFACTS
from support.bundles import TERMINAL_CONTROL
from support.net import free_port
from support.supervisor import webapp
from support.tls import ca_certificate
from support.wait import wait_for

from keter import commands
from keter.acme import AcmeManager
from keter.client import KeterClient
from keter.config import AcmeSettings, KeterConfig
from keter.messages import (
    AppChanged,
    AppGone,
    AppSnapshot,
    AppState,
    CertificateIssued,
    CertificateOutcome,
    CertificateState,
)
from keter.status import StatusServer

DAY = 86400.0
NOW = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC
ISSUER = "CN=Pebble Intermediate CA 0a1b2c"
USER = ("ops", "units-pw")


def snapshot(app: str, *hosts: str) -> AppSnapshot:
    return AppSnapshot(
        app=app,
        state=AppState.RUNNING,
        version="0123456789ab",
        bundle_mtime=NOW,
        hosts=hosts,
        port=4001,
        pid=os.getpid(),
        started_at=NOW,
        restarts=0,
        database=None,
    )


def issued(host: str, **fields) -> CertificateState:
    values = {
        "outcome": CertificateOutcome.ISSUED,
        "issuer": ISSUER,
        "not_after": NOW + 90 * DAY,
        "last_attempt": NOW - 60,
        "next_attempt": NOW + 60 * DAY,
        "detail": "",
    }
    values.update(fields)
    return CertificateState(host=host, **values)


def failed(host: str, detail: str = "urn:ietf:params:acme:error:connection: refused"):
    return CertificateState(
        host=host,
        outcome=CertificateOutcome.FAILED,
        last_attempt=NOW - 5,
        next_attempt=NOW + 55,
        detail=detail,
    )


class Status:
    """A started StatusServer and a client of its socket."""

    def __init__(self, root: Path) -> None:
        for folder in ("incoming", "etc", "log", "run"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.config = KeterConfig(
            root=root, status_listen=("127.0.0.1", free_port()), dashboard_users=(USER,)
        )
        self.server = StatusServer(self.config)
        self.server.start()
        assert self.server.listening.wait(10)
        self.client = KeterClient(root)

    def tell(self, *messages: object) -> None:
        for message in messages:
            self.server.tell(message)

    def rows(self) -> dict[str, dict]:
        return {row["host"]: row for row in self.client.certificates()["certificates"]}

    def expiries(self) -> dict[str, float]:
        text = self.client.text("/metrics")
        [family] = [
            f
            for f in text_string_to_metric_families(text)
            if f.name == "keter_certificate_expiry_timestamp_seconds"
        ]
        assert family.type == "gauge"
        return {sample.labels["host"]: sample.value for sample in family.samples}


@pytest.fixture
def status(tmp_path):
    running = Status(tmp_path / "root")
    yield running
    running.server.stop()
    running.server.join(10)


# -- the status side ------------------------------------------------------------------------


def test_the_latest_state_of_each_host_of_a_running_app_is_served(status):
    status.tell(
        AppChanged(snapshot=snapshot("shop", "shop.test", "www.shop.test")),
        failed("shop.test"),
        issued("www.shop.test"),
        issued("gone.test"),  # stored by an earlier run; no app claims it now
    )
    wait_for(lambda: len(status.rows()) == 2, 5, "both hosts of shop")
    rows = status.rows()
    assert rows["www.shop.test"] == {
        "host": "www.shop.test",
        "apps": ["shop"],
        "outcome": "issued",
        "issuer": ISSUER,
        "not_after": NOW + 90 * DAY,
        "last_attempt": NOW - 60,
        "next_attempt": NOW + 60 * DAY,
        "detail": "",
    }
    assert rows["shop.test"]["outcome"] == "failed"
    assert rows["shop.test"]["not_after"] is None
    assert rows["shop.test"]["next_attempt"] == NOW + 55
    assert "connection: refused" in rows["shop.test"]["detail"]
    # Only a host with a certificate has an expiry; a host no app claims has none.
    assert status.expiries() == {"www.shop.test": NOW + 90 * DAY}
    # The app's own view lists its hosts' certificates.
    app = status.client.app("shop")
    assert [row["host"] for row in app["certificates"]] == ["shop.test", "www.shop.test"]

    # A retry succeeds: the newest state replaces the failure.
    status.tell(issued("shop.test", not_after=NOW + 80 * DAY))
    wait_for(lambda: status.rows()["shop.test"]["outcome"] == "issued", 5, "the retry")
    assert status.expiries() == {"www.shop.test": NOW + 90 * DAY, "shop.test": NOW + 80 * DAY}

    # The app goes: its hosts are neither shown nor exported (keter.acme no longer renews them).
    status.tell(AppGone(app="shop"))
    wait_for(lambda: status.rows() == {}, 5, "no certificates")
    assert status.expiries() == {}
    # It comes back: what keter.acme said of its hosts is still known (it says it only once).
    status.tell(AppChanged(snapshot=snapshot("shop", "shop.test")))
    wait_for(lambda: list(status.rows()) == ["shop.test"], 5, "shop's certificate again")


def test_a_refused_host_has_no_next_attempt(status):
    status.tell(
        AppChanged(snapshot=snapshot("wild", "*.wild.test")),
        CertificateState(
            host="*.wild.test",
            outcome=CertificateOutcome.REFUSED,
            next_attempt=0.0,
            detail="a wildcard host cannot be validated by HTTP-01",
        ),
    )
    row = wait_for(lambda: status.rows().get("*.wild.test"), 5, "the refused host")
    assert (row["outcome"], row["next_attempt"], row["not_after"]) == ("refused", None, None)


def test_text_from_the_ca_is_made_safe_and_capped(status):
    hostile = "\x1b]0;pwned\x07\x1b[2J<b>CA</b>\u202e" + "x" * 5000
    status.tell(
        AppChanged(snapshot=snapshot("shop", "shop.test", "www.shop.test")),
        issued("shop.test", issuer=hostile),
        failed("www.shop.test", detail=hostile),
    )
    wait_for(lambda: len(status.rows()) == 2, 5, "both hosts")
    rows = status.rows()
    for text in (rows["shop.test"]["issuer"], rows["www.shop.test"]["detail"]):
        assert text.startswith("\\x1b]0;pwned\\x07\\x1b[2J<b>CA</b>\\u202e")
        assert not TERMINAL_CONTROL.search(text)
        assert len(text) < 700 and text.endswith("more characters)")


def test_text_from_the_ca_is_shown_inert_on_the_dashboard(status, browser):
    hostile = '<img src=x onerror="window.pwned=1">\x1b[31m<b>CA</b>'
    status.tell(
        AppChanged(snapshot=snapshot("shop", "shop.test")),
        CertificateState(
            host="shop.test",
            outcome=CertificateOutcome.FAILED,
            issuer=hostile,
            not_after=time.time() + 3 * DAY,
            last_attempt=time.time() - 5,
            next_attempt=time.time() + 55,
            detail=hostile,
        ),
    )
    browser.log_in(*USER)
    browser.open("http://{}:{}/".format(*status.server.tcp_address))
    table = "document.getElementById('certificates').textContent"
    text = wait_for(lambda: "<img" in (browser.js(table) or "") and browser.js(table), 10, "row")
    assert text.count('<img src=x onerror="window.pwned=1">\\x1b[31m<b>CA</b>') == 2
    assert not TERMINAL_CONTROL.search(text.replace("\n", ""))
    assert browser.js("document.querySelectorAll('main img, main b').length") == 0
    assert browser.js("window.pwned") is None
    browser.screenshot(ARTIFACTS / "dashboard-certificates-inert.png")


def test_the_supervisor_passes_certificate_states_to_the_status_component(rig):
    rig.deploy("a", webapp(rig.tmp, "a.test"))
    state = failed("a.test")
    rig.send(state)
    assert rig.status.one(CertificateState) == state


def test_keter_acme_tells_what_state_json_holds_when_it_starts(tmp_path):
    """So `keter certs` shows every host after a restart, before its next attempt."""
    folder = tmp_path / "acme"
    now = time.time()
    # Whole seconds: a certificate's dates have no fractions.
    not_after = float(int(now + 10 * DAY))
    chain, key = ca_certificate(
        folder / "hosts" / "renewing.test",
        "renewing.test",
        issuer=ISSUER,
        not_before=int(now - 80 * DAY),
        not_after=not_after,
    )
    row = {"last_attempt": now - 600, "retry_at": now + 3000}
    state = {
        # A valid certificate whose renewal failed: served again, shown as failed.
        "renewing.test": {
            **row,
            "certificate": str(chain),
            "key": str(key),
            "not_before": now - 80 * DAY,
            "not_after": now + 10 * DAY,  # the certificate's own dates are used
            "issuer": ISSUER,
            "outcome": "failed",
            "detail": "urn:ietf:params:acme:error:rateLimited: too many",
            "failures": 3,
        },
        # A first order that failed: no certificate, the retry time kept.
        "new.test": {**row, "outcome": "failed", "detail": "connection refused", "failures": 1},
        # Unreadable outcome (a hand-edited file): nothing said.
        "odd.test": {**row, "outcome": "???", "failures": 1},
    }
    (folder / "state.json").write_text(json.dumps(state))
    reports: queue.Queue = queue.Queue()
    manager = AcmeManager(
        settings=AcmeSettings(), folder=folder, challenges=tmp_path / "c", report_to=reports
    )
    manager.start()
    try:
        told = [reports.get(timeout=5) for _ in range(3)]
        with pytest.raises(queue.Empty):
            reports.get(timeout=0.3)
    finally:
        manager.stop()
        manager.join(10)
    [served] = [m for m in told if isinstance(m, CertificateIssued)]
    assert (served.host, served.certificate) == ("renewing.test", chain)
    states = {m.host: m for m in told if isinstance(m, CertificateState)}
    assert set(states) == {"renewing.test", "new.test"}
    renewing, new = states["renewing.test"], states["new.test"]
    assert renewing.outcome is CertificateOutcome.FAILED
    assert (renewing.not_after, renewing.issuer) == (not_after, ISSUER)
    assert "rateLimited" in renewing.detail
    assert new.outcome is CertificateOutcome.FAILED
    assert (new.not_after, new.next_attempt, new.last_attempt) == (None, now + 3000, now - 600)


# -- keter certs ---------------------------------------------------------------------------


def test_certs_prints_one_aligned_line_per_host():
    rows = [
        {
            "host": "shop.test",
            "apps": ["shop"],
            "outcome": "failed",
            "issuer": None,
            "not_after": None,
            "last_attempt": NOW - 5,
            "next_attempt": NOW + 55,
            "detail": "urn:ietf:params:acme:error:connection: refused",
        },
        {
            "host": "www.shop.test",
            "apps": ["shop"],
            "outcome": "issued",
            "issuer": ISSUER,
            "not_after": NOW + 89.5 * DAY,
            "last_attempt": NOW - 3 * 3600,
            "next_attempt": NOW + 59 * DAY + 3600,
            "detail": "",
        },
    ]
    assert commands.render_certificates(rows, NOW).splitlines() == [
        "HOST           ISSUER                            EXPIRES                            "
        "LAST ATTEMPT  OUTCOME  NEXT       DETAIL",
        "shop.test      -                                 -                                  "
        "5s ago        failed   in 55s     urn:ietf:params:acme:error:connection: refused",
        "www.shop.test  CN=Pebble Intermediate CA 0a1b2c  2026-08-26 08:26 UTC (in 89 days)  "
        "3h00m ago     issued   in 59d01h",
    ]
    assert commands.render_certificates([], NOW).startswith("no certificates")


@pytest.mark.parametrize(
    ("not_after", "shown"),
    [
        (None, "-"),
        (NOW + DAY, "2026-05-29 20:26 UTC (in 1 day)"),
        (NOW + 3 * 3600 + 120, "2026-05-28 23:28 UTC (in 3h02m)"),
        (NOW - 2 * DAY, "2026-05-26 20:26 UTC (expired 2d00h ago)"),
    ],
)
def test_expiry_is_a_date_and_how_far_off_it_is(not_after, shown):
    assert commands.expiry_text(not_after, NOW) == shown


def test_next_attempt_text():
    assert commands.next_text(None, NOW) == "-"
    assert commands.next_text(NOW - 1, NOW) == "due now"
    assert commands.next_text(NOW + 90, NOW) == "in 1m30s"


@given(text=st.text(max_size=300), host=st.text(min_size=1, max_size=80))
def test_certs_shows_any_text_as_one_inert_line_per_host(text, host):
    row = {
        "host": host,
        "apps": ["a"],
        "outcome": "failed",
        "issuer": text,
        "not_after": None,
        "last_attempt": None,
        "next_attempt": None,
        "detail": text,
    }
    shown = commands.render_certificates([row, {**row, "host": "b.test"}], NOW)
    lines = shown.split("\n")
    assert len(lines) == 3  # the header and one line per host
    assert not any(TERMINAL_CONTROL.search(line) for line in lines)


def test_certs_command_prints_the_table_and_the_json(status, capsys):
    expires = time.time() + 89.5 * DAY
    status.tell(
        AppChanged(snapshot=snapshot("shop", "shop.test")),
        issued("shop.test", not_after=expires),
    )
    wait_for(lambda: status.rows(), 5, "the certificate")
    root = str(status.config.root)
    assert commands.main(["certs", "--root", root]) == commands.EXIT_OK
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["HOST", "ISSUER", "EXPIRES"]
    assert line.startswith("shop.test") and ISSUER in line and "(in 89 days)" in line
    assert commands.main(["certs", "--root", root, "--json"]) == commands.EXIT_OK
    answer = json.loads(capsys.readouterr().out)
    assert [row["host"] for row in answer["certificates"]] == ["shop.test"]
    assert abs(answer["now"] - time.time()) < 10


def test_certs_without_a_running_keter_exits_3(tmp_path, capsys):
    assert commands.main(["certs", "--root", str(tmp_path)]) == commands.EXIT_UNAVAILABLE
    assert "keter is not running" in capsys.readouterr().err
