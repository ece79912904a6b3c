"""Per app and per version: request counts by status class, bytes and latency, over time.

Each version of an app has a ring of 10-second slots covering the last hour
(counts per status class, bytes, a latency ``Histogram``); every window
(the last minute, 5, 15 and 60 minutes) and the dashboard's per-minute
series are sums of slots. Cumulative counters since keter started (for
``/metrics``) are kept beside them. Memory is bounded whatever the traffic:
at most ``SLOTS`` slots per version seen in the last hour, at most
``histogram.BUCKETS`` counters per slot, ``VERSIONS_KEPT`` versions per app
in the cumulative counters.

Time is the request's own (nginx's ``$msec``), so a record that arrives late
still lands in the slot it belongs to.

Forgetting costs nothing while nothing is old: every slot start is in a heap
beside the apps with a slot there, so ``prune`` (run every second) looks only
at the apps whose slots left the hour, not at every app (1000 quiet apps cost
it nothing).

A thousand apps redeployed often keep thousands of slots, so a slot is kept
small: one object (it is its own latency histogram) and no bookkeeping of its
own beyond its start's entry.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field

from keter.stats.histogram import Histogram
from keter.stats.record import Record

SLOT = 10  # seconds per slot
KEEP = 3600  # seconds of slots kept
SLOTS = KEEP // SLOT + 1
WINDOWS = (60, 300, 900, 3600)  # what `keter stats` and the API show
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
VERSIONS_KEPT = 5  # per app, in the cumulative counters
# Upper bounds (seconds) of /metrics' latency histogram, Prometheus' usual ones.
METRIC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Slot(Histogram):
    """Ten seconds of one version's requests: the histogram of their upstream response
    times (a slot is one, rather than holding one: an object less per slot), their
    counts per status class and the bytes sent."""

    __slots__ = ("bytes", "classes")

    def __init__(self) -> None:
        super().__init__()
        self.classes = [0, 0, 0, 0, 0]  # 1xx .. 5xx
        self.bytes = 0


@dataclass
class Totals:
    """Since keter started: what /metrics exports for one app."""

    by_version: dict[str, list[int]] = field(default_factory=dict)  # version -> per class
    last_seen: dict[str, float] = field(default_factory=dict)  # version -> newest record
    buckets: list[int] = field(default_factory=lambda: [0] * len(METRIC_BUCKETS))
    latency_sum: float = 0.0
    latency_count: int = 0


@dataclass(frozen=True)
class Summary:
    """Traffic over one window."""

    seconds: int
    classes: tuple[int, int, int, int, int]
    bytes: int
    latency: Histogram

    @property
    def requests(self) -> int:
        return sum(self.classes)

    @property
    def errors(self) -> int:
        return self.classes[4]

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float | None:
        return self.latency.quantile(q)


class Traffic:
    """Everything keter has counted of its apps' requests."""

    def __init__(self) -> None:
        # app -> version -> slot start -> Slot: an app's views never look at other apps.
        self._slots: dict[str, dict[str, dict[int, Slot]]] = {}
        self.totals: dict[str, Totals] = {}
        self._apps_by_start: dict[int, set[str]] = {}  # slot start -> apps with requests in it
        # The starts of _apps_by_start, oldest first: what prune forgets, and nothing else.
        self._starts: list[int] = []
        # Slots starting after this are refused (a clock gone wild); set by prune.
        self._horizon = math.inf

    def add(self, record: Record) -> None:
        app, version = record.app, record.version
        index = CLASSES_INDEX[record.status // 100]
        totals = self.totals.get(app)
        if totals is None:
            totals = self.totals[app] = Totals()
        per_class = totals.by_version.get(version)
        if per_class is None:
            per_class = totals.by_version[version] = [0, 0, 0, 0, 0]
            if len(totals.by_version) > VERSIONS_KEPT:  # the version seen longest ago goes
                oldest = min(totals.last_seen, key=totals.last_seen.__getitem__)
                del totals.by_version[oldest], totals.last_seen[oldest]
        per_class[index] += 1
        totals.last_seen[version] = max(record.at, totals.last_seen.get(version, record.at))
        upstream = record.upstream_time
        if upstream is not None and math.isfinite(upstream):
            position = bisect.bisect_left(METRIC_BUCKETS, upstream)
            if position < len(METRIC_BUCKETS):
                totals.buckets[position] += 1
            totals.latency_sum += upstream
            totals.latency_count += 1

        versions = self._slots.get(app)
        if versions is None:
            versions = self._slots[app] = {}
        slots = versions.get(version)
        if slots is None:
            slots = versions[version] = {}
        start = int(record.at // SLOT) * SLOT
        slot = slots.get(start)
        if slot is None:
            if len(slots) >= SLOTS or start > self._horizon:  # a clock gone wild
                return
            slot = slots[start] = Slot()
            apps = self._apps_by_start.get(start)
            if apps is None:
                apps = self._apps_by_start[start] = set()
                heapq.heappush(self._starts, start)
            apps.add(app)
        slot.classes[index] += 1
        slot.bytes += record.bytes_sent
        if upstream is not None:
            slot.add(upstream)  # into the latency histogram the slot is

    def prune(self, now: float) -> set[str]:
        """Forget slots older than an hour, and apps with no request for that long.

        Returns the apps forgotten. Looks only at the apps with slots that left the hour.
        """
        oldest = now - KEEP - SLOT
        self._horizon = now + KEEP
        touched = set()
        while self._starts and self._starts[0] < oldest:
            start = heapq.heappop(self._starts)
            for app in self._apps_by_start.pop(start):
                versions = self._slots.get(app, {})
                for version, slots in list(versions.items()):
                    slots.pop(start, None)
                    if not slots:
                        del versions[version]
                if not versions:
                    self._slots.pop(app, None)
                touched.add(app)
        gone = set()
        for app in touched:
            totals = self.totals.get(app)
            if totals is not None and max(totals.last_seen.values(), default=0) < oldest:
                del self.totals[app]
            if app not in self._slots and app not in self.totals:
                gone.add(app)
        return gone

    # -- views -------------------------------------------------------------------------------

    def apps_with_slots(self, after: float, until: float) -> set[str]:
        """The apps with requests in a slot that starts after ``after`` and by ``until``."""
        if until - after <= KEEP:  # the usual second: at most one slot start to look up
            first = (math.floor(after / SLOT) + 1) * SLOT
            starts = range(first, math.floor(until) + 1, SLOT)
        else:
            starts = [start for start in self._apps_by_start if after < start <= until]
        found: set[str] = set()
        for start in starts:
            found |= self._apps_by_start.get(start, set())
        return found

    def apps(self) -> list[str]:
        return sorted(set(self._slots) | set(self.totals))

    def versions(self, app: str) -> list[str]:
        """The app's versions with traffic in the last hour, the one seen last first."""
        seen = self.totals.get(app, Totals()).last_seen
        found = set(self._slots.get(app, ()))
        return sorted(found, key=lambda v: seen.get(v, 0), reverse=True)

    def summary(
        self,
        app: str,
        now: float,
        seconds: int,
        version: str | None = None,
        *,
        since: float = 0,
        latency: bool = True,
    ) -> Summary:
        """The app's traffic (one version's, if given) in the last ``seconds`` before ``now``.

        ``since`` leaves out slots that started before it (a version watched since then);
        ``latency=False`` leaves the latency histogram empty (merging it is the costly part).
        """
        first = max(now - seconds, since)
        classes = [0, 0, 0, 0, 0]
        size = 0
        slots = []
        for v, by_start in self._slots.get(app, {}).items():
            if version is not None and v != version:
                continue
            for start, slot in by_start.items():
                if first - SLOT < start <= now:
                    slots.append(slot)
                    size += slot.bytes
                    for i, n in enumerate(slot.classes):
                        classes[i] += n
        merged = Histogram.of(slots) if latency else Histogram()
        return Summary(seconds=seconds, classes=tuple(classes), bytes=size, latency=merged)

    def minutes(
        self, app: str, now: float, count: int = 60
    ) -> list[tuple[int, int, int, float | None]]:
        """The app's last ``count`` minutes, oldest first: (start, requests, 5xx, p99)."""
        end = int(now // 60) * 60 + 60
        first = end - count * 60
        buckets: dict[int, list[Slot]] = {}
        for by_start in self._slots.get(app, {}).values():
            for start, slot in by_start.items():
                if first <= start < end:
                    buckets.setdefault(int(start // 60) * 60, []).append(slot)
        points = []
        for minute in range(first, end, 60):
            slots = buckets.get(minute, [])
            requests = sum(sum(slot.classes) for slot in slots)
            errors = sum(slot.classes[4] for slot in slots)
            p99 = Histogram.of(slots).quantile(0.99) if slots else None
            points.append((minute, requests, errors, p99))
        return points


CLASSES_INDEX = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
