"""The ACME component: keeps a certificate for every host that asks for ``ssl: acme``.

It talks to the supervisor only through messages: it is told the hosts that
want a certificate (``CertificatesWanted``, the whole set each time) and
reports each certificate it has (``CertificateIssued``: new, renewed, or
stored by an earlier run) and each host's state (``CertificateState``). The
supervisor puts an issued certificate into that host's site; nothing here
touches nginx, and nothing here blocks a deploy: a site serves over plain
HTTP until its certificate arrives.

Keys and certificates live under ``ROOT/etc/acme`` (0600), with ``state.json``
(when each host was last tried, how it went, when to try again). A certificate
the CA returns, or one stored by an earlier run, is used only if it passes
``client.check`` and OpenSSL loads it (nginx would refuse the site otherwise). A
certificate is renewed 30 days before it expires, spread over two more days by
host so a hundred hosts do not renew at once, never before half the time it had
left when issued is over, and no host is tried sooner than a minute after its
last attempt: no answer of the CA makes keter order again and again. A failure
(CA down, challenge failed, rate limit, a certificate refused) is one line and a
retry with backoff (1 minute doubling to a day, at least an hour after a rate
limit), kept across restarts so a restart never makes a retry storm. A wildcard
cannot be validated by HTTP-01: refused with a line.

Every app's orders count against one account's limits at the CA (Let's Encrypt:
300 new orders in 3 hours), so an app whose orders fail also waits as a whole:
after each failure none of its hosts is ordered for the same doubling backoff,
until one of its orders succeeds. One bundle with a hundred hosts that fail
validation would otherwise order about 800 times in 3 hours, each host on its
own backoff, and use up the limit every other app's certificates share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from keter import names
from keter.actor import Actor
from keter.config import AcmeSettings
from keter.fsutil import atomic_write, fsync_dir
from keter.messages import (
    CertificateIssued,
    CertificateOutcome,
    CertificateState,
    CertificatesWanted,
    Component,
)

if TYPE_CHECKING:
    from keter.acme import client

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
RENEW_BEFORE = 30 * DAY
RENEW_SPREAD = 2 * DAY
FIRST_BACKOFF = 60.0
MAX_BACKOFF = DAY
RATE_LIMIT_BACKOFF = 3600.0
# A host no longer wanted, without a valid certificate, is forgotten this long after its
# last attempt (a certificate issued then has expired by now if it lived 90 days).
FORGET_AFTER = 90 * DAY


@dataclass
class HostState:
    """What keter knows of one host's certificate (a row of state.json)."""

    certificate: str | None = None  # path of the chain in use
    key: str | None = None
    not_before: float | None = None
    not_after: float | None = None
    issuer: str | None = None
    last_attempt: float | None = None
    outcome: str | None = None  # a CertificateOutcome
    detail: str = ""
    failures: int = 0
    retry_at: float = 0.0  # after a failure: not before this


@dataclass
class AppBudget:
    """An app's streak of failed orders (any of its hosts), and when it may order again."""

    failures: int = 0
    retry_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class _Check:
    """Private timer: look for hosts whose certificate is due."""


class AcmeManager(Actor):
    def __init__(
        self,
        *,
        settings: AcmeSettings,
        folder: Path,
        challenges: Path,
        report_to: queue.Queue | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``folder`` is ROOT/etc/acme; ``challenges`` the folder nginx serves at
        /.well-known/acme-challenge/. ``clock`` is the wall clock (tests move it)."""
        super().__init__(Component.ACME, report_to)
        self.settings = settings
        self.folder = Path(folder)
        self.challenges = Path(challenges)
        self.clock = clock
        self.hosts: dict[str, HostState] = {}
        self.wanted: tuple[str, ...] = ()  # in the order to try them (apps in turn)
        self.owners: Mapping[str, str] = {}  # each wanted host's app
        # Apps whose orders failed lately. Kept while keter runs (a removed app that
        # comes back keeps its streak), each for a day past its last retry time.
        self.apps: dict[str, AppBudget] = {}
        self._timer: int | None = None
        self._told = False  # a _Check waits in the inbox already
        self._loaded = False

    # -- the loop ------------------------------------------------------------------------

    def on_start(self) -> None:
        if self._loaded:
            return  # a restart after a failure: the state is in memory
        self._loaded = True
        self._load()
        self._clear_challenges()
        now = self.clock()
        for host, state in sorted(self.hosts.items()):
            if self._reusable(host, state, now):
                # Served again at once; a failed renewal stays the last attempt's outcome
                # (what `keter certs` shows) until the next attempt.
                outcome = CertificateOutcome.FAILED if state.failures else CertificateOutcome.STORED
                self._issued(host, state, outcome)
            elif state.outcome in frozenset(CertificateOutcome):
                # No certificate (a failed first order): `keter certs` shows it until the retry.
                self.report(self._state_message(host, state))

    def on_restart(self) -> None:
        # The handler that failed may have been a look that had not armed the next one, or
        # a CertificatesWanted that had not looked yet: without a look now, no host was
        # ordered or renewed again until the set of hosts changed. A second _Check, if one
        # waits already, is one more look, which orders nothing that is not due.
        self._told = True
        self.tell(_Check())

    def handle(self, message: object) -> None:
        match message:
            case CertificatesWanted(hosts=hosts, owners=owners):
                now = self.clock()
                self.wanted = tuple(dict.fromkeys(hosts))
                self.owners = owners
                self.apps = {
                    app: budget
                    for app, budget in self.apps.items()
                    if budget.retry_at + MAX_BACKOFF > now
                }
                self._forget(now)
                for host in sorted(self.wanted):
                    if names.is_wildcard(host) and self._known(host).outcome != "refused":
                        self._refuse(host)
                self._check()
            case _Check():
                self._told = False
                self._check()
            case _:
                self.unexpected(message)

    def _check(self) -> None:
        """Order a certificate for the next host that is due, then look again: at once
        (after the messages already waiting: a new app's hosts, a stop) if another is
        due, else when the next one is."""
        orderable = [host for host in self.wanted if not names.is_wildcard(host)]
        try:
            now = self.clock()
            # Of the hosts due, the one that has waited longest on its own account, ties
            # in the supervisor's order, which takes the apps' hosts in turn: one bundle's
            # hundreds of hosts do not keep another app's waiting. A host whose orders
            # keep failing is due as soon as its app's backoff ends: first in that order,
            # it took every turn of its app from a sibling host that never failed (a
            # renewal too).
            due = [host for host in orderable if self._due(host) <= now]
            if due:
                self._order(min(due, key=self._own_due))
        finally:
            # Armed even when the order raised (a bug: the CA's answers are the host's
            # failures): the look this one replaced is gone, and no other would come.
            self._arm(orderable)

    def _arm(self, orderable: list[str]) -> None:
        """The next look: at once if a host is due, else when the first one is."""
        if self._timer is not None:
            self.cancel(self._timer)
            self._timer = None
        if any(self._due(each) <= self.clock() for each in orderable):
            if not self._told:
                self._told = True
                self.tell(_Check())
        elif orderable:
            # Checked at least hourly: a moved wall clock must not leave a timer far off.
            wait = min(self._due(each) for each in orderable) - self.clock()
            self._timer = self.schedule(min(max(wait, 0.0), 3600.0), _Check())

    def _due(self, host: str) -> float:
        """When ``host`` is to be ordered: its own time, or its app's after the app's
        orders failed lately, whichever is later."""
        budget = self.apps.get(self.owners.get(host, ""))
        return max(self._own_due(host), budget.retry_at if budget is not None else 0.0)

    def _own_due(self, host: str) -> float:
        state = self._known(host)
        # Never sooner than a minute after any attempt, whatever the certificate is or
        # state.json says: nothing the CA answers can make keter order again and again.
        floor = max(state.retry_at, (state.last_attempt or 0.0) + FIRST_BACKOFF)
        if state.not_after is None:
            return floor
        # 30 days before expiry, or with a third of its life left for a short-lived
        # certificate (else every new one would be due at once).
        lifetime = state.not_after - (state.not_before or state.not_after - 90 * DAY)
        before = min(RENEW_BEFORE, lifetime / 3)
        fraction = int(hashlib.sha256(host.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        spread = fraction * min(RENEW_SPREAD, lifetime / 10)
        return max(state.not_after - before - spread, floor)

    # -- one order -----------------------------------------------------------------------

    def _order(self, host: str) -> None:
        state = self._state(host)
        now = state.last_attempt = self.clock()
        # Written before the order: keter stopped mid-order (SIGTERM abandons one the CA
        # is slow to answer) had it in memory only, and ordered the host again at once at
        # its next start, however often it was restarted.
        self._save()
        try:
            # Normally made (group nginx) by the nginx writer; it may not have run yet.
            self.challenges.mkdir(mode=0o755, parents=True, exist_ok=True)
            issued = _client().order(self._ca(), host, self.challenges, now)
            chain, key = self._store(host, issued)
        except Exception as exc:  # the library raises many kinds; each is this host's failure
            self._failed(host, state, exc)
            return
        previous = {Path(each) for each in (state.certificate, state.key) if each is not None}
        state.certificate, state.key = str(chain), str(key)
        state.not_before, state.not_after = issued.not_before, issued.not_after
        state.issuer = issued.issuer
        state.failures, state.detail = 0, ""
        self.apps.pop(self.owners.get(host, ""), None)  # the app's streak ends
        # Not renewed before half the time it has left is over, however the CA dated it:
        # one issued near its end must not be ordered again at once.
        state.retry_at = now + max(FIRST_BACKOFF, (issued.not_after - now) / 2)
        log.info("acme: %s: certificate issued by %s", host, names.log_text(issued.issuer))
        if self._issued(host, state, CertificateOutcome.ISSUED):
            # Only once state.json names the new pair: removed before, a crash or a full
            # disk left it naming a deleted file (the site on plain HTTP after a restart).
            # The previous pair stays until the next renewal: the supervisor may be
            # having the nginx writer copy it for a deploy in flight.
            self._remove_files(host, keep={chain, key, *previous})

    def _store(self, host: str, issued: client.Issued) -> tuple[Path, Path]:
        """Write the host's new key and chain, and name them as its own only once OpenSSL
        (nginx's library) has loaded them as nginx will: nginx refuses the whole site
        for a chain it cannot read. Nothing else is removed here (see ``_order``)."""
        folder = self.folder / "hosts" / host
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        new_chain, new_key = folder / "new.crt.tmp", folder / "new.key.tmp"
        # Named by the chain's own hash too: a CA that issues a renewal under the same
        # serial (RFC 5280 forbids it) would otherwise give the site the same file names,
        # and the nginx writer, seeing the same site, would keep its copy of the old one.
        stem = f"{issued.serial}-{hashlib.sha256(issued.chain).hexdigest()[:12]}"
        chain, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        try:
            atomic_write(new_key, issued.key, mode=0o600)
            atomic_write(new_chain, issued.chain, mode=0o600)
            _client().loadable(new_chain, new_key)
            os.replace(new_key, key)
            os.replace(new_chain, chain)
            fsync_dir(folder)
        finally:
            for left in (new_chain, new_key):
                with contextlib.suppress(OSError):
                    left.unlink()
        return chain, key

    def _remove_files(self, host: str, keep: set[Path]) -> None:
        """Remove the files of the host's folder but ``keep`` (older pairs, leftovers)."""
        try:
            files = list((self.folder / "hosts" / host).iterdir())
        except OSError:
            return  # nothing to remove, or nothing to be done about it now
        for old in files:
            if old not in keep:
                with contextlib.suppress(OSError):
                    old.unlink()

    def _failed(self, host: str, state: HostState, exc: Exception) -> None:
        detail = names.log_text(_reason(exc), 500)
        state.failures += 1
        backoff = _backoff(state.failures)
        if _rate_limited(exc):
            backoff = max(backoff, RATE_LIMIT_BACKOFF)
        now = self.clock()
        state.retry_at = now + backoff
        app = self.owners.get(host)
        if app is not None:
            budget = self.apps.setdefault(app, AppBudget())
            budget.failures += 1
            budget.retry_at = now + _backoff(budget.failures)
        state.outcome, state.detail = CertificateOutcome.FAILED.value, detail
        log.warning(
            "acme: %s: no certificate (attempt %d; next in %ds): %s",
            host,
            state.failures,
            int(backoff),
            detail,
        )
        self._save()
        self.report(self._state_message(host, state))

    def _refuse(self, host: str) -> None:
        state = self._state(host)
        state.outcome = CertificateOutcome.REFUSED.value
        state.detail = "a wildcard host cannot be validated by HTTP-01"
        log.warning("acme: %s: %s", host, state.detail)
        self.report(self._state_message(host, state))

    def _issued(self, host: str, state: HostState, outcome: CertificateOutcome) -> bool:
        """Save and report the host's certificate; whether state.json was written."""
        state.outcome = outcome.value
        saved = self._save()
        self.report(
            CertificateIssued(
                host=host,
                certificate=Path(state.certificate),
                key=Path(state.key),
                not_after=state.not_after,
            )
        )
        self.report(self._state_message(host, state))
        return saved

    def _state_message(self, host: str, state: HostState) -> CertificateState:
        return CertificateState(
            host=host,
            outcome=CertificateOutcome(state.outcome),
            issuer=state.issuer,
            not_after=state.not_after,
            last_attempt=state.last_attempt,
            next_attempt=self._due(host),
            detail=state.detail,
        )

    # -- files ---------------------------------------------------------------------------

    def _reusable(self, host: str, state: HostState, now: float) -> bool:
        """Whether the host's stored certificate is served again. It must pass the checks
        a new one does (a chain truncated by a crash, or edited, would have nginx refuse
        the site); its dates and issuer are read from it, not from state.json. One that
        fails is forgotten with a line, and a new order is due."""
        if state.certificate is None or state.key is None:
            return False
        try:
            issued = _client().stored(Path(state.certificate), Path(state.key), host)
            if issued.not_after <= now:
                raise _client().BadCertificate("it has expired")
        except (OSError, ValueError) as exc:
            detail = names.log_text(f"the stored certificate is not used: {_reason(exc)}", 500)
            log.warning("acme: %s: %s", host, detail)
            state.certificate = state.key = state.issuer = None
            state.not_before = state.not_after = None
            if state.outcome in (CertificateOutcome.ISSUED, CertificateOutcome.STORED):
                state.outcome, state.detail = CertificateOutcome.FAILED.value, detail
            if not state.failures:
                state.retry_at = 0.0  # that certificate's renewal time: a new one is due now
            return False
        state.not_before, state.not_after = issued.not_before, issued.not_after
        state.issuer = issued.issuer
        return True

    def _ca(self) -> client.Ca:
        account = self.folder / "account.key"
        try:
            key = account.read_bytes()
        except FileNotFoundError:
            key = _client().new_account_key()
            self._make_folder()
            atomic_write(account, key, mode=0o600)
        settings = self.settings
        return _client().Ca(
            directory=settings.directory,
            account_key=key,
            email=settings.email,
            eab_kid=settings.eab_kid,
            eab_hmac_key=settings.eab_hmac_key,
            ca_bundle=settings.ca_bundle,
        )

    def _clear_challenges(self) -> None:
        """Remove what earlier orders left in the challenge folder. keter stopped mid-order
        left its answer there for good (the order's own cleanup never ran). Only keter
        writes there, one order at a time, and none runs yet: every file there is left
        over, atomic_write's hidden temporaries (``.TOKEN.*.tmp``) too."""
        try:
            entries = list(os.scandir(self.challenges))
        except OSError:
            return  # none yet: the nginx writer or the first order makes it
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def _state(self, host: str) -> HostState:
        """The host's row, made if there is none: for an attempt or an outcome."""
        return self.hosts.setdefault(host, HostState())

    def _known(self, host: str) -> HostState:
        """The host's row, or an empty one that is not kept: looking makes no row. It
        made one for every host ever wanted, tried or not, and state.json, written whole
        at every attempt, grew with each (a bundle can ask for a hundred at a time)."""
        return self.hosts.get(host) or HostState()

    def _forget(self, now: float) -> None:
        """Drop the rows of hosts no longer wanted that have no valid certificate and were
        not tried for FORGET_AFTER, and their folders: nothing in them is of use, and
        else every host ever wanted stayed in state.json (and in memory) for good. A row
        with a valid certificate stays: its app may come back and serve it again."""
        wanted = set(self.wanted)
        gone = [
            host
            for host, state in self.hosts.items()
            if host not in wanted
            and (state.certificate is None or (state.not_after or 0.0) <= now)
            and (state.last_attempt or 0.0) + FORGET_AFTER <= now
        ]
        for host in gone:
            del self.hosts[host]
            self._remove_folder(host)
        if gone:
            log.info("acme: forgot %d host(s) no longer wanted", len(gone))
            self._save()

    def _remove_folder(self, host: str) -> None:
        # A host read from state.json may be anything (a hand edit): "..", or a path,
        # would name a folder that is not one host's.
        try:
            if names.validate_host(host) != host:
                return
        except ValueError:
            return
        folder = self.folder / "hosts" / host
        self._remove_files(host, keep=set())
        with contextlib.suppress(OSError):
            folder.rmdir()

    def _load(self) -> None:
        self.hosts = {}
        try:
            data = json.loads((self.folder / "state.json").read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("acme: state.json unreadable, starting afresh: %s", exc)
            return
        if not isinstance(data, dict):
            log.warning("acme: state.json is not a mapping of hosts, starting afresh")
            return
        for host, row in data.items():
            try:
                self.hosts[host] = _row(row)
            except ValueError as exc:  # one host forgotten (a hand-edited file), not all
                log.warning("acme: state.json: %s dropped: %s", names.log_text(host, 300), exc)

    def _save(self) -> bool:
        """Write state.json; whether it was written. A failure (a full disk) is a line, not
        the component's: it ended the component, which never ordered again. The state in
        memory stays what counts, and the next save writes it whole."""
        data = {host: asdict(state) for host, state in sorted(self.hosts.items())}
        try:
            self._make_folder()
            atomic_write(
                self.folder / "state.json", json.dumps(data, indent=1).encode(), mode=0o600
            )
        except OSError as exc:
            log.warning("acme: state.json not saved (written again at the next save): %s", exc)
            return False
        return True

    def _make_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)


def _row(row: object) -> HostState:
    """A row of state.json as a HostState; raises ValueError for anything of a wrong
    type: every later use (arithmetic, paths, messages) takes the types for granted."""
    if not isinstance(row, dict):
        raise ValueError("not a mapping")
    fields = {}
    for name, value in row.items():
        if name not in _FIELDS:
            continue  # a field of another version of keter
        check, optional = _FIELDS[name]
        if not (value is None and optional):
            value = check(value)
        fields[name] = value
    return HostState(**fields)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _time(value: object) -> float:
    # bool is an int to Python; an int too large for a float breaks arithmetic later.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a time, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError("a time out of range") from None
    if not math.isfinite(seconds):
        raise ValueError("a time out of range")
    return seconds


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r:.40}")
    return value


def _outcome(value: object) -> str:
    if not isinstance(value, str) or value not in frozenset(CertificateOutcome):
        raise ValueError(f"unknown outcome {value!r:.40}")
    return str(value)


# Each field of HostState: its check and whether it may be null.
_FIELDS: dict[str, tuple[Callable[[object], object], bool]] = {
    "certificate": (_text, True),
    "key": (_text, True),
    "not_before": (_time, True),
    "not_after": (_time, True),
    "issuer": (_text, True),
    "last_attempt": (_time, True),
    "outcome": (_outcome, True),
    "detail": (_text, False),
    "failures": (_count, False),
    "retry_at": (_time, False),
}


def _backoff(failures: int) -> float:
    """The wait after the ``failures``-th failure in a row: 1 minute doubling to a day.
    The exponent is capped: failures are kept across restarts, and a host failing
    daily for three years would have 2 ** 1024, more than a float holds."""
    return min(FIRST_BACKOFF * 2 ** min(failures - 1, 20), MAX_BACKOFF)


def _client():
    """keter.acme.client, imported when a certificate is first ordered: the ACME
    libraries (acme, cryptography, josepy, requests) cost every keter about 15 MB of
    memory, and most run no app with ``ssl: acme``."""
    from keter.acme import client

    return client


def _reason(exc: Exception) -> str:
    from acme import messages as acme_messages

    if isinstance(exc, acme_messages.Error):
        return f"{exc.typ}: {exc.detail}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _rate_limited(exc: Exception) -> bool:
    from acme import errors as acme_errors
    from acme import messages as acme_messages

    return (isinstance(exc, acme_messages.Error) and (exc.code == "rateLimited")) or (
        isinstance(exc, acme_errors.Error) and "rateLimited" in str(exc)
    )
