"""keter.heap: what has lived a while is frozen out of the collector's walks, and cyclic
garbage among it is collected within the hour."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from keter.heap import COLLECT_EVERY, FREEZE_EVERY, Heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[_Clock]:
    gc.collect()
    gc.disable()  # no collection but the tests' own
    yield _Clock()
    gc.enable()
    gc.unfreeze()  # the rest of the test run collects as usual
    gc.collect()


def _cycle() -> weakref.ref:
    """Two objects that refer to each other and to nothing else: cyclic garbage once the
    caller drops them. Returns a weak reference that dies when they are collected."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_full_collection_walks_only_what_came_after_the_freeze(clock: _Clock) -> None:
    heap = Heap(clock)
    for _ in range(2000):
        _Node()  # unreachable at once: freed by refcount, never tracked long
    kept = [_Node() for _ in range(2000)]
    heap.tend()  # the first call freezes at once
    assert gc.get_freeze_count() >= len(kept)
    newer = [_Node() for _ in range(10)]
    tracked = len(gc.get_objects())  # what a full collection walks
    assert tracked < gc.get_freeze_count()
    assert all(gc.is_tracked(node) for node in newer)


def test_cyclic_garbage_that_was_frozen_is_collected_within_the_hour(clock: _Clock) -> None:
    heap = Heap(clock)
    alive = _cycle()
    heap.tend()  # frozen while still referenced (here: through its own cycle)
    gc.collect()
    assert alive() is not None  # a frozen cycle is not walked

    clock.now += FREEZE_EVERY
    heap.tend()  # a freeze, not a collection
    gc.collect()
    assert alive() is not None

    clock.now += COLLECT_EVERY
    heap.tend()
    assert alive() is None
    assert gc.get_freeze_count() > 0  # and frozen again after the collection


def test_a_frozen_object_is_freed_by_its_reference_count_at_once(clock: _Clock) -> None:
    heap = Heap(clock)
    node = _Node()
    alive = weakref.ref(node)
    heap.tend()
    del node
    assert alive() is None


def test_freezes_come_once_a_minute_not_at_every_call(clock: _Clock) -> None:
    heap = Heap(clock)
    heap.tend()
    node = _Node()
    heap.tend()  # the same moment: no freeze
    assert gc.is_tracked(node) and any(o is node for o in gc.get_objects())
    clock.now += FREEZE_EVERY
    heap.tend()
    assert not any(o is node for o in gc.get_objects())  # frozen: off the collector's lists
