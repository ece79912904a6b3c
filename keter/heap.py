"""Keeping Python's cyclic garbage collector off the objects keter has kept a while.

A full collection walks every object the collector tracks: with 1000 apps about
110,000, some 0.1 s of CPU each time, all of it holding the GIL (every thread of
keter waits), and it comes whenever allocation counts say so, on an idle host
too. keter makes almost no reference cycles (a full collection after a round of
1000 redeploys frees nothing), so what has lived a minute is frozen
(``gc.freeze``): the collector leaves it alone, and a full collection walks only
what is newer. Freezing is O(1) (the collector's lists are spliced), and an
object freed by its reference count is freed at once, frozen or not. What a
freeze can hold is cyclic garbage among frozen objects: once an hour everything
is thawed and collected once, so such garbage lives an hour at most.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

FREEZE_EVERY = 60.0  # seconds between two freezes
COLLECT_EVERY = 3600.0  # seconds between two full collections of everything


class Heap:
    """``tend`` is called by keter's main loop (at least once a second); it freezes every
    ``FREEZE_EVERY`` seconds, the first time at once, and every ``COLLECT_EVERY``
    seconds it collects everything before freezing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._freeze_at = now
        self._collect_at = now + COLLECT_EVERY

    def tend(self) -> None:
        now = self._clock()
        if now >= self._collect_at:
            gc.unfreeze()
            gc.collect()
            self._collect_at = now + COLLECT_EVERY
        elif now < self._freeze_at:
            return
        gc.freeze()
        self._freeze_at = now + FREEZE_EVERY
