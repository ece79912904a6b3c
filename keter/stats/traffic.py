"""Per app and per version: request counts by status class, bytes and latency, over time.

Each version of an app has 10-second slots for the last ``FINE`` seconds and
one-minute slots for the rest of the hour (each: counts per status class,
bytes, a latency ``Histogram``); every window (the last minute, 5, 15 and 60
minutes) and the dashboard's per-minute series are sums of slots. A 10-second
slot is merged into its minute once it is ``FINE`` old: the last minute (the
status line, ``/metrics``' rate) keeps 10-second edges, longer windows have
minute edges, and a version with a request every 10 seconds (an uptime monitor: on
a host of 1000 apps, every app) keeps 75 slots for its hour, not 361.
Cumulative counters since keter started (for ``/metrics``) are kept beside
them. Memory is bounded whatever the traffic: at most ``SLOTS`` 10-second
slots (``FINE`` seconds' worth once pruned) and ``MINUTES`` minutes per
version seen in the last hour, at most
``histogram.BUCKETS`` counters per slot, ``VERSIONS_KEPT`` versions per app
in the cumulative counters.

Time is the request's own (nginx's ``$msec``), so a record that arrives late
still lands in the slot it belongs to.

Merging and forgetting cost nothing while nothing is old: every slot start is
in a heap beside the apps with a slot there, so ``prune`` (run every second)
looks only at the apps whose slots became ``FINE`` old or left the hour, not at
every app (1000 quiet apps cost it nothing).

A thousand apps redeployed often keep thousands of slots, so a slot is kept
small: one object (it is its own latency histogram) and no bookkeeping of its
own beyond its start's entry. A minute nothing more joins is packed
(``Slot.freeze``, varints) into its version's run of packed minutes, one bytes
object (``Run``). A host of 1000 apps each asked every 10 seconds for an hour
keeps about 11 MB of statistics this way (tracemalloc; 204 MB as 10-second
slot objects).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from keter.stats.histogram import Histogram
from keter.stats.record import Record, status_class
from keter.stats.slot import Run, Slot

SLOT = 10  # seconds per recent slot
MINUTE = 60  # seconds per older slot
FINE = 120  # seconds a 10-second slot is kept before it joins its minute
KEEP = 3600  # seconds of slots kept
SLOTS = KEEP // SLOT + 1  # a version's 10-second slots, at most (between two prunes)
MINUTES = KEEP // MINUTE + 2  # a version's minutes, at most
WINDOWS = (60, 300, 900, 3600)  # what `keter stats` and the API show
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
VERSIONS_KEPT = 5  # per app, in the cumulative counters
# Upper bounds (seconds) of /metrics' latency histogram, Prometheus' usual ones.
METRIC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Tier:
    """Slots of one length, per app and version, with the bookkeeping that finds old ones.

    ``slots``: app -> version -> slot start -> Slot (an app's views never look at other
    apps). ``_apps_by_start``: slot start -> apps with a slot there, and ``_starts`` the
    same starts as a heap, oldest first: what ``take_before`` looks at, and nothing else.

    A tier that packs (the minutes) moves each slot nothing more joins out of ``slots``
    into ``packed``: app -> version -> ``Run``, so a version's hour of minutes is one
    bytes object, about 2 KB for an hour of uptime checks. A record later than any takes
    its slot back out.
    """

    def __init__(self, seconds: int, per_version: int, *, packs: bool = False) -> None:
        self.seconds = seconds
        self.per_version = per_version
        self.slots: dict[str, dict[str, dict[int, Slot]]] = {}
        self.packed: dict[str, dict[str, Run]] = {}
        # Lists, not sets (a third of the memory): an app is added once per slot it
        # gets there (per version), and looking twice at an app is harmless.
        self._apps_by_start: dict[int, list[str]] = {}
        self._start_keys: dict[int, int] = {}  # the one int object of each start
        self._starts: list[int] = []
        # start -> apps with a slot there not packed yet (a tier that packs): a backlog
        # read after a restart makes old minutes, not only the newest.
        self._unpacked: dict[int, list[str]] | None = {} if packs else None
        self.packed_before = -math.inf  # every packed slot starts before this

    def slot(self, app: str, version: str, at: float) -> Slot | None:
        """The slot holding time ``at``, made if need be; None if the version has its fill."""
        versions = self.slots.get(app)
        if versions is None:
            versions = self.slots[app] = {}
        slots = versions.get(version)
        if slots is None:
            slots = versions[version] = {}
        start = int(at // self.seconds) * self.seconds
        slot = slots.get(start)
        if slot is not None:
            return slot
        if len(slots) >= self.per_version:  # a clock gone wild
            return None
        apps = self._apps_by_start.get(start)
        if apps is None:
            apps = self._apps_by_start[start] = []
            self._start_keys[start] = start
            heapq.heappush(self._starts, start)
        apps.append(app)
        # Every app's slot at this start is keyed by one int object, not one each.
        if self._unpacked is None:
            slot = slots[self._start_keys[start]] = Slot()
        else:  # a record later than any takes its packed slot back out
            slot = self._unpack(app, version, start) or Slot()
            slots[self._start_keys[start]] = slot
            self._unpacked.setdefault(start, []).append(app)
        return slot

    def _unpack(self, app: str, version: str, start: int) -> Slot | None:
        """Take the packed slot at ``start`` out of the version's run, if there is one."""
        runs = self.packed.get(app, {})
        run = runs.get(version)
        if run is None:
            return None
        slot = run.take(start)
        self._drop_if_empty(app, version)
        return slot

    def _drop_if_empty(self, app: str, version: str) -> None:
        runs = self.packed.get(app, {})
        run = runs.get(version)
        if run is not None and not run.records:
            del runs[version]
            if not runs:
                del self.packed[app]

    def pack_before(self, limit: float) -> None:
        """Pack the slots that start before ``limit`` (nothing more joins them).

        A run is kept in start order, so forgetting drops its head: a slot newer than
        every packed one (the usual minute) goes at the end, an older one (a backlog, a
        record later than any) where it belongs.
        """
        assert self._unpacked is not None
        # In start order: each goes after the ones packed before it in this call.
        for start in sorted(start for start in self._unpacked if start < limit):
            for app in self._unpacked.pop(start):
                for version, at, slot in self._pop_slots(app, start, start + 1):
                    self.packed.setdefault(app, {}).setdefault(version, Run()).add(at, slot)
        self.packed_before = max(self.packed_before, limit)

    def take_before(self, limit: float) -> tuple[list[tuple[str, str, int, Slot]], set[str]]:
        """Remove every slot that starts before ``limit``: those not packed, as (app,
        version, start, slot), and the apps that had any."""
        taken, apps = [], set()
        while self._starts and self._starts[0] < limit:
            start = heapq.heappop(self._starts)
            del self._start_keys[start]
            if self._unpacked is not None:
                self._unpacked.pop(start, None)
            apps.update(self._apps_by_start.pop(start))
        for app in apps:
            taken += ((app, *popped) for popped in self._pop_slots(app, -math.inf, limit))
            for version, run in list(self.packed.get(app, {}).items()):
                run.drop_before(limit)
                self._drop_if_empty(app, version)
        return taken, apps

    def _pop_slots(self, app: str, low: float, high: float) -> list[tuple[str, int, Slot]]:
        """Remove the app's slots (not packed) that start in [low, high): (version, start,
        slot). A version, and an app, left with none go too."""
        versions = self.slots.get(app, {})
        popped = []
        for version, slots in list(versions.items()):
            for start in [start for start in slots if low <= start < high]:
                popped.append((version, start, slots.pop(start)))
            if not slots:
                del versions[version]
        if not versions:
            self.slots.pop(app, None)
        return popped

    def apps_with_slots(self, after: float, until: float) -> set[str]:
        """The apps with a slot that starts after ``after`` and by ``until``."""
        if until - after <= KEEP:  # the usual second: at most one slot start to look up
            first = (math.floor(after / self.seconds) + 1) * self.seconds
            starts: Iterable[int] = range(first, math.floor(until) + 1, self.seconds)
        else:
            starts = [start for start in self._apps_by_start if after < start <= until]
        found: set[str] = set()
        for start in starts:
            found.update(self._apps_by_start.get(start, ()))
        return found


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
        self._fine = _Tier(SLOT, SLOTS)  # the last FINE seconds
        self._minutes = _Tier(MINUTE, MINUTES, packs=True)  # the rest of the hour
        self.totals: dict[str, Totals] = {}
        # Records before this go to their minute (their 10-second slot has joined it);
        # slots starting after _horizon are refused (a clock gone wild). Set by prune.
        self._fine_from = -math.inf
        self._horizon = math.inf

    def add(self, record: Record) -> None:
        app, version = record.app, record.version
        index = status_class(record.status)
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

        start = record.at // SLOT * SLOT
        if start > self._horizon:  # a clock gone wild
            return
        # A late record whose 10-second slot has joined its minute goes to the minute.
        tier = self._fine if start >= self._fine_from else self._minutes
        slot = tier.slot(app, version, record.at)
        if slot is None:
            return
        slot.classes[index] += 1
        slot.bytes += record.bytes_sent
        if upstream is not None:
            slot.add(upstream)  # into the latency histogram the slot is

    def prune(self, now: float) -> set[str]:
        """Merge 10-second slots ``FINE`` old into their minutes; forget minutes that ended
        more than an hour ago, and the apps left without a slot (no request for an hour).

        Returns the apps forgotten. Looks only at the apps with slots that aged.
        """
        self._horizon = now + KEEP
        self._fine_from = now - FINE
        joining, _ = self._fine.take_before(self._fine_from)
        for app, version, start, slot in joining:
            minute = self._minutes.slot(app, version, start)
            if minute is not None:
                minute.absorb(slot)
        gone = set()
        _, touched = self._minutes.take_before(now - KEEP - MINUTE)
        for app in touched:
            if not any(app in kept for kept in self._kept()):
                self.totals.pop(app, None)  # nothing to export for an app gone an hour
                gone.add(app)
        self._minutes.pack_before(self._fine_from - MINUTE)  # the minutes all joined
        return gone

    def _kept(self) -> tuple[dict[str, dict], ...]:
        """Where an app's slots are: app -> version -> slots, each."""
        return self._fine.slots, self._minutes.slots, self._minutes.packed

    # -- views -------------------------------------------------------------------------------

    def apps_with_slots(self, after: float, until: float) -> set[str]:
        """The apps with requests in a 10-second slot that starts after ``after`` and by
        ``until`` (both within the last ``FINE`` seconds: older slots have joined their
        minutes)."""
        return self._fine.apps_with_slots(after, until)

    def apps(self) -> list[str]:
        return sorted(set(self.totals).union(*self._kept()))

    def versions(self, app: str) -> list[str]:
        """The app's versions with traffic in the last hour, the one seen last first."""
        seen = self.totals.get(app, Totals()).last_seen
        found = set().union(*(kept.get(app, ()) for kept in self._kept()))
        return sorted(found, key=lambda v: seen.get(v, 0), reverse=True)

    def _slots(
        self, app: str, version: str | None, after: float, until: float
    ) -> Iterator[tuple[int, Slot]]:
        """The app's slots (one version's, if given) that end after ``after`` and start by
        ``until``: (start, slot); a packed one thawed for the caller."""
        for tier in (self._fine, self._minutes):
            for v, by_start in tier.slots.get(app, {}).items():
                if version is None or v == version:
                    for start, slot in by_start.items():
                        if start + tier.seconds > after and start <= until:
                            yield start, slot
        if after >= self._minutes.packed_before + MINUTE:
            return  # the last minutes (the status line's): nothing packed is that recent
        for v, run in self._minutes.packed.get(app, {}).items():
            if version is None or v == version:
                yield from run.slots(after, until, MINUTE)

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
        """The app's traffic (one version's, if given) in the last ``seconds`` before ``now``:
        the slots that overlap that window.

        ``since`` leaves out slots that ended before it (a version watched since then);
        ``latency=False`` leaves the latency histogram empty (merging it is the costly part).
        """
        first = max(now - seconds, since)
        classes = [0, 0, 0, 0, 0]
        size = 0
        slots = []
        for _, slot in self._slots(app, version, first, now):
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
        end = int(now // MINUTE) * MINUTE + MINUTE
        first = end - count * MINUTE
        buckets: dict[int, list[Slot]] = {}
        for start, slot in self._slots(app, None, first, end - 1):
            buckets.setdefault(int(start // MINUTE) * MINUTE, []).append(slot)
        points = []
        for minute in range(first, end, MINUTE):
            slots = buckets.get(minute, [])
            requests = sum(sum(slot.classes) for slot in slots)
            errors = sum(slot.classes[4] for slot in slots)
            p99 = Histogram.of(slots).quantile(0.99) if slots else None
            points.append((minute, requests, errors, p99))
        return points
