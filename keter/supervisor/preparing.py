"""Preparing a deploy: its settings and ports, then the backup and release detour.

PROVISIONING -> BACKING_UP -> RELEASING -> STARTING (see ``keter.deploys`` and
``keter.release``); a deploy without a release goes straight to STARTING.
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from keter import envstore
from keter.appdata import app_user
from keter.deploys import Deploy, Stage
from keter.messages import (
    BackupDatabase,
    BackupFailed,
    BackupKind,
    BackupTaken,
    FailureKind,
    RunFinished,
    RunOnce,
)
from keter.postgres import DB_ENV_NAMES
from keter.processes.ports import NoFreePort
from keter.release import failure_reason, release_command
from keter.supervisor.state import SupervisorState

log = logging.getLogger(__name__)


class Preparing(SupervisorState):
    """Settings and ports, then the backup and the release, before STARTING."""

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
        if deploy.db is not None and (owned := sorted(set(settings) & set(DB_ENV_NAMES))):
            # Stored before the app had a database (keter env refuses them since): keter's
            # own win, and the operator should not think theirs apply.
            log.warning(
                "%s: keter env %s: overridden by the app's database (postgres: true); unset them",
                deploy.app,
                ", ".join(owned),
            )
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
        self._grant_ports(deploy.app, deploy.ports_held)  # before any of its processes starts
        webapps = deploy.config.webapps
        deploy.releases = [i for i, webapp in enumerate(webapps) if webapp.release is not None]
        if not deploy.releases:
            self._start(deploy)
        elif deploy.db is not None:
            deploy.move(Stage.BACKING_UP)
            serving = self.apps[deploy.app].serving
            again = serving is not None and serving.version == deploy.version
            self.c.backups.tell(
                BackupDatabase(
                    app=deploy.app,
                    deploy_id=deploy.id,
                    db=deploy.db,
                    user=app_user(self.config, deploy.app),
                    kind=BackupKind.RERELEASE if again else BackupKind.RELEASE,
                    version=deploy.version,
                    serving=serving.version if serving is not None else None,
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
        spec = self._process_spec(
            deploy,
            release_command(release),
            self._web_environment(deploy, index, deploy.ports_held[index]),
            deploy.config.webapps[index].limits,
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
