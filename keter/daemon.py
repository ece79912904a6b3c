"""``keter ROOT`` at run time: the real components, the supervisor's loop, signals, shutdown.

The supervisor (``keter.supervisor``) decides; this module only runs it:

* ``build_components`` makes the real actors, all reporting into one inbox.
* ``run`` installs the signal handlers (they only enqueue, as in gunicorn's
  arbiter), starts the supervisor and feeds it every message and due timer
  until it sets an exit code.
* ``shutdown`` stops the components in order with one deadline: the watcher
  first (no new deploy starts), the process monitor stops every app
  gracefully (TERM, ``stop-timeout``, KILL), the switch once no app runs (its
  tables keep the apps apart), the status API last (it answers while the apps
  stop). ACME gets ``ACME_GRACE`` after them: a certificate
  order in flight is abandoned, not waited for. A component still running at
  the deadline (``stop-timeout`` plus ``SHUTDOWN_MARGIN``) cannot keep keter
  alive: every app process is killed and keter exits anyway. A second SIGTERM
  or SIGINT means stop now: apps are killed at once.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import resource
import signal
import time

from keter import rootcheck
from keter.acme import AcmeManager
from keter.backups import Backups
from keter.config import CONFIG_NAME, ConfigError, KeterConfig, SwitchSetting, load_config
from keter.heap import Heap
from keter.incoming.unpack import stream_limit
from keter.incoming.unpacker import Unpacker
from keter.incoming.watcher import IncomingWatcher
from keter.messages import RescanRequested, ShutdownRequested
from keter.nginx import NginxWriter, ProxyOptions, last_generation
from keter.nginx.render import POOL_SECONDS, acme_challenges
from keter.postgres import PostgresProvisioner
from keter.processes import ProcessMonitor
from keter.processes.cgroups import Cgroups
from keter.processes.controllers import Controllers
from keter.processes.private import Private
from keter.stats.component import StatsCollector
from keter.status import StatusServer
from keter.supervisor import Components, Supervisor
from keter.switch import Switch
from keter.threadnames import name_this_thread
from keter.users import UsersFileError, app_users

log = logging.getLogger(__name__)

# How long past stop-timeout a shutdown may take before stuck components are abandoned.
SHUTDOWN_MARGIN = 5.0
# The longest the loop waits on its inbox. The kernel may hand a signal to any of
# keter's threads, and Python runs the handler in the main thread only when that
# thread runs again: an idle loop waiting without a bound would never notice a
# SIGTERM that landed elsewhere. Once a second at most costs nothing measurable.
MAX_WAIT = 1.0
POLL = 0.05  # how often a shutdown looks at its inbox for a second signal
# How long a shutdown waits for the ACME component once the rest stopped. An order in
# flight (each request may take the CA up to a NETWORK_TIMEOUT) is not worth holding
# keter for: what it writes is written atomically, and the next start orders again.
ACME_GRACE = 2.0


class CannotStart(Exception):
    """keter cannot start; ``str()`` says why in one line."""


def apps_need(config: KeterConfig) -> list[str]:
    """What app processes must keep reaching by path, which their private /tmp must not
    hide (keter.processes.private): ROOT (their folders, KETER_DATA_DIR), and the
    database server's socket folder when it is one."""
    needed = [str(config.root)]
    # Parsing the DSN loads libpq (keter.config.model.conninfo): only when it may name
    # a folder in /tmp or /var/tmp.
    if "tmp" in config.postgres.admin_dsn:
        host, _ = config.postgres.server()
        if host.startswith("/"):
            needed.append(host)
    return needed


def build_components(config: KeterConfig, inbox: queue.SimpleQueue) -> Components:
    """The real actors, each reporting into ``inbox``."""
    status = StatusServer(config, report_to=inbox)
    try:  # first: a port another program holds stops keter here, in one line
        status.bind()
    except OSError as exc:
        raise CannotStart(f"cannot serve the status API: {exc.strerror or exc}") from None
    try:
        users = app_users(
            config.etc_dir,
            config.app_uid_range,
            setuid=config.setuid,
            as_root=config.run_apps_as_root,
        )
    except UsersFileError as exc:
        raise CannotStart(str(exc)) from None
    cgroups = Cgroups.find(config.root)
    stats = None
    if config.traffic_stats:
        stats = StatsCollector(config, report_to=inbox, status=status)
        status.stats = stats  # the API's detailed views ask it
    return Components(
        watcher=IncomingWatcher(
            config.incoming_dir,
            report_to=inbox,
            # Its completeness check stops where the unpacker would refuse anyway.
            expand_limit=stream_limit(config.max_unpacked_bytes, config.max_members),
        ),
        unpacker=Unpacker(
            config.temp_dir,
            max_bytes=config.max_unpacked_bytes,
            max_members=config.max_members,
            report_to=inbox,
            users=users,
        ),
        monitor=ProcessMonitor(
            report_to=inbox,
            run_dir=config.run_dir,
            health_check_timeout=config.health_check_timeout,
            stop_timeout=config.stop_timeout,
            log_max_bytes=config.log_max_bytes,
            log_backups=config.log_backups,
            users=users,
            cgroups=cgroups,
            limits=config.app_limits.defaults,
            controllers=Controllers.find(config.root, cgroups),
            port_range=config.port_range,  # each deploy's cgroup binds only its own of them
            private=Private(config.run_dir / "tmp", needed=apps_need(config)),
        ),
        nginx=NginxWriter(
            listeners=config.listeners,
            config_file=config.nginx.config_file,
            test_command=config.nginx.test_command,
            reload_command=config.nginx.reload_command,
            error_log=config.nginx.error_log,
            report_to=inbox,
            options=ProxyOptions.from_config(config),
        ),
        postgres=PostgresProvisioner(
            etc_dir=config.etc_dir,
            admin_dsn=config.postgres.admin_dsn,
            retry_for=config.postgres.retry_seconds,
            connection_limit=config.postgres.connection_limit or -1,
            report_to=inbox,
        ),
        backups=Backups(
            backups_dir=config.backups_dir,
            keep=config.backup_keep,
            timeout=config.backup_timeout,
            report_to=inbox,
            users=users,  # pg_dump and psql run as the app, as its processes do
        ),
        status=status,
        stats=stats,
        switch=Switch(
            root=config.root,
            port_range=config.port_range,
            # nginx's pooled connections to a replaced version end within this (plus slack
            # for nginx's timers), see keter.nginx.render.
            pool_seconds=POOL_SECONDS + 0.05,
            report_to=inbox,
            kernel=config.switch is SwitchSetting.AUTO,
            users=users,  # apps kept off each other's ports: by their uids
            # ... and off the status API's port: one app could hold its every connection.
            closed_ports=(config.status_listen[1],) if config.status_listen else (),
        ),
        acme=AcmeManager(
            settings=config.acme,
            folder=config.etc_dir / "acme",
            challenges=acme_challenges(config.nginx.config_file),
            report_to=inbox,
        ),
    )


def install_signal_handlers(inbox: queue.SimpleQueue) -> None:
    """Handlers only enqueue; all work (and all logging) happens in the loop.

    SimpleQueue, not Queue: its put() is reentrant, so a signal handler may call it.
    """

    def on_stop(signum, _frame):
        inbox.put(ShutdownRequested(signal_name=signal.Signals(signum).name))

    def on_hup(_signum, _frame):
        inbox.put(RescanRequested())

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)


# glibc's M_MMAP_THRESHOLD (malloc.h), and the value keter fixes it at: its default.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Keep glibc from raising its mmap threshold: True if it took.

    glibc serves a large allocation with mmap and unmaps it when freed, but after
    each such free it raises the threshold to that size, so later buffers of that
    size (the history file keter writes, nginx's config, status answers) come
    from the heap, whose freed pages mostly stay with the process. Fixed, they go
    back to the system: with 1000 apps keter's RSS was 8-13 MB lower and the same
    from one run to the next. Not glibc (musl): nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


# The open files keter asks for when its hard limit allows any number (it never does
# on Linux: the kernel's nr_open caps it; a million is its default).
OPEN_FILES_WANTED = 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """Raise keter's soft limit on open files to its hard limit: (before, after).

    keter holds a few descriptors per app (its output pipe, its pidfd, its log
    file): with 1000 apps several thousand, past the 1024 a shell usually starts
    a program with. keter.service sets 65536; started otherwise, keter would
    fail every deploy after a few hundred apps ("Too many open files"). Apps get
    limits of their own (keter.limits), not keter's.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, wanted
    return soft, soft


OOM_SCORE_ADJ = -900  # keter's own; its apps raise theirs (keter.processes.spawn)


def protect_from_oom_killer() -> None:
    """Make keter one of the last processes the kernel's OOM killer picks.

    Apps without a memory limit can spread their memory over many processes, each a
    little smaller than keter: the OOM killer then killed keter, and the apps ran on
    unsupervised. Every app's start raises its own score (``spawn.CHAIN``: anyone may
    raise theirs), which alone puts apps first; keter also lowers its own where it may
    (that needs CAP_SYS_RESOURCE; the unit file sets ``OOMScoreAdjust`` too).
    """
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:
        log.info("keter: its own OOM score stays as it is (%s); its apps' is raised", exc)


def run(config: KeterConfig) -> int:
    """Run keter until it is told to stop; returns the process exit code."""
    fix_mmap_threshold()  # first: before any thread allocates
    # The process's name for ps, top and pidof (not "python"); this thread supervises.
    name_this_thread("keter")
    before, after = raise_open_files_limit()
    if after != before:
        log.info("keter: open files limit raised from %d to %d", before, after)
    protect_from_oom_killer()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        components = build_components(config, inbox)
    except CannotStart as exc:  # nothing has started yet
        log.error("keter: %s", exc)
        return 1
    supervisor = Supervisor(
        config, components, generation=last_generation(config.nginx.config_file)
    )
    install_signal_handlers(inbox)
    log.info("keter: starting on %s", config.root)
    supervisor.start()
    heap = Heap()
    while supervisor.exit_code is None:
        heap.tend()
        for timer in supervisor.due_timers():
            supervisor.dispatch(timer)
        if supervisor.exit_code is not None:
            break
        due = supervisor.next_timer()
        try:
            message = inbox.get(timeout=MAX_WAIT if due is None else min(due, MAX_WAIT))
        except queue.Empty:
            continue
        if isinstance(message, RescanRequested):
            # Here, beside the supervisor rather than in it: its handlers act on messages
            # and never read files; this reads one small file once per SIGHUP.
            recheck_config(config)
        supervisor.dispatch(message)
    shutdown(components, inbox, config.stop_timeout)
    return supervisor.exit_code


PROBLEMS_SHOWN = 5  # of the start-up checks' problems, in the one line a SIGHUP logs


def recheck_config(config: KeterConfig) -> None:
    """On SIGHUP: one line on whether keter-config.yaml still says what keter runs with.

    keter reads it at start only; an edit that changes nothing until the next start
    (or that the next start would refuse) was silent.
    """
    if config.source is None:
        return
    shown = config.config_file
    try:
        now = load_config(config.source)
    except ConfigError as exc:
        problems = "; ".join(exc.problems)
        log.error("keter: %s is now invalid: %s; the next start would refuse it", shown, problems)
        return
    config_file = shown or now.root / "etc" / CONFIG_NAME
    if problems := rootcheck.problems(now.root, config_file, nginx_config=now.nginx.config_file):
        log.error("keter: %s; the next start would refuse it", "; ".join(problems[:PROBLEMS_SHOWN]))
    if now == config:
        log.info("keter: %s unchanged", shown)
    else:
        log.warning("keter: %s changed: restart keter to apply it", shown)


def shutdown(components: Components, inbox: queue.SimpleQueue, stop_timeout: float) -> bool:
    """Stop every component within one deadline; False if some had to be abandoned."""
    monitor = components.monitor
    deadline = time.monotonic() + stop_timeout + SHUTDOWN_MARGIN
    order = [
        components.watcher,
        components.unpacker,
        components.postgres,
        components.backups,
        components.monitor,
        components.nginx,
    ]
    for component in order:
        component.stop()
    if components.acme is not None:
        components.acme.stop()  # now: it finishes an order in flight meanwhile
    stuck = _wait(order, inbox, deadline, monitor)
    # The switch deletes keter's nftables tables, and with them the isolation between
    # apps: only once the monitor has ended every app (an app that ignores SIGTERM runs
    # until stop-timeout, and could reach every other app's port meanwhile).
    if components.switch is not None:
        components.switch.stop()
        stuck += _wait([components.switch], inbox, max(deadline, time.monotonic() + 5.0), monitor)
    if components.stats is not None:  # after nginx: the last requests are counted
        components.stats.stop()
        stuck += _wait([components.stats], inbox, time.monotonic() + 2.0, monitor)
    if components.status is not None:
        components.status.stop()
        stuck += _wait([components.status], inbox, time.monotonic() + 2.0, monitor)
    if stuck:
        log.critical(
            "keter: %s did not stop in time; every app process was killed and keter exits anyway",
            ", ".join(str(c.component) for c in stuck),
        )
        monitor.kill_now()
        return False
    if components.acme is not None and _wait(
        [components.acme], inbox, time.monotonic() + ACME_GRACE, monitor
    ):
        log.warning(
            "keter: acme is still ordering a certificate: the order is abandoned and made "
            "again at the next start"
        )
    log.info("keter: stopped")
    return True


def _wait(components: list, inbox: queue.SimpleQueue, deadline: float, monitor) -> list:
    """Wait for ``components`` to end; a second signal kills every app at once."""
    while True:
        alive = [c for c in components if c.is_alive()]
        if not alive or time.monotonic() >= deadline:
            return alive
        alive[0].join(POLL)
        while True:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, ShutdownRequested):
                log.warning("keter: %s again: killing every app now", message.signal_name)
                monitor.kill_now()
            # Anything else (apps reporting that they stopped) needs no decision any more.
