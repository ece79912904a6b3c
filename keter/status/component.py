"""The status actor: the supervisor's facts in, the status API's state and metrics out.

The supervisor tells this actor every change (``AppChanged``, ``AppGone``,
``DeployFinished``, ``AppEvent``) and passes on keter.acme's ``CertificateState``
of each host; it never looks at the supervisor's objects.
From those facts it keeps the ``StatusBoard`` the API shows, the Prometheus
metrics and the archive of served bundles for rollback. It also runs the
restart and rollback requests the HTTP threads hand it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time

from keter.actor import Actor
from keter.archive import SUFFIX, ArchiveError, BundleArchive
from keter.config import KeterConfig
from keter.history import DeployHistory
from keter.incoming.unpack import bundle_limit
from keter.messages import (
    AppChanged,
    AppEvent,
    AppGone,
    AppSnapshot,
    AppState,
    CertificateState,
    Component,
    DeployFinished,
    EventKind,
    FailureKind,
    Outcome,
    RollBack,
    RollBackDone,
    ServeLastServed,
    SwitchReady,
    TrafficReport,
    message,
)
from keter.stats.component import StatsCollector
from keter.status import redeploy
from keter.status.checks import RequestChecks, load_api_token
from keter.status.errors import ApiError
from keter.status.metrics import Metrics
from keter.status.redeploy import Action, Redeploy
from keter.status.servers import Listeners, join_host_port, socket_path
from keter.status.views import StatusBoard

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0
# The history file is written at most this often: it holds every app's history, and
# 1000 deploys finishing together must not write it 1000 times.
HISTORY_SAVE_DELAY = 0.2  # archiving a large bundle may hold the actor for a while


@message
class _SaveHistory:
    """Private timer: write the deploy history file (deploys finished since the last)."""


class StatusServer(Actor):
    """The status actor and its HTTP listeners (Unix socket, optional TCP)."""

    def __init__(self, config: KeterConfig, report_to: queue.Queue | None = None) -> None:
        super().__init__(Component.STATUS, report_to)
        self.config = config
        self._save_pending = False  # a _SaveHistory timer is set
        self._saved = -HISTORY_SAVE_DELAY  # when the history file was last written (monotonic)
        self.socket_path = socket_path(config.root)
        self.checks = RequestChecks(config)
        self.archive = BundleArchive(
            config.archive_dir,
            config.archive_keep,
            bundle_limit(config.max_unpacked_bytes, config.max_members),
        )
        self.board = StatusBoard(
            config, DeployHistory(config.etc_dir / "history.json"), self.archive
        )
        self.metrics = Metrics(certificates=self.board.certificate_expiries)
        self.listeners = Listeners(self)
        self.tcp_address: tuple[str, int] | None = None  # once listening
        self.listening = threading.Event()  # set once every listener accepts connections
        self.stats: StatsCollector | None = None  # keter.stats, when traffic-stats is on

    def traffic_details(self, app: str) -> dict:
        """One app's traffic windows and last hour (HTTP threads; asks the stats component)."""
        if self.stats is None:
            raise ApiError(404, "traffic statistics are off (traffic-stats: false)")
        try:
            return self.stats.query(app)
        except concurrent.futures.TimeoutError:
            raise ApiError(503, "the statistics are busy; try again") from None

    @property
    def token(self) -> str:
        """The token POST requests need (the dashboard's pages carry it)."""
        return self.checks.token

    # -- the actor ---------------------------------------------------------------------

    def bind(self) -> None:
        """Take the socket and the TCP port; raises OSError (one line) if either is taken.

        keter calls this before any component starts: a port another program holds
        is then one line and keter not starting, rather than this component failing
        at every restart while the others start apps. Closes what it took on failure.
        """
        if self.listeners.bound:
            return
        try:
            self.listeners.bind_unix(self.socket_path, self.config.status_group)
            if self.config.status_listen is not None:
                try:
                    self.checks.api_token = load_api_token(
                        self.config.etc_dir, self.config.status_group
                    )
                except OSError as exc:  # dashboard-users still log in
                    log.error("keter: no status API token, cannot write %s: %s", exc.filename, exc)
                self.listeners.bind_tcp(*self.config.status_listen)
                self.tcp_address = self.listeners.tcp_address
        except BaseException:
            self.listeners.close()
            raise

    def on_start(self) -> None:
        self.board.history.load()
        self.bind()  # already bound by keter's start; a restart after a failure binds again
        self.listeners.start()
        where = f" and http://{join_host_port(*self.tcp_address)}" if self.tcp_address else ""
        log.info("keter: status API on %s%s", self.socket_path, where)
        self.listening.set()

    def on_stop(self) -> None:
        self.board.close()  # saves the history too
        self._sync_archive()
        self.listeners.close()

    def handle(self, message: object) -> None:
        match message:
            case AppChanged(snapshot=snapshot):
                self._app_changed(snapshot)
            case AppGone(app=app):
                self.board.app_gone(app)
                self.metrics.forget(app)
            case DeployFinished():
                self._deploy_finished(message)
            case AppEvent(app=app, kind=kind, text=text, at=at):
                self.board.add_event(app, kind, text, at)
            case Redeploy():
                redeploy.run(self.board, message)
            case RollBack(app=app, version=version, reason=reason):
                failure = redeploy.roll_back(self.board, message)
                self.report(RollBackDone(app=app, version=version, reason=reason, failure=failure))
            case ServeLastServed():
                redeploy.serve_last_served(self.board, message)
            case TrafficReport():
                self.metrics.traffic.apps = self.board.traffic_changed(message)
            case CertificateState():
                self.board.certificate_changed(message)  # /metrics reads the board too
            case SwitchReady(mode=mode, reason=reason):
                self.board.set_switch(mode, reason)
            case _SaveHistory():
                self._save_pending = False
                self.board.save_history()
                self._saved = time.monotonic()
                self._sync_archive()
            case _:
                self.unexpected(message)

    def _app_changed(self, snapshot: AppSnapshot) -> None:
        previous = self.board.app_changed(snapshot)
        self.metrics.up.labels(snapshot.app).set(1 if snapshot.state is AppState.RUNNING else 0)
        # restarts counts crashes of the serving version; a new version starts again at 0.
        if previous is not None and previous.version == snapshot.version:
            added = snapshot.restarts - previous.restarts
        else:
            added = snapshot.restarts
        if added > 0:
            self.metrics.restarts.labels(snapshot.app).inc(added)

    def _deploy_finished(self, msg: DeployFinished) -> None:
        if self.board.has_app(msg.app):
            self.metrics.deploys.labels(msg.app, msg.outcome.value).inc()
        else:  # a refused file under a name no app has (the supervisor never published it)
            self.metrics.refused.inc()
        if msg.outcome is Outcome.SERVING:
            self.metrics.duration.observe(msg.duration)
            self._archive(msg)  # before the verdict is visible, so a rollback can use it at once
        elif msg.kind is FailureKind.HEALTH_CHECK:
            self.metrics.health_check_failures.labels(msg.app).inc()
        # A deploy alone is on disk before anyone hears its verdict (a keter killed
        # right after "now serving" lost it); one of a burst within HISTORY_SAVE_DELAY.
        alone = not self._save_pending and time.monotonic() >= self._saved + HISTORY_SAVE_DELAY
        entry = self.board.record(msg, save=alone)
        if alone:
            self._saved = time.monotonic()
        elif not self._save_pending:
            self._save_pending = True
            self.schedule(HISTORY_SAVE_DELAY, _SaveHistory())
        if msg.outcome is Outcome.SERVING:
            text = f"version {msg.version} serving (took {msg.duration:.1f}s)"
        else:  # the reason as the history keeps it: capped, whatever the bundle made of it
            text = f"version {msg.version} {msg.outcome.value}: {entry['reason']}"
        self.board.add_event(msg.app, EventKind.deploy(msg.outcome), text, msg.at)

    def _sync_archive(self) -> None:
        """The bundles archived since the last time, made durable in one batch."""
        try:
            self.archive.sync()
        except OSError as exc:
            log.error("keter: cannot sync the archive in %s: %s", self.archive.folder, exc)

    def _archive(self, msg: DeployFinished) -> None:
        bundle = self.config.incoming_dir / f"{msg.app}{SUFFIX}"
        try:
            self.archive.store(msg.app, bundle, msg.sha256, msg.at)
        except ArchiveError as exc:
            log.warning("%s: version %s not archived: %s", msg.app, msg.version, exc)
        except OSError as exc:
            log.error("%s: cannot archive version %s: %s", msg.app, msg.version, exc)

    # -- for the HTTP threads ------------------------------------------------------------

    def command(self, action: Action, app: str, version: str | None = None) -> dict:
        """Run restart or rollback in the actor's thread and wait for the answer."""
        request = Redeploy(action=action, app=app, version=version)
        self.tell(request)
        try:
            return request.reply.result(timeout=COMMAND_TIMEOUT)
        except concurrent.futures.TimeoutError:
            pass
        # "Try again" must mean nothing happened: a request still queued is withdrawn
        # (it had been carried out later all the same, and a retry did it twice).
        if request.reply.cancel():
            raise ApiError(503, "keter is busy or stopping; nothing was done; try again")
        try:
            return request.reply.result(timeout=COMMAND_TIMEOUT)  # begun: its answer is near
        except concurrent.futures.TimeoutError:
            raise ApiError(
                503, f"keter is still carrying out the {action.value}; see keter status"
            ) from None
