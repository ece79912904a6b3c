"""keter.acme against a CA that misbehaves (tests/support/fakeca.py, in this process).

Whatever the CA answers, nginx is never handed a certificate it refuses: a chain
that does not parse whole, a leaf for another key or another host, or one that
is expired or about to be, is a failed attempt (one line, a retry with backoff),
never "issued"; a stored certificate that fails the same checks is not served
again after a restart. No answer makes keter order again and again.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.acme import wanted
from support.bundles import make_bundle, webapp_config
from support.fakeca import JUNK_BLOCK, FakeCa
from support.net import free_port
from support.nginx import PrivateNginx
from support.tls import make_certificate
from support.wait import wait_for

from keter.acme import AcmeManager, client
from keter.acme import manager as manager_module
from keter.acme.manager import FIRST_BACKOFF, HostState
from keter.config import AcmeSettings
from keter.messages import (
    CertificateIssued,
    CertificateOutcome,
    CertificateState,
    CertificatesWanted,
    ComponentFailed,
    ProxyApp,
    Route,
    Site,
    TlsFiles,
)
from keter.routes import acme_hosts_in_turn, with_certificates

HOST = "shop.test"
PKCS8 = (
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)


@pytest.fixture
def ca() -> Iterator[FakeCa]:
    made = FakeCa()
    yield made
    made.close()


class Component:
    """AcmeManagers (one at a time) on one ROOT/etc/acme, with the fake CA, and what they
    report."""

    def __init__(self, base: Path, ca: FakeCa) -> None:
        self.base = base
        self.ca = ca
        self.reports: queue.Queue = queue.Queue()
        self.manager: AcmeManager | None = None

    @property
    def folder(self) -> Path:
        return self.base / "etc" / "acme"

    def start(self, clock: Callable[[], float] = time.time) -> AcmeManager:
        self.stop()
        self.manager = AcmeManager(
            settings=AcmeSettings(directory=self.ca.directory),
            folder=self.folder,
            challenges=self.base / "challenges",
            report_to=self.reports,
            clock=clock,
        )
        self.manager.start()
        return self.manager

    def want(self, *hosts: str, owners: dict[str, str] | None = None) -> None:
        """``hosts`` wanted, of one app unless ``owners`` names each host's."""
        assert self.manager is not None
        message = wanted(*hosts)
        if owners is not None:
            message = CertificatesWanted(hosts=hosts, owners=owners)
        self.manager.tell(message)

    def next(self, kind: type | tuple[type, ...], timeout: float = 30) -> object:
        """The next report of ``kind`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.reports.get(timeout=max(0.05, deadline - time.monotonic()))
            if isinstance(message, kind):
                return message

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop()
            self.manager.join(timeout=30)
            assert not self.manager.is_alive()
            self.manager = None
        while not self.reports.empty():  # what it said is over with
            self.reports.get_nowait()


class Driven:
    """An AcmeManager driven on the test's thread, on a clock the test moves, that wants
    ``owners``' hosts (in that order) for their apps."""

    def __init__(self, component: Component, owners: dict[str, str]) -> None:
        self.now = time.time()
        self.manager = AcmeManager(
            settings=AcmeSettings(directory=component.ca.directory),
            folder=component.folder,
            challenges=component.base / "challenges",
            report_to=queue.Queue(),
            clock=lambda: self.now,
        )
        self.manager.on_start()
        self.manager.handle(CertificatesWanted(hosts=tuple(owners), owners=owners))
        self.hosts = len(owners)

    def minutes(self, count: int, step: float = 60) -> None:
        """``count`` times: the clock moves ``step`` seconds on, then as many checks as
        there are hosts (each orders at most one host that is due)."""
        for _ in range(count):
            self.now += step
            for _ in range(self.hosts):
                self.manager.handle(manager_module._Check())


@pytest.fixture
def component(tmp_path: Path, ca: FakeCa) -> Iterator[Component]:
    made = Component(tmp_path, ca)
    yield made
    made.stop()


def test_the_fake_ca_issues_a_certificate_keter_serves(component: Component) -> None:
    component.start()
    component.want(HOST)
    issued = component.next(CertificateIssued)
    assert issued.host == HOST
    assert issued.not_after > time.time() + 80 * 86400
    chain = issued.certificate.read_bytes()
    assert chain.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert sorted(p.name for p in issued.certificate.parent.iterdir()) == sorted(
        [issued.certificate.name, issued.key.name]
    )


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("wrong_key", "not for the key keter made"),
        ("wrong_host", "does not name shop.test"),
        ("junk_chain", "the chain does not parse"),
        ("not_pem", "the chain does not parse"),
        ("expired", "too soon"),
        ("zero_life", "too soon"),
    ],
)
def test_a_certificate_nginx_could_not_serve_is_a_failed_attempt_not_a_retry_storm(
    component: Component, caplog: pytest.LogCaptureFixture, mode: str, why: str
) -> None:
    component.ca.cert_mode = mode
    began = time.time()
    component.start()
    component.want(HOST)
    state = component.next((CertificateState, CertificateIssued))
    assert isinstance(state, CertificateState), f"a {mode} certificate was taken as issued"
    assert state.outcome is CertificateOutcome.FAILED
    assert state.not_after is None
    assert state.detail.startswith("BadCertificate: ") and why in state.detail
    assert state.next_attempt >= began + FIRST_BACKOFF
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [line for line in lines if HOST in line] == [
        f"acme: {HOST}: no certificate (attempt 1; next in 60s): {state.detail}"
    ]
    # Nothing of it is kept, and the CA is not asked again before the backoff is over.
    folder = component.folder / "hosts" / HOST
    assert not folder.exists() or list(folder.iterdir()) == []
    with pytest.raises(queue.Empty):
        component.next((CertificateState, CertificateIssued), timeout=2)
    assert component.ca.orders == [HOST]


# -- what a restart finds stored -------------------------------------------------------------


def _damage(issued: CertificateIssued, damage: str) -> None:
    chain = issued.certificate.read_bytes()
    if damage == "truncated":  # a crash or a full disk mid-write
        issued.certificate.write_bytes(chain[:200])
    elif damage == "junk_appended":
        issued.certificate.write_bytes(chain + JUNK_BLOCK)
    elif damage == "another_key":
        key = ec.generate_private_key(ec.SECP256R1())
        issued.key.write_bytes(key.private_bytes(*PKCS8))
    elif damage == "removed":
        issued.certificate.unlink()


@pytest.mark.parametrize("damage", ["truncated", "junk_appended", "another_key", "removed"])
def test_a_stored_certificate_that_fails_the_checks_is_not_served_and_a_new_one_is_ordered(
    component: Component, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    component.start()
    component.want(HOST)
    issued = component.next(CertificateIssued)
    component.stop()
    _damage(issued, damage)
    caplog.clear()
    # A minute on: the last order is past its backoff.
    component.start(clock=lambda: time.time() + FIRST_BACKOFF)
    told = component.next((CertificateState, CertificateIssued), timeout=10)
    assert isinstance(told, CertificateState), f"a {damage} stored certificate was served again"
    assert told.outcome is CertificateOutcome.FAILED
    assert told.not_after is None and told.issuer is None
    assert "the stored certificate is not used" in told.detail
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"acme: {HOST}: {told.detail}"
    ]
    component.want(HOST)  # a new order at once, not at the old certificate's renewal
    renewed = component.next(CertificateIssued, timeout=30)
    assert renewed.certificate != issued.certificate
    assert component.ca.orders == [HOST, HOST]


def test_a_host_claimed_again_gets_its_certificate_only_while_it_is_good(tmp_path: Path) -> None:
    """The supervisor kept every certificate it was ever told of: a host claimed again
    weeks after its app went (maybe by another app) was served the old one, expired."""
    issued = CertificateIssued(
        host=HOST, certificate=tmp_path / "c.crt", key=tmp_path / "c.key", not_after=1000.0
    )
    route = Route(hosts=(HOST,), action=ProxyApp(port=4000), acme=True)
    site = Site(app="another", routes=(route,))
    [served] = with_certificates(site, {HOST: issued}, now=999.0).routes
    assert served.tls == TlsFiles(certificate=issued.certificate, key=issued.key)
    [expired] = with_certificates(site, {HOST: issued}, now=1000.0).routes
    assert expired.tls is None  # plain HTTP until keter.acme has a new one


def test_a_host_whose_orders_keep_failing_takes_no_turn_of_its_sibling(
    component: Component,
) -> None:
    """The app's backoff made its failing host due the moment the app was, and first in
    the order it was ordered every time: its sibling never got a certificate (nor would
    it have been renewed)."""
    component.ca.failing_hosts = {"api.shop.test"}
    driven = Driven(component, {"api.shop.test": "shop", HOST: "shop"})
    driven.minutes(10)
    assert HOST in component.ca.orders
    assert driven.manager.hosts[HOST].certificate is not None


def test_a_renewal_under_the_same_serial_reaches_nginx_as_a_new_certificate(
    component: Component,
) -> None:
    """Files were named by the serial alone: the renewal got the old names, the site
    compared equal, and nginx kept its copy of the old certificate."""
    component.ca.serial = 4242
    now = [time.time()]
    component.start(clock=lambda: now[0])
    component.want(HOST)
    first = component.next(CertificateIssued)
    first_pem = first.certificate.read_bytes()
    now[0] = first.not_after - 20 * 86400  # due for renewal
    component.want()
    component.want(HOST)
    renewed = component.next(CertificateIssued)
    while renewed.certificate == first.certificate:  # told again first, then renewed
        renewed = component.next(CertificateIssued, timeout=10)
    assert renewed.certificate.read_bytes() != first_pem
    assert component.ca.orders == [HOST, HOST]


# -- end to end: a real keter and nginx, the fake CA -----------------------------------------


def acme_keter(keter_factory, tmp_path: Path, private_nginx: PrivateNginx, ca: FakeCa):
    certificate, key = make_certificate(tmp_path / "listener", "default", "default.test")
    return keter_factory(
        listeners=[
            {"host": "127.0.0.1", "port": private_nginx.port},
            {"host": "127.0.0.1", "port": free_port(),
             "certificate": str(certificate), "key": str(key)},
        ],
        acme={"directory": ca.directory},
    )  # fmt: skip


def deploy(keter, tmp_path: Path, app: str, host: str, **extra: object) -> None:
    stanza = {"type": "webapp", **webapp_config(host, "v1", **extra)}
    keter.drop(make_bundle(tmp_path / f"{app}.keter", config={"stanzas": [stanza]}))


def answers(nginx: PrivateNginx, host: str) -> int:
    return nginx.request(host)[0]


@pytest.mark.parametrize("mode", ["junk_chain", "wrong_key"])
def test_a_bad_certificate_from_the_ca_never_takes_the_site_down(
    keter_factory, private_nginx: PrivateNginx, tmp_path: Path, ca: FakeCa, mode: str
) -> None:
    """Before, keter logged it "issued", nginx refused the site, keter withdrew the app,
    and the next deploy of another app left its hosts with 404."""
    ca.cert_mode = mode
    keter = acme_keter(keter_factory, tmp_path, private_nginx, ca)
    deploy(keter, tmp_path, "shop", HOST, ssl="acme")
    attempt = wait_for(
        lambda: re.search(rf"{HOST}: (no certificate|certificate issued).*", keter.log()),
        60,
        "the order's outcome",
    )
    assert "no certificate (attempt 1" in attempt.group(0)
    assert answers(private_nginx, HOST) == 200  # over plain HTTP, as before the order
    deploy(keter, tmp_path, "other", "other.test")
    wait_for(lambda: answers(private_nginx, "other.test") == 200, 30, "other.test")
    private_nginx.wait_settled()
    assert answers(private_nginx, HOST) == 200
    keter.stop()
    keter.start()
    wait_for(lambda: answers(private_nginx, "other.test") == 200, 30, "other.test again")
    wait_for(lambda: answers(private_nginx, HOST) == 200, 30, f"{HOST} after the restart")
    assert "withdrew" not in keter.log() and "refused its site" not in keter.log()


def test_a_truncated_stored_certificate_leaves_the_site_on_http_after_a_restart(
    keter_factory, private_nginx: PrivateNginx, tmp_path: Path, ca: FakeCa
) -> None:
    """Before, keter took it as usable at start: nginx refused the site and the app's
    deploy failed."""
    keter = acme_keter(keter_factory, tmp_path, private_nginx, ca)
    deploy(keter, tmp_path, "shop", HOST, ssl="acme")
    wait_for(lambda: f"{HOST}: certificate issued" in keter.log(), 60, "the certificate")
    keter.stop()
    [chain] = (keter.root / "etc" / "acme" / "hosts" / HOST).glob("*.crt")
    chain.write_bytes(chain.read_bytes()[:200])  # a crash or a full disk mid-write
    keter.start()
    wait_for(lambda: answers(private_nginx, HOST) == 200, 30, f"{HOST} over HTTP")
    log = keter.log_since_start()
    assert f"acme: {HOST}: the stored certificate is not used: BadCertificate" in log
    assert "refused its site" not in log


# -- answers too slow or too large -----------------------------------------------------------


def test_a_ca_that_dribbles_its_answer_is_given_up_on_at_the_request_deadline(
    component: Component, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, NETWORK_TIMEOUT bounded each read: a byte every few seconds held the ACME
    component for good."""
    monkeypatch.setattr(client, "NETWORK_TIMEOUT", 2)
    component.ca.drip_path, component.ca.drip_every = "/dir", 0.2
    began = time.monotonic()
    component.start()
    component.want(HOST)
    state = component.next(CertificateState, timeout=20)
    assert time.monotonic() - began < 10
    assert state.outcome is CertificateOutcome.FAILED
    assert f"AnswerError: no whole answer to GET {component.ca.directory} in time" in state.detail


def test_a_whole_order_ends_at_its_deadline(
    component: Component, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA answering every request in time, each slowly, cannot stretch an order."""
    monkeypatch.setattr(client, "ORDER_SECONDS", 3)
    component.ca.delay = 1.0  # an order takes about ten requests
    began = time.monotonic()
    component.start()
    component.want(HOST)
    state = component.next((CertificateState, CertificateIssued), timeout=30)
    assert isinstance(state, CertificateState), "the order went on past its deadline"
    assert time.monotonic() - began < 8
    # Ended by the deadline: between requests (AnswerError), or, on a loaded machine, by a
    # request whose read timeout was what was left of it.
    assert "AnswerError: " in state.detail or "Read timed out" in state.detail, state.detail


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_an_answer_larger_than_a_mebibyte_is_refused_unread(
    component: Component, declared: bool
) -> None:
    """Before, a 1 GiB answer was read whole (2.6 GB more memory in keter)."""
    component.ca.huge_path, component.ca.huge_bytes = "/dir", 64 << 20
    component.ca.huge_declared = declared
    component.start()
    component.want(HOST)
    state = component.next(CertificateState, timeout=30)
    assert state.outcome is CertificateOutcome.FAILED
    assert f"AnswerError: an answer of {'67108866 bytes, ' if declared else ''}more than" in (
        state.detail
    )
    # keter hung up: what it took is what the connection's buffers held, not the answer.
    assert component.ca.huge_sent < 16 << 20


# -- state.json as a hand or a bug may leave it ----------------------------------------------


def _start_with_state(component: Component, state: object) -> AcmeManager:
    component.folder.mkdir(parents=True, exist_ok=True)
    (component.folder / "state.json").write_text(json.dumps(state))
    return component.start()


@pytest.mark.parametrize(
    "row",
    [
        {"not_after": "soon", "certificate": "/etc/hostname", "key": "/etc/hostname"},
        {"outcome": ["issued"]},
        {"failures": "3", "outcome": "failed"},
        {"retry_at": None},
        {"last_attempt": 1e400},  # json reads it as inf
        {"not_before": 10**400},
        {"failures": True},
        "a row",
    ],
    ids=["not_after", "outcome", "failures", "retry_at", "inf", "huge", "bool", "text"],
)
def test_a_row_of_state_json_with_a_wrong_type_is_dropped_with_a_line(
    component: Component, caplog: pytest.LogCaptureFixture, row: object
) -> None:
    now = time.time()
    kept = {"outcome": "failed", "detail": "refused", "failures": 2, "retry_at": now + 600}
    manager = _start_with_state(component, {"odd.test": row, "kept.test": kept})
    told = component.next(CertificateState, timeout=10)
    assert (told.host, told.next_attempt) == ("kept.test", now + 600)
    manager.tell(wanted("odd.test", "kept.test"))
    # odd.test is a host never tried: ordered now (the CA is the fake one).
    assert component.next(CertificateIssued).host == "odd.test"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("acme: state.json: odd.test dropped: ")


def test_a_host_that_failed_for_years_gets_its_line_and_a_day_of_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2 ** 1024 was more than a float holds: the component crashed at the 1026th attempt."""
    reports: queue.Queue = queue.Queue()
    folder = tmp_path / "acme"
    folder.mkdir()
    row = {"outcome": "failed", "detail": "refused", "failures": 1025}
    (folder / "state.json").write_text(json.dumps({"dead.test": row}))
    manager = AcmeManager(
        settings=AcmeSettings(directory=f"http://127.0.0.1:{free_port()}/dir"),
        folder=folder,
        challenges=tmp_path / "challenges",
        report_to=reports,
    )
    manager.start()
    try:
        reports.get(timeout=10)  # what state.json holds
        manager.tell(wanted("dead.test"))
        state = reports.get(timeout=30)
    finally:
        manager.stop()
        manager.join(timeout=15)
    assert isinstance(state, CertificateState), state
    assert "dead.test: no certificate (attempt 1026; next in 86400s)" in caplog.text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
FIELD_VALUES = st.dictionaries(st.sampled_from([f.name for f in fields(HostState)]), JSON)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=JSON | st.dictionaries(st.text(max_size=12), JSON | FIELD_VALUES))
def test_any_json_in_state_json_is_read_without_a_crash(tmp_path: Path, state: object) -> None:
    folder = tmp_path / "acme"
    folder.mkdir(exist_ok=True)
    (folder / "state.json").write_text(json.dumps(state))
    reports: queue.Queue = queue.Queue()
    manager = AcmeManager(
        settings=AcmeSettings(), folder=folder, challenges=tmp_path / "c", report_to=reports
    )
    manager.on_start()  # reads state.json and tells what it holds, on this thread
    for host, row in manager.hosts.items():
        assert isinstance(host, str)
        manager._due(host)  # the arithmetic every row goes through
        assert row.outcome is None or row.outcome in frozenset(CertificateOutcome)
        assert isinstance(row.failures, int) and isinstance(row.detail, str)
    while not reports.empty():
        assert isinstance(reports.get_nowait(), CertificateIssued | CertificateState)


def test_state_json_rows_are_checked_field_by_field() -> None:
    assert set(manager_module._FIELDS) == {f.name for f in fields(HostState)}


# -- many hosts, many apps ---------------------------------------------------------------------


def test_the_apps_hosts_are_listed_in_turn() -> None:
    def site(app: str, *hosts: str) -> Site:
        routes = (Route(hosts=(h,), action=ProxyApp(port=4000), acme=True) for h in hosts)
        return Site(app=app, routes=tuple(routes))

    sites = (site("many", "m2.test", "m1.test", "m3.test"), site("b", "b1.test"), Site(app="c"))
    assert acme_hosts_in_turn(sites) == ("b1.test", "m1.test", "m2.test", "m3.test")


def test_one_bundles_many_hosts_do_not_keep_another_apps_host_waiting(
    component: Component,
) -> None:
    """Before, every due host was ordered in one go, in sorted order: a bundle's 400
    hosts went before a host of an app deployed after it."""
    many = [f"h{i:02d}.test" for i in range(30)]
    component.ca.delay = 0.02
    component.start()
    component.want(*many)
    wait_for(lambda: len(component.ca.orders) >= 3, 30, "the first orders")
    # What the supervisor asks once another app with ssl: acme is deployed.
    owners = dict.fromkeys(many, "many") | {"zzz.test": "other"}
    component.want(many[0], "zzz.test", *many[1:], owners=owners)
    before = len(component.ca.orders)
    wait_for(lambda: "zzz.test" in component.ca.orders, 60, "zzz.test's order")
    assert component.ca.orders.index("zzz.test") <= before + 1, component.ca.orders


def test_an_app_whose_orders_fail_orders_no_more_than_an_app_with_one_host(
    component: Component,
) -> None:
    """Each of a bundle's hosts had its own backoff only: 6 hosts failing validation
    ordered 6 times as often as one, and 100 of them used up Let's Encrypt's 300
    orders per account in 3 hours, which every app's certificates share."""
    noisy = [f"n{i}.test" for i in range(6)]
    owners = {noisy[0]: "noisy", HOST: "shop"} | dict.fromkeys(noisy[1:], "noisy")
    component.ca.cert_mode = "wrong_host"  # every certificate the CA issues is refused
    driven = Driven(component, owners)
    driven.minutes(64)  # the first order and 1 minute doubling: 7 orders a host
    orders = list(component.ca.orders)
    assert orders.count(HOST) == 7, orders
    assert len(orders) - orders.count(HOST) <= 8, orders

    # One success ends the app's streak: its hosts are ordered as soon as each is due.
    component.ca.cert_mode = "good"
    driven.minutes(1, step=86400)
    assert sorted(component.ca.orders[len(orders) :]) == sorted(owners)


# -- after a failure: of the disk, of the component ------------------------------------------


def _state_json_fails(monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """The next ``times`` writes of state.json fail as on a full disk; the names written."""
    real = manager_module.atomic_write
    written: list[str] = []

    def write(path: Path, data: bytes, mode: int = 0o644, **kw: object) -> None:
        if Path(path).name == "state.json":
            written.append("failed" if len(written) < times else "written")
            if written[-1] == "failed":
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, mode, **kw)

    monkeypatch.setattr(manager_module, "atomic_write", write)
    return written


def _reports_until(component: Component, kind: type, timeout: float = 30) -> list[object]:
    """Every report up to the first of ``kind``, that one included."""
    deadline = time.monotonic() + timeout
    reports = []
    while not isinstance(reports[-1:] and reports[-1], kind):
        remaining = deadline - time.monotonic()
        try:
            reports.append(component.reports.get(timeout=max(0.05, remaining)))
        except queue.Empty:
            pytest.fail(f"no {kind.__name__} in {timeout}s; reports: {reports}")
    return reports


def test_a_state_json_that_cannot_be_written_is_a_line_and_the_orders_go_on(
    component: Component, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The failed save ended the component (ComponentFailed), and after the supervisor's
    restart it never ordered again: no certificate for any app until the hosts changed."""
    written = _state_json_fails(monkeypatch, times=1)
    component.ca.failing_hosts = {"a.test"}
    component.start()
    component.want("a.test", HOST, owners={"a.test": "a", HOST: "shop"})
    reports = _reports_until(component, CertificateIssued)
    assert not [r for r in reports if isinstance(r, ComponentFailed)], reports
    assert reports[-1].host == HOST
    assert written[:2] == ["failed", "written"]
    lines = [r.getMessage() for r in caplog.records if "state.json" in r.getMessage()]
    assert lines == [
        "acme: state.json not saved (written again at the next save): "
        "[Errno 28] No space left on device"
    ]
    # What the failed save had is in the next one: memory is what counts.
    saved = json.loads((component.folder / "state.json").read_text())
    assert saved["a.test"]["failures"] == 1 and saved[HOST]["certificate"]


@pytest.mark.parametrize("failing", ["_order", "_check"])
def test_after_a_failure_and_a_restart_the_component_orders_again(
    component: Component, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A bug raising in a look (or before it) left no look armed: after the supervisor's
    restart the component waited for a change of hosts that might never come."""
    real = getattr(AcmeManager, failing)
    calls: list[str] = []

    def once(self: AcmeManager, *args: object) -> None:
        calls.append(failing)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        real(self, *args)

    monkeypatch.setattr(AcmeManager, failing, once)
    manager = component.start()
    component.want(HOST)
    failed = component.next(ComponentFailed)
    assert failed.error == "RuntimeError: a bug"
    manager.join(10)
    assert not manager.is_alive()
    manager.restart()  # what the supervisor does, after its backoff
    assert component.next(CertificateIssued).host == HOST


def test_a_look_that_raises_still_arms_the_next(
    component: Component, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(self: AcmeManager, host: str) -> None:
        raise RuntimeError("a bug")

    manager = Driven(component, {}).manager
    monkeypatch.setattr(AcmeManager, "_order", bug)
    with pytest.raises(RuntimeError):
        manager.handle(wanted(HOST))
    armed = [m for m in manager.inbox.queue if isinstance(m, manager_module._Check)]
    assert armed or manager._timer is not None


def _renew(driven: Driven) -> Path:
    """Moves the clock to the host's renewal and looks; the chain now in use."""
    before = driven.manager.hosts[HOST].certificate
    driven.now = driven.manager._due(HOST)
    driven.manager.handle(manager_module._Check())
    assert driven.manager.hosts[HOST].certificate != before
    return Path(driven.manager.hosts[HOST].certificate)


def test_a_renewal_whose_save_fails_removes_no_certificate_state_json_names(
    component: Component, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous pair was removed before state.json was written: a full disk (or a
    crash) then left it naming a deleted file, and after a restart the site served plain
    HTTP until a new order, and a redeploy copying the old path failed."""
    driven = Driven(component, {HOST: "shop"})
    first = Path(driven.manager.hosts[HOST].certificate)
    _state_json_fails(monkeypatch, times=10**6)  # the disk stays full
    renewed = _renew(driven)
    assert renewed != first  # in use while keter runs: memory is what counts
    saved = json.loads((component.folder / "state.json").read_text())[HOST]
    assert saved["certificate"] == str(first) and first.exists()
    # keter restarted: what state.json names is served again, without an order.
    orders = len(component.ca.orders)
    again = Driven(component, {HOST: "shop"}).manager
    assert again.hosts[HOST].certificate == str(first)
    assert len(component.ca.orders) == orders


def test_a_renewal_keeps_the_previous_pair_until_the_next(component: Component) -> None:
    """A deploy in flight may still have the nginx writer copy the pair the renewal
    replaced: it stays until the next renewal, then goes."""
    driven = Driven(component, {HOST: "shop"})
    first = Path(driven.manager.hosts[HOST].certificate)
    second = _renew(driven)
    third = _renew(driven)
    kept = sorted(p.name for p in first.parent.iterdir())
    assert kept == sorted(p.with_suffix(s).name for p in (second, third) for s in (".crt", ".key"))
    assert not first.exists()


def test_keter_stopped_mid_order_leaves_no_challenge_and_no_order_at_once(
    component: Component, ca: FakeCa
) -> None:
    """SIGTERM abandons an order the CA is slow to answer: its challenge answer stayed in
    the folder nginx serves for good, and the attempt was only in memory, so the next
    start ordered the host again at once (a retry storm for a keter restarted often)."""
    ca.drip_path = "/chall/1"  # the answer is written, then the CA never answers it
    component.start()
    component.want(HOST)
    challenges = component.base / "challenges"
    wait_for(lambda: list(challenges.iterdir()), 30, "the challenge answer")
    # keter is stopped here (the abandoned order dies with the process) and started again.
    (challenges / f".{ca.token}.x1y2z3.tmp").write_bytes(b"cut short")  # atomic_write's
    ca.drip_path = None
    driven = Driven(component, {HOST: "shop"})
    try:
        assert list(challenges.iterdir()) == []
        assert ca.orders == [HOST]  # not again before a minute after the last attempt
        driven.minutes(1, step=FIRST_BACKOFF)
        assert ca.orders == [HOST, HOST]
        assert driven.manager.hosts[HOST].certificate is not None
    finally:
        ca.close()  # ends the first order, on the first component's thread


def test_state_json_keeps_only_hosts_tried_and_forgets_those_long_gone(
    component: Component,
) -> None:
    """Every host ever wanted got a row just by being looked at, tried or not: a bundle
    asking for a hundred new hosts at each deploy grew state.json (written whole at every
    attempt) and keter's memory for good."""
    (component.folder / "hosts").mkdir(parents=True)  # as a keter that ordered before left it
    account = component.folder / "account.key"
    account.write_bytes(key := client.new_account_key())
    # A hand edit: a "host" that names no host's folder (this one, ROOT/etc/acme).
    (component.folder / "state.json").write_text(json.dumps({"..": {"outcome": "failed"}}))
    component.ca.failing_hosts = {"gone.test", "kept.test"}
    driven = Driven(component, {HOST: "shop", "gone.test": "evil"})
    driven.minutes(1)
    assert sorted(component.ca.orders) == ["gone.test", HOST]
    assert account.read_bytes() == key  # ".." was forgotten, and nothing of etc/acme with it
    many = [f"h{i}.test" for i in range(100)]  # of an app waiting after its failure
    owners = {HOST: "shop", "gone.test": "evil"} | dict.fromkeys(many, "evil")
    driven.manager.handle(CertificatesWanted(hosts=tuple(owners), owners=owners))
    assert sorted(driven.manager.hosts) == ["gone.test", HOST]

    def want(*hosts: str) -> None:
        driven.manager.handle(CertificatesWanted(hosts=hosts, owners=dict.fromkeys(hosts, "evil")))

    driven.now += 80 * 86400
    want("kept.test")  # tried (and failed) 80 days on
    driven.now += 11 * 86400
    want()  # no app wants any: those not tried for 90 days, without a valid certificate, go
    assert sorted(driven.manager.hosts) == ["kept.test"]
    assert sorted(json.loads((component.folder / "state.json").read_text())) == ["kept.test"]
    assert not (component.folder / "hosts" / HOST).exists()
