"""The supervisor: the main thread, sole owner of what is deployed.

Every component reports facts into the supervisor's inbox; the supervisor
decides and sends commands back. The deploy of one bundle version walks these
stages, each finished by a reply message:

    UNPACKING     -> BundleUnpacked      (unpacker)
    PROVISIONING  -> DatabaseReady       (postgres provisioner, only for postgres: true)
    STARTING      -> ProcessHealthy      (process monitor: spawned and answering)
    SWITCHING     -> NginxApplied        (nginx writer: config written, tested, reloaded, confirmed)
    SERVING          the old version is retired: stopped after the drain period, folder removed

Any failure on the way stops the new version and removes its folder; the
version that was serving is never touched. An app has at most one version
serving and one on its way (``next``); a newer bundle supersedes ``next``,
except while nginx is already switching to it, in which case the newer bundle
waits for that switch to finish (only the latest waiting bundle is kept).

A bundle is any mix of Keter's stanzas (``keter.bundle``). One without a web
app (static files, redirects, reverse proxies, workers only) skips STARTING:
nothing needs a port or a health check before nginx switches to it. Certificates
and TLS listeners are checked (``keter.routes.deploy_problems``) right after
unpacking, so a bad certificate fails that deploy alone, before nginx sees it.

Background workers are processes of the deploy like its web app, each with its
own process id from the deploy-id counter (``Deploy.workers``), supervised by
the process monitor without port or health check. A version's workers start
once it serves, and stop with it: on a redeploy the old version's workers are
stopped after the new version's have started (after the drain period, together
with the old web app), as in Keter. A worker that crashed more often than its
``restart-count`` is stopped for good.
"""

from __future__ import annotations

import enum
import logging
import os
import pwd
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from keter import systemd
from keter.bundle import Background, BundleConfig
from keter.config import KeterConfig
from keter.messages import (
    AppChanged,
    AppEvent,
    AppGone,
    ApplyNginx,
    AppSnapshot,
    AppState,
    BundleArrived,
    BundleIgnored,
    BundleRemoved,
    BundleUnpacked,
    ComponentFailed,
    DatabaseFailed,
    DatabaseReady,
    DbInfo,
    DeployFinished,
    EventKind,
    FailureKind,
    HealthCheck,
    NginxApplied,
    NginxFailed,
    Outcome,
    ProcessFailed,
    ProcessHealthy,
    ProcessSpec,
    ProcessStarted,
    ProcessState,
    ProcessStateChanged,
    ProcessStopped,
    ProvisionDatabase,
    RemoveFolder,
    Rescan,
    RescanRequested,
    ScanCompleted,
    ShutdownRequested,
    Site,
    StartProcess,
    StopProcess,
    UnpackBundle,
    UnpackFailed,
)
from keter.nginx import NginxWriter, ProxyOptions
from keter.postgres import PostgresProvisioner, db_env
from keter.processes import ProcessMonitor
from keter.processes.ports import NoFreePort, PortPool
from keter.routes import approot, dashboard_site, deploy_problems, sites_for
from keter.status import StatusServer
from keter.unpacker import Unpacker
from keter.watcher import IncomingWatcher

log = logging.getLogger(__name__)

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A component restarted more often than this within the window means keter cannot go on.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0


class Stage(enum.Enum):
    UNPACKING = "unpacking"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    SWITCHING = "switching"
    SERVING = "serving"


@dataclass(kw_only=True)
class Deploy:
    """One version of one app, from bundle to retirement."""

    id: int
    app: str
    bundle: Path
    bundle_mtime: float  # seconds since the epoch
    stage: Stage = Stage.UNPACKING
    began: float = field(default_factory=time.monotonic)
    folder: Path | None = None
    config: BundleConfig | None = None
    port: int | None = None
    pid: int | None = None
    db: DbInfo | None = None
    generation: int | None = None  # the nginx generation that switches traffic to it
    process_state: ProcessState | None = None
    sha256: str = ""  # of the bundle as unpacked
    started_at: float | None = None  # wall clock time its current process started
    restarts: int = 0
    # Background workers: process id -> index into config.backgrounds; and their restarts.
    workers: dict[int, int] = field(default_factory=dict)
    worker_restarts: dict[int, int] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.sha256[:12] or "unknown"

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host the version claims, from all its stanzas."""
        if self.config is None:
            return ()
        return self.config.all_hosts

    @property
    def process_ids(self) -> tuple[int, ...]:
        """The web app's id (the deploy's own, used even without a web app) and the workers'."""
        return (self.id, *self.workers)


@dataclass(kw_only=True)
class App:
    name: str
    serving: Deploy | None = None
    next: Deploy | None = None
    waiting: BundleArrived | None = None  # a newer bundle held back while nginx switches
    removing: bool = False
    remove_generation: int | None = None
    # While its bundle is in incoming/, an app stays known, even with nothing serving
    # (its first deploy failed): the operator must see it as failed, not as absent.
    bundle_present: bool = True

    @property
    def idle(self) -> bool:
        return self.serving is None and self.next is None and self.waiting is None

    def snapshot(self) -> AppSnapshot:
        shown = self.serving
        if shown is None:
            busy = self.next is not None or self.waiting
            state = AppState.DEPLOYING if busy else AppState.FAILED
        elif shown.process_state in (ProcessState.BACKOFF, ProcessState.STARTING):
            state = AppState.BACKOFF  # a serving version is only STARTING again after a crash
        else:
            state = AppState.RUNNING
        return AppSnapshot(
            app=self.name,
            state=state,
            version=shown.version if shown else None,
            bundle_mtime=shown.bundle_mtime if shown else None,
            hosts=shown.hosts if shown else (),
            port=shown.port if shown else None,
            pid=shown.pid if shown else None,
            started_at=shown.started_at if shown else None,
            restarts=shown.restarts if shown else 0,
            database=shown.db.name if shown and shown.db else None,
            deploying=self.next.version if self.next and self.next.sha256 else None,
        )


def app_environment(
    config: KeterConfig, bundle: BundleConfig, port: int, db: DbInfo | None
) -> dict[str, str]:
    """The complete environment an app process gets (nothing else leaks from keter's).

    After the base and the global ``env``: the ``forward-env`` names that keter's
    own environment has, the bundle's ``env``, then PORT (also under every
    ``port-env-vars`` name), APPROOT and the database variables.
    """
    webapp = bundle.webapp
    assert webapp is not None
    env = _base_environment(config, webapp.forward_env)
    env.update(webapp.env)
    for name in ("PORT", *webapp.port_env_vars):
        env[name] = str(port)
    secure = webapp.ssl is not False
    env["APPROOT"] = approot(webapp.hosts[0], secure=secure, settings=config)
    if db is not None:
        env.update(db_env(db))
    return env


def worker_environment(
    config: KeterConfig, worker: Background, db: DbInfo | None
) -> dict[str, str]:
    """A background worker's environment: as an app's, without PORT and APPROOT."""
    env = _base_environment(config, worker.forward_env)
    env.update(worker.env)
    if db is not None:
        env.update(db_env(db))
    return env


def _base_environment(config: KeterConfig, forward: tuple[str, ...]) -> dict[str, str]:
    home = "/"
    if config.setuid:
        home = pwd.getpwnam(config.setuid).pw_dir
    env = {"PATH": BASE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": home}
    env.update(config.env)
    # Only what the bundle names: the rest of keter's environment stays out.
    env.update({name: os.environ[name] for name in forward if name in os.environ})
    return env


def _covered(assigned: int | None, generation: int) -> bool:
    """Whether a change sent with nginx generation ``assigned`` is settled by this reply."""
    return assigned is not None and assigned <= generation


class Supervisor:
    def __init__(self, config: KeterConfig) -> None:
        self.config = config
        # SimpleQueue, not Queue: its put() is reentrant, so signal handlers may call it.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.apps: dict[str, App] = {}
        self.retiring: dict[int, Deploy] = {}  # deploys whose processes are being stopped
        self.ports = PortPool(*config.port_range)
        self._deploy_ids = iter(range(1, 1 << 62))
        self._generation = 0
        self._nginx_inflight: int | None = None
        self._nginx_dirty = False
        self._exit_code: int | None = None
        self._published: dict[str, AppSnapshot] = {}
        self._failures: dict[str, list[float]] = {}  # component -> recent failure times
        self._watching = False  # the watcher runs (from nginx's first reply on)
        self._dashboard = dashboard_site(config)  # routed with the apps when configured

        report = self.inbox
        self.watcher = IncomingWatcher(config.incoming_dir, report_to=report)
        self.unpacker = Unpacker(
            config.temp_dir,
            max_bytes=config.max_unpacked_bytes,
            max_members=config.max_members,
            report_to=report,
        )
        self.monitor = ProcessMonitor(
            report_to=report,
            run_dir=config.run_dir,
            health_check_timeout=config.health_check_timeout,
            stop_timeout=config.stop_timeout,
            log_max_bytes=config.log_max_bytes,
            log_backups=config.log_backups,
        )
        self.nginx = NginxWriter(
            listeners=config.listeners,
            config_file=config.nginx.config_file,
            test_command=config.nginx.test_command,
            reload_command=config.nginx.reload_command,
            report_to=report,
            options=ProxyOptions.from_config(config),
        )
        self.postgres = PostgresProvisioner(
            etc_dir=config.etc_dir,
            admin_dsn=config.postgres.admin_dsn,
            retry_for=config.postgres.retry_seconds,
            report_to=report,
        )
        # The operator's API (keter.status); _publish tells it every change.
        self.status: StatusServer | None = StatusServer(config, report_to=report)
        # The watcher is not among these: it starts once nginx has taken keter's
        # first config (see run), so no deploy begins before that.
        self.components = [self.unpacker, self.monitor, self.nginx, self.postgres, self.status]

    # -- running ---------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Handlers only enqueue; all work (and all logging) happens in the loop."""

        def on_stop(signum, _frame):
            self.inbox.put(ShutdownRequested(signal_name=signal.Signals(signum).name))

        def on_hup(_signum, _frame):
            self.inbox.put(RescanRequested())

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def run(self) -> int:
        """Run until shutdown; returns the process exit code."""
        log.info("keter: starting on %s", self.config.root)
        for warning in self.config.warnings:
            log.warning("keter: %s", warning)
        for component in self.components:
            component.start()
        # nginx must reflect reality before any app starts: an earlier run's config
        # routes hosts to ports this run may hand to other apps.
        self._request_nginx()
        while self._exit_code is None:
            self.dispatch(self.inbox.get())
        return self._exit_code

    def dispatch(self, message: object) -> None:
        self._handle(message)
        self._publish()

    def _handle(self, message: object) -> None:
        match message:
            case BundleArrived():
                self._bundle_arrived(message)
            case BundleRemoved(app=app):
                self._bundle_removed(app)
            case BundleIgnored():
                pass  # the watcher has logged it
            case ScanCompleted():
                log.info("keter: initial scan done, %d bundle(s) found", len(self.apps))
                systemd.notify("READY=1")
            case BundleUnpacked():
                self._unpacked(message)
            case UnpackFailed(app=app, deploy_id=deploy_id, reason=reason, kind=kind):
                if deploy := self._next_deploy(app, deploy_id):
                    deploy.folder = None  # the unpacker removed it
                    self._fail(deploy, reason, kind=kind)
            case DatabaseReady(app=app, deploy_id=deploy_id, db=db):
                if deploy := self._next_deploy(app, deploy_id):
                    deploy.db = db
                    self._start_process(deploy)
            case DatabaseFailed(app=app, deploy_id=deploy_id, reason=reason):
                if deploy := self._next_deploy(app, deploy_id):
                    self._fail(deploy, f"database: {reason}", kind=FailureKind.DATABASE)
            case ProcessStarted(app=app, deploy_id=deploy_id, pid=pid) if self._worker_deploy(
                deploy_id
            ):
                log.info("%s: background worker #%d started pid %d", app, deploy_id, pid)
            case ProcessStarted(app=app, deploy_id=deploy_id, pid=pid, port=port):
                log.info("%s: deploy #%d started pid %d on port %s", app, deploy_id, pid, port)
                if deploy := self._find_deploy(app, deploy_id):
                    deploy.pid, deploy.started_at = pid, time.time()
            case ProcessHealthy(app=app, deploy_id=deploy_id):
                if deploy := self._next_deploy(app, deploy_id):
                    log.info("%s: deploy #%d is healthy, switching traffic", app, deploy_id)
                    deploy.stage = Stage.SWITCHING
                    self._request_nginx()
            case ProcessFailed(app=app, deploy_id=deploy_id, reason=reason) if self._worker_deploy(
                deploy_id
            ):
                # Its deploy serves on; ProcessStopped follows and forgets the worker.
                log.error("%s: background worker #%d could not start: %s", app, deploy_id, reason)
            case ProcessFailed(
                app=app, deploy_id=deploy_id, reason=reason, kind=kind, output_tail=tail
            ):
                if deploy := self._next_deploy(app, deploy_id):
                    # The monitor has already stopped it; ProcessStopped follows.
                    self._fail(deploy, reason, tail, kind=kind, process_stopping=True)
            case ProcessStateChanged():
                self._process_state_changed(message)
            case ProcessStopped(app=app, deploy_id=deploy_id):
                self._process_stopped(app, deploy_id)
            case NginxApplied(generation=generation):
                self._nginx_replied(generation, None)
            case NginxFailed(generation=generation, reason=reason):
                self._nginx_replied(generation, reason)
            case RescanRequested():
                self.watcher.tell(Rescan())
            case ShutdownRequested(signal_name=name):
                log.info("keter: %s received, stopping every app", name)
                self._shutdown(0)
            case ComponentFailed():
                self._component_failed(message)
            case _:
                log.error("keter: unexpected message %r", message)

    # -- component failures ------------------------------------------------------------

    def _component_failed(self, failed: ComponentFailed) -> None:
        """One-for-one: fail the deploy the failing message was about, restart the component.

        A component that keeps failing (RESTART_LIMIT times within RESTART_WINDOW
        seconds) means keter cannot go on: it exits non-zero and systemd restarts it.
        """
        log.critical(
            "keter: component %s failed handling %s: %s\n%s",
            failed.component,
            failed.message or "its start",
            failed.error,
            failed.traceback,
        )
        component = next(c for c in self._all_components() if c.component == failed.component)
        now = time.monotonic()
        recent = [t for t in self._failures.get(failed.component, []) if now - t < RESTART_WINDOW]
        recent.append(now)
        self._failures[failed.component] = recent
        if failed.deploy_id is not None:
            deploy = self._in_flight(failed.deploy_id)
            if deploy is not None:
                reason = f"internal error in {failed.component}: {failed.error}"
                self._fail(deploy, reason, kind=FailureKind.INTERNAL)
        if len(recent) > RESTART_LIMIT:
            log.critical(
                "keter: component %s failed %d times within %gs; stopping",
                failed.component,
                len(recent),
                RESTART_WINDOW,
            )
            self._shutdown(1)
            return
        component.join(timeout=1.0)
        component.restart()
        log.warning("keter: component %s restarted", failed.component)

    def _all_components(self) -> list:
        return [self.watcher, *self.components]

    def _in_flight(self, process_id: int) -> Deploy | None:
        """The deploy on its way whose id (or one of whose processes) is ``process_id``."""
        for app in self.apps.values():
            if app.next is not None and process_id in app.next.process_ids:
                return app.next
        return None

    # -- status ----------------------------------------------------------------------

    def _publish(self) -> None:
        """Tell the status component what changed since the last message (cheap: no I/O)."""
        if self.status is None:
            return
        for app in self.apps.values():
            snapshot = app.snapshot()
            if self._published.get(app.name) != snapshot:
                self._published[app.name] = snapshot
                self.status.tell(AppChanged(snapshot=snapshot))
        for name in self._published.keys() - self.apps.keys():
            del self._published[name]
            self.status.tell(AppGone(app=name))

    def _event(self, app: str, kind: EventKind, text: str) -> None:
        if self.status is not None:
            self.status.tell(AppEvent(app=app, kind=kind, text=text, at=time.time()))

    def _finished(
        self,
        deploy: Deploy,
        outcome: Outcome,
        reason: str = "",
        kind: FailureKind | None = None,
    ) -> None:
        if self.status is not None:
            self.status.tell(
                DeployFinished(
                    app=deploy.app,
                    version=deploy.version,
                    sha256=deploy.sha256,
                    bundle_mtime=deploy.bundle_mtime,
                    outcome=outcome,
                    kind=kind,
                    reason=reason,
                    duration=time.monotonic() - deploy.began,
                    at=time.time(),
                )
            )

    def _process_state_changed(self, msg: ProcessStateChanged) -> None:
        if worker_of := self._worker_deploy(msg.deploy_id):
            self._worker_state_changed(worker_of, msg)
            return
        deploy = self._find_deploy(msg.app, msg.deploy_id)
        if deploy is None:
            return
        previous, deploy.process_state = deploy.process_state, msg.state
        if msg.pid is not None and msg.pid != deploy.pid:
            deploy.pid, deploy.started_at = msg.pid, time.time()
        if deploy.stage is not Stage.SERVING:
            return  # a new version's start is reported through its deploy
        if msg.state is ProcessState.BACKOFF:
            deploy.restarts += 1
            if previous is ProcessState.RUNNING:
                self._event(msg.app, EventKind.CRASH, msg.detail)
        elif msg.state is ProcessState.RUNNING and previous is ProcessState.STARTING:
            self._event(msg.app, EventKind.RESTART, f"running again ({msg.detail})")

    # -- bundles ---------------------------------------------------------------------

    def _bundle_arrived(self, arrived: BundleArrived) -> None:
        app = self.apps.setdefault(arrived.app, App(name=arrived.app))
        app.bundle_present = True
        log.info("%s: bundle seen (%d bytes)", arrived.app, arrived.size)
        if app.next is not None:
            if app.next.stage is Stage.SWITCHING and app.next.generation is not None:
                # nginx may already route to it; let the switch finish, then deploy this one.
                app.waiting = arrived
                return
            self._abandon(app.next, "superseded by a newer bundle")
        self._begin(app, arrived)

    def _begin(self, app: App, arrived: BundleArrived) -> None:
        deploy_id = next(self._deploy_ids)
        deploy = Deploy(
            id=deploy_id, app=app.name, bundle=arrived.path, bundle_mtime=arrived.mtime_ns / 1e9
        )
        deploy.folder = self.config.temp_dir / f"{app.name}-{deploy_id}"
        app.next = deploy
        app.waiting = None
        self.unpacker.tell(
            UnpackBundle(app=app.name, deploy_id=deploy_id, bundle=arrived.path, dest=deploy.folder)
        )

    def _bundle_removed(self, name: str) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        log.info("%s: bundle removed from incoming/", name)
        app.waiting = None
        app.bundle_present = False
        if app.next is not None:
            if app.next.stage is Stage.SWITCHING and app.next.generation is not None:
                app.removing = True  # handled when the switch completes
                return
            self._abandon(app.next, "its bundle was removed")
        if app.serving is None:
            self._forget_if_idle(app)
            return
        app.removing = True
        app.remove_generation = None
        self._request_nginx()

    def _unpacked(self, msg: BundleUnpacked) -> None:
        deploy = self._next_deploy(msg.app, msg.deploy_id)
        if deploy is None:
            self.unpacker.tell(RemoveFolder(path=msg.folder))  # superseded meanwhile
            return
        config: BundleConfig = msg.config  # type: ignore[assignment]
        deploy.config = config
        deploy.sha256 = msg.sha256
        for warning in msg.warnings:
            log.warning("%s: %s", msg.app, warning)
        if not config.runs_something and not config.serves_http:
            self._fail(
                deploy, "config/keter.yaml defines nothing to run or serve", kind=FailureKind.CONFIG
            )
            return
        for host in config.all_hosts:
            owner = self._host_owner(host, except_app=msg.app)
            if owner is not None:
                reason = f"host {host} is already served by app {owner}"
                self._fail(deploy, reason, kind=FailureKind.CONFLICT)
                return
        problems = deploy_problems(config, self.config)
        if problems:
            self._fail(deploy, "; ".join(problems), kind=FailureKind.CONFIG)
            return
        log.info(
            "%s: deploy #%d unpacked, hosts %s", msg.app, msg.deploy_id, ", ".join(deploy.hosts)
        )
        if config.postgres:
            deploy.stage = Stage.PROVISIONING
            self.postgres.tell(ProvisionDatabase(app=msg.app, deploy_id=msg.deploy_id))
        else:
            self._start_process(deploy)

    def _host_owner(self, host: str, *, except_app: str) -> str | None:
        if host == self.config.dashboard_host:
            return "keter (its dashboard-host)"
        for app in self.apps.values():
            if app.name == except_app:
                continue
            for deploy in (app.serving, app.next):
                if deploy is not None and host in deploy.hosts:
                    return app.name
        return None

    def _start_process(self, deploy: Deploy) -> None:
        assert deploy.config is not None
        webapp = deploy.config.webapp
        if webapp is None:
            # Nothing to start or health-check: nginx can switch to it right away.
            log.info("%s: deploy #%d runs no web app, switching", deploy.app, deploy.id)
            deploy.stage = Stage.SWITCHING
            self._request_nginx()
            return
        try:
            deploy.port = self.ports.allocate()
        except NoFreePort as exc:
            self._fail(deploy, str(exc), kind=FailureKind.PORTS)
            return
        deploy.stage = Stage.STARTING
        health_host = next((h for h in webapp.hosts if not h.startswith("*.")), webapp.hosts[0])
        spec = ProcessSpec(
            command=(str(webapp.exec), *webapp.args),
            cwd=deploy.folder,
            env=app_environment(self.config, deploy.config, deploy.port, deploy.db),
            log_path=self.config.log_dir / f"app-{deploy.app}.log",
            port=deploy.port,
            health=HealthCheck(
                host=health_host.removeprefix("*."),
                path=webapp.health_check_path or "/",
                strict=webapp.health_check_path is not None,
            ),
            user=self.config.setuid,
            health_timeout=webapp.ensure_alive,
        )
        self.monitor.tell(StartProcess(app=deploy.app, deploy_id=deploy.id, spec=spec))

    # -- background workers ------------------------------------------------------------

    def _start_workers(self, deploy: Deploy) -> None:
        """Start the version's background workers; it serves now (see the module docstring)."""
        assert deploy.config is not None and deploy.folder is not None
        for index, worker in enumerate(deploy.config.backgrounds):
            process_id = next(self._deploy_ids)
            deploy.workers[process_id] = index
            spec = ProcessSpec(
                command=(str(worker.exec), *worker.args),
                cwd=deploy.folder,
                env=worker_environment(self.config, worker, deploy.db),
                log_path=self.config.log_dir / f"app-{deploy.app}.log",
                user=self.config.setuid,
                restart_delay=worker.restart_delay,
            )
            log.info(
                "%s: deploy #%d starts background worker #%d (%s)",
                deploy.app,
                deploy.id,
                process_id,
                worker.exec.name,
            )
            self.monitor.tell(StartProcess(app=deploy.app, deploy_id=process_id, spec=spec))

    def _worker_deploy(self, process_id: int) -> Deploy | None:
        """The deploy that runs background worker ``process_id``, if it is one."""
        deploy = self.retiring.get(process_id)
        if deploy is None:
            serving = (app.serving for app in self.apps.values() if app.serving is not None)
            deploy = next((d for d in serving if process_id in d.workers), None)
        return deploy if deploy is not None and process_id in deploy.workers else None

    def _worker_state_changed(self, deploy: Deploy, msg: ProcessStateChanged) -> None:
        """Count a worker's crashes; past its restart-count it is stopped for good."""
        if msg.state is not ProcessState.BACKOFF or msg.deploy_id in self.retiring:
            return
        assert deploy.config is not None
        worker = deploy.config.backgrounds[deploy.workers[msg.deploy_id]]
        restarts = deploy.worker_restarts.get(msg.deploy_id, 0) + 1
        deploy.worker_restarts[msg.deploy_id] = restarts
        text = f"background worker #{msg.deploy_id}: {msg.detail}"
        self._event(msg.app, EventKind.CRASH, text)
        if worker.restart_count is not None and restarts > worker.restart_count:
            log.error(
                "%s: background worker #%d crashed again after %d restart(s); "
                "restart-count reached, not restarting",
                msg.app,
                msg.deploy_id,
                worker.restart_count,
            )
            self.monitor.tell(StopProcess(app=msg.app, deploy_id=msg.deploy_id, delay=0))

    # -- nginx -----------------------------------------------------------------------

    def _desired_sites(self) -> tuple[Site, ...]:
        sites: list[Site] = []
        for app in self.apps.values():
            target = app.serving if not app.removing else None
            if app.next is not None and app.next.stage is Stage.SWITCHING:
                target = app.next
            if target is None or target.config is None or target.folder is None:
                continue
            try:
                sites.extend(
                    sites_for(app.name, target.config, target.folder, target.port, self.config)
                )
            except ValueError as exc:  # the bundle parser refuses this already
                log.error("%s: not routed: %s", app.name, exc)
        if self._dashboard is not None:
            sites.append(self._dashboard)
        return tuple(sorted(sites, key=lambda s: s.app))

    def _request_nginx(self) -> None:
        """Send the desired routing to nginx; one generation in flight at a time."""
        if self._nginx_inflight is not None:
            self._nginx_dirty = True  # sent again, with everything since, when the reply comes
            return
        self._generation += 1
        generation = self._generation
        for app in self.apps.values():
            if (
                app.next is not None
                and app.next.stage is Stage.SWITCHING
                and app.next.generation is None
            ):
                app.next.generation = generation
            if app.removing and app.remove_generation is None:
                app.remove_generation = generation
        self._nginx_inflight = generation
        self._nginx_dirty = False
        self.nginx.tell(ApplyNginx(generation=generation, sites=self._desired_sites()))

    def _nginx_replied(self, generation: int, failure: str | None) -> None:
        """Finish every switch and removal that rode on ``generation``, either way.

        The nginx writer has logged a failure already; each deploy it sinks says so too.
        """
        for app in list(self.apps.values()):
            deploy = app.next
            if deploy is not None and _covered(deploy.generation, generation):
                if failure is None:
                    self._switched(app, deploy)
                else:
                    reason = f"nginx did not take the new config: {failure}"
                    self._fail(deploy, reason, kind=FailureKind.NGINX)
            if app.removing and _covered(app.remove_generation, generation):
                # On failure nginx still routes to the app, but the user removed its bundle:
                # stop it anyway; nginx catches up with its next successful generation.
                if app.serving is not None:
                    self._retire(app.serving, self.config.drain_seconds if failure is None else 0)
                    app.serving = None
                app.removing, app.remove_generation = False, None
                log.info("%s: removed", app.name)
                self._event(app.name, EventKind.REMOVED, "bundle removed; app stopped")
            self._continue_waiting(app)
        # Cleared only now, so requests made while handling the reply are batched into one.
        self._nginx_inflight = None
        if self._nginx_dirty:
            self._request_nginx()
        if not self._watching and self._exit_code is None:
            # The first reply: deploys may begin (the monitor, started earlier, has
            # already stopped any leftovers of an earlier run).
            self._watching = True
            self.watcher.start()

    def _switched(self, app: App, deploy: Deploy) -> None:
        old, app.serving, app.next = app.serving, deploy, None
        deploy.stage = Stage.SERVING
        took = time.monotonic() - deploy.began
        hosts = ", ".join(deploy.hosts)
        log.info("%s: deploy #%d now serving %s (took %.2fs)", app.name, deploy.id, hosts, took)
        self._finished(deploy, Outcome.SERVING)
        self._start_workers(deploy)
        if old is not None:
            self._retire(old, self.config.drain_seconds)

    def _continue_waiting(self, app: App) -> None:
        """After a switch ended (either way): carry out what waited for it."""
        if app.removing and app.next is None and app.remove_generation is None:
            self._request_nginx()  # a removal requested mid-switch
        if app.waiting is not None and app.next is None:
            self._begin(app, app.waiting)
        self._forget_if_idle(app)

    # -- endings ---------------------------------------------------------------------

    def _fail(
        self,
        deploy: Deploy,
        reason: str,
        tail: tuple[str, ...] = (),
        *,
        kind: FailureKind,
        process_stopping: bool = False,
    ) -> None:
        log.error("%s: deploy #%d failed: %s", deploy.app, deploy.id, reason)
        self._finished(deploy, Outcome.FAILED, reason, kind)
        if tail:
            log.error("%s: last output:\n%s", deploy.app, "\n".join(f"  | {line}" for line in tail))
        app = self.apps[deploy.app]
        if app.next is deploy:
            app.next = None
        self._cleanup(deploy, process_stopping=process_stopping)
        serving = app.serving
        if serving is not None:
            log.info("%s: deploy #%d keeps serving", app.name, serving.id)
        self._continue_waiting(app)

    def _abandon(self, deploy: Deploy, reason: str) -> None:
        log.info("%s: deploy #%d abandoned: %s", deploy.app, deploy.id, reason)
        self._finished(deploy, Outcome.SUPERSEDED, reason)
        self.apps[deploy.app].next = None
        self._cleanup(deploy, process_stopping=False)

    def _cleanup(self, deploy: Deploy, *, process_stopping: bool) -> None:
        """Undo whatever a deploy that will never serve has set up so far."""
        if deploy.stage in (Stage.STARTING, Stage.SWITCHING, Stage.SERVING):
            for process_id in deploy.process_ids:
                self.retiring[process_id] = deploy
                if process_id != deploy.id or not process_stopping:
                    self.monitor.tell(StopProcess(app=deploy.app, deploy_id=process_id, delay=0))
        elif deploy.folder is not None and (
            deploy.stage is Stage.PROVISIONING or deploy.config is not None
        ):
            self.unpacker.tell(RemoveFolder(path=deploy.folder))
        # An UNPACKING deploy without config is still in the unpacker: its late reply is
        # recognised as stale and its folder removed then.

    def _retire(self, deploy: Deploy, delay: float) -> None:
        log.info("%s: stopping deploy #%d in %.1fs", deploy.app, deploy.id, delay)
        # Without a web app the deploy's own id names no process; the monitor
        # answers ProcessStopped at once, so every deploy ends the same way.
        for process_id in deploy.process_ids:
            self.retiring[process_id] = deploy
            self.monitor.tell(StopProcess(app=deploy.app, deploy_id=process_id, delay=delay))

    def _process_stopped(self, app_name: str, deploy_id: int) -> None:
        deploy = self.retiring.pop(deploy_id, None)
        if deploy is None:
            if owner := self._worker_deploy(deploy_id):  # a worker that gave up
                log.info("%s: background worker #%d stopped", app_name, deploy_id)
                owner.workers.pop(deploy_id, None)
            return
        if any(self.retiring.get(other) is deploy for other in deploy.process_ids):
            return  # the last of its processes finishes it
        if deploy.port is not None:
            self.ports.release(deploy.port)
        if deploy.folder is not None:
            self.unpacker.tell(RemoveFolder(path=deploy.folder))
        log.info("%s: deploy #%d stopped and removed", app_name, deploy_id)
        app = self.apps.get(app_name)
        if app is not None:
            self._forget_if_idle(app)

    def _forget_if_idle(self, app: App) -> None:
        gone = app.idle and not app.removing and not app.bundle_present
        if gone and self.apps.get(app.name) is app:
            del self.apps[app.name]

    # -- lookups ---------------------------------------------------------------------

    def _next_deploy(self, app: str, deploy_id: int) -> Deploy | None:
        """The app's in-flight deploy if it is ``deploy_id``; None for a stale reply."""
        state = self.apps.get(app)
        if state is not None and state.next is not None and state.next.id == deploy_id:
            return state.next
        return None

    def _find_deploy(self, app: str, deploy_id: int) -> Deploy | None:
        """The deploy whose web app process is ``deploy_id`` (never a worker's)."""
        if deploy_id in self.retiring:
            deploy = self.retiring[deploy_id]
            return deploy if deploy.id == deploy_id else None
        state = self.apps.get(app)
        if state is None:
            return None
        for deploy in (state.serving, state.next):
            if deploy is not None and deploy.id == deploy_id:
                return deploy
        return None

    # -- shutdown --------------------------------------------------------------------

    def _shutdown(self, code: int) -> None:
        if self._exit_code is not None:
            return
        # The watcher goes first so no new deploy starts; the monitor's own stop
        # then stops every app gracefully (TERM, shared deadline, KILL).
        # The status API goes last: it answers while the apps stop.
        stopping = [self.watcher, self.unpacker, self.postgres, self.monitor, self.nginx]
        for component in stopping:
            component.stop()
        for component in stopping:
            if component.is_alive():
                component.join()
        if self.status is not None:
            self.status.stop()
            if self.status.is_alive():
                self.status.join()
        log.info("keter: stopped")
        self._exit_code = code
