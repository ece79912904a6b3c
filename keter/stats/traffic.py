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
own beyond its start's entry; a minute nothing more joins is packed into
bytes (``Slot.freeze``). A host of 1000 apps each asked every 10 seconds for
an hour keeps about 19 MB of statistics this way (204 MB as 10-second slot
objects).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import struct
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from keter.stats.histogram import Histogram
from keter.stats.record import Record

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


class Slot(Histogram):
    """Ten seconds (or a minute) of one version's requests: the histogram of their upstream
    response times (a slot is one, rather than holding one: an object less per slot),
    their counts per status class and the bytes sent."""

    __slots__ = ("bytes", "classes")

    def __init__(self) -> None:
        super().__init__()
        self.classes = [0, 0, 0, 0, 0]  # 1xx .. 5xx
        self.bytes = 0

    def absorb(self, other: Slot) -> None:
        """Add ``other``'s requests to this slot's (a 10-second slot joining its minute)."""
        self.merge(other)
        for i, n in enumerate(other.classes):
            self.classes[i] += n
        self.bytes += other.bytes

    def freeze(self) -> bytes:
        """The slot packed: its five class counts and bytes, then (bucket, count) pairs.

        A minute nothing more joins is kept so: about 100 bytes for a minute of uptime
        checks, against about 450 for the objects (the histogram's dict above all).
        """
        pairs = array("I", itertools.chain.from_iterable(self.counts.items()))
        return _FROZEN.pack(*self.classes, self.bytes) + pairs.tobytes()

    @classmethod
    def thaw(cls, frozen: bytes) -> Slot:
        slot = cls()
        *classes, slot.bytes = _FROZEN.unpack_from(frozen)
        slot.classes = classes
        pairs = array("I", frozen[_FROZEN.size :])
        slot.counts = dict(zip(pairs[::2], pairs[1::2], strict=True))
        slot.count = sum(pairs[1::2])
        return slot


# A frozen slot's head: counts of 1xx .. 5xx (a minute of even 70,000 requests a second
# fits 32 bits many times over), then the bytes sent.
_FROZEN = struct.Struct("=5IQ")
Stored = Slot | bytes  # a slot, or a minute nothing more joins, frozen (Slot.freeze)


class _Tier:
    """Slots of one length, per app and version, with the bookkeeping that finds old ones.

    ``slots``: app -> version -> slot start -> Slot (an app's views never look at other
    apps). ``_apps_by_start``: slot start -> apps with a slot there, and ``_starts`` the
    same starts as a heap, oldest first: what ``take_before`` looks at, and nothing else.
    """

    def __init__(self, seconds: int, per_version: int, *, freezes: bool = False) -> None:
        self.seconds = seconds
        self.per_version = per_version
        self.slots: dict[str, dict[str, dict[int, Stored]]] = {}
        self._apps_by_start: dict[int, set[str]] = {}
        self._start_keys: dict[int, int] = {}  # the one int object of each start
        self._starts: list[int] = []
        # start -> apps with a slot there not frozen yet (a tier whose slots freeze): a
        # backlog read after a restart makes old minutes, not only the newest.
        self._thawed: dict[int, set[str]] | None = {} if freezes else None

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
        if slot is None:
            if len(slots) >= self.per_version:  # a clock gone wild
                return None
            apps = self._apps_by_start.get(start)
            if apps is None:
                apps = self._apps_by_start[start] = set()
                self._start_keys[start] = start
                heapq.heappush(self._starts, start)
            apps.add(app)
            # Every app's slot at this start is keyed by one int object, not one each.
            slot = slots[self._start_keys[start]] = Slot()
        elif isinstance(slot, bytes):  # a record later than any: the slot thaws
            slot = slots[start] = Slot.thaw(slot)
        else:
            return slot
        if self._thawed is not None:
            self._thawed.setdefault(start, set()).add(app)
        return slot

    def freeze_before(self, limit: float) -> None:
        """Freeze the slots that start before ``limit`` (nothing more joins them)."""
        assert self._thawed is not None
        for start in [start for start in self._thawed if start < limit]:
            for app in self._thawed.pop(start):
                for slots in self.slots.get(app, {}).values():
                    slot = slots.get(start)
                    if isinstance(slot, Slot):
                        slots[start] = slot.freeze()

    def take_before(self, limit: float) -> list[tuple[str, str, int, Stored]]:
        """Remove every slot that starts before ``limit``: (app, version, start, slot)."""
        taken = []
        while self._starts and self._starts[0] < limit:
            start = heapq.heappop(self._starts)
            del self._start_keys[start]
            if self._thawed is not None:
                self._thawed.pop(start, None)
            for app in self._apps_by_start.pop(start):
                versions = self.slots.get(app, {})
                for version, slots in list(versions.items()):
                    slot = slots.pop(start, None)
                    if not slots:
                        del versions[version]
                    if slot is not None:
                        taken.append((app, version, start, slot))
                if not versions:
                    self.slots.pop(app, None)
        return taken

    def apps_with_slots(self, after: float, until: float) -> set[str]:
        """The apps with a slot that starts after ``after`` and by ``until``."""
        if until - after <= KEEP:  # the usual second: at most one slot start to look up
            first = (math.floor(after / self.seconds) + 1) * self.seconds
            starts: Iterable[int] = range(first, math.floor(until) + 1, self.seconds)
        else:
            starts = [start for start in self._apps_by_start if after < start <= until]
        found: set[str] = set()
        for start in starts:
            found |= self._apps_by_start.get(start, set())
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
        self._minutes = _Tier(MINUTE, MINUTES, freezes=True)  # the rest of the hour
        self.totals: dict[str, Totals] = {}
        # Records before this go to their minute (their 10-second slot has joined it);
        # slots starting after _horizon are refused (a clock gone wild). Set by prune.
        self._fine_from = -math.inf
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
        for app, version, start, slot in self._fine.take_before(self._fine_from):
            minute = self._minutes.slot(app, version, start)
            if minute is not None:
                assert isinstance(slot, Slot)  # 10-second slots never freeze
                minute.absorb(slot)
        gone = set()
        for app, _, _, _ in self._minutes.take_before(now - KEEP - MINUTE):
            if app not in self._fine.slots and app not in self._minutes.slots:
                self.totals.pop(app, None)  # nothing to export for an app gone an hour
                gone.add(app)
        self._minutes.freeze_before(self._fine_from - MINUTE)  # the minutes all joined
        return gone

    # -- views -------------------------------------------------------------------------------

    def apps_with_slots(self, after: float, until: float) -> set[str]:
        """The apps with requests in a 10-second slot that starts after ``after`` and by
        ``until`` (both within the last ``FINE`` seconds: older slots have joined their
        minutes)."""
        return self._fine.apps_with_slots(after, until)

    def apps(self) -> list[str]:
        return sorted(set(self._fine.slots) | set(self._minutes.slots) | set(self.totals))

    def versions(self, app: str) -> list[str]:
        """The app's versions with traffic in the last hour, the one seen last first."""
        seen = self.totals.get(app, Totals()).last_seen
        found = set(self._fine.slots.get(app, ())) | set(self._minutes.slots.get(app, ()))
        return sorted(found, key=lambda v: seen.get(v, 0), reverse=True)

    def _slots(
        self, app: str, version: str | None, after: float, until: float
    ) -> Iterator[tuple[int, Slot]]:
        """The app's slots (one version's, if given) that end after ``after`` and start by
        ``until``: (start, slot); a frozen one thawed for the caller."""
        for tier in (self._fine, self._minutes):
            for v, by_start in tier.slots.get(app, {}).items():
                if version is None or v == version:
                    for start, slot in by_start.items():
                        if start + tier.seconds > after and start <= until:
                            yield start, Slot.thaw(slot) if isinstance(slot, bytes) else slot

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


CLASSES_INDEX = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
