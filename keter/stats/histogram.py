"""A streaming latency histogram: memory bounded whatever the traffic, no per-request storage.

Log-linear buckets: bucket 0 holds every latency up to 1 ms (nginx measures
in milliseconds); bucket ``i`` above it holds ``(1 ms * 1.02**(i-1), 1 ms *
1.02**i]``, and a quantile is reported as its bucket's geometric middle. So
a reported percentile is within 1% of the true one above 1 ms (within 0.5 ms
below), whatever the distribution. Latencies above ~1.5 days share the last
bucket: at most ``BUCKETS`` counters exist, and only those that were used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

FLOOR = 0.001  # seconds: bucket 0 holds [0, FLOOR]
GROWTH = 1.02  # each bucket is 2% wider than the one before
BUCKETS = 1024
RELATIVE_ERROR = math.sqrt(GROWTH) - 1  # of a reported quantile above FLOOR (about 1%)
_LOG_GROWTH = math.log(GROWTH)
_TOP = FLOOR * GROWTH ** (BUCKETS - 2)  # the last bucket holds everything above this


def bucket(seconds: float) -> int:
    """The bucket a latency falls in (any float: a spool line may say "inf")."""
    if not seconds > FLOOR:  # NaN too
        return 0
    if seconds > _TOP:  # infinity too, whose logarithm has no ceiling
        return BUCKETS - 1
    # At most BUCKETS - 1: seconds <= _TOP puts the logarithm at BUCKETS - 2 or below.
    return math.ceil(math.log(seconds / FLOOR) / _LOG_GROWTH)


def bucket_value(index: int) -> float:
    """The latency a bucket stands for: its geometric middle (bucket 0: half of FLOOR)."""
    if index <= 0:
        return FLOOR / 2
    return FLOOR * GROWTH ** (index - 0.5)


class Histogram:
    """Counts per bucket (a dict: only the buckets that were used)."""

    __slots__ = ("count", "counts")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0

    def add(self, seconds: float) -> None:
        index = bucket(seconds)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1

    def merge(self, other: Histogram) -> None:
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """The latency below which a fraction ``q`` of the requests fell; None if empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))  # the rank-th smallest latency
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return bucket_value(index)
        return bucket_value(max(self.counts))  # pragma: no cover - q > 1

    @classmethod
    def of(cls, histograms: Iterable[Histogram]) -> Histogram:
        total = cls()
        for histogram in histograms:
            total.merge(histogram)
        return total
