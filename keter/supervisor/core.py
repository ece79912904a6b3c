"""The Supervisor: the loop's API (``keter.daemon``) and ``dispatch``, one ``match``
on message type that hands each message to the part of the package that
handles it.
"""

from __future__ import annotations

import logging

from keter import systemd
from keter.deploys import Stage
from keter.messages import (
    BackupFailed,
    BackupTaken,
    BundleArrived,
    BundleIgnored,
    BundleRemoved,
    BundleUnpacked,
    CertificateIssued,
    CertificateState,
    ComponentFailed,
    DatabaseFailed,
    DatabaseReady,
    DatabaseRequest,
    Drained,
    FailureKind,
    NginxApplied,
    NginxFailed,
    PointFailed,
    ProcessFailed,
    ProcessHealthy,
    ProcessPortTaken,
    ProcessStarted,
    ProcessStateChanged,
    ProcessStopped,
    Rescan,
    RescanRequested,
    RollBackDone,
    RunFinished,
    ScanCompleted,
    ServicesPointed,
    ShutdownRequested,
    SwitchReady,
    UnpackFailed,
    VersionUnhealthy,
)
from keter.supervisor.conflicts import Conflicts
from keter.supervisor.database import DatabaseRequests
from keter.supervisor.endings import Endings
from keter.supervisor.intake import Intake
from keter.supervisor.preparing import Preparing
from keter.supervisor.processes import ProcessFacts
from keter.supervisor.reports import Reports
from keter.supervisor.restarts import Restarts
from keter.supervisor.rollout import Rollout
from keter.supervisor.routing import Routing
from keter.supervisor.starting import Starting
from keter.supervisor.switching import Switching
from keter.supervisor.timers import DrainOver, RestartComponent, RetryDeploy, RetryMove

log = logging.getLogger(__name__)


class Supervisor(
    Intake,
    Conflicts,
    Preparing,
    DatabaseRequests,
    Starting,
    ProcessFacts,
    Switching,
    Routing,
    Rollout,
    Endings,
    Restarts,
    Reports,
):
    """The one place that decides what is deployed (see the package's docstring)."""

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
        return self.timers.next()

    def due_timers(self) -> list[object]:
        """Remove and return the timer messages that are due."""
        return self.timers.due()

    def _handle(self, msg: object) -> None:
        """Hand the message to the part that handles it (the package docstring lists them)."""
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
            case UnpackFailed(app=app, deploy_id=deploy_id, reason=reason, kind=kind, gone=gone):
                if deploy := self._next(app, deploy_id):
                    deploy.folder_exists = False  # the unpacker removed it
                    if gone:  # removed before it was read: no failure of the deploy
                        self._abandon(deploy, "its bundle was removed")
                    else:
                        self._fail(deploy, reason, kind=kind)
            case DatabaseReady(app=app, deploy_id=deploy_id, db=db):
                self._database_answered(app)
                if deploy := self._next(app, deploy_id):
                    deploy.db = db
                    self._prepare(deploy)
            case DatabaseFailed(app=app, deploy_id=deploy_id, reason=reason):
                if deploy := self._next(app, deploy_id):
                    self._database_failed(deploy, reason, unavailable=msg.unavailable)
            case RetryDeploy(app=app, deploy_id=deploy_id):
                self._retry_deploy(app, deploy_id)
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
            case RetryMove(process_id=process_id, port=port):
                self._retry_move(process_id, port)
            case NginxApplied(generation=generation, refused=refused):
                self._nginx_replied(generation, None, {r.app: r.reason for r in refused})
            case NginxFailed(generation=generation, reason=reason):
                self._nginx_replied(generation, reason, {})
            case CertificateIssued(host=host):
                # keter.acme: the host's sites get it at the next nginx generation.
                self._certificates[host] = msg
                self._request_nginx()
            case CertificateState():
                # keter.acme's view of one host (logged there), for `keter certs`, the
                # status API, the dashboard and /metrics.
                if self.c.status is not None:
                    self.c.status.tell(msg)
            case VersionUnhealthy(app=app, version=version, reason=reason):
                self._unhealthy(app, version, reason)
            case RollBackDone():
                self._rollback_done(msg)
            case SwitchReady():
                self._switch_known(msg)
            case ServicesPointed(deploy_id=deploy_id, at=at):
                self._services_pointed(deploy_id, at)
            case PointFailed(deploy_id=deploy_id, reason=reason):
                deploy = self.owners.get(deploy_id)
                if deploy is not None and deploy.stage is Stage.POINTING:
                    self._fail(deploy, f"switch: {reason}", kind=FailureKind.SWITCH)
            case Drained(deploy_id=deploy_id) | DrainOver(deploy_id=deploy_id):
                deploy = self.owners.get(deploy_id)
                if deploy is not None and deploy.stage is Stage.DRAINING:
                    self._retire(deploy, 0)
            case RescanRequested():
                self.c.watcher.tell(Rescan())
            case ShutdownRequested(signal_name=name):
                log.info("keter: %s received, stopping every app", name)
                self._keter_stops()
                self.exit_code = 0
            case ComponentFailed():
                self._component_failed(msg)
            case RestartComponent(component=component):
                self._restart_component(component)
            case _:
                log.error("keter: ignoring unexpected message %s", type(msg).__name__)
