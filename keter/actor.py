"""The one-inbox-per-thread loop every keter component runs on.

Modelled on pykka's actor loop: a component owns its state privately and is
reached only through ``tell``. It stops when it receives ``Stop``. If its
handler raises, the failure is reported to the supervisor as
``ComponentFailed`` and the thread ends; nothing is swallowed.

Components that must act later (a backoff, a drain period, a poll) do not
sleep: they ``schedule`` a message to themselves and the loop waits on the
inbox with a timeout that ends when the earliest timer is due.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
import traceback

from keter.messages import ComponentFailed, Stop

log = logging.getLogger(__name__)


class Actor(threading.Thread):
    """A named, non-daemon thread with an inbox and private timers."""

    def __init__(self, name: str, report_to: queue.Queue | None) -> None:
        super().__init__(name=f"keter-{name}", daemon=False)
        self.component = name
        self.inbox: queue.Queue = queue.Queue()
        self._report_to = report_to
        self._timers: list[tuple[float, int, object]] = []
        self._timer_seq = itertools.count()

    # -- API used by other threads -------------------------------------------------

    def tell(self, message: object) -> None:
        self.inbox.put(message)

    def stop(self) -> None:
        self.inbox.put(Stop())

    # -- API used by the component itself --------------------------------------------

    def report(self, message: object) -> None:
        """Send a fact to whoever supervises this component."""
        if self._report_to is not None:
            self._report_to.put(message)

    def schedule(self, delay: float, message: object) -> None:
        """Deliver ``message`` to this actor's own handler after ``delay`` seconds."""
        due = time.monotonic() + max(0.0, delay)
        heapq.heappush(self._timers, (due, next(self._timer_seq), message))

    def handle(self, message: object) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_start(self) -> None:
        """Runs in the actor's thread before the first message."""

    def on_stop(self) -> None:
        """Runs in the actor's thread after Stop (or a failure); must not raise."""

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.on_start()
            while True:
                message = self._next_message()
                if message is None:
                    continue
                if isinstance(message, Stop):
                    break
                self.handle(message)
        except Exception as exc:  # reported, never swallowed
            log.error("component %s failed: %s", self.component, exc)
            self.report(
                ComponentFailed(
                    component=self.component,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )
            )
        finally:
            try:
                self.on_stop()
            except Exception:
                log.exception("component %s failed while stopping", self.component)

    def _next_message(self) -> object | None:
        """The next due timer message, else the next inbox message, else None."""
        now = time.monotonic()
        if self._timers and self._timers[0][0] <= now:
            return heapq.heappop(self._timers)[2]
        timeout = self._timers[0][0] - now if self._timers else None
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
