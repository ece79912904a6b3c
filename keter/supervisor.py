"""The supervisor: the one place that decides what is deployed.

It owns the components (watcher, unpacker, process monitor, nginx writer,
postgres provisioner, status) and every app's state. Components report facts
into its inbox; it decides and sends them commands. ``dispatch(message)`` is
the whole behaviour: a function of (state, message) that changes the state and
``tell``s components. Nothing here blocks, sleeps or starts a thread, so
``tests/test_supervisor.py`` drives it with scripted messages and fake
components; ``keter.daemon`` runs it for real.

A deploy of one bundle version walks the stages of ``keter.deploys`` (read
that module's table first), each step finished by a component's reply:

    UNPACKING     -> BundleUnpacked   (unpacker)
    PROVISIONING  -> DatabaseReady    (postgres provisioner, only for postgres: true)
    BACKING_UP    -> BackupTaken      (backups, only with a release and postgres: true)
    RELEASING     -> RunFinished      (process monitor, only with a release: keter.release)
    STARTING      -> ProcessHealthy   (process monitor, once for every web app)
    POINTING      -> ServicesPointed  (switch: the kernel leads its stable addresses to it)
    SWITCHING     -> NginxApplied     (nginx writer: written, tested, reloaded, confirmed)
    SERVING          the old version drains: Drained (switch) or drain-seconds, then retires

In kernel mode (``keter.switch``) nginx proxies each web app to a stable
address for as long as its routes stay the same; a redeploy with the same
routes is POINTING alone, without an nginx reload. A first deploy, or one that
changes routes, gets stable addresses of its own and then an nginx generation.
Without the kernel mode (no nftables, or ``switch: reload``) every switch is
an nginx generation with the version's own ports, as in the original Keter.

Any failure on the way stops the new version and removes its folder; the
version that was serving is never touched. An app has at most one version
serving and one on its way (``next``); a newer bundle supersedes ``next``,
except while the kernel or nginx is already switching to it, or its release
runs: then the newer bundle waits for that to finish (only the latest waiting
bundle is kept).

Background workers are processes of their deploy like its web apps, each
with an id of its own from the same counter as deploy ids. A version's
workers start once it serves and stop with it; a worker that crashed more
often than its ``restart-count`` is stopped for good.

Failures of keter itself (``ComponentFailed``, or a bug in a handler here)
fail only the deploy the failing message was about; a component is restarted
(one-for-one, with backoff); only repeated failures make keter stop.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from keter import envstore, systemd
from keter.appdata import app_user, data_dir
from keter.config import KeterConfig
from keter.deploys import App, Deploy, Stage, WebProcess, Worker
from keter.environment import app_environment, worker_environment
from keter.messages import (
    AppChanged,
    AppEvent,
    AppGone,
    ApplyNginx,
    AppSnapshot,
    BackupDatabase,
    BackupFailed,
    BackupKind,
    BackupTaken,
    BundleArrived,
    BundleIgnored,
    BundleRemoved,
    BundleUnpacked,
    CertificateIssued,
    CertificateState,
    CertificatesWanted,
    Component,
    ComponentFailed,
    DatabaseFailed,
    DatabaseReady,
    DatabaseRequest,
    DbAction,
    DeployFinished,
    Drained,
    EventKind,
    FailureKind,
    HealthCheck,
    MoveProcess,
    NginxApplied,
    NginxFailed,
    Outcome,
    PointFailed,
    PointServices,
    ProcessFailed,
    ProcessHealthy,
    ProcessPortTaken,
    ProcessSpec,
    ProcessStarted,
    ProcessState,
    ProcessStateChanged,
    ProcessStopped,
    ProvisionDatabase,
    ReleaseServices,
    RemoveFolder,
    RequestRefused,
    Rescan,
    RescanRequested,
    RestoreDatabase,
    RollBack,
    RunFinished,
    RunOnce,
    ScanCompleted,
    ServicesPointed,
    ShutdownRequested,
    Site,
    StartProcess,
    StopProcess,
    SwitchMode,
    SwitchReady,
    TlsFiles,
    UnpackBundle,
    UnpackFailed,
    VersionServing,
    VersionUnhealthy,
    WatchDrain,
    WatchVersion,
    message,
)
from keter.names import PROBLEMS_LIMIT, log_text, validate_app_name
from keter.processes.ports import NoFreePort, PortPool
from keter.release import failure_reason, release_command
from keter.routes import (
    acme_hosts,
    dashboard_site,
    deploy_problems,
    sites_for,
    with_certificates,
)
from keter.switch import NoStablePort, StablePorts

log = logging.getLogger(__name__)

# A component restarted more often than this within the window means keter cannot go on.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
RESTART_FIRST_DELAY = 0.05  # doubled for each recent failure
RESTART_MAX_DELAY = 5.0
# Watched rollout: this many crashes of a watched version within its window roll it back;
# a verdict arriving this long after the window (the stats lag a second) still counts.
WATCH_CRASHES = 3
WATCH_GRACE = 5.0


class Teller(Protocol):
    """What the supervisor needs of a component: an inbox and a lifecycle."""

    component: Component

    def tell(self, message: object) -> None: ...
    def start(self) -> None: ...
    def restart(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


@dataclass(kw_only=True)
class Components:
    """The components the supervisor owns (real actors, or fakes in tests)."""

    watcher: Teller
    unpacker: Teller
    monitor: Teller
    nginx: Teller
    postgres: Teller
    backups: Teller
    status: Teller | None = None
    stats: Teller | None = None  # traffic statistics (keter.stats); None with traffic-stats off
    switch: Teller | None = None  # None: reload mode, drains end after drain-seconds
    acme: Teller | None = None  # certificates for ssl: acme (keter.acme)

    def all(self) -> list[Teller]:
        parts = [self.watcher, self.unpacker, self.monitor, self.nginx, self.postgres, self.backups]
        optional = (self.status, self.stats, self.switch, self.acme)
        return [*parts, *(c for c in optional if c is not None)]


@message
class _RestartComponent:
    """Private timer: a failed component's backoff is over."""

    component: Component


@message
class _DrainOver:
    """Private timer: a draining deploy's drain-seconds are over."""

    deploy_id: int


class Supervisor:
    def __init__(
        self,
        config: KeterConfig,
        components: Components,
        *,
        ports: PortPool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.c = components
        self.clock = clock
        self.apps: dict[str, App] = {}
        # Every deploy that has not ENDED, by its own id and by each of its process ids.
        self.owners: dict[int, Deploy] = {}
        self.hosts: dict[str, str] = {}  # host -> the app whose serving or next deploy claims it
        self.ports = ports or PortPool(*config.port_range)
        self.exit_code: int | None = None  # set when keter must stop
        self._ids = itertools.count(1)
        self._generation = 0
        self._nginx_inflight: int | None = None
        self._nginx_dirty = False
        self._waiting_on_nginx: set[str] = set()  # apps with a switch or removal in flight
        self._watching = False  # the watcher runs (from nginx's first reply on)
        self._nginx_ready = False  # nginx took keter's first config
        # The switch mode, known from the switch component's first report (no component:
        # reload mode at once). Deploys begin only once it is known.
        self.switch_mode = SwitchMode.RELOAD
        self._switch_address = "127.0.0.1"
        self._switch_ready = components.switch is None
        self.stable_ports = StablePorts()
        self._dashboard = dashboard_site(config)  # routed with the apps when configured
        # keter.acme: the certificates it has issued, and the hosts it was last asked for.
        self._certificates: dict[str, TlsFiles] = {}
        self._acme_hosts: frozenset[str] = frozenset()
        self._published: dict[str, AppSnapshot] = {}
        self._changed: set[str] = set()  # apps whose snapshot may have changed
        self._failures: dict[Component, list[float]] = {}  # recent component failures
        self._own_failures: list[float] = []  # recent failures of the supervisor's handlers
        self._timers: list[tuple[float, int, object]] = []
        self._timer_seq = itertools.count()

    # -- the loop's API (keter.daemon) -----------------------------------------------------

    def start(self) -> None:
        """Start every component but the watcher, and ask nginx for keter's first config.

        nginx must reflect reality before any app starts: an earlier run's config
        routes hosts to ports this run may hand to other apps. The watcher starts
        with nginx's first reply, so no deploy begins before that.
        """
        for warning in self.config.warnings:
            log.warning("keter: %s", warning)
        for component in self.c.all():
            if component is not self.c.watcher:
                component.start()
        self._request_nginx()

    def dispatch(self, msg: object) -> None:
        """Handle one message. A bug here fails only the deploy the message was about."""
        try:
            self._handle(msg)
        except Exception as exc:
            self._handler_failed(msg, exc)
        self._publish()

    def next_timer(self) -> float | None:
        """Seconds until the earliest timer is due (None: no timer)."""
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - self.clock())

    def due_timers(self) -> list[object]:
        """Remove and return the timer messages that are due."""
        now, due = self.clock(), []
        while self._timers and self._timers[0][0] <= now:
            due.append(heapq.heappop(self._timers)[2])
        return due

    def _schedule(self, delay: float, msg: object) -> None:
        heapq.heappush(self._timers, (self.clock() + delay, next(self._timer_seq), msg))

    # -- dispatch --------------------------------------------------------------------------

    def _handle(self, msg: object) -> None:
        match msg:
            case BundleArrived():
                self._bundle_arrived(msg)
            case BundleRemoved(app=app):
                self._bundle_removed(app)
            case BundleIgnored(filename=filename, reason=reason):
                self._refused_file(filename, reason)
            case ScanCompleted():
                log.info("keter: initial scan done, %d bundle(s) found", len(self.apps))
                systemd.notify("READY=1")
            case BundleUnpacked():
                self._unpacked(msg)
            case UnpackFailed(app=app, deploy_id=deploy_id, reason=reason, kind=kind):
                if deploy := self._next(app, deploy_id):
                    deploy.folder_exists = False  # the unpacker removed it
                    self._fail(deploy, reason, kind=kind)
            case DatabaseReady(app=app, deploy_id=deploy_id, db=db):
                if deploy := self._next(app, deploy_id):
                    deploy.db = db
                    self._prepare(deploy)
            case DatabaseFailed(app=app, deploy_id=deploy_id, reason=reason):
                if deploy := self._next(app, deploy_id):
                    self._fail(deploy, f"database: {reason}", kind=FailureKind.DATABASE)
            case BackupTaken() | BackupFailed():
                self._backup_done(msg)
            case RunFinished():
                self._release_finished(msg)
            case DatabaseRequest():
                self._database_request(msg)
            case ProcessStarted():
                self._process_started(msg)
            case ProcessHealthy(deploy_id=process_id):
                self._process_healthy(process_id)
            case ProcessFailed():
                self._process_failed(msg)
            case ProcessStateChanged():
                self._process_state_changed(msg)
            case ProcessStopped(deploy_id=process_id):
                self._process_stopped(process_id)
            case ProcessPortTaken(deploy_id=process_id):
                self._port_taken(process_id)
            case NginxApplied(generation=generation, refused=refused):
                self._nginx_replied(generation, None, {r.app: r.reason for r in refused})
            case NginxFailed(generation=generation, reason=reason):
                self._nginx_replied(generation, reason, {})
            case CertificateIssued(host=host, certificate=certificate, key=key):
                # keter.acme: the host's sites get it at the next nginx generation.
                self._certificates[host] = TlsFiles(certificate=certificate, key=key)
                self._request_nginx()
            case CertificateState():
                # keter.acme's view of one host (logged there), for `keter certs`, the
                # status API, the dashboard and /metrics.
                if self.c.status is not None:
                    self.c.status.tell(msg)
            case VersionUnhealthy(app=app, version=version, reason=reason):
                self._unhealthy(app, version, reason)
            case SwitchReady():
                self._switch_known(msg)
            case ServicesPointed(deploy_id=deploy_id, at=at):
                self._services_pointed(deploy_id, at)
            case PointFailed(deploy_id=deploy_id, reason=reason):
                deploy = self.owners.get(deploy_id)
                if deploy is not None and deploy.stage is Stage.POINTING:
                    self._fail(deploy, f"switch: {reason}", kind=FailureKind.SWITCH)
            case Drained(deploy_id=deploy_id) | _DrainOver(deploy_id=deploy_id):
                deploy = self.owners.get(deploy_id)
                if deploy is not None and deploy.stage is Stage.DRAINING:
                    self._retire(deploy, 0)
            case RescanRequested():
                self.c.watcher.tell(Rescan())
            case ShutdownRequested(signal_name=name):
                log.info("keter: %s received, stopping every app", name)
                self.exit_code = 0
            case ComponentFailed():
                self._component_failed(msg)
            case _RestartComponent(component=component):
                part = self._component(component)
                part.join(1.0)  # it reported its failure as its thread's last act
                part.restart()
                log.warning("keter: component %s restarted", component)
                if part is self.c.watcher:
                    part.tell(Rescan())  # file events during its failure may be lost
            case _:
                log.error("keter: ignoring unexpected message %s", type(msg).__name__)

    # -- bundles ---------------------------------------------------------------------------

    def _bundle_arrived(self, arrived: BundleArrived) -> None:
        app = self.apps.setdefault(arrived.app, App(name=arrived.app))
        app.bundle_present = True
        self._changed.add(app.name)
        log.info("%s: bundle seen (%d bytes)", arrived.app, arrived.size)
        if app.next is not None:
            if self._must_finish(app.next):
                # Let the switch (or the release) finish, then deploy this one.
                app.waiting = arrived
                return
            self._abandon(app.next, "superseded by a newer bundle")
        self._begin(app, arrived)

    @staticmethod
    def _must_finish(deploy: Deploy) -> bool:
        """Whether a newer bundle or a removal must wait for the deploy's current step.

        Traffic may already reach a deploy that is switching; a release may be half
        way through changing the database (see keter.release).
        """
        if deploy.stage is Stage.RELEASING:
            log.info("%s: waiting for the release of deploy #%d to finish", deploy.app, deploy.id)
            return True
        return deploy.switch_in_flight

    def _refused_file(self, filename: str, reason: str) -> None:
        """The watcher refused an entry of incoming/ (and logged it): a line of history.

        Only under a valid app name; a name no app can have has no history to go in.
        Whatever serves under that name serves on.
        """
        try:
            app = validate_app_name(filename.removesuffix(".keter"))
        except ValueError:
            return
        if self.c.status is not None and filename.endswith(".keter"):
            self.c.status.tell(
                DeployFinished(
                    app=app,
                    version="unknown",
                    sha256="",
                    bundle_mtime=0.0,
                    outcome=Outcome.FAILED,
                    reason=reason,
                    duration=0.0,
                    at=time.time(),
                    kind=FailureKind.UNPACK,
                )
            )

    def _begin(self, app: App, arrived: BundleArrived) -> None:
        deploy_id = next(self._ids)
        deploy = Deploy(
            id=deploy_id,
            app=app.name,
            bundle=arrived.path,
            bundle_mtime=arrived.mtime_ns / 1e9,
            folder=self.config.temp_dir / f"{app.name}-{deploy_id}",
            began=self.clock(),
        )
        app.next, app.waiting = deploy, None
        self.owners[deploy_id] = deploy
        self.c.unpacker.tell(
            UnpackBundle(app=app.name, deploy_id=deploy_id, bundle=arrived.path, dest=deploy.folder)
        )

    def _bundle_removed(self, name: str) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        log.info("%s: bundle removed from incoming/", name)
        self._changed.add(name)
        app.waiting = None
        app.bundle_present = False
        if app.next is not None:
            if self._must_finish(app.next):
                app.removing = True  # carried out when the switch (or the release) completes
                return
            self._abandon(app.next, "its bundle was removed")
        if app.serving is None:
            self._forget_if_idle(app)
            return
        app.removing, app.remove_generation = True, None
        self._request_nginx()

    def _unpacked(self, msg: BundleUnpacked) -> None:
        deploy = self._next(msg.app, msg.deploy_id)
        if deploy is None:
            self.c.unpacker.tell(RemoveFolder(path=msg.folder))  # superseded meanwhile
            return
        config = deploy.config = msg.config
        deploy.sha256 = msg.sha256
        for warning in msg.warnings:
            log.warning("%s: %s", msg.app, warning)
        if not config.runs_something and not config.serves_http:
            reason = "config/keter.yaml defines nothing to run or serve"
            self._fail(deploy, reason, kind=FailureKind.CONFIG)
            return
        for host in config.all_hosts:
            owner = self._host_owner(host, msg.app)
            if owner is not None:
                reason = f"host {host} is already served by app {owner}"
                self._fail(deploy, reason, kind=FailureKind.CONFLICT)
                return
        problems = deploy_problems(config, self.config)
        if config.postgres and config.postgres_server is not None:
            server = config.postgres_server
            problem = self.config.postgres.server_problem(server.host, server.port)
            if problem:
                problems.append(f"plugins.postgres {problem}")
        problems += self.config.app_limits.over_ceiling(config.process_limits)
        if problems:
            self._fail(deploy, "; ".join(problems), kind=FailureKind.CONFIG)
            return
        for host in config.all_hosts:
            self.hosts[host] = msg.app
        log.info(
            "%s: deploy #%d unpacked, hosts %s", msg.app, msg.deploy_id, ", ".join(deploy.hosts)
        )
        if config.postgres:
            deploy.move(Stage.PROVISIONING)
            self.c.postgres.tell(ProvisionDatabase(app=msg.app, deploy_id=msg.deploy_id))
        else:
            self._prepare(deploy)

    def _host_owner(self, host: str, app: str) -> str | None:
        if host == self.config.dashboard_host:
            return "keter (its dashboard-host)"
        owner = self.hosts.get(host)
        return owner if owner != app else None

    # -- preparing: settings, ports, backup and release (keter.release) -------------------

    def _prepare(self, deploy: Deploy) -> None:
        """Unpacked, its database ready: read its settings and reserve its ports, then
        back up and run its release if it has one, else start it."""
        assert deploy.config is not None
        try:
            settings = envstore.load(self.config.etc_dir, deploy.app)
        except envstore.SettingsError as exc:
            self._fail(deploy, f"its settings (keter env): {exc}", kind=FailureKind.CONFIG)
            return
        deploy.settings = MappingProxyType(settings)
        ports: list[int] = []
        try:
            for _ in deploy.config.webapps:
                ports.append(self.ports.allocate())
        except NoFreePort as exc:
            for port in ports:
                self.ports.release(port)
            self._fail(deploy, str(exc), kind=FailureKind.PORTS)
            return
        deploy.ports_held = tuple(ports)
        webapps = deploy.config.webapps
        deploy.releases = [i for i, webapp in enumerate(webapps) if webapp.release is not None]
        if not deploy.releases:
            self._start(deploy)
        elif deploy.db is not None:
            deploy.move(Stage.BACKING_UP)
            self.c.backups.tell(
                BackupDatabase(
                    app=deploy.app,
                    deploy_id=deploy.id,
                    db=deploy.db,
                    user=app_user(self.config, deploy.app),
                    kind=BackupKind.RELEASE,
                    version=deploy.version,
                )
            )
        else:
            deploy.move(Stage.RELEASING)
            self._run_release(deploy)

    def _backup_done(self, msg: BackupTaken | BackupFailed) -> None:
        deploy = self._next(msg.app, msg.deploy_id)
        if deploy is None or deploy.stage is not Stage.BACKING_UP:
            return  # superseded meanwhile: the backup is kept, like any other
        if isinstance(msg, BackupTaken):
            deploy.backup = msg.backup.name
            name = msg.backup.name
            log.info("%s: deploy #%d: database backed up to %s", msg.app, deploy.id, name)
        elif self.config.backup_required:
            reason = f"database backup before the release failed: {msg.reason}"
            self._fail(deploy, reason, kind=FailureKind.BACKUP)
            return
        else:
            log.warning(
                "%s: deploy #%d: database backup failed, releasing anyway "
                "(backup-required: false): %s",
                msg.app,
                deploy.id,
                msg.reason,
            )
        deploy.move(Stage.RELEASING)
        self._run_release(deploy)

    def _run_release(self, deploy: Deploy) -> None:
        """Run the next web app's release, once, through the process monitor."""
        assert deploy.config is not None
        index = deploy.releases.pop(0)
        release = deploy.config.webapps[index].release
        assert release is not None
        process_id = next(self._ids)
        deploy.release_id, deploy.release_index = process_id, index
        self.owners[process_id] = deploy
        spec = ProcessSpec(
            command=release_command(release),
            cwd=deploy.folder,
            env=self._web_environment(deploy, index, deploy.ports_held[index]),
            log_path=self.config.log_dir / f"app-{deploy.app}.log",
            user=app_user(self.config, deploy.app),
            data_dir=data_dir(self.config, deploy.app),
            limits=deploy.config.webapps[index].limits,
        )
        log.info(
            "%s: deploy #%d runs its release %s (#%d, at most %gs)",
            deploy.app,
            deploy.id,
            release.exec.name,
            process_id,
            release.timeout,
        )
        self.c.monitor.tell(
            RunOnce(app=deploy.app, deploy_id=process_id, spec=spec, timeout=release.timeout)
        )

    def _release_finished(self, msg: RunFinished) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None or deploy.release_id != msg.deploy_id:
            return
        del self.owners[msg.deploy_id]
        deploy.release_id = None
        if deploy.stage is not Stage.RELEASING:  # stopped: keter failed while it ran
            if deploy.stage is Stage.RETIRING and not self._live(deploy):
                self._ended(deploy)
            return
        assert deploy.config is not None
        if not msg.ok:
            release = deploy.config.webapps[deploy.release_index].release
            assert release is not None
            reason = failure_reason(release, deploy.folder, msg.reason, msg.output_tail)
            self._fail(deploy, reason, msg.output_tail, kind=FailureKind.RELEASE)
            return
        log.info("%s: deploy #%d: release finished (%s)", deploy.app, deploy.id, msg.reason)
        app = self.apps[deploy.app]
        if app.waiting is not None or app.removing:
            # What waited for the release (see keter.release) goes on now.
            why = "its bundle was removed" if app.removing else "superseded by a newer bundle"
            self._abandon(deploy, why)
            self._continue_waiting(app)
        elif deploy.releases:
            self._run_release(deploy)
        else:
            self._start(deploy)

    def _web_environment(self, deploy: Deploy, index: int, port: int) -> dict[str, str]:
        """Web app ``index``'s environment on ``port``, which its release command gets too."""
        assert deploy.config is not None
        return app_environment(
            self.config,
            deploy.config.webapps[index],
            port,
            deploy.db,
            settings=deploy.settings,
            data_dir=data_dir(self.config, deploy.app),
        )

    # -- an operator's database requests (keter db backup / restore) -----------------------

    def _database_request(self, request: DatabaseRequest) -> None:
        """Check it here (the one place that knows what runs), carry it out in backups."""
        app = self.apps.get(request.app)
        serving = app.serving if app is not None else None
        refusal = None
        if serving is None:
            refusal = RequestRefused(404 if app is None else 409, f"{request.app} is not running")
        elif serving.db is None:
            refusal = RequestRefused(409, f"{request.app} has no database (postgres: true)")
        elif request.action is DbAction.RESTORE and app is not None and app.next is not None:
            refusal = RequestRefused(
                409, f"a deploy of {request.app} is under way; restore once it has ended"
            )
        if refusal is not None or serving is None or serving.db is None:
            request.reply.set_exception(refusal or RequestRefused(500, "no database"))
            return
        user = app_user(self.config, request.app)
        if request.action is DbAction.BACKUP:
            command: object = BackupDatabase(
                app=request.app,
                deploy_id=None,
                db=serving.db,
                user=user,
                kind=BackupKind.MANUAL,
                version=serving.version,
                reply=request.reply,
            )
        else:
            command = RestoreDatabase(
                app=request.app,
                db=serving.db,
                user=user,
                backup=request.backup,
                version=serving.version,
                reply=request.reply,
            )
        self.c.backups.tell(command)

    # -- starting ----------------------------------------------------------------------------

    def _start(self, deploy: Deploy) -> None:
        """Spawn every web app of the deploy (each on a port of its own), or switch at once."""
        assert deploy.config is not None
        webapps = deploy.config.webapps
        if not webapps:
            # Nothing to start or health-check: nginx can switch to it right away.
            log.info("%s: deploy #%d runs no web app, switching", deploy.app, deploy.id)
            self._switch(deploy)
            return
        deploy.move(Stage.STARTING)
        for index, port in enumerate(deploy.ports_held):
            # The first web app's process is known by the deploy's own id (as in the log's
            # "deploy #N"); further ones and workers take fresh ids from the same counter.
            process_id = deploy.id if index == 0 else next(self._ids)
            deploy.web.append(WebProcess(index=index, process_id=process_id, port=port))
            self.owners[process_id] = deploy
            spec = self._web_spec(deploy, index, port)
            self.c.monitor.tell(StartProcess(app=deploy.app, deploy_id=process_id, spec=spec))

    def _web_spec(self, deploy: Deploy, index: int, port: int) -> ProcessSpec:
        """Web app ``index`` of the deploy on ``port``."""
        assert deploy.config is not None
        webapp = deploy.config.webapps[index]
        health_host = next((h for h in webapp.hosts if "*" not in h), webapp.hosts[0])
        return ProcessSpec(
            command=(str(webapp.exec), *webapp.args),
            cwd=deploy.folder,
            env=self._web_environment(deploy, index, port),
            log_path=self.config.log_dir / f"app-{deploy.app}.log",
            port=port,
            health=HealthCheck(
                host=health_host.removeprefix("*."),
                path=webapp.health_check_path or "/",
                strict=webapp.health_check_path is not None,
            ),
            user=app_user(self.config, deploy.app),
            health_timeout=webapp.ensure_alive,
            data_dir=data_dir(self.config, deploy.app),
            limits=webapp.limits,
        )

    def _port_taken(self, process_id: int) -> None:
        """A stranger holds a web process's port (the monitor stopped it): give it a fresh
        one, and if nginx routes to it, re-point nginx at once: the stranger gets nothing."""
        deploy = self.owners.get(process_id)
        web = deploy.web_process(process_id) if deploy is not None else None
        if deploy is None or web is None or deploy.config is None:
            return
        try:
            port = self.ports.allocate()
        except NoFreePort as exc:
            log.error("%s: cannot move deploy #%d to another port: %s", deploy.app, process_id, exc)
            return
        self.ports.release(web.port)  # the pool skips it while the stranger holds it
        log.info("%s: deploy #%d moves from port %d to %d", deploy.app, process_id, web.port, port)
        web.port = port
        held = list(deploy.ports_held)
        held[web.index] = port  # released when the deploy ends
        deploy.ports_held = tuple(held)
        spec = self._web_spec(deploy, web.index, port)
        self.c.monitor.tell(MoveProcess(app=deploy.app, deploy_id=process_id, spec=spec))
        self._changed.add(deploy.app)
        if deploy.services:
            # Kernel mode: nginx routes to the stable port; it stops leading to the stranger
            # now and leads to the app again once it answers on its new port.
            if deploy.stage is Stage.SERVING:
                assert self.c.switch is not None
                web.repoint = True
                stable = deploy.services[web.index]
                self.c.switch.tell(ReleaseServices(app=deploy.app, ports=(stable,)))
        elif deploy.sites:
            deploy.sites = self._sites(deploy, deploy.ports)
            self._request_nginx()

    def _start_workers(self, deploy: Deploy) -> None:
        """Start the version's background workers; it serves now (see the module docstring)."""
        assert deploy.config is not None
        for index, worker in enumerate(deploy.config.backgrounds):
            process_id = next(self._ids)
            deploy.workers[process_id] = Worker(index=index, process_id=process_id)
            self.owners[process_id] = deploy
            spec = ProcessSpec(
                command=(str(worker.exec), *worker.args),
                cwd=deploy.folder,
                env=worker_environment(
                    self.config,
                    worker,
                    deploy.db,
                    settings=deploy.settings,
                    data_dir=data_dir(self.config, deploy.app),
                ),
                log_path=self.config.log_dir / f"app-{deploy.app}.log",
                user=app_user(self.config, deploy.app),
                restart_delay=worker.restart_delay,
                data_dir=data_dir(self.config, deploy.app),
                limits=worker.limits,
            )
            log.info(
                "%s: deploy #%d starts background worker #%d (%s)",
                deploy.app,
                deploy.id,
                process_id,
                worker.exec.name,
            )
            self.c.monitor.tell(StartProcess(app=deploy.app, deploy_id=process_id, spec=spec))

    # -- process facts ---------------------------------------------------------------------

    def _process_started(self, msg: ProcessStarted) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None:
            return
        if msg.deploy_id in deploy.workers:
            log.info("%s: background worker #%d started pid %d", msg.app, msg.deploy_id, msg.pid)
            return
        web = deploy.web_process(msg.deploy_id)
        if web is None:
            return
        web.pid, web.started_at = msg.pid, time.time()
        which = f" (web app {web.index + 1})" if len(deploy.web) > 1 else ""
        log.info(
            "%s: deploy #%d started pid %d on port %s%s",
            msg.app,
            deploy.id,
            msg.pid,
            msg.port,
            which,
        )

    def _process_healthy(self, process_id: int) -> None:
        deploy = self.owners.get(process_id)
        web = deploy.web_process(process_id) if deploy is not None else None
        if deploy is None or web is None or deploy.stage is not Stage.STARTING:
            return
        web.healthy = True
        if deploy.all_healthy:
            log.info("%s: deploy #%d is healthy, switching traffic", deploy.app, deploy.id)
            self._switch(deploy)

    def _process_failed(self, msg: ProcessFailed) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None:
            return
        if msg.deploy_id in deploy.workers:
            # Its deploy serves on; ProcessStopped follows and forgets the worker.
            log.error(
                "%s: background worker #%d could not start: %s", msg.app, msg.deploy_id, msg.reason
            )
            return
        if deploy.stage is Stage.STARTING:
            # The monitor has stopped this process already; ProcessStopped follows.
            self._fail(
                deploy,
                msg.reason,
                msg.output_tail,
                kind=msg.kind,
                stopped_already=msg.deploy_id,
            )

    def _process_state_changed(self, msg: ProcessStateChanged) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None:
            return
        if worker := deploy.workers.get(msg.deploy_id):
            self._worker_state_changed(deploy, worker, msg)
            return
        web = deploy.web_process(msg.deploy_id)
        if web is None:
            return
        self._changed.add(deploy.app)
        previous, web.state = web.state, msg.state
        if msg.pid is not None and msg.pid != web.pid:
            web.pid, web.started_at = msg.pid, time.time()
        if deploy.stage is not Stage.SERVING:
            return  # a new version's start is reported through its deploy
        if web.repoint and msg.state is ProcessState.RUNNING:
            web.repoint = False  # it answers on the port it moved to (_port_taken)
            assert self.c.switch is not None
            stable = deploy.services[web.index]
            targets = ((stable, web.port),)
            self.c.switch.tell(PointServices(app=deploy.app, deploy_id=deploy.id, targets=targets))
        if msg.state is ProcessState.BACKOFF:
            web.restarts += 1
            if previous is ProcessState.RUNNING:
                self._event(msg.app, EventKind.CRASH, msg.detail)
            crashes = sum(w.restarts for w in deploy.web)
            watched = deploy.rollback_to is not None and self.clock() < deploy.watch_until
            if watched and crashes >= WATCH_CRASHES:  # it crash-loops: roll back
                reason = f"crashed {crashes} times since its switch"
                self._unhealthy(deploy.app, deploy.version, reason)
        elif msg.state is ProcessState.RUNNING and previous is ProcessState.STARTING:
            self._event(msg.app, EventKind.RESTART, f"running again ({msg.detail})")

    def _worker_state_changed(
        self, deploy: Deploy, worker: Worker, msg: ProcessStateChanged
    ) -> None:
        """Count a worker's crashes; past its restart-count it is stopped for good."""
        if msg.state is not ProcessState.BACKOFF or deploy.stage is not Stage.SERVING:
            return
        assert deploy.config is not None
        limit = deploy.config.backgrounds[worker.index].restart_count
        worker.restarts += 1
        self._event(msg.app, EventKind.CRASH, f"background worker #{msg.deploy_id}: {msg.detail}")
        if limit is not None and worker.restarts > limit:
            log.error(
                "%s: background worker #%d crashed again after %d restart(s); "
                "restart-count reached, not restarting",
                msg.app,
                msg.deploy_id,
                limit,
            )
            self.c.monitor.tell(StopProcess(app=msg.app, deploy_id=msg.deploy_id, delay=0))

    def _process_stopped(self, process_id: int) -> None:
        deploy = self.owners.pop(process_id, None)
        if deploy is None:
            return
        if deploy.workers.pop(process_id, None) is not None and deploy.stage is Stage.SERVING:
            log.info("%s: background worker #%d stopped", deploy.app, process_id)
            return
        if deploy.stage in (Stage.RETIRING, Stage.DRAINING) and not self._live(deploy):
            self._ended(deploy)

    def _live(self, deploy: Deploy) -> bool:
        """Whether any process of the deploy has not reported ProcessStopped yet."""
        return any(self.owners.get(pid) is deploy for pid in deploy.process_ids)

    # -- nginx ---------------------------------------------------------------------------------

    def _routed(self, app: App) -> Deploy | None:
        """The deploy nginx should route the app to: the one switching, else the serving one."""
        if app.next is not None and app.next.stage is Stage.SWITCHING:
            return app.next
        return app.serving if not app.removing else None

    def _switch(self, deploy: Deploy) -> None:
        """Lead traffic to the deploy: through the kernel (kernel mode), else nginx.

        Its sites are computed once, here. In kernel mode they name stable
        addresses: those of the version it replaces when that gives the very
        same sites (the kernel switch is then all there is), else new ones.
        """
        if self.switch_mode is SwitchMode.KERNEL and deploy.web:
            self._point(deploy)
            return
        try:
            deploy.sites = self._sites(deploy, deploy.ports)
        except ValueError as exc:  # the bundle parser refuses this already; a second lock
            self._fail(deploy, f"cannot route it: {exc}", kind=FailureKind.CONFIG)
            return
        deploy.move(Stage.SWITCHING)
        self._request_nginx()

    def _sites(
        self, deploy: Deploy, ports: tuple[int | None, ...], host: str = "127.0.0.1"
    ) -> tuple[Site, ...]:
        """The deploy's sites, its web apps on ``ports`` at ``host``.

        Its version goes into every access record nginx writes (keter.stats), except
        behind stable addresses: the kernel switches those without nginx, so the
        records say "-" and the stats component tells versions apart by the time
        each began serving (``VersionServing``).
        """
        assert deploy.config is not None
        found = sites_for(
            deploy.app, deploy.config, deploy.folder, ports, self.config, upstream_host=host
        )
        version = "-" if host != "127.0.0.1" else deploy.version
        return tuple(dataclasses.replace(site, version=version) for site in found)

    def _point(self, deploy: Deploy) -> None:
        """Kernel mode: lead stable addresses to the deploy (STARTING -> POINTING)."""
        old = self.apps[deploy.app].serving
        previous: tuple[tuple[int, int], ...] = ()
        try:
            if old is not None and len(old.services) == len(deploy.web):
                sites = self._sites(deploy, old.services, self._switch_address)
                if sites == old.sites:
                    deploy.services, deploy.sites = old.services, sites
                    previous = tuple(zip(old.services, old.ports, strict=True))
            if not deploy.services:
                deploy.services = tuple(self.stable_ports.allocate() for _ in deploy.web)
                deploy.sites = self._sites(deploy, deploy.services, self._switch_address)
                deploy.reroute = True
        except (ValueError, NoStablePort) as exc:
            kind = FailureKind.PORTS if isinstance(exc, NoStablePort) else FailureKind.CONFIG
            self._fail(deploy, f"cannot route it: {exc}", kind=kind)
            return
        deploy.move(Stage.POINTING)
        assert self.c.switch is not None
        self.c.switch.tell(
            PointServices(
                app=deploy.app,
                deploy_id=deploy.id,
                targets=tuple(zip(deploy.services, deploy.ports, strict=True)),
                previous=previous,
            )
        )

    def _services_pointed(self, deploy_id: int, at: float) -> None:
        deploy = self.owners.get(deploy_id)
        if deploy is None or deploy.stage is not Stage.POINTING:
            return  # a restore after a failure, or a deploy that ended meanwhile
        deploy.pointed_at = at or None
        app = self.apps[deploy.app]
        if deploy.reroute:
            # Its stable addresses lead to it; nginx must now route its hosts to them.
            deploy.move(Stage.SWITCHING)
            self._request_nginx()
            return
        log.info("%s: deploy #%d: the kernel leads new connections to it", app.name, deploy.id)
        self._switched(app, deploy)
        self._continue_waiting(app)

    def _restore_services(self, app: App, deploy: Deploy) -> None:
        """A deploy failed while POINTING at stable ports it shares with the serving
        version: lead them back to that version (the switch may not have done it)."""
        serving = app.serving
        if serving is None or deploy.reroute or serving.services != deploy.services:
            return
        assert self.c.switch is not None
        self.c.switch.tell(
            PointServices(
                app=app.name,
                deploy_id=serving.id,
                targets=tuple(zip(serving.services, serving.ports, strict=True)),
            )
        )

    def _desired_sites(self) -> tuple[Site, ...]:
        sites: list[Site] = []
        for app in self.apps.values():
            deploy = self._routed(app)
            if deploy is not None:
                sites.extend(deploy.sites)
        if self._dashboard is not None:
            sites.append(self._dashboard)
        sites = [with_certificates(site, self._certificates) for site in sites]
        return tuple(sorted(sites, key=lambda s: s.app))

    def _request_nginx(self) -> None:
        """Send the desired routing to nginx; one generation in flight at a time."""
        if self._nginx_inflight is not None:
            self._nginx_dirty = True  # sent again, with everything since, when the reply comes
            return
        self._generation += 1
        generation = self._generation
        for app in self.apps.values():
            deploy = app.next
            if deploy is not None and deploy.stage is Stage.SWITCHING and deploy.generation is None:
                deploy.generation = generation
                self._waiting_on_nginx.add(app.name)
            if app.removing and app.remove_generation is None:
                app.remove_generation = generation
                self._waiting_on_nginx.add(app.name)
        self._nginx_inflight = generation
        self._nginx_dirty = False
        sites = self._desired_sites()
        self.c.nginx.tell(ApplyNginx(generation=generation, sites=sites))
        wanted = acme_hosts(sites)
        if wanted != self._acme_hosts and self.c.acme is not None:
            self._acme_hosts = wanted
            self.c.acme.tell(CertificatesWanted(hosts=tuple(sorted(wanted))))

    def _nginx_replied(self, generation: int, failure: str | None, refused: dict[str, str]) -> None:
        """Finish every switch and removal that rode on ``generation``, either way.

        The nginx writer has logged a failure already; each deploy it sinks says so too.
        """
        for name in sorted(self._waiting_on_nginx):
            app = self.apps.get(name)
            if app is None:
                self._waiting_on_nginx.discard(name)
                continue
            done = True
            deploy = app.next
            if deploy is not None and deploy.generation is not None:
                if deploy.generation > generation:
                    done = False
                elif failure is None and name not in refused:
                    self._switched(app, deploy)
                elif failure is not None:
                    reason = f"nginx did not take the new config: {failure}"
                    self._fail(deploy, reason, kind=FailureKind.NGINX)
                else:
                    reason = f"nginx refused its site: {refused[name]}"
                    self._fail(deploy, reason, kind=FailureKind.NGINX)
            if app.removing and app.remove_generation is not None:
                if app.remove_generation > generation:
                    done = False
                else:
                    self._removed(app, drain=failure is None)
            if done:
                self._waiting_on_nginx.discard(name)
            self._continue_waiting(app)
        for name, reason in refused.items():
            app = self.apps.get(name)
            if app is not None and app.serving is not None and app.next is None:
                # nginx withdrew a site that had been serving (its files changed outside keter).
                log.error("%s: nginx withdrew its site: %s", name, reason)
                # No longer routed: nginx is not asked for it again, and the app's next
                # deploy (even one with the very same routes) goes through nginx.
                app.serving.sites = ()
        # Cleared only now, so requests made while handling the reply are batched into one.
        self._nginx_inflight = None
        if self._nginx_dirty:
            self._request_nginx()
        self._nginx_ready = True
        self._start_watching()

    def _switch_known(self, ready: SwitchReady) -> None:
        """The switch component's one report at start: the mode for this run."""
        self.switch_mode = ready.mode
        if ready.address is not None:
            self._switch_address = ready.address
        if self.c.status is not None:
            self.c.status.tell(ready)
        self._switch_ready = True
        self._start_watching()

    def _start_watching(self) -> None:
        """Deploys may begin once nginx took keter's first config and the switch mode is
        known (the monitor, started earlier, has already stopped an earlier run's leftovers)."""
        if self._watching or not (self._nginx_ready and self._switch_ready):
            return
        if self.exit_code is None:
            self._watching = True
            self.c.watcher.start()

    def _switched(self, app: App, deploy: Deploy) -> None:
        """The deploy takes the traffic (POINTING or SWITCHING -> SERVING); the old drains."""
        old, app.serving, app.next = app.serving, deploy, None
        deploy.move(Stage.SERVING)
        self._changed.add(app.name)
        took = self.clock() - deploy.began
        hosts = ", ".join(deploy.hosts)
        log.info("%s: deploy #%d now serving %s (took %.2fs)", app.name, deploy.id, hosts, took)
        if self.c.stats is not None:  # before any watch of it: records are named by time
            self.c.stats.tell(
                VersionServing(
                    app=app.name, version=deploy.version, since=deploy.pointed_at or time.time()
                )
            )
        self._finished(deploy, Outcome.SERVING, watch_seconds=self._watch(deploy, old))
        self._start_workers(deploy)
        if old is not None:
            self._release_hosts(old, keep=deploy)
            self._drain(old)

    # -- watched rollout (issue 14: keter.stats watches, the supervisor decides) ------------

    def _watch(self, deploy: Deploy, previous: Deploy | None) -> float:
        """Have the stats component watch a version that replaced ``previous``; the seconds.

        Not watched: the first version (nothing to go back to), or watch-seconds 0.
        """
        assert deploy.config is not None
        seconds = deploy.config.watch_seconds
        if seconds is None:
            seconds = self.config.watch_seconds
        if self.c.stats is None or previous is None or not previous.sha256 or seconds <= 0:
            return 0.0
        deploy.rollback_to = previous.sha256
        deploy.watch_until = self.clock() + seconds
        self.c.stats.tell(
            WatchVersion(
                app=deploy.app,
                version=deploy.version,
                previous=previous.version,
                seconds=seconds,
                max_error_ratio=self.config.watch_max_error_ratio,
                min_requests=self.config.watch_min_requests,
            )
        )
        return seconds

    def _unhealthy(self, app_name: str, version: str, reason: str) -> None:
        """A watched version made things worse: roll back to the version before it, once.

        The archived bundle goes back into incoming/ (the status component holds the
        archive) and the usual pipeline deploys it, with no request lost.
        """
        app = self.apps.get(app_name)
        deploy = app.serving if app is not None else None
        if deploy is None or deploy.version != version or deploy.rollback_to is None:
            return  # replaced, removed or rolled back meanwhile
        if app.next is not None or self.clock() > deploy.watch_until + WATCH_GRACE:
            return  # a newer bundle is on its way, or the watch is over
        target, deploy.rollback_to = deploy.rollback_to, None
        log.warning("%s: version %s rolled back to %s: %s", app_name, version, target[:12], reason)
        if self.c.status is not None:
            self.c.status.tell(
                DeployFinished(
                    app=deploy.app,
                    version=deploy.version,
                    sha256=deploy.sha256,
                    bundle_mtime=deploy.bundle_mtime,
                    outcome=Outcome.ROLLED_BACK,
                    reason=reason,
                    duration=self.clock() - deploy.began,
                    at=time.time(),
                )
            )
            self.c.status.tell(RollBack(app=app_name, sha256=target, reason=reason))

    def _removed(self, app: App, *, drain: bool) -> None:
        """The app's bundle was removed and nginx no longer routes it (or failed to change)."""
        # On failure nginx may still route to the app, but the user removed its bundle:
        # stop it anyway; nginx catches up with its next successful generation.
        if app.serving is not None:
            self._release_hosts(app.serving)
            if drain:
                self._drain(app.serving)
            else:
                self._retire(app.serving, 0)
            app.serving = None
        app.removing, app.remove_generation = False, None
        self._changed.add(app.name)
        log.info("%s: removed", app.name)
        self._event(app.name, EventKind.REMOVED, "bundle removed; app stopped")

    def _continue_waiting(self, app: App) -> None:
        """After a switch ended (either way): carry out what waited for it."""
        if app.removing and app.next is None and app.remove_generation is None:
            self._request_nginx()  # a removal requested mid-switch
        if app.waiting is not None and app.next is None:
            self._begin(app, app.waiting)
        self._forget_if_idle(app)

    # -- endings -------------------------------------------------------------------------------

    def _fail(
        self,
        deploy: Deploy,
        reason: str,
        tail: tuple[str, ...] = (),
        *,
        kind: FailureKind,
        stopped_already: int | None = None,
    ) -> None:
        """The deploy on its way failed: undo it; the serving version is untouched."""
        if len(reason) > PROBLEMS_LIMIT:  # components cap theirs; this is the last gate
            reason = (
                f"{reason[:PROBLEMS_LIMIT]}... ({len(reason) - PROBLEMS_LIMIT} more characters)"
            )
        log.error("%s: deploy #%d failed: %s", deploy.app, deploy.id, reason)
        self._finished(deploy, Outcome.FAILED, reason, kind)
        if tail:
            log.error("%s: last output:\n%s", deploy.app, "\n".join(f"  | {line}" for line in tail))
        app = self.apps[deploy.app]
        if app.next is deploy:
            app.next = None
        self._changed.add(app.name)
        if deploy.stage is Stage.POINTING:
            self._restore_services(app, deploy)
        self._release_hosts(deploy, keep=app.serving)
        self._retire(deploy, 0, skip=stopped_already)
        if app.serving is not None:
            log.info("%s: deploy #%d keeps serving", app.name, app.serving.id)
        self._continue_waiting(app)

    def _abandon(self, deploy: Deploy, reason: str) -> None:
        log.info("%s: deploy #%d abandoned: %s", deploy.app, deploy.id, reason)
        self._finished(deploy, Outcome.SUPERSEDED, reason)
        app = self.apps[deploy.app]
        app.next = None
        self._release_hosts(deploy, keep=app.serving)
        self._retire(deploy, 0)

    def _drain(self, deploy: Deploy) -> None:
        """A version that served no longer gets new connections (SERVING -> DRAINING).

        It is stopped once its ports hold no connection (the switch reports Drained),
        or when drain-seconds are over, whichever comes first.
        """
        drain = self.config.drain_seconds
        if not self._live(deploy) or drain <= 0:
            self._retire(deploy, 0)
            return
        deploy.move(Stage.DRAINING)
        log.info("%s: deploy #%d drains (at most %.1fs)", deploy.app, deploy.id, drain)
        ports = tuple(web.port for web in deploy.web)
        if self.c.switch is not None and ports:
            self.c.switch.tell(
                WatchDrain(app=deploy.app, deploy_id=deploy.id, ports=ports, seconds=drain)
            )
        self._schedule(drain, _DrainOver(deploy_id=deploy.id))

    def _retire(self, deploy: Deploy, delay: float, *, skip: int | None = None) -> None:
        """Stop whatever of the deploy runs, then end it (see keter.deploys for the stages)."""
        if deploy.stage in (Stage.UNPACKING, Stage.PROVISIONING):
            # Nothing runs. A deploy still in the unpacker (no config yet) has no folder
            # to remove now: the unpacker's late reply is recognised as stale then.
            self._ended(deploy, remove_folder=deploy.config is not None)
            return
        if not self._live(deploy):
            self._ended(deploy)
            return
        if deploy.stage in (Stage.SERVING, Stage.DRAINING):
            log.info("%s: stopping deploy #%d", deploy.app, deploy.id)
        deploy.move(Stage.RETIRING)
        for process_id in deploy.process_ids:
            if process_id != skip and self.owners.get(process_id) is deploy:
                self.c.monitor.tell(StopProcess(app=deploy.app, deploy_id=process_id, delay=delay))

    def _ended(self, deploy: Deploy, *, remove_folder: bool = True) -> None:
        """Nothing of the deploy runs any more: release its ports, remove its folder."""
        deploy.move(Stage.ENDED)
        for port in deploy.ports_held:
            self.ports.release(port)
        self._release_stable_ports(deploy)
        self.owners.pop(deploy.id, None)
        if remove_folder and deploy.folder_exists:
            self.c.unpacker.tell(RemoveFolder(path=deploy.folder))
        if deploy.web or deploy.outcome is Outcome.SERVING:
            log.info("%s: deploy #%d stopped and removed", deploy.app, deploy.id)
        app = self.apps.get(deploy.app)
        if app is not None:
            self._forget_if_idle(app)

    def _release_stable_ports(self, deploy: Deploy) -> None:
        """Its stable ports that no other version of the app uses go back, kernel rules too."""
        app = self.apps.get(deploy.app)
        kept = set()
        if app is not None:
            for other in (app.serving, app.next):
                if other is not None and other is not deploy:
                    kept.update(other.services)
        gone = tuple(port for port in deploy.services if port not in kept)
        for port in gone:
            self.stable_ports.release(port)
        if gone and self.c.switch is not None:
            self.c.switch.tell(ReleaseServices(app=deploy.app, ports=gone))

    def _release_hosts(self, deploy: Deploy, keep: Deploy | None = None) -> None:
        """The deploy no longer claims its hosts (those ``keep`` claims stay claimed)."""
        kept = set(keep.hosts) if keep is not None else set()
        for host in deploy.hosts:
            if host not in kept and self.hosts.get(host) == deploy.app:
                del self.hosts[host]

    def _forget_if_idle(self, app: App) -> None:
        gone = app.idle and not app.removing and not app.bundle_present
        if gone and self.apps.get(app.name) is app:
            del self.apps[app.name]
            self._changed.add(app.name)

    def _next(self, app: str, deploy_id: int) -> Deploy | None:
        """The app's in-flight deploy if it is ``deploy_id``; None for a stale reply."""
        state = self.apps.get(app)
        if state is not None and state.next is not None and state.next.id == deploy_id:
            return state.next
        return None

    # -- failures of keter itself ------------------------------------------------------------

    def _component(self, name: Component) -> Teller:
        return next(c for c in self.c.all() if c.component == name)

    def _component_failed(self, failed: ComponentFailed) -> None:
        """One-for-one: fail the deploy the failing message was about, restart the component.

        A component that keeps failing (more than RESTART_LIMIT times within
        RESTART_WINDOW seconds) means keter cannot go on: it stops, non-zero.
        """
        log.critical(
            "keter: component %s failed handling %s: %s\n%s",
            failed.component,
            failed.message or "its start",
            log_text(failed.error),
            failed.traceback.rstrip(),
        )
        reason = f"internal error in {failed.component}: {log_text(failed.error)}"
        if failed.deploy_id is not None:
            self._fail_owner(failed.deploy_id, reason)
        if failed.component is Component.NGINX and self._nginx_inflight is not None:
            # The generation it was applying will never be answered.
            self._nginx_replied(self._nginx_inflight, reason, {})

        recent = self._recent(self._failures.setdefault(failed.component, []))
        if len(recent) > RESTART_LIMIT:
            log.critical(
                "keter: component %s failed %d times within %gs; keter cannot go on",
                failed.component,
                len(recent),
                RESTART_WINDOW,
            )
            self.exit_code = 1
            return
        delay = min(RESTART_MAX_DELAY, RESTART_FIRST_DELAY * 2 ** (len(recent) - 1))
        self._schedule(delay, _RestartComponent(component=failed.component))

    def _handler_failed(self, msg: object, exc: Exception) -> None:
        """A bug in the supervisor's own handler: fail that message's deploy and go on."""
        log.critical(
            "keter: internal error handling %s: %s: %s\n%s",
            type(msg).__name__,
            type(exc).__name__,
            exc,
            traceback.format_exc().rstrip(),
        )
        recent = self._recent(self._own_failures)
        deploy_id = getattr(msg, "deploy_id", None)
        if isinstance(deploy_id, int):
            try:
                self._fail_owner(deploy_id, f"internal error in keter: {type(exc).__name__}")
            except Exception:
                log.critical("keter: cannot fail the deploy either; its state is unknown")
                recent.append(self.clock())
        if len(recent) > RESTART_LIMIT:
            log.critical(
                "keter: %d internal errors within %gs; stopping", len(recent), RESTART_WINDOW
            )
            self.exit_code = 1

    def _fail_owner(self, some_id: int, reason: str) -> None:
        """Fail the deploy on its way that ``some_id`` (a deploy or process id) belongs to."""
        deploy = self.owners.get(some_id)
        if deploy is None:
            return
        app = self.apps.get(deploy.app)
        if app is not None and app.next is deploy:
            self._fail(deploy, reason, kind=FailureKind.INTERNAL)

    def _recent(self, times: list[float]) -> list[float]:
        """Record a failure now; ``times`` keeps only those within the window."""
        now = self.clock()
        times[:] = [t for t in times if now - t < RESTART_WINDOW] + [now]
        return times

    # -- status ---------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Tell the status component what changed (only apps touched by the last message)."""
        changed, self._changed = self._changed, set()
        if self.c.status is None:
            return
        for name in changed:
            app = self.apps.get(name)
            if app is None:
                if self._published.pop(name, None) is not None:
                    self.c.status.tell(AppGone(app=name))
                continue
            snapshot = app.snapshot()
            if self._published.get(name) != snapshot:
                self._published[name] = snapshot
                self.c.status.tell(AppChanged(snapshot=snapshot))

    def _event(self, app: str, kind: EventKind, text: str) -> None:
        if self.c.status is not None:
            self.c.status.tell(AppEvent(app=app, kind=kind, text=text, at=time.time()))

    def _finished(
        self,
        deploy: Deploy,
        outcome: Outcome,
        reason: str = "",
        kind: FailureKind | None = None,
        watch_seconds: float = 0.0,
    ) -> None:
        deploy.outcome = outcome
        if self.c.status is not None:
            self.c.status.tell(
                DeployFinished(
                    app=deploy.app,
                    version=deploy.version,
                    sha256=deploy.sha256,
                    bundle_mtime=deploy.bundle_mtime,
                    outcome=outcome,
                    reason=reason,
                    duration=self.clock() - deploy.began,
                    at=time.time(),
                    kind=kind,
                    watch_seconds=watch_seconds,
                )
            )
