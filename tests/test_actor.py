"""The actor loop's timers (keter/actor.py): what is scheduled arrives, what is cancelled
never does and never wakes the thread."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from keter.actor import Actor
from keter.messages import Component
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
