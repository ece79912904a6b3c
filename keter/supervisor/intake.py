"""Bundles in and out of incoming/: a deploy begins, is superseded, or its app is removed.

Also the checks a freshly unpacked bundle must pass against what else runs
(host conflicts, the operator's limits) before anything of it starts.
"""

from __future__ import annotations

import logging
import time

from keter.bundle import BundleConfig
from keter.deploys import App, Deploy, Stage
from keter.messages import (
    BundleArrived,
    BundleUnpacked,
    DeployFinished,
    FailureKind,
    Outcome,
    ProvisionDatabase,
    RemoveFolder,
    UnpackBundle,
)
from keter.names import validate_app_name
from keter.routes import deploy_problems
from keter.supervisor.state import SupervisorState

log = logging.getLogger(__name__)


class Intake(SupervisorState):
    """Bundles arriving in and leaving incoming/; a freshly unpacked bundle's checks."""

    def _bundle_arrived(self, arrived: BundleArrived) -> None:
        app = self.apps.setdefault(arrived.app, App(name=arrived.app))
        app.bundle_present = True
        self._cancel_db_retry(arrived.app)  # the newer bundle deploys instead
        self._changed.add(app.name)
        log.info("%s: bundle seen (%d bytes)", arrived.app, arrived.size)
        if app.removing:
            # Copied in again while its removal is under way: that finishes first (nginx
            # may be un-routing the app right now), then this deploys like a first one.
            log.info("%s: waiting for its removal to finish", arrived.app)
            app.waiting = arrived
            return
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
            at_start=arrived.at_start,
            arrival=arrived,
        )
        self._stop_waiting(app.name)  # this deploy supersedes a wait for a host
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
        self._cancel_db_retry(name, forget=True)
        app.waiting = None
        app.bundle_present = False
        self._stop_waiting(name)
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
        self._changed.add(msg.app)  # its version is known: `keter status` shows it deploying
        for warning in msg.warnings:
            log.warning("%s: %s", msg.app, warning)
        if not config.runs_something and not config.serves_http:
            reason = "config/keter.yaml defines nothing to run or serve"
            self._fail(deploy, reason, kind=FailureKind.CONFIG)
            return
        conflicts = self._conflicts(deploy)
        problems = self._config_problems(config)
        if conflicts:
            host, owner = next(iter(conflicts.items()))
            reason = f"host {host} is already served by app {owner}"
            self._fail(deploy, reason, kind=FailureKind.CONFLICT)
            if not problems:  # nothing else to fix: it deploys once the hosts are free
                self._wait_for_hosts(deploy, conflicts)
            return
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

    def _config_problems(self, config: BundleConfig) -> list[str]:
        """Why the operator's config refuses the bundle's config (nothing: it may run)."""
        problems = deploy_problems(config, self.config)
        if config.postgres and config.postgres_server is not None:
            server = config.postgres_server
            problem = self.config.postgres.server_problem(server.host, server.port)
            if problem:
                problems.append(f"plugins.postgres {problem}")
        problems += self.config.app_limits.over_ceiling(config.process_limits)
        return problems
