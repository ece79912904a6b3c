"""What the status API shows: every app's latest snapshot, recent events, deploy history,
each host's certificate.

The status actor's thread is the only writer (``StatusBoard``'s ``app_changed``,
``record`` ...); the HTTP threads only read, through the ``*_view`` methods.
Both sides hold ``cond``; a writer that adds a history entry wakes the long
polls waiting for one.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import replace

from keter import __version__
from keter.archive import BundleArchive
from keter.config import KeterConfig
from keter.history import REASON_LIMIT, DeployHistory, capped_text
from keter.logtail import tail_lines
from keter.messages import (
    AppSnapshot,
    AppTraffic,
    CertificateOutcome,
    CertificateState,
    DeployFinished,
    EventKind,
    SwitchMode,
    TrafficReport,
    WatchState,
)
from keter.names import WILDCARD, log_text
from keter.routes import approot
from keter.status.errors import ApiError

EVENTS_KEPT = 100
EVENT_LIMIT = REASON_LIMIT + 100  # characters of one event's text (a deploy's reason and more)
MAX_LOG_LINES = 1000
LOG_LINE_LIMIT = 4096  # characters of one log line shown (an app's lines go up to 64 KiB)
MAX_LOG_ANSWER = 512 * 1024  # bytes of JSON of the lines of one answer, the newest kept
MAX_LOG_BYTES = MAX_LOG_LINES * LOG_LINE_LIMIT  # read of the log at most: what can be shown
LONG_POLL_SECONDS = 30.0  # the longest a history request waits for a new entry
ISSUER_LIMIT = 300  # characters of a certificate's issuer shown (the CA's name)
DETAIL_LIMIT = 600  # characters of why a host's last attempt failed (keter.acme caps it too)


def app_urls(hosts: tuple[str, ...], config: KeterConfig) -> list[str]:
    """Where an app is reached through nginx, as in its APPROOT (wildcards have no one URL)."""
    return [
        approot(host, secure=False, settings=config) + "/"
        for host in hosts
        if WILDCARD not in host.split(".")
    ]


class StatusBoard:
    """The facts the status API serves, guarded by ``cond``."""

    def __init__(self, config: KeterConfig, history: DeployHistory, archive: BundleArchive) -> None:
        self.config = config
        self.history = history
        self.archive = archive
        self.started_at = time.time()
        self.cond = threading.Condition()  # guards everything below, and the history
        self.closing = False
        self._apps: dict[str, AppSnapshot] = {}
        self._events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self._traffic: dict[str, AppTraffic] = {}  # the stats component's latest report
        self._watches: dict[str, WatchState] = {}
        self._switch: dict = {"mode": None, "reason": ""}  # how versions are switched
        # keter.acme's latest word on each host. Bounded: the hosts are those of deployed
        # bundles (and of ROOT/etc/acme/state.json); only the hosts of current apps are shown.
        self._certificates: dict[str, CertificateState] = {}

    # -- changes (the actor's thread) -----------------------------------------------------

    def app_changed(self, snapshot: AppSnapshot) -> AppSnapshot | None:
        """Keep the app's new snapshot; returns the one it replaces."""
        with self.cond:
            previous = self._apps.get(snapshot.app)
            self._apps[snapshot.app] = snapshot
            return previous

    def has_app(self, app: str) -> bool:
        """Whether the supervisor has told of an app by this name (and not of its end)."""
        with self.cond:
            return app in self._apps

    def app_gone(self, app: str) -> None:
        with self.cond:
            self._apps.pop(app, None)

    def record(self, finished: DeployFinished, *, save: bool = False) -> dict:
        """Add a deploy to the history and wake the requests waiting for one; its entry.

        The file is written first with ``save``, else by ``save_history`` (the status
        actor, soon after).
        """
        with self.cond:
            entry = self.history.record(finished, save=save)
            self.cond.notify_all()
        return entry

    def save_history(self) -> None:
        with self.cond:
            self.history.flush()

    def traffic_changed(self, report: TrafficReport) -> dict[str, AppTraffic]:
        """Take in what changed; returns every app's entry now (a new dict, never changed:
        /metrics reads it from another thread)."""
        traffic = {**self._traffic, **{app.app: app for app in report.apps}}
        for app in report.gone:
            traffic.pop(app, None)
        watches = {watch.app: watch for watch in report.watches}
        with self.cond:
            self._traffic = traffic
            self._watches = watches
        return traffic

    def add_event(self, app: str, kind: EventKind, text: str, at: float) -> None:
        event = {"at": at, "app": app, "kind": str(kind), "text": capped_text(text, EVENT_LIMIT)}
        with self.cond:
            self._events.append(event)

    def certificate_changed(self, state: CertificateState) -> None:
        """Keep keter.acme's latest state of one host (the CA's text made safe to show)."""
        shown = replace(
            state,
            issuer=None if state.issuer is None else log_text(state.issuer, ISSUER_LIMIT),
            detail=log_text(state.detail, DETAIL_LIMIT),
        )
        with self.cond:
            self._certificates[state.host] = shown

    def set_switch(self, mode: SwitchMode, reason: str) -> None:
        with self.cond:
            self._switch = {"mode": str(mode), "reason": reason}

    def close(self) -> None:
        """keter is stopping: the history is saved, long polls answer now."""
        self.save_history()
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    # -- reads -------------------------------------------------------------------------------

    def snapshot(self, app: str) -> AppSnapshot | None:
        with self.cond:
            return self._apps.get(app)

    def knows(self, app: str) -> bool:
        """Whether keter runs the app now or remembers it from its history."""
        with self.cond:
            return app in self._apps or app in self.history

    def status_view(self) -> dict:
        """Every app, the recent events and keter's own facts."""
        now = time.time()
        with self.cond:
            apps = [self._app_json(self._apps[name], now) for name in sorted(self._apps)]
            events = list(reversed(self._events))
            seq = self.history.seq
            switch = dict(self._switch)
        keter = {
            "version": __version__,
            "root": str(self.config.root),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "switch": switch,
            # `keter deploy` checks a bundle locally with these, as keter will.
            "bundle_limits": {
                "max_unpacked_bytes": self.config.max_unpacked_bytes,
                "max_members": self.config.max_members,
            },
        }
        return {"keter": keter, "now": now, "apps": apps, "events": events, "history_seq": seq}

    def app_view(self, app: str) -> dict:
        """One app with its whole history and archived versions; 404 if keter never saw it."""
        now = time.time()
        with self.cond:
            snapshot = self._apps.get(app)
            if snapshot is not None:
                view = self._app_json(snapshot, now)
            elif app in self.history:
                view = {"name": app, "state": "removed", "last_deploy": self.history.last(app)}
            else:
                raise ApiError(404, f"no app named {app}")
            view["history"] = list(reversed(self.history.entries(app)))
            view["certificates"] = self._certificate_rows(snapshot.hosts if snapshot else ())
            view["events"] = [e for e in reversed(self._events) if e["app"] == app]
        view["archive"] = [
            {"version": b.version, "sha256": b.sha256, "served_at": b.served_at}
            for b in self.archive.versions(app)
        ]
        view["now"] = now
        return view

    def certificates_view(self) -> dict:
        """Each host's certificate, for the hosts of the apps keter runs now, by host."""
        with self.cond:
            hosts = {host for snapshot in self._apps.values() for host in snapshot.hosts}
            rows = self._certificate_rows(hosts)
        return {"now": time.time(), "certificates": rows}

    def certificate_expiries(self) -> list[tuple[str, float]]:
        """(host, not_after) of every shown host that has a certificate (for /metrics)."""
        rows = self.certificates_view()["certificates"]
        return [(row["host"], row["not_after"]) for row in rows if row["not_after"] is not None]

    def history_after(self, app: str, after: int, wait: float) -> dict:
        """The app's history entries newer than ``after``, waiting up to ``wait`` s for one.

        An app keter has not seen yet is no error: its first bundle may be on its way.
        """
        with self.cond:
            self.cond.wait_for(
                lambda: self.closing or self.history.entries(app, after),
                timeout=min(max(wait, 0.0), LONG_POLL_SECONDS),
            )
            return {"app": app, "entries": self.history.entries(app, after)}

    def log_lines(self, app: str, count: int) -> dict:
        if not self.knows(app):
            raise ApiError(404, f"no app named {app}")
        path = self.config.log_dir / f"app-{app}.log"
        try:
            lines = tail_lines(path, min(max(count, 0), MAX_LOG_LINES), MAX_LOG_BYTES)
        except FileNotFoundError:
            lines = []
        # The app wrote these: shown with control characters and escape sequences escaped.
        shown = [log_text(line, LOG_LINE_LIMIT) for line in lines]
        # Bounded in bytes too: JSON escapes each character past ASCII in 6 or 12 bytes,
        # so 200 lines of emoji were 10 MB an answer, which the dashboard asks each second.
        size, kept = 0, len(shown)
        while kept:
            size += len(json.dumps(shown[kept - 1])) + 1  # the line and its comma
            if size > MAX_LOG_ANSWER:
                break
            kept -= 1
        return {"app": app, "file": str(path), "lines": shown[kept:]}

    def _app_json(self, snapshot: AppSnapshot, now: float) -> dict:
        started = snapshot.started_at
        return {
            "name": snapshot.app,
            "state": snapshot.state,
            "version": snapshot.version,
            "bundle_mtime": snapshot.bundle_mtime,
            "hosts": list(snapshot.hosts),
            "urls": app_urls(snapshot.hosts, self.config),
            "port": snapshot.port,
            "pid": snapshot.pid,
            "started_at": started,
            "uptime": now - started if started is not None and snapshot.pid else None,
            "restarts": snapshot.restarts,
            "database": snapshot.database,
            "deploying": snapshot.deploying,
            "last_deploy": self.history.last(snapshot.app),
            "traffic": self._traffic_json(snapshot.app),
            "watch": self._watch_json(snapshot.app),
        }

    def _certificate_rows(self, hosts) -> list[dict]:
        """The known certificate states of ``hosts``, by host (hold ``cond``).

        A host appears once keter.acme has reported on it: its first order's
        outcome, or a certificate stored by an earlier run. Hosts a bundle no
        longer claims are not shown (keter.acme no longer renews them).
        """
        claimed: dict[str, list[str]] = {}
        for snapshot in self._apps.values():
            for host in snapshot.hosts:
                claimed.setdefault(host, []).append(snapshot.app)
        rows = []
        for host in sorted(set(hosts)):
            state = self._certificates.get(host)
            if state is None or host not in claimed:
                continue
            rows.append(
                {
                    "host": host,
                    "apps": sorted(claimed[host]),
                    "outcome": str(state.outcome),
                    "issuer": state.issuer,
                    "not_after": state.not_after,
                    "last_attempt": state.last_attempt,
                    # A refused host (a wildcard) is never tried again.
                    "next_attempt": None
                    if state.outcome is CertificateOutcome.REFUSED
                    else state.next_attempt,
                    "detail": state.detail,
                }
            )
        return rows

    def _traffic_json(self, app: str) -> dict | None:
        """The last minute's rate and 5xx ratio; None when nginx logs nothing for keter."""
        if not self.config.traffic_stats:
            return None
        traffic = self._traffic.get(app)
        if traffic is None:
            return {"rate": 0.0, "error_ratio": 0.0}
        return {"rate": round(traffic.rate, 3), "error_ratio": round(traffic.error_ratio, 5)}

    def _watch_json(self, app: str) -> dict | None:
        watch = self._watches.get(app)
        if watch is None:
            return None
        return {
            "version": watch.version,
            "until": watch.until,
            "requests": watch.requests,
            "errors": watch.errors,
            "verdict": str(watch.verdict),
            "reason": watch.reason,
        }
