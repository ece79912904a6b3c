"""A slot of traffic (a 10-second or one-minute span of one version's requests) and its
packed form.

``Slot`` is what keter.stats.traffic counts into. A minute nothing more joins is
packed (``Slot.freeze``: its numbers as zigzagged LEB128 varints, about 25 bytes for
a minute of uptime checks against about 450 for the objects), and a version's packed
minutes are one bytes object (``Run``, records in start order): 1000 apps each asked
every 10 seconds keep about 11 MB of statistics for their hour in all.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from keter.stats.histogram import Histogram


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
        """The slot packed: bytes sent, the five class counts, then (bucket, count) pairs,
        each a varint.

        A minute nothing more joins is kept so: about 25 bytes for a minute of uptime
        checks, against about 450 for the objects (the histogram's dict above all).
        """
        numbers = [self.bytes, *self.classes, *itertools.chain.from_iterable(self.counts.items())]
        return _varints(numbers)

    @classmethod
    def thaw(cls, frozen: bytes) -> Slot:
        slot = cls()
        numbers = _read_varints(frozen)
        slot.bytes, slot.classes = numbers[0], numbers[1:6]
        slot.counts = dict(zip(numbers[6::2], numbers[7::2], strict=True))
        slot.count = sum(numbers[7::2])
        return slot


def _varints(numbers: Iterable[int]) -> bytes:
    """Integers as LEB128 varints, zigzagged (a hostile spool line may say -5 bytes)."""
    out = bytearray()
    for number in numbers:
        number = number << 1 if number >= 0 else (~number << 1) | 1
        while number > 0x7F:
            out.append(number & 0x7F | 0x80)
            number >>= 7
        out.append(number)
    return bytes(out)


def _read_varints(data: bytes) -> list[int]:
    if data.isascii():  # every number within -64 .. 63, one byte each: a quiet minute
        return [byte >> 1 if not byte & 1 else ~(byte >> 1) for byte in data]
    numbers, number, shift = [], 0, 0
    for byte in data:  # inline: a call per number made a busy app's views 1.5x slower
        number |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            numbers.append(number >> 1 if not number & 1 else ~(number >> 1))
            number, shift = 0, 0
    return numbers


def _varint_at(data: bytes, offset: int) -> tuple[int, int]:
    """The zigzagged varint at ``offset``, and the offset after it."""
    number, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        number |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return (number >> 1 if not number & 1 else ~(number >> 1)), offset


def packed_records(packed: bytes) -> Iterator[tuple[int, int, int, int]]:
    """A packed run's records: (slot start, record offset, slot offset, record end)."""
    offset = 0
    while offset < len(packed):
        start, after = _varint_at(packed, offset)
        length, slot_offset = _varint_at(packed, after)
        yield start, offset, slot_offset, slot_offset + length
        offset = slot_offset + length


@dataclass(slots=True)
class Run:
    """One version's packed slots: records (start, length, ``Slot.freeze``) in start order,
    and the newest one's start (a slot newer than it is never in the run: no scan)."""

    records: bytes = b""
    newest: float = -math.inf

    def add(self, start: int, slot: Slot) -> None:
        """Pack ``slot``, which starts at ``start``, into the run."""
        frozen = slot.freeze()
        record = _varints((start, len(frozen))) + frozen
        if start > self.newest:  # the usual minute, and a backlog read in time order
            self.records += record
            self.newest = start
            return
        for at, begin, _, _ in packed_records(self.records):
            if at > start:
                self.records = self.records[:begin] + record + self.records[begin:]
                return
        self.records += record  # a start equal to the newest: keter never packs one twice

    def take(self, start: int) -> Slot | None:
        """Take the slot at ``start`` out, if the run has it."""
        if start > self.newest:
            return None
        before = None  # the start of the record before the one looked at
        for at, begin, slot_offset, end in packed_records(self.records):
            if at == start:
                slot = Slot.thaw(self.records[slot_offset:end])
                if end == len(self.records) and before is not None:
                    self.newest = before
                self.records = self.records[:begin] + self.records[end:]
                return slot
            before = at
        return None

    def slots(self, after: float, until: float, seconds: int) -> Iterator[tuple[int, Slot]]:
        """The packed slots (each ``seconds`` long) that end after ``after`` and start by
        ``until``, unpacked: (start, slot). The run is left as it is."""
        for start, _, slot_offset, end in packed_records(self.records):
            if start + seconds > after and start <= until:
                yield start, Slot.thaw(self.records[slot_offset:end])

    def drop_before(self, limit: float) -> None:
        """Drop the records of slots that start before ``limit`` (the run's head)."""
        for at, begin, _, _ in packed_records(self.records):
            if at >= limit:
                self.records = self.records[begin:]
                return
        self.records = b""
