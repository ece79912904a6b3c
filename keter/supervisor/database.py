"""An operator's database requests (``keter db backup`` / ``restore``).

Checked here, against what runs; carried out by the backups component.
"""

from __future__ import annotations

from keter.appdata import app_user
from keter.messages import (
    BackupDatabase,
    BackupKind,
    DatabaseRequest,
    DbAction,
    RequestRefused,
    RestoreDatabase,
)
from keter.supervisor.state import SupervisorState


class DatabaseRequests(SupervisorState):
    """An operator's database requests, checked against what runs."""

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
