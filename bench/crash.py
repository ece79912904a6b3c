"""Benchmark 4: how fast a killed app answers again, and what a crash loop costs keter.

* Recovery: SIGKILL an app's process, then poll through nginx until a new
  process answers; kill that one again at once (a second crash soon after the
  first). One app per round, so every round starts with a clean crash history.
* Crash loop: an app that keter always finds healthy and that is killed 0.5 s
  after every start (bench/app.sh with CRASH_AFTER); over a window from its
  first start, keter's restarts per minute and keter's own CPU.
"""

from __future__ import annotations

import os
import re
import signal
import time

from harness import (
    Row,
    Settings,
    Stack,
    app_start_times,
    keter_stack,
    median,
    ms,
    observe,
    poll,
    spread,
)

NAME = "crash"
FIRST_TARGET = 0.100  # plus the app's own start
SECOND_TARGET = 0.5  # a tenth of Keter 2.3.5's 5 s
CRASH_AFTER = 0.5


def run(settings: Settings) -> list[Row]:
    rounds = settings.pick(5, 3)
    window = settings.pick(60, 10)
    with keter_stack(settings, NAME) as stack:
        apps = [f"c{i}" for i in range(rounds)]
        stack.deploy({app: stack.bundle(app, "v1") for app in apps})
        stack.settle(rounds)
        first, second, starts = [], [], []
        for app in apps:
            first.append(_kill_until_back(stack, app))
            second.append(_kill_until_back(stack, app))
            starts += app_start_times(settings.workdir, 1)

        offset = stack.log_size()
        stack.deploy({"loop": stack.bundle("loop", "v1", env={"CRASH_AFTER": str(CRASH_AFTER)})})
        usage = observe(stack.pid, window)
        loop_log = stack.log_since(offset)
    restarts = len(re.findall(r"loop: state BACKOFF -> STARTING", loop_log))

    start = median(starts)
    first_target = FIRST_TARGET + start
    return [
        Row(
            "crash recovery: kill -9, answering again",
            spread(first),
            f"Keter 2.3.5: 35 ms; app start here {ms(start)}",
            f"< 100 ms + app start = {ms(first_target)}",
            median(first) < first_target,
        ),
        Row(
            "crash recovery: second kill -9 right after",
            spread(second),
            "Keter 2.3.5: 5 s down (~930 failed requests under load)",
            f"< {ms(SECOND_TARGET)} (a tenth)",
            median(second) < SECOND_TARGET,
        ),
        Row(
            f"crash loop (killed {CRASH_AFTER:g} s after each start), first {window} s",
            f"{restarts * 60 / usage.seconds:.0f} restarts/min, keter CPU "
            f"{usage.cpu_percent:.2f}% of a core",
            "Keter 2.3.5: 23/min, 0.65% CPU",
            "(none)",
            None,
        ),
    ]


def _kill_until_back(stack: Stack, app: str) -> float:
    """SIGKILL the app's process; seconds until a new process answers through nginx."""
    before = stack.answer(app)
    if before is None:
        raise RuntimeError(f"{app}: not answering before the kill")

    def back() -> bool:
        reply = stack.answer(app)
        return reply is not None and reply.pid != before.pid

    killed = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    _, seen = poll(back, 30, f"{app} to answer again after kill -9")
    return seen - killed
