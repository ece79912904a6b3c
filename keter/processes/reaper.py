"""The reaper: one thread that deletes what stopped app processes left behind.

An app may leave a tree of any size in its /tmp: four workers that made 200,000 files
each took seconds to delete. Done in the spawn pool, those deletions held its threads,
and every spawn (another app's deploy, a crash restart, a release command) waited
behind them; keter's stop waited for them too. The reaper does them on its own, one at
a time, in the order they were asked for: each app process's folders
(``keter.processes.private``, renamed away first, so nothing starts in them), what a
killed keter left there, and an app's IPC objects (a scan of every process and
``ipcrm``). Nothing waits for it but keter's stop, and that only briefly: the folders
it leaves are renamed away already, and the next start deletes them (``sweep``) and
every app user's IPC objects.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from keter.threadnames import name_this_thread

log = logging.getLogger(__name__)

SLOW = 5.0  # seconds: a clean-up that takes longer is said


@dataclass(frozen=True, kw_only=True)
class _Job:
    what: str  # "APP: removing ...", as the log says it
    work: Callable[[], object]


class Reaper:
    """Runs clean-ups in one thread of their own (a daemon thread: keter's exit does
    not wait for it), started with the first one."""

    def __init__(self, slow: float = SLOW) -> None:
        self.slow = slow
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._doing: str | None = None  # the job in hand, for the line at close

    def submit(self, what: str, work: Callable[[], object]) -> None:
        """Run ``work`` after those submitted before; ``what`` names it in the log
        ("APP: removing ..."): the line when it took long, or failed."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="keter-reaper", daemon=True)
            self._thread.start()
        self._jobs.put(_Job(what=what, work=work))

    def close(self, timeout: float) -> None:
        """Keter stops: wait at most ``timeout`` for the clean-ups asked for, and say what
        is left (it is renamed away already: the next start deletes it)."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "processes: keter stops before its clean-up is done (%s; %d more waiting): "
                "the next start finishes it",
                self._doing or "starting",
                max(self._jobs.qsize() - 1, 0),  # the None that ends the loop is no job
            )

    def _loop(self) -> None:
        name_this_thread()
        while (job := self._jobs.get()) is not None:
            self._doing = job.what
            began = time.monotonic()
            try:
                job.work()
            except Exception:
                log.exception("%s failed", job.what)
            took = time.monotonic() - began
            if took > self.slow:
                log.warning("%s took %.1fs", job.what, took)
            self._doing = None
