"""Every message that crosses a thread boundary in keter.

Components talk only through ``queue.Queue`` inboxes carrying these frozen,
keyword-only dataclasses (the original Keter's Chan design). Facts are named in
the past tense (``BundleArrived``); commands are imperative (``StartProcess``).

``deploy_id`` identifies one attempt to deploy one bundle version. The
supervisor hands out increasing ids, and every reply carries the id back so a
late answer about a superseded deploy can be recognised and ignored.
"""

from __future__ import annotations

import concurrent.futures
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from keter.bundle.model import BundleConfig, RateLimiterConfig
from keter.limits import NO_LIMITS, Limits

message = dataclass(frozen=True, kw_only=True, slots=True)


# -- value enums carried by messages ---------------------------------------------------
# StrEnums: their values are what the status API, history.json and the metrics show,
# so serialising them needs no mapping, and nothing compares reason wording.


class Component(enum.StrEnum):
    """keter's actors, as named in logs, ComponentFailed and the status API."""

    WATCHER = "watcher"
    UNPACKER = "unpacker"
    PROCESSES = "processes"
    NGINX = "nginx"
    POSTGRES = "postgres"
    STATUS = "status"
    STATS = "stats"  # traffic statistics and access logs (keter.stats)
    SWITCH = "switch"  # stable addresses in the kernel, drains (keter.switch)
    BACKUPS = "backups"
    ACME = "acme"  # certificates from an ACME CA (keter.acme)


class ProcessState(enum.StrEnum):
    """One app process's state; the transition table is in the process monitor."""

    STARTING = "STARTING"  # spawned, not yet answering its health check
    RUNNING = "RUNNING"  # answering (or spawned, when there is no health check)
    BACKOFF = "BACKOFF"  # crashed; waiting to be restarted on the same port
    STOPPING = "STOPPING"  # being stopped; waiting until its whole group is gone
    EXITED = "EXITED"  # not started yet, or stopped on request (the group is gone)
    FATAL = "FATAL"  # the first start failed; it was stopped and is not retried


class Outcome(enum.StrEnum):
    """How one deploy attempt ended (a line of the app's history)."""

    SERVING = "serving"  # it took the traffic
    FAILED = "failed"  # it never served; the previous version (if any) serves on
    # A newer bundle (or the bundle's removal) replaced it first, or keter stopped.
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled-back"  # it served, made real traffic worse, and was rolled back


class FailureKind(enum.StrEnum):
    """Why a deploy failed, for metrics and operators; the reason text says the details."""

    UNPACK = "unpack"  # the archive was refused (unsafe, corrupt, too big)
    CONFIG = "config"  # config/keter.yaml was refused
    CONFLICT = "conflict"  # a host is already served by another app
    DATABASE = "database"  # its database could not be provisioned
    PORTS = "ports"  # no free port
    SPAWN = "spawn"  # the program could not be started at all
    EXITED = "exited"  # it exited (or was killed) before answering
    OOM = "oom"  # the OOM killer killed it before it answered (its memory limit)
    HEALTH_CHECK = "health-check"  # it ran but never passed its health check
    NGINX = "nginx"  # nginx refused its site, or did not take the new config
    SWITCH = "switch"  # the kernel did not lead new connections to it
    BACKUP = "backup"  # the database backup before its release failed (backup-required)
    RELEASE = "release"  # its release command failed, timed out or could not run
    INTERNAL = "internal"  # a bug in keter while handling this bundle


class SwitchMode(enum.StrEnum):
    """How keter moves traffic from one version of an app to the next."""

    KERNEL = "kernel"  # nftables re-points the app's stable address; nginx is not reloaded
    RELOAD = "reload"  # nginx is reloaded with the new version's port (the fallback)


class AppState(enum.StrEnum):
    """What an operator sees of an app."""

    DEPLOYING = "deploying"  # its first version is on its way
    RUNNING = "running"
    BACKOFF = "backoff"  # crashed, being restarted
    FAILED = "failed"  # no version serving after a failed deploy
    STOPPING = "stopping"  # removed: its last version's processes are being stopped


class BackupKind(enum.StrEnum):
    """Why a database backup was taken (part of its file name)."""

    RELEASE = "release"  # before a version's release ran, as it replaced another (or came first)
    # Before the release of the version already serving ran again (a restart, new settings,
    # a restore's redeploy): never what `rollback --with-data` restores.
    RERELEASE = "rerelease"
    MANUAL = "manual"  # `keter db backup`
    RESTORE = "restore"  # before `keter db restore` replaced the data


class DbAction(enum.StrEnum):
    """What an operator asks of an app's database."""

    BACKUP = "backup"
    RESTORE = "restore"


class EventKind(enum.StrEnum):
    """What an entry of the recent-events feed tells: a deploy's outcome, or an app's news."""

    DEPLOY_SERVING = "deploy-serving"
    DEPLOY_FAILED = "deploy-failed"
    DEPLOY_SUPERSEDED = "deploy-superseded"
    DEPLOY_ROLLED_BACK = "deploy-rolled-back"
    CRASH = "crash"
    RESTART = "restart"
    REMOVED = "removed"
    NO_ROLLBACK = "no-rollback"  # a watched version made things worse, and stays

    @classmethod
    def deploy(cls, outcome: Outcome) -> EventKind:
        """The entry for a deploy that ended with ``outcome``."""
        match outcome:
            case Outcome.SERVING:
                return cls.DEPLOY_SERVING
            case Outcome.FAILED:
                return cls.DEPLOY_FAILED
            case Outcome.SUPERSEDED:
                return cls.DEPLOY_SUPERSEDED
            case Outcome.ROLLED_BACK:
                return cls.DEPLOY_ROLLED_BACK


# -- value types carried by messages -------------------------------------------------


@message
class HealthCheck:
    """How the process monitor decides a new version really answers."""

    host: str  # sent as the Host header
    path: str = "/"
    # For "/" any answer below 500 is healthy; an explicit health-check-path
    # must answer 2xx or 3xx.
    strict: bool = False


@message
class ProcessSpec:
    """Everything needed to start (and restart) one app process."""

    command: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(repr=False)  # may hold database passwords
    log_path: Path
    port: int | None = None  # None for processes that serve no HTTP
    health: HealthCheck | None = None
    user: str | None = None  # global `setuid`
    # Per-app overrides (Keter's ensure-alive-time-bound, restart-delay-seconds).
    health_timeout: float | None = None  # instead of the global health-check-timeout
    restart_delay: float | None = None  # a fixed delay between restarts, not the backoff
    # ROOT/data/APP (KETER_DATA_DIR): made before the spawn if missing, owned by ``user``,
    # mode 0700 (see keter.appdata).
    data_dir: Path | None = None
    # The stanza's own resource limits; the ones it leaves unset are app-limits' defaults.
    limits: Limits = NO_LIMITS


@message
class DbInfo:
    """One app's database credentials (Keter's postgres.yaml entry)."""

    name: str
    user: str
    password: str = field(repr=False)
    host: str
    port: int


@message
class TlsFiles:
    """A certificate nginx presents for some hosts (chosen by SNI).

    The paths are where the bundle's files are; the nginx writer copies them
    (the chain joined to the certificate) and nginx reads only the copies.
    """

    certificate: Path
    key: Path
    chain: tuple[Path, ...] = ()  # intermediate certificates, sent after ``certificate``


@message
class BasicAuth:
    """HTTP basic authentication in front of a route."""

    realm: str
    credentials: tuple[tuple[str, str], ...] = field(repr=False, default=())  # (user, password)
    # The htpasswd file (hashed passwords only): set by the nginx writer, which writes it.
    user_file: Path | None = None


@message
class LocalOnly:
    """Keter's ``local`` middleware: callers other than localhost get this answer."""

    status: int
    text: str


@message
class ProxyApp:
    """Proxy to the app's own process: its port on 127.0.0.1, or its stable address."""

    port: int
    # A loopback address of keter's own where the kernel leads ``port`` to the version
    # serving now (keter.switch); 127.0.0.1 is the process itself.
    host: str = "127.0.0.1"
    timeout: float | None = None  # seconds per read/send; 0 unbounded; None the global bound


@message
class ServeFiles:
    """nginx serves a folder of the unpacked bundle itself."""

    root: Path  # absolute, symlinks resolved, inside the unpacked bundle
    listing: bool = False


@message
class RedirectRule:
    """One redirect action: ``url`` verbatim, or the request path on another host."""

    path: str | None = None  # only this exact path; None matches every path
    url: str | None = None
    host: str | None = None  # used when ``url`` is None
    secure: bool = False
    port: int | None = None


@message
class SendRedirect:
    """Answer every request with a redirect (the first matching rule wins; else 404)."""

    status: int
    rules: tuple[RedirectRule, ...]


@message
class ProxyRemote:
    """Proxy to a server elsewhere (Keter's reverse-proxy stanza)."""

    host: str
    port: int
    ssl: bool = False
    host_header: str | None = None  # None: the client's own Host header
    timeout: float | None = None  # seconds; 0 unbounded; None the global bound


@message
class Route:
    """Some hosts of one app and what nginx does with their requests."""

    hosts: tuple[str, ...]
    action: ProxyApp | ServeFiles | SendRedirect | ProxyRemote
    tls: TlsFiles | None = None  # own certificate; None: each TLS listener's default
    requires_secure: bool = False  # plain HTTP requests are redirected to https
    basic_auth: BasicAuth | None = None
    headers: tuple[tuple[str, str], ...] = ()  # added to every response
    local_only: LocalOnly | None = None
    rate_limiters: tuple[RateLimiterConfig, ...] = ()  # nginx's limit_req
    autohead: bool = False  # a HEAD request reaches the app as GET
    max_body_size: int | None = None  # request body limit in bytes (0: none); None: global
    buffering: bool = True  # False: proxied answers stream through unbuffered
    # ssl: acme. Until keter has a certificate for these hosts (then in ``tls``), they
    # are served over plain HTTP only and requires-secure does not redirect yet.
    acme: bool = False


@message
class Site:
    """Everything nginx serves for one app.

    ``Site(app=..., hosts=..., port=...)`` is a plain web app: these hosts are
    proxied to this port. ``routes`` carries everything else (static files,
    redirects, reverse proxies, TLS, middleware); ``all_routes`` joins both.
    """

    app: str
    hosts: tuple[str, ...] = ()
    port: int | None = None
    routes: tuple[Route, ...] = ()
    # The deployed version (short sha256): nginx writes it into each request's access
    # record (keter.stats). "" for keter's own sites, which are not counted.
    version: str = ""

    @property
    def all_routes(self) -> tuple[Route, ...]:
        if not self.hosts and self.port is None:
            return self.routes
        return (Route(hosts=self.hosts, action=ProxyApp(port=self.port)), *self.routes)

    @property
    def all_hosts(self) -> tuple[str, ...]:
        return tuple(host for route in self.all_routes for host in route.hosts)


@message
class BackupInfo:
    """One backup file under ROOT/backups/APP/ (see keter.backups)."""

    app: str
    name: str  # the file name
    kind: BackupKind
    version: str  # the version it precedes (RELEASE) or that served when it was taken
    at: float  # wall clock
    size: int  # bytes


class RequestRefused(Exception):
    """An operator's request keter will not carry out; ``status`` is the API's HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reply() -> concurrent.futures.Future:
    return concurrent.futures.Future()


# -- lifecycle -----------------------------------------------------------------------


@message
class Stop:
    """Ends an actor's loop."""


@message
class ComponentFailed:
    """A component's handler raised: its thread ended and the supervisor restarts it.

    ``app`` and ``deploy_id`` name the deploy the failing message was about (when it
    was about one): only that deploy fails.
    """

    component: Component
    error: str
    traceback: str = field(repr=False, default="")
    message: str = ""  # the failing message's type
    app: str | None = None
    deploy_id: int | None = None


@message
class ShutdownRequested:
    """SIGTERM or SIGINT arrived; stop every app and exit."""

    signal_name: str


@message
class RescanRequested:
    """SIGHUP arrived; compare incoming/ with what is deployed."""


# -- incoming watcher ----------------------------------------------------------------


@message
class BundleArrived:
    """A bundle in incoming/ is new or changed and completely written."""

    app: str
    path: Path
    mtime_ns: int
    size: int
    # Found by keter's first scan (and unchanged since): there before keter started.
    at_start: bool = False


@message
class BundleRemoved:
    """A bundle disappeared from incoming/."""

    app: str


@message
class BundleIgnored:
    """An entry in incoming/ cannot be a bundle (a bad name, not a regular file, or
    unreadable); said once per entry."""

    filename: str
    reason: str


@message
class ScanCompleted:
    """The watcher has reported every bundle that was in incoming/."""


@message
class Rescan:
    """Command to the watcher: report every bundle in incoming/ again."""


# -- unpacker ------------------------------------------------------------------------


@message
class UnpackBundle:
    app: str
    deploy_id: int
    bundle: Path
    dest: Path  # a fresh folder under ROOT/temp that must not exist yet


@message
class BundleUnpacked:
    app: str
    deploy_id: int
    folder: Path
    config: BundleConfig
    warnings: tuple[str, ...] = ()
    sha256: str = ""  # of the bundle file as unpacked: the version's identity


@message
class UnpackFailed:
    app: str
    deploy_id: int
    reason: str
    kind: FailureKind = FailureKind.UNPACK  # or CONFIG when config/keter.yaml was refused
    # Its bundle is no longer in incoming/: removed before it could be read, which is
    # no failure of the deploy (BundleRemoved follows).
    gone: bool = False


@message
class RemoveFolder:
    """Delete an unpacked version's folder (it is no longer running)."""

    path: Path


# -- postgres provisioner ------------------------------------------------------------


@message
class ProvisionDatabase:
    app: str
    deploy_id: int


@message
class DatabaseReady:
    app: str
    deploy_id: int
    db: DbInfo


@message
class DatabaseFailed:
    app: str
    deploy_id: int
    reason: str
    # The server could not be reached or refused keter's login for all of retry-seconds:
    # the same bundle may deploy later. False: provisioning was refused (a bad entry in
    # postgres.yaml, a role keter must not hand out, a lock an app holds): it will not.
    unavailable: bool = False


# -- backups (keter.backups) ---------------------------------------------------------


@message
class BackupDatabase:
    """Dump the app's database into ROOT/backups/APP/.

    From a deploy (``deploy_id``), before its release: answered by ``BackupTaken``
    or ``BackupFailed``. From an operator (``deploy_id`` None): answered in
    ``reply`` only (a dict for the API, or ``RequestRefused``).
    """

    app: str
    deploy_id: int | None
    db: DbInfo
    user: str | None  # the OS user pg_dump runs as: the app's (keter.appdata.app_user)
    kind: BackupKind
    version: str
    reply: concurrent.futures.Future | None = field(default=None, repr=False, compare=False)
    # The version serving (None: none), whose newest release backup pruning never deletes:
    # what rollback --with-data restores (failed deploys' backups had pushed it out).
    serving: str | None = None


@message
class RestoreDatabase:
    """Replace the app's data with a backup (the newest when ``backup`` is None).

    The current data is backed up first (kind RESTORE). Answered in ``reply``.
    """

    app: str
    db: DbInfo
    user: str | None
    backup: str | None
    version: str  # the version serving now, named in the backup taken first
    reply: concurrent.futures.Future = field(default_factory=_reply, repr=False, compare=False)


@message
class BackupTaken:
    app: str
    deploy_id: int
    backup: BackupInfo


@message
class BackupFailed:
    app: str
    deploy_id: int
    reason: str


@message
class DatabaseRequest:
    """``keter db backup`` or ``restore``, from a status API thread to the supervisor.

    The supervisor checks it (the app serves, has a database, no deploy is under
    way for a restore) and hands it to the backups component; the answer comes
    back in ``reply``.
    """

    action: DbAction
    app: str
    backup: str | None = None  # restore: a file name; None: the newest
    reply: concurrent.futures.Future = field(default_factory=_reply, repr=False, compare=False)


# -- process monitor -----------------------------------------------------------------


@message
class StartProcess:
    app: str
    deploy_id: int
    spec: ProcessSpec


@message
class StopProcess:
    """Stop a deploy's process after ``delay`` seconds (the drain period)."""

    app: str
    deploy_id: int
    delay: float = 0.0


@message
class ProcessStarted:
    app: str
    deploy_id: int
    pid: int
    port: int | None


@message
class ProcessHealthy:
    app: str
    deploy_id: int


@message
class ProcessFailed:
    """A new version never became healthy; it has been stopped."""

    app: str
    deploy_id: int
    reason: str
    kind: FailureKind  # SPAWN, EXITED, OOM, HEALTH_CHECK or PORTS
    output_tail: tuple[str, ...] = ()


@message
class ProcessStateChanged:
    """A deployed process moved in its state machine (crash, backoff, restart)."""

    app: str
    deploy_id: int
    state: ProcessState
    detail: str = ""
    pid: int | None = None  # the current process, if one is running
    # Into BACKOFF by a failure of the process's: it ended, or its restart could not start
    # (what a crash loop counts). Not when keter stopped it itself (its port taken).
    failed: bool = False


@message
class ProcessPortTaken:
    """A stranger (not one of the deploy's processes) listens on its port.

    The monitor has stopped the deploy's process and waits (BACKOFF) for a
    ``MoveProcess``; keter must not route to ``port`` any more.
    """

    app: str
    deploy_id: int
    port: int


@message
class MoveProcess:
    """Answer to ``ProcessPortTaken``: restart the deploy's process with this spec (a
    fresh port)."""

    app: str
    deploy_id: int
    spec: ProcessSpec


@message
class ProcessStopped:
    """Every process of the deploy's group is gone; its port is free again."""

    app: str
    deploy_id: int


@message
class RunOnce:
    """Run ``spec`` once (a release command): never restarted, no health check.

    Stopped (TERM, then KILL after stop-timeout) if it runs longer than
    ``timeout`` seconds, or on ``StopProcess``. Always answered by exactly one
    ``RunFinished``, once nothing of its process group is left.
    """

    app: str
    deploy_id: int
    spec: ProcessSpec
    timeout: float


@message
class RunFinished:
    """A ``RunOnce`` process ended and its whole group is gone."""

    app: str
    deploy_id: int
    returncode: int | None  # None: it could not be started at all
    reason: str  # for the operator: "exited with status 1", "cannot run ...", ...
    timed_out: bool = False  # it was stopped at its timeout
    output_tail: tuple[str, ...] = ()  # its last lines of output

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# -- nginx writer --------------------------------------------------------------------


@message
class ApplyNginx:
    """Make nginx route exactly these sites. Later generations supersede earlier."""

    generation: int
    sites: tuple[Site, ...]


@message
class SiteRefused:
    """One app's site that nginx could not take; that app keeps its previous site (if any)."""

    app: str
    reason: str


@message
class NginxApplied:
    """nginx now serves ``generation`` (and so every earlier one is obsolete).

    Sites in ``refused`` failed alone (rendering or ``nginx -t``): each of those apps
    kept the site it had before, or none; every other site is as asked.
    """

    generation: int
    refused: tuple[SiteRefused, ...] = ()


@message
class NginxFailed:
    """``generation`` was not applied at all (nginx itself is broken: even keter's
    config without any site fails, or the reload was not taken); nginx still
    serves the previous config."""

    generation: int
    reason: str


# -- switch (keter.switch: the kernel's stable addresses, drains) --------------------


@message
class SwitchReady:
    """The switch component's mode, once at start; the supervisor tells status too."""

    mode: SwitchMode
    address: str | None = None  # the stable addresses' loopback IP (kernel mode)
    reason: str = ""  # why the kernel mode is not used (reload mode)


@message
class PointServices:
    """Lead these stable ports to these app ports, confirm, and report ServicesPointed.

    ``previous`` holds what the same stable ports led to until now: the report
    waits until nginx can no longer send a new request to those (see keter.switch).
    """

    app: str
    deploy_id: int
    targets: tuple[tuple[int, int], ...]  # (stable port, app port)
    previous: tuple[tuple[int, int], ...] = ()


@message
class ServicesPointed:
    """New connections to the deploy's stable ports reach it, and only it."""

    app: str
    deploy_id: int
    at: float = 0.0  # wall clock time the kernel began leading them to it


@message
class PointFailed:
    """The stable ports could not be led to the deploy; they lead where they did before."""

    app: str
    deploy_id: int
    reason: str


@message
class ReleaseServices:
    """No deploy uses these stable ports any more: remove them from the kernel."""

    app: str
    ports: tuple[int, ...]


@message
class WatchDrain:
    """Report Drained once these app ports hold no connection (give up after ``seconds``)."""

    app: str
    deploy_id: int
    ports: tuple[int, ...]
    seconds: float


@message
class Drained:
    """The deploy's ports hold no connection any more."""

    app: str
    deploy_id: int


@message
class GrantPorts:
    """These app ports are the app's now (a version of it will listen there): its
    processes may connect to them, and no other app's may (kernel mode, apps with
    uids of their own)."""

    app: str
    ports: tuple[int, ...]


@message
class RevokePorts:
    """These app ports are no longer the app's (nothing of its runs there any more)."""

    app: str
    ports: tuple[int, ...]


# -- ACME (keter.acme) ---------------------------------------------------------------


class CertificateOutcome(enum.StrEnum):
    """How a host's last certificate attempt ended."""

    ISSUED = "issued"  # a new certificate from the CA
    STORED = "stored"  # a valid certificate from an earlier run, used again
    FAILED = "failed"  # the CA refused, timed out or the challenge failed; retried later
    REFUSED = "refused"  # the host cannot get one by HTTP-01 (a wildcard)


@message
class CertificatesWanted:
    """Supervisor -> ACME: every host that should have a certificate now (ssl: acme),
    in the order to try them: the apps' hosts in turn; and the app of each (an app
    whose orders fail waits as a whole)."""

    hosts: tuple[str, ...]
    owners: Mapping[str, str]  # host -> app


@message
class CertificateIssued:
    """ACME -> supervisor: ``host`` has a valid certificate (new, renewed or stored)."""

    host: str
    certificate: Path  # the chain, leaf first, under ROOT/etc/acme (a new file per issue)
    key: Path
    not_after: float  # seconds since the epoch


@message
class CertificateState:
    """ACME -> supervisor -> status: what an operator sees of one host's certificate."""

    host: str
    outcome: CertificateOutcome
    issuer: str | None = None
    not_after: float | None = None  # of the certificate in use, if any
    last_attempt: float | None = None  # wall clock of the last order
    next_attempt: float | None = None  # when keter will try (or renew) next
    detail: str = ""  # why it failed


# -- status component (supervisor -> status; facts only) -----------------------------


@message
class AppSnapshot:
    """What an operator sees of one app right now."""

    app: str
    state: AppState
    version: str | None  # short sha256 of the serving bundle
    bundle_mtime: float | None  # of the serving bundle, seconds since the epoch
    hosts: tuple[str, ...]
    port: int | None
    pid: int | None
    started_at: float | None  # wall clock time the serving process (re)started
    restarts: int  # crash restarts of the serving version
    database: str | None  # never the password
    deploying: str | None = None  # short sha256 of a version on its way ("": not read yet)


@message
class AppChanged:
    snapshot: AppSnapshot


@message
class AppGone:
    """The app's bundle was removed and its last process stopped."""

    app: str


@message
class DeployFinished:
    """One deploy attempt ended; a line of the app's deploy history."""

    app: str
    version: str  # short sha256
    sha256: str
    bundle_mtime: float
    outcome: Outcome
    reason: str
    duration: float  # seconds from bundle seen to outcome
    at: float  # wall clock
    kind: FailureKind | None = None  # why it failed (None unless outcome is FAILED)
    # SERVING: keter watches it this many seconds from ``at`` and may roll it back
    # (keter.stats); 0: not watched.
    watch_seconds: float = 0.0


@message
class AppEvent:
    """Something an operator wants in the recent-events feed (crash, restart, removal)."""

    app: str
    kind: EventKind
    text: str
    at: float


# -- traffic statistics (keter.stats -> status, supervisor) ----------------------------


class WatchVerdict(enum.StrEnum):
    """Where the watch of a newly serving version stands (issue 14's watched rollout)."""

    WATCHING = "watching"  # within its window
    PASSED = "passed"  # the window ended and the version stays
    FAILED = "failed"  # it made things worse for real traffic: VersionUnhealthy was sent


@message
class VersionTraffic:
    """Requests one version of an app got since keter started, by status class."""

    version: str
    classes: tuple[int, int, int, int, int]  # 1xx, 2xx, 3xx, 4xx, 5xx


@message
class AppTraffic:
    """One app's traffic: the last minute, and totals since keter started (for /metrics)."""

    app: str
    rate: float  # requests per second over the last minute
    error_ratio: float  # share of 5xx answers over the last minute
    versions: tuple[VersionTraffic, ...]
    latency_buckets: tuple[int, ...]  # upstream response times per keter.stats bucket bound
    latency_sum: float  # seconds
    latency_count: int


@message
class WatchState:
    """A watched version's numbers so far."""

    app: str
    version: str
    until: float  # wall clock time the window ends
    requests: int
    errors: int  # 5xx answers
    verdict: WatchVerdict
    reason: str = ""  # why it failed, in numbers


@message
class TrafficReport:
    """Stats -> status, each second something changed: what keter status, the API and
    /metrics show. Only the apps whose entry changed; the others' stand as last reported."""

    at: float
    apps: tuple[AppTraffic, ...]  # the entries that changed
    gone: tuple[str, ...] = ()  # apps with no request for an hour: no entry any more
    watches: tuple[WatchState, ...] = ()  # all of them


@message
class VersionServing:
    """Supervisor -> stats: from ``since`` (wall clock) the app's requests reach ``version``.

    nginx's access records of an app behind a stable address (keter.switch) say
    "-" for the version: the kernel switched it without nginx, so the stats
    component gives each such record the version serving when it was made.
    """

    app: str
    version: str  # short sha256
    since: float


@message
class WatchVersion:
    """Supervisor -> stats: a version just started serving; watch it for ``seconds``."""

    app: str
    version: str  # short sha256
    previous: str | None  # the version it replaced: its 5xx ratio is the baseline
    seconds: float
    max_error_ratio: float
    min_requests: int


@message
class VersionUnhealthy:
    """Stats -> supervisor: a watched version makes things worse for real traffic."""

    app: str
    version: str
    reason: str  # in numbers, e.g. "5xx 48% of 212 requests vs 0.0% before"


@message
class RollBack:
    """Supervisor -> status: put this archived version back into incoming/ (a watched
    version made things worse); the usual pipeline deploys it. Answered RollBackDone."""

    app: str
    version: str  # the version rolled back
    sha256: str  # the version to put back
    reason: str
    # The rolled-back version's whole hash: its bundle must still be the one in
    # incoming/ (not removed, nor replaced by a newer upload, since the order was sent).
    replaces: str = ""


@message
class RollBackDone:
    """Status -> supervisor: what came of a RollBack. Only a rollback that took place
    is recorded as one (the version to go back to may not be archived any more)."""

    app: str
    version: str
    reason: str
    failure: str | None = None  # why the archived version could not be put back


@message
class ServeLastServed:
    """Supervisor -> status: at keter's start the bundle in incoming/ failed and nothing
    serves the app; put the version that served last (the archive's newest) back into
    incoming/, unless it is the one that failed."""

    app: str
    failed_sha256: str  # "" when the bundle failed before its hash was known
    # What tells the failed bundle when its hash is not known: nothing is put back over
    # a newer upload (it deploys instead).
    failed_mtime: float = 0.0
