"""The deploy state machine: one version of one app, from bundle to retirement.

Pure data and rules, no threads and no I/O; the supervisor (``keter.supervisor``)
drives it with the components' replies. A deploy walks these stages::

    UNPACKING ─► PROVISIONING ─► STARTING ─► POINTING ─► SWITCHING ─► SERVING ─► DRAINING
        │              │             │   │       │   routes  ▲ │          │           │
        │              │             │   │       └─unchanged─┘ │          ▼           ▼
        │              │             │   └─(reload mode)─►─────┘       RETIRING ◄─────┘
        │              └─────────────┴─────────┴──── failed/superseded ──►┘ │
        └─────────────────── failed/superseded (nothing runs yet) ──────────► ENDED

POINTING is the kernel switch (``keter.switch``): the app's stable addresses
are led to the new version. When its routes are those of the version it
replaces, that is the whole switch and nginx is not touched; otherwise (a
first deploy, changed hosts) nginx then routes the new stable addresses
(SWITCHING). Without the kernel mode every switch is an nginx reload.

A bundle with a ``release`` command (``keter.release``) takes a detour before
STARTING: its database (if any) is backed up, then the release runs once::

    PROVISIONING ─► BACKING_UP ─► RELEASING ─► STARTING      (postgres: true)
    UNPACKING ───────────────────► RELEASING ─► STARTING      (no database)
                       │               │
                       └── failed ─────┴─► ENDED (nothing else ran; folder removed)

A running release is never interrupted by a newer bundle or the removal of
the bundle: they wait for it (like a switch in flight), see ``keter.release``.

Every allowed move is in ``TRANSITIONS`` with the reason it happens; any other
move is a bug (``IllegalTransition``). A deploy that never served still goes
through RETIRING when it has processes to stop, so every deploy ends the same
way: processes stopped, port released, folder removed, then ENDED. A version
that served drains first: it gets no new connections, and is stopped once it
holds none (at most ``drain-seconds`` later).

An app (``App``) has at most one deploy serving and one on its way (``next``);
a deploy that ended is forgotten.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from keter.bundle import BundleConfig
from keter.messages import (
    AppSnapshot,
    AppState,
    BundleArrived,
    DbInfo,
    Outcome,
    ProcessState,
    Site,
)


class Stage(enum.StrEnum):
    UNPACKING = "unpacking"  # the unpacker unpacks the bundle and reads its config
    PROVISIONING = "provisioning"  # the provisioner creates (or finds) its database
    BACKING_UP = "backing-up"  # its database is dumped before its release runs
    RELEASING = "releasing"  # its release command runs (once, before any web app starts)
    STARTING = "starting"  # its web apps run; waiting until every one answers
    POINTING = "pointing"  # the kernel leads its stable addresses to it (keter.switch)
    SWITCHING = "switching"  # nginx is being pointed at it
    SERVING = "serving"  # it takes the traffic; its background workers run
    DRAINING = "draining"  # replaced or removed: new connections go elsewhere, its own end
    RETIRING = "retiring"  # its processes are being stopped (replaced, removed or failed)
    ENDED = "ended"  # nothing of it runs; port released, folder removed


S = Stage

TRANSITIONS: dict[tuple[Stage, Stage], str] = {
    (S.UNPACKING, S.PROVISIONING): "unpacked and checked; it asks for a database",
    (S.UNPACKING, S.STARTING): "unpacked and checked; its web apps are spawned",
    (S.UNPACKING, S.SWITCHING): "unpacked and checked; it runs no web app to wait for",
    (S.UNPACKING, S.ENDED): "failed or superseded before anything ran; its folder is removed",
    (S.PROVISIONING, S.STARTING): "database ready; its web apps are spawned",
    (S.PROVISIONING, S.SWITCHING): "database ready; it runs no web app to wait for",
    (S.PROVISIONING, S.ENDED): "failed or superseded before anything ran; its folder is removed",
    # The release detour (keter.release).
    (S.UNPACKING, S.RELEASING): "unpacked and checked; its release runs (it has no database)",
    (S.PROVISIONING, S.BACKING_UP): "database ready; it has a release, so it is backed up first",
    (S.BACKING_UP, S.RELEASING): "backup written (or failed, with backup-required: false)",
    (S.BACKING_UP, S.ENDED): "the backup failed, or it was superseded; nothing ran",
    (S.RELEASING, S.STARTING): "every release exited with status 0; its web apps are spawned",
    (S.RELEASING, S.RETIRING): "keter failed while its release ran: the release is stopped",
    (S.RELEASING, S.ENDED): "the release failed, or finished after a newer bundle came",
    (S.STARTING, S.POINTING): "every web app answers its health check (kernel mode)",
    (S.STARTING, S.SWITCHING): "every web app answers its health check (reload mode)",
    (S.STARTING, S.RETIRING): "a web app failed, or a newer bundle superseded it",
    (S.STARTING, S.ENDED): "failed before any process was spawned (e.g. no free port)",
    (S.POINTING, S.SERVING): "routes unchanged: its stable addresses lead to it, and nginx "
    "can no longer send a new request to the version before it",
    (S.POINTING, S.SWITCHING): "its new stable addresses lead to it; nginx must route them",
    (S.POINTING, S.RETIRING): "the kernel did not lead new connections to it; the version "
    "before it serves on",
    (S.SWITCHING, S.SERVING): "nginx serves it; the version before it drains",
    (S.SWITCHING, S.RETIRING): "nginx refused its site; the version before it serves on",
    (S.SWITCHING, S.ENDED): "nginx refused its site, and it runs no process",
    (S.SERVING, S.DRAINING): "replaced by a newer version, or its bundle was removed",
    (S.SERVING, S.RETIRING): "removed while nginx failed to change: stopped at once",
    (S.SERVING, S.ENDED): "replaced or removed, and it runs no process",
    (S.DRAINING, S.RETIRING): "it holds no connection any more, or drain-seconds passed",
    (S.DRAINING, S.ENDED): "it runs no process",
    (S.RETIRING, S.ENDED): "every process of it has stopped",
}


class IllegalTransition(RuntimeError):
    """A move that TRANSITIONS does not allow: a bug in the supervisor."""


def check_transition(old: Stage, new: Stage) -> str:
    """Why ``old -> new`` is allowed; raises ``IllegalTransition`` if it is not."""
    try:
        return TRANSITIONS[(old, new)]
    except KeyError:
        raise IllegalTransition(f"{old} -> {new}") from None


@dataclass(kw_only=True, eq=False)
class WebProcess:
    """One web app of a deploy (a bundle may have several webapp stanzas)."""

    index: int  # into config.webapps
    process_id: int  # the process monitor's id for it
    port: int
    pid: int | None = None
    state: ProcessState | None = None
    healthy: bool = False  # answered its first health check
    started_at: float | None = None  # wall clock time its current process started
    restarts: int = 0  # crash restarts while serving
    repoint: bool = False  # moved to another port: lead its stable port there once it runs
    # A stranger holds its port and no other was free: the next try's delay (None: none due).
    move_retry: float | None = None
    unrouted: bool = False  # reload mode: nginx routes it nowhere until it moves (as above)


@dataclass(kw_only=True, eq=False)
class Worker:
    """One background worker of a deploy (started once the deploy serves)."""

    index: int  # into config.backgrounds
    process_id: int
    restarts: int = 0


@dataclass(kw_only=True, eq=False)
class Deploy:
    """One version of one app, from bundle to retirement."""

    id: int
    app: str
    bundle: Path
    bundle_mtime: float  # seconds since the epoch
    folder: Path  # where it is unpacked (ROOT/temp/APP-ID)
    stage: Stage = Stage.UNPACKING
    began: float = field(default_factory=time.monotonic)
    config: BundleConfig | None = None  # known once unpacked
    sha256: str = ""  # of the bundle as unpacked: the version's identity
    db: DbInfo | None = None
    generation: int | None = None  # the nginx generation that switches traffic to it
    # Kernel mode: the stable ports nginx proxies its web apps to (config.webapps order);
    # shared with the version before it when the routes are the same.
    services: tuple[int, ...] = ()
    reroute: bool = False  # its routes differ from the version before: nginx after POINTING
    pointed_at: float | None = None  # wall clock: the kernel began leading connections to it
    web: list[WebProcess] = field(default_factory=list)
    workers: dict[int, Worker] = field(default_factory=dict)  # by process id
    worker_restarts: int = 0  # of all its workers, those stopped for good too
    sites: tuple[Site, ...] = ()  # what nginx serves for it, from the moment it switches
    outcome: Outcome | None = None  # how its attempt ended, once it did
    folder_exists: bool = True  # False once the unpacker removed it (or never made it)
    # Watched after its switch (keter.stats, issue 14): the version to roll back to
    # (sha256) until the watch ends (supervisor clock); None when not watched.
    rollback_to: str | None = None
    watch_until: float = 0.0
    # Its verdict "made things worse", come while another deploy was on its way: acted
    # on if that one fails (the stats component says a verdict once).
    held_verdict: str | None = None
    # Ports held for its web apps, in config.webapps order: reserved before its release
    # runs (the release gets the app's PORT), released when it ends.
    ports_held: tuple[int, ...] = ()
    # ``keter env`` settings, read once when it is prepared: all its processes get the same.
    settings: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    releases: list[int] = field(default_factory=list)  # web apps whose release is still to run
    release_id: int | None = None  # the process id of the release running now
    release_index: int = 0  # the web app (config.webapps) whose release runs or ran last
    backup: str | None = None  # the backup taken before its release (ROOT/backups/APP/...)
    # Its bundle was in incoming/ when keter started (BundleArrived.at_start): what
    # served the app before is gone, and the archive's newest version is what served last.
    at_start: bool = False
    # The report its bundle began with: offered again when it was refused only for a
    # host another app claims, once no other app does (keter.supervisor.conflicts).
    arrival: BundleArrived | None = None

    def move(self, new: Stage) -> str:
        """Go to ``new``; returns the table's reason. Raises IllegalTransition."""
        why = check_transition(self.stage, new)
        self.stage = new
        return why

    @property
    def version(self) -> str:
        return self.sha256[:12] or "unknown"

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host the version claims, from all its stanzas."""
        return self.config.all_hosts if self.config is not None else ()

    @property
    def process_ids(self) -> tuple[int, ...]:
        """Every process the monitor runs for it (its release, web apps, then workers)."""
        release = (self.release_id,) if self.release_id is not None else ()
        return (*release, *(w.process_id for w in self.web), *self.workers)

    @property
    def ports(self) -> tuple[int | None, ...]:
        """One port per web app of its config, in order (None before it started)."""
        count = len(self.config.webapps) if self.config is not None else 0
        by_index = {w.index: w.port for w in self.web}
        return tuple(by_index.get(i) for i in range(count))

    @property
    def switch_in_flight(self) -> bool:
        """Whether traffic may already reach it: it can no longer be abandoned."""
        if self.stage is Stage.POINTING:
            return True
        return self.stage is Stage.SWITCHING and self.generation is not None

    def web_process(self, process_id: int) -> WebProcess | None:
        return next((w for w in self.web if w.process_id == process_id), None)

    @property
    def all_healthy(self) -> bool:
        return all(w.healthy for w in self.web)

    @property
    def restarts(self) -> int:
        """Crash restarts of its web apps and its background workers."""
        return sum(w.restarts for w in self.web) + self.worker_restarts


@dataclass(kw_only=True, eq=False)
class App:
    """Everything the supervisor knows of one app (one NAME.keter)."""

    name: str
    serving: Deploy | None = None
    next: Deploy | None = None
    waiting: BundleArrived | None = None  # a newer bundle held back while nginx switches
    removing: bool = False
    remove_generation: int | None = None
    # While its bundle is in incoming/, an app stays known, even with nothing serving
    # (its first deploy failed): the operator must see it as failed, not as absent.
    bundle_present: bool = True
    # Its deploys draining or retiring: until they have ended the app stays known too
    # (processes of it still run: its data folder must not be purged yet).
    ending: set[int] = field(default_factory=set)

    @property
    def idle(self) -> bool:
        nothing_on = self.serving is None and self.next is None and self.waiting is None
        return nothing_on and not self.ending

    @property
    def _deploying(self) -> str | None:
        """The version on its way, "" while it is not read yet, None when none is."""
        if self.next is not None:
            return self.next.version if self.next.sha256 else ""
        return "" if self.waiting is not None else None

    def snapshot(self) -> AppSnapshot:
        shown = self.serving
        if shown is None:
            busy = self.next is not None or self.waiting is not None
            state = AppState.DEPLOYING if busy else AppState.FAILED
            if not busy and self.ending and not self.bundle_present:
                state = AppState.STOPPING
        elif any(w.state in (ProcessState.BACKOFF, ProcessState.STARTING) for w in shown.web):
            state = AppState.BACKOFF  # a serving version is only STARTING again after a crash
        else:
            state = AppState.RUNNING
        first = shown.web[0] if shown is not None and shown.web else None
        return AppSnapshot(
            app=self.name,
            state=state,
            version=shown.version if shown else None,
            bundle_mtime=shown.bundle_mtime if shown else None,
            hosts=shown.hosts if shown else (),
            port=first.port if first else None,
            pid=first.pid if first else None,
            started_at=first.started_at if first else None,
            # Its background workers' too: a worker crash-looping behind a healthy web
            # app showed 0 restarts.
            restarts=shown.restarts if shown else 0,
            database=shown.db.name if shown and shown.db else None,
            deploying=self._deploying,
        )
