"""Reading every app's output and noticing every exit: ONE thread for all runs.

The thread waits on one selector (epoll) holding, for each run, its output
pipe and a pidfd of its leader, plus a wake pipe that tells it about new
runs and released ones. A pidfd becomes readable the moment the leader
exits, even when a daemonised grandchild keeps the output pipe open, so an
exit is seen at once; the thread then takes what the pipe holds (the leader's
last words), reads the leader's exit status and calls ``on_exit`` (the monitor
posts ``_Exited`` to itself). It does not reap the leader: the monitor does,
once it has stopped signalling the group (``exit_status``).

Why one thread: a thread per process costs a stack and a scheduler entry per
app, and 1000 apps meant 1000 threads. One selector scales with the number
of *ready* pipes, not of apps. Fairness: a pipe is read one chunk per round,
so an app that floods its output cannot starve the others. Nor can it take
keter's CPU: an app's output is read at most ``OUTPUT_RATE`` bytes a second
after a burst of ``OUTPUT_BURST`` (a token bucket), all its processes together
(a bundle may run 64: with a bucket each they had a whole core of keter's, and
the throttle never began), and each line costs ``LINE_COST`` bytes more, what
its time stamp and its handling cost (``yes ""``, a line per byte, had cost a
fifth of a core within the rate). Past that the pipe of the run that overdrew
is left unread for as long as the excess takes at that rate; the pipe fills
and the app's own writes wait, so the flood costs the app, not keter (an app
running ``yes`` had cost keter a whole core). One line says so, once per run.

A run is watched until its leader has exited and either its pipe reached end
of file (the whole group is gone) or the monitor released it (its group is
gone; whoever still holds the pipe escaped the group and is not waited for).
"""

from __future__ import annotations

import heapq
import logging
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from keter.processes.applog import LogRegistry, OutputCapture
from keter.processes.mailbox import Mailbox
from keter.threadnames import name_this_thread

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
OUTPUT_RATE = 1 << 20  # bytes a second read of one app's output, past its burst
OUTPUT_BURST = 8 << 20  # bytes read at once before the rate applies (a stack dump)
LINE_COST = 32  # bytes charged per line besides its own: the log's time stamp, its handling
MAX_PIPE_BUFFER = 1024 * 1024  # Linux's default /proc/sys/fs/pipe-max-size
FAILURE_TAIL = 20  # output lines sent with an exit report

# on_exit(key, returncode, last output lines); called in the reader's thread.
ExitCallback = Callable[[object, int, tuple[str, ...]], None]


@dataclass(eq=False)
class _Budget:
    """One app's output budget, shared by its runs (touched by the reader thread only)."""

    tokens: float = OUTPUT_BURST  # bytes it may write before its runs wait
    counted_at: float = 0.0  # when ``tokens`` was last brought up to date
    runs: int = 0  # its runs being watched: the budget goes with the last


@dataclass(eq=False)
class _Watched:
    """One run, as the reader thread sees it (touched by that thread only)."""

    key: object
    proc: subprocess.Popen
    capture: OutputCapture
    fd: int  # the output pipe's read end
    pidfd: int
    pipe_open: bool = True
    exited: bool = False
    released: bool = False
    budget: _Budget | None = None  # its app's, from _add
    paused_until: float | None = None  # its pipe is left unread until then
    throttled: bool = False  # the line saying so was logged


# What the selector hands back with a ready descriptor (the mailbox's is None).
@dataclass(frozen=True, slots=True)
class _Output:
    """The run's output pipe is readable."""

    watched: _Watched


@dataclass(frozen=True, slots=True)
class _LeaderExit:
    """The run's pidfd is readable: its leader exited."""

    watched: _Watched


# What the monitor's thread asks of the reader's, through the mailbox.
@dataclass(frozen=True, slots=True)
class _Watch:
    watched: _Watched


@dataclass(frozen=True, slots=True)
class _Release:
    key: object


@dataclass(frozen=True, slots=True)
class _Close:
    pass


class OutputReader:
    """Copies each run's output to its log and reports its leader's exit."""

    def __init__(self, logs: LogRegistry, on_exit: ExitCallback) -> None:
        self._logs = logs
        self._on_exit = on_exit
        self._commands = Mailbox()  # _Watch, _Release, _Close from the monitor's thread
        self._selector = selectors.DefaultSelector()
        self._watched: dict[object, _Watched] = {}
        self._budgets: dict[str, _Budget] = {}  # by app
        self._paused: list[tuple[float, int, _Watched]] = []  # a heap: (until, seq, run)
        self._pause_seq = 0
        self._thread = threading.Thread(target=self._loop, name="keter-output", daemon=True)
        self._started = False

    # -- API, called from the monitor's thread ----------------------------------------

    def watch(self, key: object, proc: subprocess.Popen, capture: OutputCapture) -> None:
        """Start reading ``proc``'s stdout; ``on_exit(key, ...)`` when its leader exits."""
        assert proc.stdout is not None
        # Opened here, right after the spawn and before anyone can reap the child,
        # so the pidfd refers to it and not to a process that reused its pid.
        pidfd = os.pidfd_open(proc.pid)
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        self._send(_Watch(_Watched(key=key, proc=proc, capture=capture, fd=fd, pidfd=pidfd)))

    def release(self, key: object) -> None:
        """The run's group is gone: read what is left and stop watching it."""
        self._send(_Release(key))

    def close(self, timeout: float) -> None:
        """Finish every run (what their pipes hold is logged) and end the thread."""
        if self._started:
            self._send(_Close())
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._selector.close()
            self._commands.close()

    def _send(self, command: _Watch | _Release | _Close) -> None:
        self._commands.put(command)
        if not self._started:
            self._started = True
            self._thread.start()

    # -- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        name_this_thread()
        self._selector.register(self._commands, selectors.EVENT_READ, None)
        while True:
            timeout = None
            if self._paused:
                timeout = max(0.0, self._paused[0][0] - time.monotonic())
            ready = self._selector.select(timeout)
            self._resume_due()
            for key, _ in ready:
                match key.data:
                    case None:
                        if not self._take_commands():
                            self._finish_all()
                            return
                    case _Output(watched):
                        try:
                            self._readable(watched)
                        except Exception:
                            self._failed(watched)
                    case _LeaderExit(watched):
                        try:
                            self._leader_exited(watched)
                        except Exception:
                            self._failed(watched)

    def _take_commands(self) -> bool:
        """Handle what other threads asked for; False once asked to close."""
        for command in self._commands.take():
            match command:
                case _Watch(watched):
                    self._add(watched)
                case _Release(key):
                    if (watched := self._watched.get(key)) is not None:
                        watched.released = True
                        self._finish_if_done(watched)
                case _:  # _Close
                    return False
        return True

    def _add(self, watched: _Watched) -> None:
        watched.budget = self._budgets.setdefault(watched.capture.app, _Budget())
        watched.budget.runs += 1
        self._watched[watched.key] = watched
        self._selector.register(watched.fd, selectors.EVENT_READ, _Output(watched))
        self._selector.register(watched.pidfd, selectors.EVENT_READ, _LeaderExit(watched))

    def _readable(self, watched: _Watched) -> None:
        if not watched.pipe_open or watched.paused_until is not None:
            return  # closed or paused earlier in this round
        # One chunk per round: every other ready pipe is read before this one again.
        got = read_once(watched.capture, watched.fd)
        if got is False:
            self._close_pipe(watched)
            self._finish_if_done(watched)
        elif got:
            self._spent(watched, got)

    def _spent(self, watched: _Watched, cost: int) -> None:
        """Take ``cost`` from its app's budget; pause the run's pipe when it is spent."""
        budget = watched.budget
        assert budget is not None
        now = _refill(budget)
        budget.tokens -= cost
        if budget.tokens >= 0:
            return
        if not watched.throttled:
            watched.throttled = True
            log.warning(
                "%s: pid %d writes output faster than %d KiB/s: keter reads it at that "
                "rate from now on, and the app's writes wait",
                watched.capture.app,
                watched.proc.pid,
                OUTPUT_RATE // 1024,
            )
        watched.paused_until = now - budget.tokens / OUTPUT_RATE
        self._selector.unregister(watched.fd)
        self._pause_seq += 1
        heapq.heappush(self._paused, (watched.paused_until, self._pause_seq, watched))

    def _resume_due(self) -> None:
        now = time.monotonic()
        while self._paused and self._paused[0][0] <= now:
            _, _, watched = heapq.heappop(self._paused)
            watched.paused_until = None
            if watched.pipe_open:
                self._selector.register(watched.fd, selectors.EVENT_READ, _Output(watched))

    def _leader_exited(self, watched: _Watched) -> None:
        if watched.exited:
            return
        # Everything the leader wrote is in the pipe by now: take it first so the
        # exit report shows its last words.
        if watched.pipe_open and not self._drain(watched):
            self._close_pipe(watched)
        watched.capture.flush()
        try:
            returncode = exit_status(watched.pidfd)
        except ChildProcessError:  # reaped already: keter is stopping (monitor.on_stop)
            returncode = watched.proc.returncode if watched.proc.returncode is not None else -9
        self._close_pidfd(watched)
        self._on_exit(watched.key, returncode, watched.capture.tail(FAILURE_TAIL))
        self._finish_if_done(watched)

    def _drain(self, watched: _Watched) -> bool:
        """``drain``, within the app's budget: past it, only the pipe's last chunk is
        logged (the last words) and the rest dropped, said once per run. Taken whole,
        16 flooding processes exiting at once with full 1 MiB pipes held another app's
        exit report up to 3 s; so they did with a byte of budget left each."""
        budget = watched.budget
        assert budget is not None
        _refill(budget)  # an app quiet since its flood has its budget back
        open_, cost, dropped = drain(watched.capture, watched.fd, max(budget.tokens, 0))
        budget.tokens -= cost
        if dropped and not watched.throttled:
            watched.throttled = True
            log.warning(
                "%s: pid %d: %d bytes of its output dropped (past its output budget)",
                watched.capture.app,
                watched.proc.pid,
                dropped,
            )
        return open_

    def _failed(self, watched: _Watched) -> None:
        """A bug while handling one run must not stop the thread that serves all."""
        log.exception("processes: output reader failed for pid %d", watched.proc.pid)
        try:
            self._close_pipe(watched)
            if not watched.exited:
                # Without an exit report the monitor would wait for it forever; the
                # stop that follows kills the group, so the leader is reaped then.
                returncode = watched.proc.poll()
                self._on_exit(watched.key, -9 if returncode is None else returncode, ())
                self._close_pidfd(watched)
            self._finish_if_done(watched)
        except Exception:
            log.exception("processes: cannot clean up after pid %d", watched.proc.pid)

    def _finish_if_done(self, watched: _Watched) -> None:
        if watched.exited and (watched.released or not watched.pipe_open):
            self._finish(watched)

    def _finish(self, watched: _Watched) -> None:
        if watched.pipe_open:
            self._drain(watched)
            self._close_pipe(watched)
        if not watched.exited:
            self._close_pidfd(watched)
            watched.proc.poll()  # reaps it if it has exited (keter is closing)
        watched.capture.flush()
        self._logs.release(watched.capture.applog)
        del self._watched[watched.key]
        if watched.budget is not None:
            watched.budget.runs -= 1
            if not watched.budget.runs:
                del self._budgets[watched.capture.app]

    def _finish_all(self) -> None:
        for watched in list(self._watched.values()):
            try:
                self._finish(watched)
            except Exception:
                log.exception("processes: cannot finish the output of pid %d", watched.proc.pid)

    def _close_pipe(self, watched: _Watched) -> None:
        if watched.pipe_open:
            watched.pipe_open = False
            if watched.paused_until is None:  # a paused pipe is not in the selector
                self._selector.unregister(watched.fd)
            assert watched.proc.stdout is not None
            watched.proc.stdout.close()

    def _close_pidfd(self, watched: _Watched) -> None:
        if not watched.exited:
            watched.exited = True
            self._selector.unregister(watched.pidfd)
            os.close(watched.pidfd)


def _refill(budget: _Budget) -> float:
    """Bring ``budget`` up to date (what the rate gave back since); returns now."""
    now = time.monotonic()
    elapsed = now - budget.counted_at
    budget.tokens = min(OUTPUT_BURST, budget.tokens + elapsed * OUTPUT_RATE)
    budget.counted_at = now
    return now


def exit_status(pidfd: int) -> int:
    """The exited process's status as Popen's returncode, without reaping it.

    A leader's pid is its process group's id. Reaped, the number is free for any new
    process as soon as the group has no member left, which an app empties while it
    still runs (a child that calls setsid() stays in the cgroup, not in the group):
    keter's next SIGKILL to the group would then reach a stranger's new session. The
    zombie keeps the number until the monitor, done with the group, reaps it
    (``Popen.poll`` in its ``_release_run``).
    """
    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
    if info is None:  # not exited after all (WNOHANG is not set: cannot happen)
        raise ChildProcessError("the process has not exited")
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # killed by (or dumped core on) signal si_status


def read_once(capture: OutputCapture, fd: int) -> int | bool | None:
    """One chunk from a non-blocking pipe into the log.

    What it cost (bytes read, and ``LINE_COST`` a line), None when there are none
    right now, False at end of file.
    """
    try:
        data = os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None
    if not data:
        return False
    capture.feed(data)
    return len(data) + LINE_COST * data.count(b"\n")


def drain(capture: OutputCapture, fd: int, allowance: float) -> tuple[bool, int, int]:
    """Read what the pipe holds right now without waiting: (False at end of file, what
    was logged cost, as ``read_once`` counts, bytes dropped).

    Chunks are logged while what they cost stays within ``allowance`` (one at least
    if any is left); of the rest only the last chunk's whole lines, the last words:
    reading without logging costs next to nothing. Reads at most the largest pipe
    buffer: enough for everything a dead leader wrote, and a chatty grandchild
    cannot keep the reader here.
    """
    cost, dropped, last, open_ = 0, 0, b"", True
    for _ in range(MAX_PIPE_BUFFER // READ_CHUNK):
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            break
        if not data:
            open_ = False
            break
        if cost < allowance:
            capture.feed(data)
            cost += len(data) + LINE_COST * data.count(b"\n")
        else:
            dropped += len(last)
            last = data
    if dropped:
        capture.flush()  # what came before the gap stays a line of its own
        cut = last.find(b"\n") + 1
        dropped, last = dropped + cut, last[cut:]
    capture.feed(last)
    return open_, cost, dropped
