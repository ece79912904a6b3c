"""The stats component: nginx's access records in; statistics, access logs and verdicts out.

Every ``TICK`` seconds it reads what nginx added to the spool (``spool``),
parses each record (``record``), counts it (``traffic``) and appends its
access line to ``ROOT/log/access-APP.log`` (rotated like app logs). Once a
second it tells the status component what changed, if anything, in what
``keter status``, the API and ``/metrics`` show (``TrafficReport``), and checks
the versions it watches (``WatchVersion``): one that makes things worse for real
traffic is reported to the supervisor (``VersionUnhealthy``), which rolls it back.

Idle costs nothing per app: a second's work looks only at the apps that got
requests, the apps with requests in the 10-second slot that just left their
last minute (their rate falls), the slots that left the hour and the watches.
With no traffic nothing is added up and no report is sent.

The status API's detailed views (``keter stats APP``, the dashboard's hour)
ask through ``TrafficQuery`` and wait for the answer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import logging
import math
import queue
import time
from dataclasses import dataclass, field

from keter.actor import Actor
from keter.config import KeterConfig
from keter.messages import (
    AppGone,
    AppTraffic,
    Component,
    TrafficReport,
    VersionServing,
    VersionTraffic,
    VersionUnhealthy,
    WatchState,
    WatchVerdict,
    WatchVersion,
    message,
)
from keter.names import validate_app_name
from keter.processes.applog import AppLog
from keter.stats import spool
from keter.stats.record import SERVER_ERROR, Record, parse, status_class
from keter.stats.traffic import CLASSES, METRIC_BUCKETS, SLOT, WINDOWS, Summary, Traffic

log = logging.getLogger(__name__)

FORGET_WATCH = 600.0  # seconds a verdict stays shown after the window
TICK = 0.25  # seconds between two reads of the spool (nginx writes it at least every second)
REPORT_EVERY = 1.0  # seconds between two TrafficReports
TICK_BUDGET = 0.2  # seconds of reading per tick; the rest waits for the next one
BASELINE_SECONDS = 300  # the window of the previous version's 5xx ratio
QUERY_TIMEOUT = 10.0
SERVING_KEPT = 8  # versions remembered per app to name the records that say "-"
SETTLE_SECONDS = 1.0  # records that say "-" wait this long for news of a switch
# A removed app's late records (nginx flushes its buffers up to a second later, and
# its retiring workers as they exit) are written, not counted, for this long.
REMOVED_KEPT = 3600.0


@message
class TrafficQuery:
    """From a status HTTP thread: one app's windows and last hour; the answer in ``reply``."""

    app: str
    reply: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@message
class _Tick:
    """Private timer: read the spool."""


@dataclass
class _Watch:
    """A version being watched, and its exact numbers since the watch began."""

    order: WatchVersion
    started: float
    until: float
    baseline: float  # the previous version's 5xx ratio
    baseline_requests: int
    requests: int = 0
    errors: int = 0
    verdict: WatchVerdict = WatchVerdict.WATCHING
    reason: str = ""

    def counts(self, record: Record) -> bool:
        """Whether a request is the watched version's, within its window, and reached it.

        Every request of that version counts, even one that reached the spool
        before the watch began: the version is new, all its traffic is recent.
        One nginx answered itself (no upstream time: a malformed request's 501 or
        400, a rate limit's 429) says nothing of the version, and any client can
        send them: counted, they let anyone have a healthy version rolled back.
        """
        return (
            record.version == self.order.version
            and record.at <= self.until
            and record.upstream_time is not None
        )

    def state(self) -> WatchState:
        o = self.order
        return WatchState(
            app=o.app,
            version=o.version,
            until=self.until,
            requests=self.requests,
            errors=self.errors,
            verdict=self.verdict,
            reason=self.reason,
        )


class StatsCollector(Actor):
    def __init__(
        self,
        config: KeterConfig,
        report_to: queue.Queue | None = None,
        status: Actor | None = None,
    ) -> None:
        super().__init__(Component.STATS, report_to)
        self.config = config
        self.status = status  # told every TrafficReport
        self.spool_path = spool.spool_path(config.root)
        self.traffic = Traffic()
        self.records = 0  # parsed since keter started
        self.skipped = 0  # spool lines that were not keter's records
        self._spool: spool.Spool | None = None
        self._spool_trouble: str | None = None  # why the spool cannot be followed, once said
        self._logs: dict[str, AppLog] = {}
        self._log_used: dict[str, float] = {}  # app -> last write; least recent first
        self._watches: dict[str, _Watch] = {}
        # A watch is looked at again only when its app got requests (``_watch_dirty``) or
        # a deadline of its came (``_watch_due``: its window's end, then the time it is
        # forgotten), so a thousand quiet watched versions cost nothing per second.
        self._watch_dirty: set[str] = set()
        self._watch_due: list[tuple[float, str]] = []  # a heap
        self._watches_changed = False  # since the last report
        # Per app, the latest versions that began serving: (since, version), oldest first.
        self._serving: dict[str, list[tuple[float, str]]] = {}
        self._unsettled: collections.deque[Record] = collections.deque()  # "-", not yet named
        # The last report's entry per app, and the apps counted since: only those, and the
        # apps with requests in a slot that left the minute since, are added up again.
        self._reported: dict[str, AppTraffic] = {}
        self._counted: set[str] = set()
        self._gone: set[str] = set()  # apps forgotten (an hour without requests), to report
        # Apps removed (AppGone), oldest first, and when: not counted or reported again
        # unless they serve again (VersionServing).
        self._removed: dict[str, float] = {}
        self._reported_watches: tuple[WatchState, ...] = ()
        self._left = -float("inf")  # slots starting by this had left the last report's minute
        self._last_report = -math.inf  # time.monotonic() of the last report
        # Made now, before nginx is first configured: nginx would make it readable by all.
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        spool.create(self.spool_path)

    # -- the actor ---------------------------------------------------------------------

    def on_start(self) -> None:
        self._spool = spool.Spool(self.spool_path)
        self.schedule(0, _Tick())

    def on_restart(self) -> None:
        self.schedule(0, _Tick())  # the timer that was due may have died with the failure

    def on_stop(self) -> None:
        if self._spool is not None:
            self._read(time.monotonic() + TICK_BUDGET)
            self._count(self._settled(float("inf")))
            self._spool.close()
        for applog in self._logs.values():
            applog.close()

    def handle(self, message: object) -> None:
        match message:
            case _Tick():
                self._tick()
            case WatchVersion():
                self._watch(message)
            case VersionServing(app=app, version=version, since=since):
                self._removed.pop(app, None)
                kept = self._serving.setdefault(app, [])
                kept.append((since, version))
                del kept[:-SERVING_KEPT]
                self._say_again(app, version)
            case AppGone(app=app):
                self._forget(app)
            case TrafficQuery(app=app, reply=reply):
                # One its asker gave up on is not worked out: a flood of queries timed out
                # had kept the actor from the spool and the watches for as long.
                if reply.set_running_or_notify_cancel():
                    reply.set_result(self.details(app, time.time()))
            case _:
                self.unexpected(message)

    def _tick(self) -> None:
        busy = self._read(time.monotonic() + TICK_BUDGET)
        # The interval on the monotonic clock: the wall clock set back an hour (NTP, a
        # virtual machine resumed) had stopped the reports and the watched versions'
        # checks for that hour. The records' own times stay the wall clock's.
        if (ticked := time.monotonic()) - self._last_report >= REPORT_EVERY:
            self._last_report = ticked
            self._follow_spool()
            now = time.time()
            self._gone |= self.traffic.prune(now)
            self._close_idle_logs()
            self._forget_removed(time.monotonic() - REMOVED_KEPT)
            self._check_watches(now)
            report = self.traffic_report(now)
            if self.status is not None and report is not None:
                self.status.tell(report)
        self.schedule(0 if busy else TICK, _Tick())

    # -- reading -------------------------------------------------------------------------

    def _follow_spool(self) -> None:
        assert self._spool is not None
        try:
            changed = self._spool.follow()
        except OSError as exc:
            trouble = f"{self.spool_path} cannot be made again: {exc}; statistics stop"
            if trouble != self._spool_trouble:  # said once, not every second
                log.error("stats: %s", trouble)
            self._spool_trouble = trouble
            return
        self._spool_trouble = None
        if changed is not None:
            log.warning("stats: %s", changed)

    def _read(self, deadline: float) -> bool:
        """Take in what nginx wrote; True if there is more than one tick could read."""
        assert self._spool is not None
        self._count(self._settled(time.time() - SETTLE_SECONDS))
        while time.monotonic() < deadline:
            lines = self._spool.read_lines()
            if not lines:
                return False
            records = []
            for raw in lines:
                record = parse(raw)
                if record is None:
                    self.skipped += 1
                    continue
                self.records += 1
                if record.version == "-":
                    self._unsettled.append(record)
                else:
                    records.append(record)
            self._count(records)
        return True

    def _count(self, records: list[Record]) -> None:
        by_app: dict[str, list[bytes]] = {}
        for record in records:
            if record.app in self._removed:  # its access line only
                by_app.setdefault(record.app, []).append(record.line)
                continue
            self.traffic.add(record)
            self._counted.add(record.app)
            by_app.setdefault(record.app, []).append(record.line)
            watch = self._watches.get(record.app)
            if watch is not None:
                # Any version's request: the previous version's late ones move the baseline.
                self._watch_dirty.add(record.app)
                if watch.counts(record):
                    watch.requests += 1
                    watch.errors += status_class(record.status) == SERVER_ERROR
                    self._watches_changed = True
        for app, access in by_app.items():
            self._access_log(app, access)

    def _settled(self, before: float) -> list[Record]:
        """The records that say "-" made before ``before``, each with its version named.

        They waited SETTLE_SECONDS: by then the supervisor's word on a switch they may
        follow (``VersionServing``) has arrived.
        """
        ready = []
        # A record from past the settling (made before the wall clock was set back) would
        # hold every one behind it, of every app, until the clock caught up: an hour of
        # statistics, access logs and watches, all kept in memory. It settles at once.
        future = before + 2 * SETTLE_SECONDS
        while self._unsettled and not before <= self._unsettled[0].at <= future:
            record = self._unsettled.popleft()
            self._resolve(record)
            ready.append(record)
        return ready

    def _resolve(self, record: Record) -> None:
        """A record of an app the kernel switches: the version serving when it was made.

        Off by at most the ~0.1 s after a switch during which nginx may still send
        a request on a connection it pooled to the version before (keter.switch).
        """
        version = "-"
        for since, serving in self._serving.get(record.app, ()):
            if since <= record.at:
                version = serving
        if version != "-":
            record.version = version
            record.line = record.line[:-1] + version.encode()  # the line ends with it

    def _access_log(self, app: str, lines: list[bytes]) -> None:
        applog = self._logs.get(app)
        if applog is None:
            applog = self._open_log(app)
            if applog is None:
                return
            if app in self._removed:
                # Late lines of a removed app: its log is not held open again.
                try:
                    applog.append(lines, b"", app)
                finally:
                    applog.close()
                return
            self._logs[app] = applog
        self._log_used.pop(app, None)
        self._log_used[app] = time.monotonic()  # now the most recent: last in the dict
        applog.append(lines, b"", app)  # a full disk: said once, and the statistics go on

    def _open_log(self, app: str) -> AppLog | None:
        try:
            validate_app_name(app)  # it names a file
        except ValueError:
            return None
        path = self.config.log_dir / f"access-{app}.log"
        try:
            return AppLog(path, self.config.log_max_bytes, self.config.log_backups)
        except OSError as exc:
            log.error("%s: cannot open %s: %s", app, path, exc)
            return None

    def _forget(self, app: str) -> None:
        """The app was removed. Its access log closes now, not after an hour idle: the
        operator may delete it and must get its disk space back. Its statistics go
        (from /metrics too: its series go with the app); its last hour's slots age out
        as any do (``keter stats`` shows them if it comes back within the hour)."""
        self._close_log(app)
        self._serving.pop(app, None)
        if self._watches.pop(app, None) is not None:
            self._watches_changed = True
        self.traffic.totals.pop(app, None)
        self._counted.discard(app)
        self._gone.add(app)  # the next report drops its entry
        self._removed.pop(app, None)
        self._removed[app] = time.monotonic()  # the most recent: last

    def _forget_removed(self, before: float) -> None:
        while self._removed:
            app, at = next(iter(self._removed.items()))  # the oldest
            if at >= before:
                break
            del self._removed[app]

    def _close_idle_logs(self) -> None:
        idle = time.monotonic() - 3600  # _log_used is on the monotonic clock
        while self._log_used:
            app, used = next(iter(self._log_used.items()))  # the least recent
            if used >= idle:
                break
            self._close_log(app)

    def _close_log(self, app: str) -> None:
        applog = self._logs.pop(app, None)
        if applog is not None:
            applog.close()
        self._log_used.pop(app, None)

    # -- watched rollout -----------------------------------------------------------------

    def _watch(self, order: WatchVersion) -> None:
        now = time.time()
        watch = _Watch(
            order=order, started=now, until=now + order.seconds, baseline=0.0, baseline_requests=0
        )
        self._watches[order.app] = watch
        heapq.heappush(self._watch_due, (watch.until, order.app))
        self._watches_changed = True
        log.info("%s: watching version %s for %gs", order.app, order.version, order.seconds)

    def _check_watches(self, now: float) -> None:
        apps, self._watch_dirty = self._watch_dirty, set()
        while self._watch_due and self._watch_due[0][0] <= now:
            apps.add(heapq.heappop(self._watch_due)[1])  # an older watch's entry: harmless
        for app in sorted(apps):
            watch = self._watches.get(app)
            if watch is None:
                continue
            if watch.verdict is not WatchVerdict.WATCHING:
                if now >= watch.until + FORGET_WATCH:  # shown for a while, then forgotten
                    del self._watches[app]
                    self._watches_changed = True
                continue
            order = watch.order
            if order.previous:
                # The previous version's last minutes before the switch; computed at each
                # check, as nginx's buffers bring its last requests a second late.
                before = self.traffic.summary(app, watch.started, BASELINE_SECONDS, order.previous)
                watch.baseline, watch.baseline_requests = before.error_ratio, before.requests
            ratio = watch.errors / watch.requests if watch.requests else 0.0
            if (
                watch.requests >= order.min_requests
                and ratio > order.max_error_ratio
                and ratio > watch.baseline
            ):
                watch.verdict = WatchVerdict.FAILED
                watch.reason = (
                    f"5xx {_percent(ratio, watch.requests)} of {watch.requests} requests "
                    f"vs {_percent(watch.baseline, watch.baseline_requests)} before"
                )
                log.warning("%s: version %s is unhealthy: %s", app, order.version, watch.reason)
                self._ended(watch)
                self.report(VersionUnhealthy(app=app, version=order.version, reason=watch.reason))
            elif now >= watch.until:
                watch.verdict = WatchVerdict.PASSED
                log.info(
                    "%s: version %s passed its watch (5xx %s of %d requests)",
                    app,
                    order.version,
                    _percent(ratio, watch.requests),
                    watch.requests,
                )
                self._ended(watch)

    def _say_again(self, app: str, version: str) -> None:
        """The version found unhealthy serves again within its window (a restart of it,
        ``keter env set``): the verdict is said again. The supervisor let it pass while
        that restart was on its way, and the bad version stayed for good."""
        watch = self._watches.get(app)
        if watch is None or watch.order.version != version:
            return
        if watch.verdict is WatchVerdict.FAILED and time.time() < watch.until:
            self.report(VersionUnhealthy(app=app, version=version, reason=watch.reason))

    def _ended(self, watch: _Watch) -> None:
        """A verdict: shown until ``FORGET_WATCH`` after the window, then forgotten."""
        heapq.heappush(self._watch_due, (watch.until + FORGET_WATCH, watch.order.app))
        self._watches_changed = True

    # -- what others see ---------------------------------------------------------------

    def traffic_report(self, now: float) -> TrafficReport | None:
        """What changed since the last report; None when nothing did.

        An app is added up again when it got requests, or when a 10 s slot in
        which it had some left its minute (its rate falls). Every other app's
        entry stands as last reported: the status component keeps it.
        """
        left = now - 60 - SLOT  # Traffic.summary's minute: the slots starting after this
        changed = self._counted | self.traffic.apps_with_slots(self._left, left)
        self._left = left
        self._counted = set()
        apps = []
        for app in sorted(changed - self._gone - self._removed.keys()):
            entry = self._app_traffic(app, now)
            if entry == self._reported.get(app):
                continue
            self._reported[app] = entry
            apps.append(entry)
        gone = tuple(sorted(app for app in self._gone if self._reported.pop(app, None)))
        self._gone.clear()
        if self._watches_changed:
            self._watches_changed = False
            watches = tuple(w.state() for w in self._watches.values())
        else:
            watches = self._reported_watches
        if not apps and not gone and watches == self._reported_watches:
            return None
        self._reported_watches = watches
        return TrafficReport(at=now, apps=tuple(apps), gone=gone, watches=watches)

    def _app_traffic(self, app: str, now: float) -> AppTraffic:
        minute = self.traffic.summary(app, now, 60, latency=False)
        totals = self.traffic.totals.get(app)
        versions = ()
        if totals is not None:
            versions = tuple(
                VersionTraffic(version=v, classes=tuple(c))  # type: ignore[arg-type]
                for v, c in sorted(totals.by_version.items())
            )
        return AppTraffic(
            app=app,
            rate=minute.rate,
            error_ratio=minute.error_ratio,
            versions=versions,
            latency_buckets=tuple(totals.buckets) if totals else (),
            latency_sum=totals.latency_sum if totals else 0.0,
            latency_count=totals.latency_count if totals else 0,
        )

    def details(self, app: str, now: float) -> dict:
        """One app's windows (all versions, and each version) and its last hour, per minute."""

        def shown(summary: Summary) -> dict:
            return {
                "seconds": summary.seconds,
                "requests": summary.requests,
                "rate": round(summary.rate, 3),
                "classes": dict(zip(CLASSES, summary.classes, strict=True)),
                "error_ratio": round(summary.error_ratio, 5),
                "bytes": summary.bytes,
                "latency": {
                    "p50": summary.percentile(0.50),
                    "p95": summary.percentile(0.95),
                    "p99": summary.percentile(0.99),
                },
            }

        return {
            "app": app,
            "windows": [shown(self.traffic.summary(app, now, s)) for s in WINDOWS],
            "versions": [
                {
                    "version": version,
                    "windows": [shown(self.traffic.summary(app, now, s, version)) for s in WINDOWS],
                }
                for version in self.traffic.versions(app)
            ],
            "minutes": [
                {"at": start, "requests": requests, "errors": errors, "p99": p99}
                for start, requests, errors, p99 in self.traffic.minutes(app, now)
            ],
            "latency_buckets": list(METRIC_BUCKETS),
        }

    def query(self, app: str) -> dict:
        """For the status API's threads: ``details`` from the actor's thread."""
        request = TrafficQuery(app=app)
        self.tell(request)
        try:
            return request.reply.result(timeout=QUERY_TIMEOUT)
        except concurrent.futures.TimeoutError:
            request.reply.cancel()  # still queued: the actor skips it
            raise


def _percent(ratio: float, requests: int) -> str:
    return f"{ratio:.1%}" if requests else "no requests"
