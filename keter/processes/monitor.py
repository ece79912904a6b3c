"""The process monitor: starts, health-checks, restarts and stops app processes.

Each deploy (``deploy_id``) has one entry with an explicit state machine
(``ProcessState``, transitions in ``keter.processes.states``). A process is
always started in its own session, so "the app" is a process group: signals go
to the whole group and the app only counts as stopped when nothing of the group
is left (a shell wrapper's grandchildren may hold the port after the wrapper
died).

Nothing here blocks the actor's loop, which manages every app:

* Spawns run in a small pool (``_Spawned`` comes back): a spawn waits for the
  child's exec, and spawns must not wait on each other. While a deploy's
  spawn is in flight nothing else happens to it; a stop is carried out once
  the spawn is done.
* What a stopped process leaves (its /tmp, of any size, and its app's IPC
  objects) is deleted by ONE reaper thread (``keter.processes.reaper``), which
  no spawn and no stop waits for.
* Exit detection and output capture run in ONE output reader thread for all
  apps (``keter.processes.reader``: a selector on every output pipe and a
  pidfd per process), which posts ``_Exited``.
* Health probes run in ONE prober thread for all apps (``keter.processes.health``:
  a non-blocking socket per probe in a selector, so a slow app delays no other
  app's probes); results come back as ``_ProbeDone``.
* Every delay (probe interval, backoff, drain, kill escalation) is a timer
  message from ``Actor.schedule``.

What the supervisor hears about a deploy: ``ProcessStarted`` and (once it
answers) ``ProcessHealthy``, each once; ``ProcessStateChanged`` on every
transition, restarts included (a restart keeps the port, so nothing else
changes). A first start that fails is stopped, then reported as
``ProcessFailed``; every deploy ends with exactly one ``ProcessStopped``.

One-shot processes (``RunOnce``: a release command) use the same entries,
spawn, records and stop path, without health check or restart: spawned
(STARTING, then RUNNING at once), and when the leader exits, at their timeout
or on ``StopProcess``, their whole group is stopped (STOPPING -> EXITED) and
they are reported once, as ``RunFinished`` with the exit status and the last
lines of output.

A process that leaves the group (``setsid``, a daemon's double fork) escapes
``killpg`` but not the deploy's cgroup (``keter.processes.cgroups``): stopping
a deploy ends with ``cgroup.kill``, so nothing of it survives. Without a
writable cgroup v2 hierarchy (said once at start) such a process cannot be
stopped: keter names one that still holds the app's port once the group is
gone, and the port pool skips a port that is still bound.

Each process's cgroup also gets a bind guard (``keter.processes.bindguard``,
where the kernel allows it: checked once at start) before its first run: of
``port-range`` its processes may bind only the port keter gave it, so no app
can squat the ports keter hands to others. A process moved to another port
(``MoveProcess``) has its guard replaced before its restart.
"""

from __future__ import annotations

import logging
import os
import pwd
import queue
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil

from keter import sockdiag
from keter.actor import Actor
from keter.limits import DEFAULTS, Limits
from keter.messages import (
    Component,
    FailureKind,
    MoveProcess,
    ProcessFailed,
    ProcessHealthy,
    ProcessPortTaken,
    ProcessSpec,
    ProcessStarted,
    ProcessState,
    ProcessStateChanged,
    ProcessStopped,
    RunFinished,
    RunOnce,
    StartProcess,
    StopProcess,
    message,
)
from keter.processes import bindguard
from keter.processes.applog import AppLog, LogRegistry, OutputCapture
from keter.processes.cgroups import Cgroup, Cgroups
from keter.processes.controllers import Controllers, DeployLimits, oom_reason
from keter.processes.groups import KILL_WAIT, group_members, signal_group, stop_groups
from keter.processes.health import Prober
from keter.processes.ports import port_is_free, socket_pids, user_pids
from keter.processes.private import Private, PrivateStart, remove_ipc
from keter.processes.reader import FAILURE_TAIL, OutputReader
from keter.processes.reaper import Reaper
from keter.processes.records import Record, Records
from keter.processes.spawn import Identity, SpawnError, spawn
from keter.processes.states import backoff_delay, check_transition, describe_exit
from keter.threadnames import name_this_thread
from keter.users import AppUsers, NoFreeUid

log = logging.getLogger(__name__)

CRASH_TAIL = 10  # output lines logged when a running app crashes
PROBE_FIRST_INTERVAL = 0.01
PROBE_MAX_INTERVAL = 0.25
GONE_FIRST_POLL = 0.01  # polling for a group's stragglers after its leader died
GONE_MAX_POLL = 0.2
REAPER_GRACE = 2.0  # seconds keter's stop waits for the reaper; the next start sweeps the rest


# -- private messages (timers and reports from this actor's own threads) --------------


@message
class _Probe:
    """Time for the next health probe."""

    deploy_id: int
    run: int


@message
class _ProbeDone:
    deploy_id: int
    run: int
    healthy: bool
    detail: str


@message
class _HealthDeadline:
    deploy_id: int
    run: int


@message
class _Exited:
    """The group leader exited and was reaped (posted by the reader thread)."""

    deploy_id: int
    run: int
    returncode: int
    tail: tuple[str, ...]


@message
class _Spawned:
    """A spawn handed to the spawn pool has finished (started, or failed)."""

    deploy_id: int


@message
class _Restart:
    deploy_id: int
    run: int


@message
class _BeginStop:
    """A StopProcess's drain delay is over."""

    deploy_id: int


@message
class _Escalate:
    """stop_timeout after SIGTERM: SIGKILL whatever is left."""

    deploy_id: int
    run: int


@message
class _CheckGone:
    deploy_id: int
    run: int


@message
class _OnceTimeout:
    """A one-shot process's timeout is over."""

    deploy_id: int
    run: int


# -- per-deploy bookkeeping -----------------------------------------------------------


@dataclass(eq=False)
class _Run:
    """One spawned incarnation of a deploy (a restart makes a new one)."""

    deploy_id: int
    number: int
    proc: subprocess.Popen
    create_time: float
    capture: OutputCapture
    exited: bool = False
    gone: bool = False  # the whole group is known to be gone

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the leader's pid is the group id


@dataclass(eq=False, slots=True)  # one per process: with 1000 apps, slots save ~0.5 MB
class _Entry:
    app: str
    deploy_id: int
    spec: ProcessSpec
    state: ProcessState = ProcessState.EXITED
    run: _Run | None = None
    runs: int = 0
    failures: int = 0  # consecutive crashes, for the backoff
    ever_healthy: bool = False  # False until the first start answered
    running_since: float | None = None
    stop_requested: bool = False
    failure: str | None = None  # why the first start failed
    failure_kind: FailureKind = FailureKind.EXITED
    failure_tail: tuple[str, ...] = ()
    probe_interval: float = PROBE_FIRST_INTERVAL
    last_probe: str = "no probe finished"
    probe_done_at: float = 0.0  # when the last probe finished (or probing began; monotonic)
    gone_poll: float = GONE_FIRST_POLL
    spawning: Future | None = None  # a spawn in the pool; nothing else happens meanwhile
    spawn_log: AppLog | None = None  # the log that spawn will write to
    stop_due: bool = False  # a stop began while spawning: carry it out once spawned
    cgroup: Cgroup | None = None  # every process of the deploy, when cgroups are available
    limits: Limits = DEFAULTS  # what it runs under (app-limits merged with its own)
    limit_groups: DeployLimits | None = None  # its v1/v2 groups carrying out limits
    guarded: tuple[int, ...] | None = None  # the ports its cgroup's bind guard allows
    oom_kills: int | None = None  # its OOM kill count when its current run started
    probing: bool = False  # a health probe is out
    # The timer of its current state (the health deadline while STARTING, a one-shot's
    # timeout while RUNNING, SIGKILL's while STOPPING): cancelled when the state changes,
    # so it never wakes the monitor for nothing.
    state_timer: int | None = None
    moving: bool = False  # a stranger took its port: waiting (BACKOFF) for MoveProcess
    exit_pending: _Exited | None = None  # the leader exited while a probe was out
    # One-shot processes (RunOnce) only: its timeout, and how it ended.
    once_timeout: float | None = None
    returncode: int | None = None
    exit_reason: str | None = None  # how its leader ended ("killed by the OOM killer ...")
    timed_out: bool = False


@dataclass(eq=False)
class _Launched:
    """What a spawn in the pool made (``ProcessMonitor._launch``): the process, or why
    not, and the deploy's groups either way."""

    cgroup: Cgroup | None
    limit_groups: DeployLimits | None
    guarded: tuple[int, ...] | None = None  # the ports its bind guard allows, if set now
    oom_kills: int | None = None
    proc: subprocess.Popen | None = None
    create_time: float = 0.0
    error: str | None = None


# -- the actor ------------------------------------------------------------------------


class ProcessMonitor(Actor):
    """Runs every app process; see the module docstring for the design."""

    def __init__(
        self,
        *,
        report_to: queue.Queue,
        run_dir: Path,
        health_check_timeout: float,
        stop_timeout: float,
        log_max_bytes: int,
        log_backups: int,
        probe_timeout: float = 1.0,
        backoff_base: float = 0.025,
        backoff_cap: float = 60.0,
        backoff_reset: float = 10.0,
        spawn_workers: int = 4,
        limits: Limits = DEFAULTS,
        users: AppUsers | None = None,
        app_groups: tuple[int, ...] = (),
        cgroups: Cgroups | None = None,
        controllers: Controllers | None = None,
        port_range: tuple[int, int] | None = None,
        private: Private | None = None,
    ) -> None:
        """``limits`` are app-limits' defaults; ``controllers`` where each limit is carried
        out (None: by rlimits only); ``port_range`` the ports keter hands out, which an
        app may not bind unless they are its own (None: no bind guard); ``private`` where
        each process's own /tmp is kept and how it gets its namespaces (None: the
        machine's /tmp, /dev/shm and IPC)."""
        super().__init__(Component.PROCESSES, report_to)
        self.run_dir = Path(run_dir)
        self.health_check_timeout = health_check_timeout
        self.stop_timeout = stop_timeout
        self.probe_timeout = probe_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.backoff_reset = backoff_reset  # RUNNING this long forgives earlier crashes
        self._logs = LogRegistry(log_max_bytes, log_backups)
        self._reader = OutputReader(self._logs, self._exited)
        self._prober = Prober(self._probe_done)
        # Spawning waits for the child's exec; in a pool, spawns overlap and the
        # monitor's loop never waits for one.
        self._spawner = ThreadPoolExecutor(
            spawn_workers, thread_name_prefix="keter-spawn", initializer=name_this_thread
        )
        self._reaper = Reaper()
        # Per app, the IPC clean-up the reaper was asked for: set to call it off.
        self._ipc_pending: dict[str, threading.Event] = {}
        self._entries: dict[int, _Entry] = {}
        self._records = Records(self.run_dir)
        self._kill_now = threading.Event()  # set by kill_now(): no grace period any more
        self._random = random.Random()
        self.limits = limits
        self.controllers = controllers or Controllers()
        # Each app's own uid and gid (None: apps run as keter, or as spec.user).
        self.users = users
        self.app_groups = app_groups  # supplementary groups every app user gets
        self._cgroups = cgroups
        self.port_range = port_range
        self._guarding = False  # decided at start (_check_guard)
        self.private = private

    # -- lifecycle --------------------------------------------------------------------

    def on_start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._records.stop_leftovers(self.stop_timeout)
        self._say_limits()
        if self._cgroups is None:
            log.warning(
                "processes: no cgroup v2 hierarchy keter can write to: apps are contained by "
                "process groups only, so a process that leaves its group (setsid, a daemon's "
                "double fork) survives its app"
            )
        else:
            for cgroup in self._cgroups.leftovers():
                if cgroup.populated():
                    log.warning("processes: stopping what a previous keter left in %s", cgroup.path)
                    cgroup.kill()
                    cgroup.wait_empty(KILL_WAIT)
                cgroup.remove()
        self.controllers.sweep()
        self._check_guard()
        if self.private is not None:
            self.private.check()
            # Renamed away now, deleted by the reaper: an app's leftovers may be large.
            if swept := self.private.sweep():
                self._reaper.submit(
                    "processes: removing what an earlier keter left in ROOT/run/tmp",
                    partial(self.private.remove_swept, swept),
                )
        self._remove_all_apps_ipc("a previous keter's")

    def _check_guard(self) -> None:
        """Once at start: whether each deploy's cgroup gets a bind guard, said in one line."""
        if self.port_range is None:
            return
        low, high = self.port_range
        if self._cgroups is None:
            why: str | None = "no cgroup v2 hierarchy"
        else:
            why = bindguard.unavailable(self._cgroups.base, self.port_range)
        if why is None:
            self._guarding = True
            log.info(
                "processes: bind guard on: an app binds no port of %d-%d but its own (cgroup BPF)",
                low,
                high,
            )
            return
        log.warning(
            "processes: no bind guard (%s): an app may bind any free port of %d-%d, so one "
            "app can take the ports keter hands to others",
            why,
            low,
            high,
        )

    def _say_limits(self) -> None:
        """Once at start: every app's default limits, and how each is carried out."""
        if self.controllers.fallbacks():
            log.warning(
                "processes: app limits: %s; without a cgroup controller memory and processes "
                "are rlimits (per process, per user) and cpu is not limited",
                self.controllers.describe(self.limits),
            )
        else:
            log.info("processes: app limits: %s", self.controllers.describe(self.limits))

    def kill_now(self) -> None:
        """From another thread: keter must stop at once (a second SIGTERM, or the monitor
        itself is stuck). SIGKILLs every recorded app process group; a shutdown still
        waiting out the grace period goes on to SIGKILL too."""
        self._kill_now.set()
        self._records.kill_running()
        if self._cgroups is not None:
            for cgroup in self._cgroups.leftovers():  # daemons that left their group too
                cgroup.kill()

    def on_stop(self) -> None:
        """Keter is shutting down: stop every process in parallel and wait for all."""
        self._spawner.shutdown(wait=True)  # spawns take milliseconds (nothing else is there)
        entries = list(self._entries.values())
        for entry in entries:
            if entry.spawning is not None:
                self._take_spawn(entry)
        runs = [e.run for e in entries if e.run is not None and not e.run.gone]
        if runs:
            labels = {e.run.pgid: f"{e.app}: pid {e.run.pid}" for e in entries if e.run in runs}
            stop_groups(labels, self.stop_timeout, self._kill_now)
        cgroups = [e.cgroup for e in entries if e.cgroup is not None]
        for cgroup in cgroups:
            cgroup.kill()  # whatever left the process groups
        for cgroup in cgroups:
            cgroup.wait_empty(KILL_WAIT)
            cgroup.remove()
        if self._cgroups is not None:
            self._cgroups.remove()
        for entry in entries:
            if entry.limit_groups is not None:
                entry.limit_groups.remove()
            self._remove_private(entry)
        self.controllers.remove()
        for run in runs:
            self._release_run(run)
        self._remove_all_apps_ipc("keter is shutting down")  # once their leaders are reaped
        self._reader.close(timeout=KILL_WAIT)
        for entry in entries:
            log.info("%s: stopped (keter is shutting down)", entry.app)
            self.report(ProcessStopped(app=entry.app, deploy_id=entry.deploy_id))
        self._entries.clear()
        self._prober.close(timeout=KILL_WAIT)
        self._reaper.close(timeout=REAPER_GRACE)

    # -- messages ---------------------------------------------------------------------

    def handle(self, message: object) -> None:
        match message:
            case StartProcess():
                self._start(message)
            case RunOnce():
                self._start_once(message)
            case _OnceTimeout():
                if entry := self._current(message.deploy_id, message.run, ProcessState.RUNNING):
                    entry.timed_out = True
                    self._terminate(entry, f"did not finish within {entry.once_timeout:g}s")
            case StopProcess():
                self._stop_requested(message)
            case _Probe() | _ProbeDone() | _HealthDeadline() as msg:
                if entry := self._current(msg.deploy_id, msg.run, ProcessState.STARTING):
                    self._on_health(entry, msg)
            case MoveProcess():
                self._move(message)
            case _Spawned():
                if (entry := self._entries.get(message.deploy_id)) and entry.spawning:
                    self._on_spawned(entry)
            case _Exited():
                self._on_exited(message)
            case _Restart():
                if entry := self._current(message.deploy_id, message.run, ProcessState.BACKOFF):
                    self._restart(entry)
            case _BeginStop():
                if entry := self._entries.get(message.deploy_id):
                    self._begin_stop(entry)
            case _Escalate():
                if entry := self._current(message.deploy_id, message.run, ProcessState.STOPPING):
                    self._escalate(entry)
            case _CheckGone():
                if entry := self._current(message.deploy_id, message.run, ProcessState.STOPPING):
                    self._check_gone(entry)
            case _:
                self.unexpected(message)

    def _current(self, deploy_id: int, run: int, state: ProcessState) -> _Entry | None:
        """The entry, if a private message about it is not stale."""
        entry = self._entries.get(deploy_id)
        if entry is None or entry.state is not state or entry.runs != run:
            return None
        return entry

    # -- starting ---------------------------------------------------------------------

    def _start(self, msg: StartProcess) -> None:
        if msg.deploy_id in self._entries:
            log.error(
                "%s: deploy %d is already running; StartProcess ignored", msg.app, msg.deploy_id
            )
            return
        entry = _Entry(app=msg.app, deploy_id=msg.deploy_id, spec=msg.spec)
        self._add(entry)
        self._spawn(entry)

    def _add(self, entry: _Entry) -> None:
        """A new process of the app: an IPC clean-up of the app that the reaper has not
        done yet is called off (the objects it would remove may soon be this one's)."""
        self._entries[entry.deploy_id] = entry
        if (pending := self._ipc_pending.pop(entry.app, None)) is not None:
            pending.set()

    def _spawn(self, entry: _Entry) -> None:
        """Hand a new run of ``entry`` to the spawn pool; ``_Spawned`` follows.

        Only the decisions happen here; the slow parts (the deploy's cgroup and limit
        groups, the exec chain, its record) run in the pool (``_launch``): each is a
        few system calls that block on the kernel's cgroup locks, and this loop
        serves every app.
        """
        spec = entry.spec
        if spec.port is not None and not port_is_free(spec.port):
            stranger = self._port_stranger(entry) if entry.ever_healthy else None
            if stranger:
                self._port_taken(entry, stranger)
            else:
                self._spawn_failed(entry, f"port {spec.port} is already in use")
            return
        try:
            entry.spawn_log = self._logs.acquire(spec.log_path)
        except OSError as exc:
            self._spawn_failed(entry, f"cannot open log {spec.log_path}: {exc.strerror or exc}")
            return
        identity = None
        if spec.user is None and self.users is not None:
            try:
                uid = self.users.uid(entry.app)
            except (OSError, NoFreeUid) as exc:
                self._logs.release(entry.spawn_log)
                entry.spawn_log = None
                self._spawn_failed(entry, f"no user of its own: {exc}")
                return
            identity = Identity(uid, uid, self.app_groups)
        if entry.limit_groups is None:
            entry.limits = self.limits.merged(spec.limits)
        entry.spawning = self._spawner.submit(
            self._launch,
            entry.app,
            entry.deploy_id,
            spec,
            entry.limits,
            identity,
            entry.cgroup,
            entry.limit_groups,
            self._guard_wanted(entry),
        )
        deploy_id = entry.deploy_id
        entry.spawning.add_done_callback(lambda _: self.tell(_Spawned(deploy_id=deploy_id)))

    def _guard_wanted(self, entry: _Entry) -> tuple[int, ...] | None:
        """The ports the entry's bind guard must allow from its next run on, if its cgroup
        does not have that guard yet (its first run, or it moved to another port)."""
        if not self._guarding:
            return None
        wanted = () if entry.spec.port is None else (entry.spec.port,)
        return None if wanted == entry.guarded else wanted

    def _launch(
        self,
        app: str,
        deploy_id: int,
        spec: ProcessSpec,
        limits: Limits,
        identity: Identity | None,
        cgroup: Cgroup | None,
        limit_groups: DeployLimits | None,
        guard: tuple[int, ...] | None,
    ) -> _Launched:
        """In the spawn pool: the deploy's groups (on its first run), its bind guard (when
        ``guard`` says which ports), then the process.

        Never raises: whatever it made is in the result, so the monitor owns (and
        removes) it whether or not the process started.
        """
        done = _Launched(cgroup=cgroup, limit_groups=limit_groups)
        if self._cgroups is not None and done.cgroup is None:
            try:
                done.cgroup = self._cgroups.for_deploy(app, deploy_id)
            except OSError as exc:
                done.error = f"cannot create its cgroup: {exc.strerror or exc}"
                return done
        if guard is not None and done.cgroup is not None:
            assert self.port_range is not None
            try:
                bindguard.guard(done.cgroup.path, self.port_range, guard)
            except OSError as exc:
                # Not started unguarded: keter checked at start that guards work, and an
                # old guard would refuse the app its new port anyway. A restart retries.
                done.error = f"cannot guard its ports: {exc.strerror or exc}"
                return done
            done.guarded = guard
        if done.limit_groups is None:
            try:
                done.limit_groups = self.controllers.for_deploy(app, deploy_id, done.cgroup)
                done.limit_groups.apply(limits)
            except OSError as exc:
                done.error = f"cannot set its limits: {exc.strerror or exc}"
                return done
        done.oom_kills = done.limit_groups.oom_kills()
        private = None
        if self.private is not None:
            private = PrivateStart(self.private, private_name(app, deploy_id), limits.memory)
        try:
            done.proc = spawn(
                spec,
                self.controllers.rlimits(limits),
                identity=identity,
                cgroup=done.cgroup,
                join=done.limit_groups.procs(),
                private=private,
            )
        except SpawnError as exc:
            done.error = str(exc)
            return done
        except Exception as exc:  # a bug fails this start, not the monitor every app needs
            log.exception("%s: deploy #%d: starting it failed", app, deploy_id)
            done.error = f"internal error while starting it: {type(exc).__name__}"
            return done
        try:
            done.create_time = psutil.Process(done.proc.pid).create_time()
        except psutil.NoSuchProcess:
            done.create_time = 0.0
        self._records.add(
            Record(
                pid=done.proc.pid,
                pgid=done.proc.pid,  # start_new_session: the leader's pid is the group id
                create_time=done.create_time,
                app=app,
                deploy_id=deploy_id,
            )
        )
        return done

    def _on_spawned(self, entry: _Entry) -> None:
        first = entry.run is None
        error = self._take_spawn(entry)
        if error:
            self._spawn_failed(entry, error)
        elif entry.once_timeout is not None:
            self._once_spawned(entry)
        elif first:
            assert entry.run is not None
            self.report(
                ProcessStarted(
                    app=entry.app,
                    deploy_id=entry.deploy_id,
                    pid=entry.run.pid,
                    port=entry.spec.port,
                )
            )
            self._transition(entry, ProcessState.STARTING, self._where(entry))
            self._await_health(entry)
        else:
            self._transition(entry, ProcessState.STARTING, self._where(entry))
            self._await_health(entry)
        if entry.stop_due and self._entries.get(entry.deploy_id) is entry:
            entry.stop_due = False
            self._begin_stop(entry)

    def _take_spawn(self, entry: _Entry) -> str | None:
        """The finished spawn becomes the entry's run (watched, recorded); or why it failed."""
        future, entry.spawning = entry.spawning, None
        applog, entry.spawn_log = entry.spawn_log, None
        assert future is not None and applog is not None
        launched = future.result()  # _launch never raises
        # The groups are the entry's even if the process did not start: they go with it.
        entry.cgroup, entry.limit_groups = launched.cgroup, launched.limit_groups
        if launched.guarded is not None:
            entry.guarded = launched.guarded
        if launched.proc is None:
            self._logs.release(applog)
            return launched.error or "not started"
        entry.oom_kills = launched.oom_kills
        entry.runs += 1
        run = _Run(
            deploy_id=entry.deploy_id,
            number=entry.runs,
            proc=launched.proc,
            create_time=launched.create_time,
            capture=OutputCapture(entry.app, applog),
        )
        entry.run = run
        self._reader.watch(run, launched.proc, run.capture)
        return None

    def _spawn_failed(self, entry: _Entry, error: str) -> None:
        if entry.run is not None:  # a restart: try again later
            log.error("%s: restart failed: %s", entry.app, error)
            self._back_off(entry, error)
            return
        entry.failure = error
        # The supervisor logs the failed deploy with this reason; once is enough.
        log.debug("%s: deploy %d could not start: %s", entry.app, entry.deploy_id, error)
        self._transition(entry, ProcessState.FATAL, error)
        del self._entries[entry.deploy_id]
        self._remove_groups(entry)  # nothing ever ran in them
        self._ended(entry)
        if entry.once_timeout is not None:
            self.report(
                RunFinished(app=entry.app, deploy_id=entry.deploy_id, returncode=None, reason=error)
            )
            return
        self.report(
            ProcessFailed(
                app=entry.app, deploy_id=entry.deploy_id, reason=error, kind=FailureKind.SPAWN
            )
        )
        self.report(ProcessStopped(app=entry.app, deploy_id=entry.deploy_id))

    def _await_health(self, entry: _Entry) -> None:
        spec = entry.spec
        if spec.health is None or spec.port is None:
            self._became_healthy(entry)
            return
        entry.probe_interval = PROBE_FIRST_INTERVAL
        entry.last_probe = "no probe finished"
        entry.probing, entry.exit_pending = False, None
        entry.probe_done_at = time.monotonic()
        self._state_timer(
            entry,
            self._health_timeout(spec),
            _HealthDeadline(deploy_id=entry.deploy_id, run=entry.runs),
        )
        self._probe(entry)

    def _health_timeout(self, spec: ProcessSpec) -> float:
        return self.health_check_timeout if spec.health_timeout is None else spec.health_timeout

    def _probe(self, entry: _Entry) -> None:
        """Probe the deploy's port, unless a process that is not the app listens there.

        A probe is a request like any other: one that connects to a stranger's
        socket has handed it a connection (and the app's health path and Host),
        so the port's owner is asked first. A stranger that binds between this
        check and the probe's connect is still caught when it answers.
        """
        if stranger := self._port_stranger(entry):
            self._stranger_on_port(entry, stranger)
        else:
            self._submit_probe(entry)

    def _submit_probe(self, entry: _Entry) -> None:
        spec = entry.spec
        assert spec.health is not None and spec.port is not None
        self._prober.probe(
            (entry.deploy_id, entry.runs), spec.port, spec.health, self.probe_timeout
        )
        entry.probing = True

    def _probe_done(self, key: object, healthy: bool, detail: str) -> None:
        """In the prober's thread: the answer goes to the monitor's inbox."""
        deploy_id, run = key
        self.tell(_ProbeDone(deploy_id=deploy_id, run=run, healthy=healthy, detail=detail))

    def _on_health(self, entry: _Entry, msg: _Probe | _ProbeDone | _HealthDeadline) -> None:
        match msg:
            case _Probe():
                self._probe(entry)
            case _ProbeDone(healthy=True) if stranger := self._port_stranger(entry):
                # The answer came from a process that is not the app's.
                entry.probing, entry.exit_pending = False, None
                self._stranger_on_port(entry, stranger)
            case _ProbeDone() if entry.exit_pending is not None:
                # The leader exited while this probe was out: if it answered, it was
                # healthy first (and then crashed); if not, it never answered.
                entry.probing = False
                exited, entry.exit_pending = entry.exit_pending, None
                if msg.healthy:
                    self._became_healthy(entry)
                self._leader_exited(entry, exited)
            case _ProbeDone(healthy=True):
                entry.probing = False
                self._became_healthy(entry)
            case _ProbeDone(detail=detail):
                entry.probing, entry.last_probe = False, detail
                entry.probe_done_at = time.monotonic()
                self.schedule(
                    entry.probe_interval, _Probe(deploy_id=entry.deploy_id, run=entry.runs)
                )
                entry.probe_interval = min(entry.probe_interval * 1.5, PROBE_MAX_INTERVAL)
            case _HealthDeadline() if self._stalled(entry):
                # keter itself did not run for a while (a frozen VM, swapping): the app was
                # not asked meanwhile (a probe out then timed out on the frozen clock), and
                # failing it unasked failed a healthy version. The freeze does not count:
                # one more probing round decides.
                entry.probe_done_at = time.monotonic()
                deadline = _HealthDeadline(deploy_id=entry.deploy_id, run=entry.runs)
                self._state_timer(entry, self._probe_round(), deadline)
                if not entry.probing:
                    self._probe(entry)
            case _HealthDeadline():
                self._not_healthy(entry)

    def _probe_round(self) -> float:
        """The longest a probing round takes: an interval, then a probe's whole timeout,
        and a second of slack."""
        return PROBE_MAX_INTERVAL + self.probe_timeout + 1.0

    def _stalled(self, entry: _Entry) -> bool:
        """Whether no probe of the entry finished for longer than a probing round."""
        return time.monotonic() - entry.probe_done_at > self._probe_round()

    def _not_healthy(self, entry: _Entry) -> None:
        """Its health deadline passed, and the app did not answer."""
        reason = (
            f"did not answer on port {entry.spec.port} within "
            f"{self._health_timeout(entry.spec):g}s (last: {entry.last_probe})"
        )
        if entry.ever_healthy:
            # A restart that never answered is killed, not drained: it served nobody.
            assert entry.run is not None
            self._kill(entry)
            self._crashed(entry, reason, entry.run.capture.tail(CRASH_TAIL))
        else:
            self._fail_start(entry, reason, FailureKind.HEALTH_CHECK)

    def _became_healthy(self, entry: _Entry) -> None:
        self._transition(entry, ProcessState.RUNNING, self._where(entry))
        entry.running_since = time.monotonic()
        if not entry.ever_healthy:
            entry.ever_healthy = True
            self.report(ProcessHealthy(app=entry.app, deploy_id=entry.deploy_id))

    def _fail_start(
        self, entry: _Entry, reason: str, kind: FailureKind = FailureKind.EXITED
    ) -> None:
        """The first start failed: stop what is left of it, then report ProcessFailed."""
        run = entry.run
        assert run is not None
        entry.failure = reason
        entry.failure_kind = kind
        entry.failure_tail = run.capture.tail(FAILURE_TAIL)
        # The supervisor logs the failed deploy with this output; once is enough.
        log.debug("%s: first start of deploy %d failed: %s", entry.app, entry.deploy_id, reason)
        if run.exited:
            self._kill(entry)  # leftovers of a dead leader
            self._transition(entry, ProcessState.STOPPING, reason)
            self._check_gone(entry)
        else:
            self._terminate(entry, reason)

    # -- exits, crashes and restarts ----------------------------------------------------

    def _exited(self, run: object, returncode: int, tail: tuple[str, ...]) -> None:
        """The reader saw a run's leader exit (called in the reader's thread)."""
        assert isinstance(run, _Run)
        self.tell(
            _Exited(deploy_id=run.deploy_id, run=run.number, returncode=returncode, tail=tail)
        )

    def _on_exited(self, msg: _Exited) -> None:
        entry = self._entries.get(msg.deploy_id)
        if entry is None or entry.run is None or entry.run.number != msg.run:
            return
        entry.run.exited = True
        if entry.once_timeout is not None:
            self._once_exited(entry, msg)
            return
        if entry.state is ProcessState.STARTING and entry.probing:
            # A probe is out: its answer may be from before the exit. Decide once it is in.
            entry.exit_pending = msg
            return
        self._leader_exited(entry, msg)

    def _leader_exited(self, entry: _Entry, msg: _Exited) -> None:
        reason, oom = self._exit_reason(entry, msg.returncode)
        match entry.state:
            case ProcessState.STARTING if not entry.ever_healthy:
                kind = FailureKind.OOM if oom else FailureKind.EXITED
                self._fail_start(entry, f"{reason} before answering", kind)
            case ProcessState.STARTING | ProcessState.RUNNING:
                # The leader is gone: kill the rest so no orphan holds the port.
                self._kill(entry)
                if entry.state is ProcessState.STARTING:
                    reason = f"{reason} before answering"
                self._crashed(entry, reason, msg.tail[-CRASH_TAIL:])
            case ProcessState.STOPPING:
                self._check_gone(entry)
            case _:
                pass  # BACKOFF: a killed restart's leader; _restart waits for this

    def _exit_reason(self, entry: _Entry, returncode: int) -> tuple[str, bool]:
        """Why the run's leader died, and whether the OOM killer did it: it died by SIGKILL
        (or a wrapper exited after the OOM killer killed its child) and the deploy's OOM
        kill count rose since the run started."""
        reason = describe_exit(returncode)
        groups, before = entry.limit_groups, entry.oom_kills
        now = groups.oom_kills() if groups is not None else None
        if now is None or before is None or now <= before:
            return reason, False
        entry.oom_kills = now  # counted once
        return oom_reason(entry.limits.memory, returncode), True

    def _crashed(self, entry: _Entry, reason: str, tail: tuple[str, ...]) -> None:
        """A process that had been running died (or a restart of it failed)."""
        entry.running_since, ran_since = None, entry.running_since
        if entry.stop_requested:
            self._transition(entry, ProcessState.STOPPING, f"{reason} while stopping")
            self._check_gone(entry)
            return
        log.error(
            "%s: crashed: %s; last output: %s", entry.app, reason, " | ".join(tail) or "(none)"
        )
        if ran_since is not None and time.monotonic() - ran_since >= self.backoff_reset:
            entry.failures = 0
        self._back_off(entry, reason)

    def _back_off(self, entry: _Entry, reason: str) -> None:
        delay = backoff_delay(
            entry.failures, self.backoff_base, self.backoff_cap, self._random.random()
        )
        # Keter's restart-delay-seconds (background workers) is the least delay, not the
        # only one: at 0, 63 workers exiting at once had keter spawn 344 processes a
        # second and write 1,371 log lines a second, for as long as they ran.
        if entry.spec.restart_delay is not None:
            delay = max(delay, entry.spec.restart_delay)
        entry.failures += 1
        detail = f"{reason}; restarting in {delay:.3f}s"
        self._transition(entry, ProcessState.BACKOFF, detail, failed=True)
        self.schedule(delay, _Restart(deploy_id=entry.deploy_id, run=entry.runs))

    def _restart(self, entry: _Entry) -> None:
        old = entry.run
        assert old is not None
        if not old.exited or self._left(entry):
            # Still dying from the SIGKILL: the port is not free yet. Look again soon.
            self._kill(entry)
            self.schedule(entry.gone_poll, _Restart(deploy_id=entry.deploy_id, run=entry.runs))
            entry.gone_poll = min(entry.gone_poll * 2, GONE_MAX_POLL)
            return
        entry.gone_poll = GONE_FIRST_POLL
        self._release_run(old)
        self._spawn(entry)

    # -- stopping ---------------------------------------------------------------------

    def _stop_requested(self, msg: StopProcess) -> None:
        entry = self._entries.get(msg.deploy_id)
        if entry is None:
            # Already gone (or never started): stopping is idempotent.
            self.report(ProcessStopped(app=msg.app, deploy_id=msg.deploy_id))
            return
        entry.stop_requested = True
        if entry.state is ProcessState.BACKOFF or msg.delay <= 0:
            # Nothing is being served from BACKOFF, so there is nothing to drain.
            self._begin_stop(entry)
        else:
            self.schedule(msg.delay, _BeginStop(deploy_id=msg.deploy_id))

    def _begin_stop(self, entry: _Entry) -> None:
        if entry.spawning is not None:
            entry.stop_due = True  # _on_spawned carries it out
            return
        match entry.state:
            case ProcessState.STARTING | ProcessState.RUNNING:
                self._terminate(entry, "stop requested")
            case ProcessState.BACKOFF:
                self._transition(entry, ProcessState.STOPPING, "stop requested; restart cancelled")
                self._check_gone(entry)
            case _:
                pass  # already stopping

    def _terminate(self, entry: _Entry, why: str) -> None:
        run = entry.run
        assert run is not None
        entry.running_since = None
        signal_group(run.pgid, signal.SIGTERM)
        if entry.cgroup is not None:
            entry.cgroup.signal(signal.SIGTERM)  # what left the group gets its grace too
        self._transition(entry, ProcessState.STOPPING, f"{why}; sent SIGTERM to group {run.pgid}")
        self._state_timer(
            entry, self.stop_timeout, _Escalate(deploy_id=entry.deploy_id, run=entry.runs)
        )
        if run.exited:
            # The leader's exit came while a probe was out and waited for its answer,
            # which a stopping deploy never takes: no other _Exited will finish the stop.
            entry.probing, entry.exit_pending = False, None
            self._check_gone(entry)

    def _escalate(self, entry: _Entry) -> None:
        run = entry.run
        assert run is not None
        if not run.exited or self._left(entry):
            log.warning(
                "%s: still running %gs after SIGTERM; sending SIGKILL to group %d",
                entry.app,
                self.stop_timeout,
                run.pgid,
            )
            self._kill(entry)

    def _check_gone(self, entry: _Entry) -> None:
        """Finish the stop once the leader was reaped and nothing of its group is left."""
        run = entry.run
        if run is not None and not run.exited:
            return  # its _Exited will call us again
        if run is not None and self._left(entry):
            # Stragglers have no pidfd here to wake us; poll, briefly, with backoff.
            self.schedule(entry.gone_poll, _CheckGone(deploy_id=entry.deploy_id, run=entry.runs))
            entry.gone_poll = min(entry.gone_poll * 2, GONE_MAX_POLL)
            return
        if run is not None:
            self._release_run(run)
            self._warn_if_port_held(entry)
        self._remove_groups(entry)
        final = ProcessState.FATAL if entry.failure else ProcessState.EXITED
        self._transition(entry, final, entry.failure or "stopped")
        del self._entries[entry.deploy_id]
        self._ended(entry)
        if entry.once_timeout is not None:
            self.report(self._once_finished(entry))
            return
        if entry.failure:
            self.report(
                ProcessFailed(
                    app=entry.app,
                    deploy_id=entry.deploy_id,
                    reason=entry.failure,
                    kind=entry.failure_kind,
                    output_tail=entry.failure_tail,
                )
            )
        self.report(ProcessStopped(app=entry.app, deploy_id=entry.deploy_id))

    def _close_apps_listeners(self, entry: _Entry, port: int) -> int:
        """Close what processes of keter's apps still listen on the stopped deploy's port.

        The deploy's own processes are gone: such a socket was handed on (a newer
        version took it over a Unix socket, no bind, so no bind guard) and would keep
        the port from the pool for good, one port a deploy. Apps with their own users
        only: without them an app's socket is not told from keter's or root's.
        """
        users = self.users
        if users is None:
            return 0
        try:
            closed = sockdiag.destroy_listeners(port, lambda uid: users.low <= uid <= users.high)
        except sockdiag.DiagError as exc:
            log.debug("%s: cannot close what holds port %d: %s", entry.app, port, exc)
            return 0
        if closed:
            log.warning(
                "%s: closed %d listening socket(s) on port %d, which a process of an app "
                "still held after deploy %d stopped (handed on); the port goes back to the pool",
                entry.app,
                closed,
                port,
                entry.deploy_id,
            )
        return closed

    def _warn_if_port_held(self, entry: _Entry) -> None:
        """The deploy is gone and something still listens on its port: a process of an app
        it was handed to (closed here, apps with their own users), or (without cgroups)
        a process that left the app's group; a stranger's is only named."""
        port = entry.spec.port
        if port is None or port_is_free(port):
            return
        if self._close_apps_listeners(entry, port) and port_is_free(port):
            return
        holders = ", ".join(map(self._holder, sockdiag.listeners(port))) or "unknown"
        left = "" if entry.cgroup is not None else " (setsid or a daemon's double fork)"
        log.warning(
            "%s: port %d is still held by %s after deploy %d stopped%s; keter does not stop it",
            entry.app,
            port,
            holders,
            entry.deploy_id,
            left,
        )

    # -- one-shot processes (RunOnce) -----------------------------------------------------

    def _start_once(self, msg: RunOnce) -> None:
        if msg.deploy_id in self._entries:
            log.error("%s: process %d is already running; RunOnce ignored", msg.app, msg.deploy_id)
            return
        entry = _Entry(app=msg.app, deploy_id=msg.deploy_id, spec=msg.spec)
        entry.once_timeout = msg.timeout
        self._add(entry)
        self._spawn(entry)  # _Spawned follows: _once_spawned, or _spawn_failed

    def _once_spawned(self, entry: _Entry) -> None:
        assert entry.once_timeout is not None
        self._transition(entry, ProcessState.STARTING, self._where(entry))
        self._transition(entry, ProcessState.RUNNING, "one-shot: no health check")
        self._state_timer(
            entry, entry.once_timeout, _OnceTimeout(deploy_id=entry.deploy_id, run=entry.runs)
        )

    def _once_exited(self, entry: _Entry, msg: _Exited) -> None:
        """The one-shot's leader exited: stop what is left of its group, then report it."""
        assert entry.run is not None
        entry.returncode = msg.returncode
        reason, _ = self._exit_reason(entry, msg.returncode)
        entry.exit_reason = reason
        if entry.state is ProcessState.RUNNING:
            self._kill(entry)  # nothing a release started may outlive it
            self._transition(entry, ProcessState.STOPPING, reason)
        self._check_gone(entry)

    def _once_finished(self, entry: _Entry) -> RunFinished:
        assert entry.run is not None
        reason = entry.exit_reason or "stopped"
        if entry.timed_out:
            reason = f"did not finish within {entry.once_timeout:g}s ({reason})"
        elif entry.stop_requested:
            reason = f"stopped on request ({reason})"
        return RunFinished(
            app=entry.app,
            deploy_id=entry.deploy_id,
            returncode=entry.returncode,
            reason=reason,
            timed_out=entry.timed_out,
            output_tail=entry.run.capture.tail(FAILURE_TAIL),
        )

    # -- shared helpers ---------------------------------------------------------------

    def _state_timer(self, entry: _Entry, delay: float, message: object) -> None:
        """Schedule the deadline of the entry's current state (replacing any earlier)."""
        if entry.state_timer is not None:
            self.cancel(entry.state_timer)
        entry.state_timer = self.schedule(delay, message)

    def _transition(
        self, entry: _Entry, new: ProcessState, detail: str, *, failed: bool = False
    ) -> None:
        """The one place where an entry changes state: checked, logged and reported."""
        check_transition(entry.state, new)
        log.info("%s: state %s -> %s (%s)", entry.app, entry.state.value, new.value, detail)
        entry.state = new
        if entry.state_timer is not None:  # the old state's deadline: nothing to do any more
            self.cancel(entry.state_timer)
            entry.state_timer = None
        pid = entry.run.pid if entry.run is not None and not entry.run.gone else None
        self.report(
            ProcessStateChanged(
                app=entry.app,
                deploy_id=entry.deploy_id,
                state=new,
                detail=detail,
                pid=pid,
                failed=failed,
            )
        )

    def _stranger_on_port(self, entry: _Entry, stranger: str) -> None:
        """A process that is not the app's listens on its port while it starts: it never
        gets traffic. A first start fails; a running app moves to another port."""
        if entry.ever_healthy:
            self._port_taken(entry, stranger)
            return
        log.error(
            "%s: port %d is held by %s, not by the app: not routing there",
            entry.app,
            entry.spec.port,
            stranger,
        )
        self._fail_start(
            entry,
            f"port {entry.spec.port} is held by {stranger}, not by the app",
            FailureKind.PORTS,
        )

    @staticmethod
    def _where(entry: _Entry) -> str:
        assert entry.run is not None
        return f"pid {entry.run.pid}, port {entry.spec.port}"

    def _port_stranger(self, entry: _Entry) -> str | None:
        """Who listens on the deploy's port if it is not the deploy ("pid 12 (user x)").

        A socket's cgroup (sock_diag) tells at once: the app's processes make theirs in
        the deploy's cgroup, and cannot leave it. Only without cgroups are file
        descriptors read, the app's own first: one app holding millions of them had made
        each look take seconds, on the thread every app's health checks wait on.
        """
        port = entry.spec.port
        if port is None:
            return None
        found = sockdiag.listeners(port)
        if not found:
            return None
        cgroup = entry.cgroup.id if entry.cgroup is not None else 0
        own_uid = self.users.uid(entry.app) if self.users and entry.spec.user is None else None
        mine: list[int] | None = None  # the app's pids, read once if a socket needs them
        for listener in found:
            if cgroup and listener.cgroup:
                if listener.cgroup == cgroup:
                    continue
                return self._holder(listener)  # made in another cgroup: never the app's
            if listener.uid == own_uid:
                continue
            if mine is None:
                if entry.cgroup is not None:
                    mine = entry.cgroup.pids()
                else:
                    mine = group_members(entry.run.pgid) if entry.run is not None else []
            if socket_pids(listener.inode, mine):
                continue
            # Maybe a stranger. A holder that is gone meanwhile, or of the app after all,
            # is no stranger.
            holders = socket_pids(listener.inode, user_pids(listener.uid))
            if strangers := [pid for pid in holders if not self._ours(entry, pid)]:
                return f"pid {strangers[0]} (user {_user_name(listener.uid)})"
        return None

    def _holder(self, listener: sockdiag.Listener) -> str:
        """Who holds a socket, for the operator: another deploy of keter's, named by its
        cgroup; else a process of the socket's owner (only that user's are looked at)."""
        user = _user_name(listener.uid)
        if listener.cgroup:
            for other in self._entries.values():  # rare: a stranger on an app's port
                if other.cgroup is not None and other.cgroup.id == listener.cgroup:
                    return f"app {other.app}'s deploy {other.deploy_id} (user {user})"
        pids = socket_pids(listener.inode, user_pids(listener.uid))
        return f"pid {pids[0]} (user {user})" if pids else f"a process of user {user}"

    @staticmethod
    def _ours(entry: _Entry, pid: int) -> bool:
        if entry.cgroup is not None and pid in entry.cgroup.pids():
            return True
        if entry.run is None:
            return False
        try:
            return pid == entry.run.pid or os.getpgid(pid) == entry.run.pgid
        except ProcessLookupError:
            return True  # gone: it holds nothing any more

    def _port_taken(self, entry: _Entry, stranger: str) -> None:
        """A stranger holds a running app's port: stop the app, ask for another port."""
        port = entry.spec.port
        log.error(
            "%s: port %s is held by %s, not by the app: keter routes nothing there and "
            "moves the app to another port",
            entry.app,
            port,
            stranger,
        )
        entry.running_since = None
        if entry.run is not None and not entry.run.gone:
            self._kill(entry)
        entry.moving = True
        self._transition(
            entry, ProcessState.BACKOFF, f"port {port} taken by {stranger}; waiting for another"
        )
        assert port is not None
        self.report(ProcessPortTaken(app=entry.app, deploy_id=entry.deploy_id, port=port))

    def _move(self, msg: MoveProcess) -> None:
        entry = self._entries.get(msg.deploy_id)
        if entry is None or not entry.moving or entry.state is not ProcessState.BACKOFF:
            return  # stopped meanwhile
        entry.moving = False
        entry.spec = msg.spec
        entry.failures = 0
        self.schedule(0, _Restart(deploy_id=entry.deploy_id, run=entry.runs))

    def _kill(self, entry: _Entry) -> None:
        """SIGKILL what is left of the deploy: its cgroup, else its process group."""
        if entry.run is not None:
            signal_group(entry.run.pgid, signal.SIGKILL)
        if entry.cgroup is not None:
            entry.cgroup.kill()  # double forks and setsid included

    def _left(self, entry: _Entry) -> bool:
        """Whether any process of the deploy's current run is still alive."""
        if entry.cgroup is not None:
            return entry.cgroup.populated()
        return entry.run is not None and bool(group_members(entry.run.pgid))

    @staticmethod
    def _remove_groups(entry: _Entry) -> None:
        """The deploy is over and nothing of it runs: its cgroup and limit groups go."""
        if entry.cgroup is not None:
            entry.cgroup.remove()
        if entry.limit_groups is not None:
            entry.limit_groups.remove()

    def _ended(self, entry: _Entry) -> None:
        """The entry is gone and nothing of it runs: its /tmp goes, and with the app's
        last process what IPC objects its uid left in keter's namespace (systemd's
        RemoveIPC). The app's other processes (another version, a worker) keep theirs:
        each has its own /tmp, and a uid's objects are removed only once none of them
        runs. Both by the reaper, which no spawn waits for: an app may have left a
        large tree, and the IPC clean-up reads every process on the machine and runs
        ipcrm (up to 30 s)."""
        self._remove_private(entry)
        if not self._machine_ipc or entry.spec.user is not None:
            return  # nothing there, or a uid shared by every app (setuid): not its own
        if any(other.app == entry.app for other in self._entries.values()):
            return
        assert self.users is not None
        uid = self.users.known().get(entry.app)
        if uid is not None:
            called_off = self._ipc_pending[entry.app] = threading.Event()
            self._reaper.submit(
                f"{entry.app}: removing the IPC objects its processes left",
                partial(_remove_app_ipc, entry.app, uid, called_off),
            )

    def _remove_private(self, entry: _Entry) -> None:
        """The entry's folders are renamed away now, on the loop (one rename: a start of
        the same name meanwhile gets fresh ones), and deleted by the reaper."""
        if self.private is None:
            return
        name = _private_name(entry)
        if (doomed := self.private.retire(name)) is not None:
            self._reaper.submit(
                f"{entry.app}: removing what process {name} left in its /tmp and /var/tmp",
                partial(self.private.remove_swept, [doomed]),
            )

    def _remove_all_apps_ipc(self, why: str) -> None:
        """At start (what a killed keter's apps left) and once every app stopped at the
        end: every app user's IPC objects in keter's namespace."""
        if not self._machine_ipc:
            return
        assert self.users is not None
        if removed := remove_ipc(set(self.users.known().values())):
            log.info("processes: removed %d IPC object(s) apps left (%s)", removed, why)

    @property
    def _machine_ipc(self) -> bool:
        """Whether apps with users of their own may leave IPC objects in keter's namespace
        (keter.processes.private): they are then removed once their uid runs nothing."""
        return self.users is not None and (self.private is None or self.private.machine_ipc)

    def _release_run(self, run: _Run) -> None:
        """The run's group is gone: the reader may stop reading its output, and the
        leader's zombie, which kept the group's id from being reused while keter might
        still signal the group (``reader.exit_status``), is reaped."""
        if not run.gone:
            run.gone = True
            self._reader.release(run)
            run.proc.poll()
            self._records.remove(run.deploy_id)


def _remove_app_ipc(app: str, uid: int, called_off: threading.Event) -> None:
    """By the reaper: what IPC objects the app's uid left (``_ended``). Unless the app
    started again meanwhile (``_add``): the reaper may come to it late, behind a large
    /tmp, and a new version's objects, say between a crash and its restart, are its
    own (``remove_ipc`` spares only a uid that runs)."""
    if called_off.is_set():
        return
    if removed := remove_ipc({uid}):
        log.info("%s: removed %d IPC object(s) its processes left", app, removed)


def _private_name(entry: _Entry) -> str:
    """The entry's folder under ROOT/run/tmp (``private_name``)."""
    return private_name(entry.app, entry.deploy_id)


def private_name(app: str, process_id: int) -> str:
    """``APP-ID``: unique, as the id, after the last "-", has none of its own."""
    return f"{app}-{process_id}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
