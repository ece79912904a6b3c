"""The actor loop (keter/actor.py): what is scheduled arrives, what is cancelled never
does and never wakes the thread; a failure answers its request and a Stop still runs
``on_stop``."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keter.actor import Actor
from keter.messages import Component, ComponentFailed
from keter.threadnames import kernel_name


class Recorder(Actor):
    """Schedules at start what the test asks; every message it handles goes to ``got``."""

    def __init__(self, plan) -> None:
        super().__init__(Component.STATS, None)
        self.plan = plan
        self.got: queue.Queue = queue.Queue()

    def on_start(self) -> None:
        self.plan(self)

    def handle(self, message: object) -> None:
        self.got.put(message)


def test_a_cancelled_timer_never_delivers_and_the_others_do() -> None:
    def plan(actor: Actor) -> None:
        early = actor.schedule(0.01, "cancelled early")
        actor.schedule(0.05, "kept")
        late = actor.schedule(0.02, "cancelled later")
        actor.schedule(0.1, "last")
        actor.cancel(early)
        actor.cancel(late)

    actor = Recorder(plan)
    actor.start()
    try:
        assert actor.got.get(timeout=5) == "kept"
        assert actor.got.get(timeout=5) == "last"
    finally:
        actor.stop()
        actor.join(5)
    assert actor.got.empty()
    assert not actor._timers and not actor._timers_live and not actor._timers_cancelled


def test_a_cancelled_timer_does_not_wake_the_loop() -> None:
    """1000 health deadlines of apps that answered long ago must cost no wakeup: the
    loop drops cancelled timers before it computes how long to wait."""
    actor = Recorder(lambda actor: None)
    timers = [actor.schedule(0.0, f"deadline {i}") for i in range(1000)]
    actor.schedule(3600, "much later")
    for timer in timers:
        actor.cancel(timer)
    actor.tell("news")
    assert actor._next_message() == "news"  # no due timer came first
    assert [message for _, _, message in actor._timers] == ["much later"]
    actor.cancel(timers[0])  # already gone: nothing to remember
    assert not actor._timers_cancelled


def test_an_actor_thread_carries_its_name_into_the_kernel() -> None:
    seen: queue.Queue = queue.Queue()

    class Named(Actor):
        def handle(self, message: object) -> None:
            task = f"/proc/self/task/{threading.get_native_id()}/comm"
            seen.put(Path(task).read_text().strip())

    actor = Named(Component.NGINX, None)
    actor.start()
    actor.tell("which")
    assert seen.get(timeout=10) == "keter-nginx"
    actor.stop()
    actor.join(10)


def test_the_kernel_keeps_fifteen_ascii_bytes_of_a_name() -> None:
    assert kernel_name("keter-processes") == b"keter-processes"
    assert kernel_name("keter-status-http") == b"keter-status-ht"
    assert kernel_name("keter-backup-çafé") == b"keter-backup-?a"


def test_messages_taken_at_once_are_only_those_at_the_head() -> None:
    # The switch takes every queued PointServices for one transaction: taken from behind
    # a ReleaseServices of the same port, the port was pointed again first and then
    # deleted; and messages put back queued behind those that came meanwhile.
    actor = Recorder(lambda actor: None)
    for message in ["a1", "a2", 3, "a3"]:
        actor.tell(message)
    assert actor.take_queued(str) == ["a1", "a2"]
    assert actor.take_queued(str) == []  # 3 comes first
    assert actor._next_message() == 3
    actor.tell(4)
    assert actor.take_queued(str) == ["a3"]
    assert actor._next_message() == 4


@dataclass(frozen=True, kw_only=True)
class Ask:
    """A request its asker waits on, as the status API's threads do."""

    boom: bool = False
    reply: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Failing(Actor):
    """Raises on a request that says so; records what it handled and its stop."""

    def __init__(self, report_to: queue.Queue) -> None:
        super().__init__(Component.STATS, report_to)
        self.handled: list[object] = []
        self.stopped = threading.Event()

    def handle(self, message: object) -> None:
        self.handled.append(message)
        match message:
            case Ask(boom=True):
                raise RuntimeError("boom")
            case Ask(reply=reply):
                reply.set_result("answered")

    def on_stop(self) -> None:
        self.stopped.set()


def test_a_request_whose_handler_raises_is_answered_with_the_failure() -> None:
    """Its asker waited out its whole timeout (10 s, 60 s) for an answer that never came."""
    reports: queue.Queue = queue.Queue()
    actor = Failing(reports)
    actor.start()
    asked = Ask(boom=True)
    actor.tell(asked)
    with pytest.raises(RuntimeError, match="internal error in stats: boom"):
        asked.reply.result(timeout=5)
    assert isinstance(reports.get(timeout=5), ComponentFailed)
    actor.join(5)
    assert not actor.is_alive()


def test_stopping_a_component_a_failure_ended_runs_its_stop_and_nothing_queued() -> None:
    """Its thread was gone (the restart's backoff not over, or keter stopping because it
    kept failing): nobody handled the Stop, and the monitor's on_stop, which stops every
    app, never ran. What waited for it may be what fails it again: dropped."""
    reports: queue.Queue = queue.Queue()
    actor = Failing(reports)
    actor.start()
    actor.tell(Ask(boom=True))
    reports.get(timeout=5)
    actor.join(5)
    waiting = Ask(boom=True)
    actor.tell(waiting)
    actor.schedule(0, Ask(boom=True))
    actor.stop()
    assert actor.stopped.wait(5)
    actor.join(5)
    assert len(actor.handled) == 1 and reports.empty()
    assert not waiting.reply.done()  # dropped: its asker's own timeout answers it


def test_a_component_failing_after_it_was_asked_to_stop_still_runs_its_stop() -> None:
    """Stop queued behind a message whose handling then fails: the thread ended after its
    report and the Stop was never reached (the monitor's on_stop stops every app)."""
    reports: queue.Queue = queue.Queue()
    actor = Failing(reports)
    handling, fail = threading.Event(), threading.Event()

    def slow_boom(message: object) -> None:
        handling.set()
        fail.wait(5)
        raise RuntimeError("boom")

    actor.handle = slow_boom  # type: ignore[method-assign]
    actor.start()
    actor.tell(Ask())
    assert handling.wait(5)
    actor.stop()  # it is handling: alive, not failed yet
    fail.set()
    assert actor.stopped.wait(5)
    actor.join(5)
    assert isinstance(reports.get(timeout=5), ComponentFailed) and reports.empty()


def test_a_failure_in_its_restart_is_said_as_such(caplog) -> None:
    # It was logged as "failed handling NoneType": no message was being handled.
    reports: queue.Queue = queue.Queue()
    actor = Failing(reports)

    def no_restart() -> None:
        raise RuntimeError("restart boom")

    actor.on_restart = no_restart  # type: ignore[method-assign]
    actor.start()
    actor.tell(Ask(boom=True))
    reports.get(timeout=5)
    actor.join(5)
    actor.restart()
    assert isinstance(reports.get(timeout=5), ComponentFailed)
    actor.join(5)
    lines = [record.getMessage() for record in caplog.records]
    assert "stats: failed handling Ask: boom" in lines
    assert "stats: failed restarting: restart boom" in lines
