"""Knowing when nginx's retiring workers have stopped accepting connections.

On a reload nginx's master starts workers with the new config, waits about
100 ms, and only then tells the old workers to stop; each old worker then
closes its copies of the listening sockets and finishes what it holds. Until
it has closed them, a fresh connection may still land on it and be served by
the old config. So "nginx serves the new generation" (one answer from a new
worker) is not yet "every new connection gets the new config".

Nothing in nginx reports that moment, but Linux shows it: a worker still
accepting holds one of the master's listening sockets among its open files
(``/proc/PID/fd``). ``Retiring`` notes nginx's workers before a reload and,
after it, tells which of them still hold a listening socket; the writer waits
(on its stop event, with a deadline) until none does.

Everything here reads ``/proc`` (and asks ``keter.sockdiag`` which sockets
listen), and fails soft: a process that is gone
is not accepting, and when the master cannot be found the writer is told so
(``Retiring.known`` is False) and does not wait.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from keter import sockdiag

PROC = Path("/proc")


def master_of(worker: int) -> int | None:
    """The parent of a worker process (nginx's master), or None if it is gone."""
    stat = _stat(worker)
    return int(stat[1]) if stat is not None else None


def children(pid: int) -> set[int]:
    """The child processes of ``pid`` (nginx's workers, cache manager, ...)."""
    try:
        text = (PROC / str(pid) / "task" / str(pid) / "children").read_text()
    except OSError:
        return set()
    return {int(word) for word in text.split()}


def started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None if it is gone)."""
    stat = _stat(pid)
    return int(stat[19]) if stat is not None else None


def now_ticks() -> int:
    """The current time in the same clock ticks since boot as ``started``."""
    return uptime_ticks((PROC / "uptime").read_text().split()[0], os.sysconf("SC_CLK_TCK"))


def uptime_ticks(uptime: str, hz: int) -> int:
    """/proc/uptime's seconds ("1024.09", hundredths) in clock ticks, exactly: through a
    float, one time in twenty came out a tick low, and a worker started in the tick
    before a reload counted as started after it."""
    whole, _, hundredths = uptime.partition(".")
    return int(whole) * hz + int(hundredths.ljust(2, "0")[:2]) * hz // 100


def listening_sockets(master: int, ports: Iterable[int]) -> set[str]:
    """The socket inodes ("socket:[N]") of the TCP sockets listening on ``ports``
    that ``master`` holds.

    Only nginx's own ports are asked about, not every listening socket: those
    include every app's (a thousand on a big host), and nginx's are enough, since
    a retiring worker closes all its listening sockets at once.
    """
    inodes = {listener.inode for port in set(ports) for listener in sockdiag.listeners(port)}
    return {f"socket:[{inode}]" for inode in inodes} & _sockets(master)


def is_master(pid: int) -> bool:
    """Whether ``pid`` is an nginx master process (it retitles itself so)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().startswith(b"nginx: master process")
    except OSError:
        return False


def holds_any(pid: int, sockets: set[str]) -> bool:
    """Whether ``pid`` has one of ``sockets`` among its open files."""
    return bool(_sockets(pid) & sockets)


@dataclass
class Retiring:
    """nginx's workers as they were just before a reload."""

    master: int | None
    ports: frozenset[int]  # the ports nginx listens on
    before: set[int] = field(default_factory=set)  # the master's children then
    at: int = 0  # clock ticks when the reload was sent

    @classmethod
    def before_reload(cls, master: int | None, ports: Iterable[int]) -> Retiring:
        """Note the workers of ``master`` (the last known one; None if none yet),
        which listens on ``ports``."""
        if master is not None and not is_master(master):
            master = None  # nginx was restarted: its new master is learnt after the reload
        before = children(master) if master else set()
        return cls(master=master, ports=frozenset(ports), before=before, at=now_ticks())

    def in_a_later_tick(self) -> bool:
        """Whether a clock tick has begun since ``at`` (if so, ``at`` moves to it).

        Until the master is known, the workers from before a reload are told from
        the new ones only by their start tick, and nginx answers within
        milliseconds of its start: its first workers may have started in the very
        tick the reload is sent in. Sending it in a later tick (the writer waits
        for this, at most 10 ms) keeps them older than ``at``.
        """
        now = now_ticks()
        if now > self.at:
            self.at = now
            return True
        return False

    def replaced(self) -> bool:
        """Whether new workers run and none from before the reload accepts any more."""
        if self.master is None:
            return False
        return bool(children(self.master) - self.before) and not self.still_accepting()

    def after_reload(self, new_worker: int | None) -> None:
        """Learn the master from a worker that serves the new config."""
        master = master_of(new_worker) if new_worker else None
        if master is not None and master != self.master:
            # nginx was restarted since the last reload (or this is the first): its
            # workers from before ours are told apart by when they started.
            self.master, self.before = master, set()

    def older(self, worker: int) -> bool:
        """Whether ``worker`` ran before the reload (it serves the config from before);
        False for 0, a worker nginx did not name, and for a pid that is no nginx worker
        here: nginx in another PID namespace names its own pids, which here are other
        processes' (judged by their start, every reload had failed)."""
        if not worker:
            return False
        if worker in self.before:
            return True
        parent = master_of(worker)
        if parent is None or (parent != self.master and not is_master(parent)):
            return False
        begun = started(worker)
        return begun is not None and begun < self.at

    @property
    def known(self) -> bool:
        return self.master is not None

    def still_accepting(self) -> list[int]:
        """The workers from before the reload that still hold a listening socket."""
        if self.master is None:
            return []
        listening = listening_sockets(self.master, self.ports)
        old = set(self.before)
        old.update(child for child in children(self.master) if self.older(child))
        return sorted(pid for pid in old if holds_any(pid, listening))


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 is index 0)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or ")".
    return text[text.rindex(")") + 2 :].split()


def _sockets(pid: int) -> set[str]:
    found = set()
    folder = PROC / str(pid) / "fd"
    try:
        entries = os.listdir(folder)
    except OSError:
        return found
    for entry in entries:
        with contextlib.suppress(OSError):
            target = os.readlink(folder / entry)
            if target.startswith("socket:["):
                found.add(target)
    return found
