"""Databases: a deploy the database server was unavailable for, and an operator's
requests (``keter db backup`` / ``restore``).

A deploy whose database could not be provisioned because the server could not be
reached (for all of the provisioner's retry-seconds) fails like any other. When
nothing serves its app (its first deploy, or every deploy after a keter restart while
PostgreSQL is down) the same bundle deploys again after ``DB_RETRY_FIRST`` seconds,
then twice as long after each such failure up to ``DB_RETRY_MAX``, until the server
answers: the app had answered 404 until an operator acted. A newer bundle or the
bundle's removal cancels the retry. When an older version serves, nothing is retried:
it serves on, and a new version should not replace it at some unannounced moment
later; the operator's next upload (or ``keter restart``) deploys it.

An operator's database requests are checked here, against what runs, and carried out
by the backups component.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from keter.appdata import app_user
from keter.deploys import App, Deploy
from keter.messages import (
    BackupDatabase,
    BackupKind,
    DatabaseRequest,
    DbAction,
    FailureKind,
    RequestRefused,
    RestoreDatabase,
)
from keter.supervisor.state import DbRetry, SupervisorState
from keter.supervisor.timers import RetryDeploy

log = logging.getLogger(__name__)

DB_RETRY_FIRST = 10.0  # seconds before the first retry (the provisioner retried already)
DB_RETRY_MAX = 300.0


class DatabaseRequests(SupervisorState):
    """Deploys retried while the database server is unavailable; an operator's database
    requests, checked against what runs."""

    def _database_failed(self, deploy: Deploy, reason: str, *, unavailable: bool) -> None:
        self._fail(deploy, f"database: {reason}", kind=FailureKind.DATABASE)
        app = self.apps.get(deploy.app)
        if not unavailable or app is None or deploy.arrival is None:
            return
        # _fail may have begun a bundle that waited; anything on its way, serving or
        # leaving decides the app's future instead.
        if not self._nothing_on(app):
            return
        delay = self._db_retry_delays.get(app.name, DB_RETRY_FIRST)
        self._db_retry_delays[app.name] = min(delay * 2, DB_RETRY_MAX)
        self._db_retries[app.name] = DbRetry(deploy_id=deploy.id, arrival=deploy.arrival)
        self.timers.schedule(delay, RetryDeploy(app=app.name, deploy_id=deploy.id))
        log.warning(
            "%s: database server unavailable and nothing serves the app: its bundle"
            " deploys again in %gs",
            app.name,
            delay,
        )

    @staticmethod
    def _nothing_on(app: App) -> bool:
        """Nothing of the app serves, deploys, waits or leaves; its bundle is there."""
        idle = app.serving is None and app.next is None and app.waiting is None
        return idle and not app.removing and app.bundle_present

    def _database_answered(self, app: str) -> None:
        """The server provisioned the app's database: the next retry waits the least again."""
        self._db_retry_delays.pop(app, None)

    def _cancel_db_retry(self, app: str, *, forget: bool = False) -> None:
        """A newer bundle or a removal: the bundle that failed does not deploy again."""
        self._db_retries.pop(app, None)
        if forget:
            self._db_retry_delays.pop(app, None)

    def _retry_deploy(self, app_name: str, deploy_id: int) -> None:
        retry = self._db_retries.get(app_name)
        if retry is None or retry.deploy_id != deploy_id:
            return  # cancelled meanwhile
        del self._db_retries[app_name]
        app = self.apps.get(app_name)
        if app is None or not self._nothing_on(app):
            return
        log.info("%s: deploying its bundle again", app_name)
        self._changed.add(app_name)
        # Not at_start: what ServeLastServed puts back was asked for at the first failure.
        self._begin(app, replace(retry.arrival, at_start=False))

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
                serving=serving.version,
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
