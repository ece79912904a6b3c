"""The supervisor's timers: messages it sends itself after a delay.

No thread and no sleep: ``keter.daemon`` waits on the inbox at most until the
earliest timer is due (``Supervisor.next_timer``), then dispatches the due
ones like any other message.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from keter.messages import Component, message


@message
class RestartComponent:
    """Timer: a failed component's backoff is over (keter.supervisor.restarts)."""

    component: Component


@message
class DrainOver:
    """Timer: a draining deploy's drain-seconds are over (keter.supervisor.endings)."""

    deploy_id: int


@message
class RetryMove:
    """Timer: try again to move a web process off the port a stranger holds
    (keter.supervisor.starting), which found no free port the last time."""

    process_id: int
    port: int  # the port it was to move off: a retry for a port it left is stale


@message
class RetryDeploy:
    """Timer: deploy again the bundle whose deploy found the database server unavailable
    with nothing serving its app (keter.supervisor.database)."""

    app: str
    deploy_id: int  # the deploy that failed: a retry a newer bundle or removal cancelled is stale


class Timers:
    """Timer messages ordered by when they are due (ties: in the order scheduled)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, object]] = []
        self._seq = itertools.count()

    def schedule(self, delay: float, msg: object) -> None:
        heapq.heappush(self._heap, (self._clock() + delay, next(self._seq), msg))

    def next(self) -> float | None:
        """Seconds until the earliest timer is due (None: no timer)."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    def due(self) -> list[object]:
        """Remove and return the timer messages that are due."""
        now, due = self._clock(), []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due
