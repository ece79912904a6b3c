"""The one-inbox-per-thread loop every keter component runs on.

Modelled on pykka's actor loop: a component owns its state privately and is
reached only through ``tell``. It stops when it receives ``Stop``.

Failures are reported, never swallowed. If a handler raises, the loop reports
``ComponentFailed`` (naming the deploy the message was about, if any) and the
thread ends. The supervisor then fails that one deploy and calls ``restart``:
a new thread on the same object, inbox and timers, so nothing queued is lost
and the component's own state (e.g. the processes it supervises) survives.
``on_restart`` lets a component drop whatever the failure may have left half
done. ``on_stop`` runs only after ``Stop``: a failure must not tear down what
the component manages (the process monitor would stop every app).

Components that must act later (a backoff, a drain period, a poll) do not
sleep: they ``schedule`` a message to themselves and the loop waits on the
inbox with a timeout that ends when the earliest timer is due. A timer that is
no longer wanted (a health deadline once the app answered) is ``cancel``led: it
never wakes the thread, so 1000 apps started leave no 1000 wakeups behind.
The one exception is the nginx writer: an apply waits inside its handler until
nginx's status server reports the new generation and the old workers stop
accepting (``Event.wait`` in steps of a few ms, each wait bounded by
``confirm_timeout``; ``stop`` cuts it short). Its reply must not come before
nginx serves the new config, and the supervisor sends the next generation only
once it has that reply, so nothing waits behind it in the writer's inbox.

Every component answers a message it does not know the same way:
``unexpected`` logs one ERROR line and the message is ignored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
import traceback

from keter.messages import Component, ComponentFailed, Stop
from keter.threadnames import name_this_thread

log = logging.getLogger(__name__)


class Actor:
    """A named component with an inbox, private timers and a (restartable) thread."""

    def __init__(self, component: Component, report_to: queue.Queue | None) -> None:
        self.component = component
        self.inbox: queue.Queue = queue.Queue()
        self._report_to = report_to
        self._timers: list[tuple[float, int, object]] = []
        self._timer_seq = itertools.count()
        self._timers_live: set[int] = set()  # the numbers of the timers in the heap
        self._timers_cancelled: set[int] = set()  # those of them that must not fire
        self._thread: threading.Thread | None = None
        self._started = False  # on_start completed once
        # Its last thread ended in a failure (reported), and whether it was asked to stop:
        # read and set together under the lock, so that exactly one of stop() and the
        # failing thread sees to on_stop. Mangled: subclasses have a _failed.
        self.__lock = threading.Lock()
        self.__failed = False
        self.__stopping = False

    # -- API used by other threads -------------------------------------------------

    def tell(self, message: object) -> None:
        self.inbox.put(message)

    def stop(self) -> None:
        """Its thread handles Stop, then runs ``on_stop`` (the monitor's stops every app).
        A thread a failure ended (its restart's backoff not over, or keter stopping
        because it kept failing) is started again first: nobody handled the Stop, and
        every app ran on without a keter. What waited in its inbox and its timers is
        dropped, not handled before the Stop: it may be what made the component fail.
        A thread that fails after this call runs ``on_stop`` itself (``_run``)."""
        with self.__lock:
            self.__stopping = True
            failed = self.__failed
        if failed:
            self.join(1.0)  # it ends right after its report
            if not self.is_alive():
                self._drop_pending()
                self.start()
        self.inbox.put(Stop())

    def _drop_pending(self) -> None:
        self._timers.clear()
        self._timers_live.clear()
        self._timers_cancelled.clear()
        while True:
            try:
                self.inbox.get_nowait()
            except queue.Empty:
                return

    def start(self) -> None:
        """Start the component's thread (``on_start`` first, then the loop)."""
        self.__failed = False
        self._thread = threading.Thread(
            target=self._run, name=f"keter-{self.component}", daemon=False
        )
        self._thread.start()

    def restart(self) -> None:
        """After a failure: a new thread on the same state and inbox."""
        if self.is_alive():
            raise RuntimeError(f"{self.component} is still running")
        self.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- API used by the component itself --------------------------------------------

    def report(self, message: object) -> None:
        """Send a fact to whoever supervises this component."""
        if self._report_to is not None:
            self._report_to.put(message)

    def schedule(self, delay: float, message: object) -> int:
        """Deliver ``message`` to this actor's own handler after ``delay`` seconds.

        Returns the timer's number, for ``cancel``.
        """
        due = time.monotonic() + max(0.0, delay)
        number = next(self._timer_seq)
        heapq.heappush(self._timers, (due, number, message))
        self._timers_live.add(number)
        return number

    def cancel(self, timer: int) -> None:
        """The timer ``schedule`` numbered so will not deliver its message (if not yet)."""
        if timer in self._timers_live:
            self._timers_cancelled.add(timer)  # dropped once it is the next due, without waking

    def take_queued(self, kind: type | tuple[type, ...]) -> list:
        """Take the messages of ``kind`` at the head of the inbox now, up to the first
        of another kind. For a component that answers many at once: the switch's one
        transaction for every switch queued, the watcher's one rescan for every rescan
        asked. Only from the head: a message taken past another would be carried out
        before it (a port pointed again before its earlier release, which then deleted
        it), and one put back would queue behind what came meanwhile."""
        taken = []
        with self.inbox.mutex:  # Queue's own lock: put() takes it too
            waiting = self.inbox.queue
            while waiting and isinstance(waiting[0], kind):
                taken.append(waiting.popleft())
        return taken

    def _pop_timer(self) -> object:
        """Take the next due timer out of the heap; its message."""
        _, number, message = heapq.heappop(self._timers)
        self._timers_live.discard(number)
        return message

    def unexpected(self, message: object) -> None:
        """The one policy for a message a component does not know: log and ignore it."""
        log.error("%s: ignoring unexpected message %s", self.component, type(message).__name__)

    def handle(self, message: object) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_start(self) -> None:
        """Runs in the actor's thread before the first message (once, not on restarts)."""

    def on_restart(self) -> None:
        """Runs in the new thread after a failure, before the next message."""

    def on_stop(self) -> None:
        """Runs in the actor's thread after Stop; must not raise."""

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread()
        message: object = None
        try:
            if not self._started:
                self.on_start()
                self._started = True
            else:
                self.on_restart()
            while True:
                message = self._next_message()
                if message is None:
                    continue
                if isinstance(message, Stop):
                    break
                self.handle(message)
        except Exception as exc:  # reported, never swallowed
            doing = "starting" if not self._started else "restarting"
            if message is not None:
                doing = f"handling {type(message).__name__}"
            log.error("%s: failed %s: %s", self.component, doing, exc)
            with self.__lock:
                self.__failed = True
                stopping = self.__stopping
            answer_failure(message, self.component, exc)
            self.report(
                ComponentFailed(
                    component=self.component,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                    message=type(message).__name__ if message is not None else "",
                    app=_field(message, "app", str),
                    deploy_id=_field(message, "deploy_id", int),
                )
            )
            if not stopping:
                return  # restarted after a backoff, or stop() starts it again
            # Asked to stop before this failure: nobody starts this thread again, and the
            # Stop behind the failing message is never reached. What waits is dropped.
            self._drop_pending()
        try:
            self.on_stop()
        except Exception:
            log.exception("%s: failed while stopping", self.component)

    def _next_message(self) -> object | None:
        """The next due timer message, else the next inbox message, else None."""
        while self._timers and self._timers[0][1] in self._timers_cancelled:
            self._timers_cancelled.discard(self._timers[0][1])
            self._pop_timer()
        now = time.monotonic()
        if self._timers and self._timers[0][0] <= now:
            return self._pop_timer()
        timeout = self._timers[0][0] - now if self._timers else None
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None


def answer_failure(message: object, handler: str, exc: Exception) -> None:
    """A request whose handler raised is answered with the failure: its asker (an HTTP
    thread) waited out its whole timeout for an answer that would never come, then said
    "busy"."""
    reply = getattr(message, "reply", None)
    if isinstance(reply, concurrent.futures.Future):
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # given up on
            reply.set_exception(RuntimeError(f"internal error in {handler}: {exc}"))


def _field(message: object, name: str, kind: type) -> object:
    value = getattr(message, name, None)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None
