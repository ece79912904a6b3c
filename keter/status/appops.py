"""An app's settings, database and data folder through the status API (issue 13).

* Settings (``keter env``): their names are listed, never their values; a
  change is stored (``keter.envstore``) and applied by a zero-downtime
  restart unless the caller asks not to.
* Database: the backups are listed (``keter.backups``); taking one and
  restoring one go to the supervisor as a ``DatabaseRequest`` (it knows the
  app's credentials and whether a deploy is under way) and the answer is
  awaited here. A restore is followed by a redeploy of the version serving
  (from the archive of served versions, like a rollback to it: a newer bundle
  in incoming/ that failed is replaced, since the data was restored for the
  version that serves), so the app starts again on the restored data. A
  newer bundle on its way is left to deploy instead, on the restored data
  (its release waits for the restore behind its own backup): copying the
  version serving over it had dropped an upload made during the restore.
  ``rollback --with-data`` restores the backup taken before the serving
  version's release, then rolls back.
* The data folder: purged on request, never while the app runs.

HTTP threads call these functions; each returns a dict for the client or
raises ``ApiError``. Values of settings appear in no answer and no log line.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING

from keter import envstore
from keter.appdata import data_dir, purge_data_dir
from keter.archive import ArchiveError
from keter.backups import backup_before, info_json, list_backups
from keter.messages import AppState, DatabaseRequest, DbAction, RequestRefused
from keter.postgres import DB_ENV_NAMES
from keter.status.errors import ApiError
from keter.status.redeploy import Action, incoming_sha256, rollback_target

if TYPE_CHECKING:
    from keter.status.component import StatusServer

log = logging.getLogger(__name__)

MARGIN = 30.0  # seconds a database request may wait beyond backup-timeout (queued jobs)


# -- settings -----------------------------------------------------------------------------


def env_names(api: StatusServer, app: str) -> dict:
    try:
        names = sorted(envstore.load(api.config.etc_dir, app))
    except envstore.SettingsError as exc:
        raise ApiError(500, str(exc)) from None
    return {"app": app, "names": names}


def env_change(api: StatusServer, app: str, body: dict) -> dict:
    """Store ``body["set"]`` and remove ``body["unset"]``; restart unless ``restart`` is false."""
    changes, removals, restart = body.get("set", {}), body.get("unset", []), body.get("restart")
    if not isinstance(changes, dict) or not isinstance(removals, list):
        raise ApiError(400, 'expected {"set": {NAME: VALUE}, "unset": [NAME], "restart": bool}')
    if restart is None:
        restart = True
    if not isinstance(restart, bool):
        raise ApiError(400, "restart must be true or false")
    if not changes and not removals:
        raise ApiError(400, "nothing to set or unset")
    snapshot = api.board.snapshot(app)
    has_database = snapshot is not None and snapshot.database is not None
    # Stored, they were silently overridden: the app kept keter's database.
    if has_database and (owned := sorted(name for name in changes if name in DB_ENV_NAMES)):
        raise ApiError(
            400,
            f"{', '.join(owned)}: set by keter for {app}'s database (postgres: true); "
            "it cannot be changed",
        )
    try:
        changed, removed = envstore.update(api.config.etc_dir, app, changes, removals)
    except envstore.SettingsError as exc:
        raise ApiError(400, str(exc)) from None
    except OSError as exc:
        raise ApiError(500, f"cannot store the settings: {exc.strerror or exc}") from None
    log.info(
        "%s: settings changed through the status API: set %s; unset %s",
        app,
        ", ".join(changed) or "nothing",
        ", ".join(removed) or "nothing",
    )
    result: dict = {"app": app, "set": changed, "unset": removed, "restart": None}
    if restart and api.board.snapshot(app) is not None:
        try:
            result["restart"] = api.command(Action.RESTART, app)
        except ApiError as exc:
            # Stored all the same: an error answer would say nothing changed.
            result["restart_error"] = exc.message
    return result


# -- the database ----------------------------------------------------------------------------


def backups(api: StatusServer, app: str) -> dict:
    if not api.board.knows(app) and not list_backups(api.config.backups_dir, app):
        raise ApiError(404, f"no app named {app}")
    found = list_backups(api.config.backups_dir, app)
    return {"app": app, "backups": [info_json(backup) for backup in found]}


def database(api: StatusServer, action: DbAction, app: str, backup: str | None = None) -> dict:
    """Hand the request to the supervisor and wait for the backups component's answer."""
    request = DatabaseRequest(action=action, app=app, backup=backup)
    api.report(request)
    timeout = (2 if action is DbAction.RESTORE else 1) * api.config.backup_timeout + MARGIN
    try:
        return request.reply.result(timeout=timeout)
    except RequestRefused as exc:
        raise ApiError(exc.status, exc.message) from None
    except concurrent.futures.TimeoutError:
        raise ApiError(503, f"no answer within {timeout:g}s; see keter's log") from None


def take_backup(api: StatusServer, app: str) -> dict:
    return database(api, DbAction.BACKUP, app)


def restore(api: StatusServer, app: str, body: dict) -> dict:
    """Restore a backup (the newest if none is named), then restart the app on it."""
    name = body.get("backup")
    # "" is refused, not read as "the newest": a script's unset variable restored it.
    if name is not None and (not isinstance(name, str) or not name):
        raise ApiError(400, "backup must be a file name (leave it out for the newest)")
    after = api.board.history.seq  # a deploy that begins during the restore ends past it
    result = database(api, DbAction.RESTORE, app, name)
    snapshot = api.board.snapshot(app)
    if snapshot is not None and snapshot.deploying not in (None, snapshot.version):
        # Uploaded during the restore: it deploys on the restored data.
        sha256 = incoming_sha256(api.config, app)
        log.info("%s: version %s, on its way, deploys on the restored data", app, sha256[:12])
        result.update(
            {"app": app, "version": sha256[:12], "sha256": sha256, "after": after, "newer": True}
        )
        return result
    result.update(_redeploy_serving(api, app))
    return result


def _redeploy_serving(api: StatusServer, app: str) -> dict:
    """Deploy the version serving again (from the archive; else the bundle in incoming/)."""
    snapshot = api.board.snapshot(app)
    if snapshot is not None and snapshot.version is not None:
        log.info("%s: redeploying version %s on the restored data", app, snapshot.version)
        try:
            return api.command(Action.ROLLBACK, app, snapshot.version)
        except ApiError as exc:
            if exc.status != 409:  # not archived: the bundle in incoming/ it is
                raise
    return api.command(Action.RESTART, app)


def rollback_with_data(api: StatusServer, app: str, version: str | None) -> dict:
    """Restore the backup taken before the serving version's release, then roll back."""
    snapshot = api.board.snapshot(app)
    if snapshot is None or snapshot.version is None:
        raise ApiError(409, f"{app} is not running; --with-data undoes the version serving")
    target = rollback_target(api.board, app, version)  # refused before any data changes
    backup = backup_before(api.config.backups_dir, app, snapshot.version)
    if backup is None:
        raise ApiError(
            409,
            f"no backup was taken before version {snapshot.version} of {app} "
            "(it has no release or no database, or the backup was deleted); "
            "roll back without --with-data, or restore a backup by name",
        )
    try:
        # The rollback's own check, before the data changes: a damaged archived bundle
        # had it fail after the restore, the version undone serving on the old data.
        api.board.archive.check(target)
    except ArchiveError as exc:
        raise ApiError(409, f"{exc}; nothing was restored") from None
    restored = database(api, DbAction.RESTORE, app, backup.name)
    try:
        result = api.command(Action.ROLLBACK, app, target.version)
    except ApiError as exc:
        safety = restored["safety_backup"]["name"]
        raise ApiError(
            exc.status,
            f"{exc.message}; but the database was restored from {backup.name} and version "
            f"{snapshot.version} serves on it (its data before is in backup {safety})",
        ) from None
    result.update(restored)
    return result


# -- the data folder --------------------------------------------------------------------------


def purge(api: StatusServer, app: str, body: dict) -> dict:
    if body.get("confirm") != app:
        raise ApiError(400, 'confirm by sending {"confirm": APP}, the app\'s name again')
    snapshot = api.board.snapshot(app)
    if snapshot is not None and snapshot.state is AppState.STOPPING:
        raise ApiError(409, f"keter still stops {app}'s processes; try again once they ended")
    if snapshot is not None:
        raise ApiError(409, f"keter still runs or deploys {app}; remove its bundle first")
    folder = data_dir(api.config, app)
    try:
        purged = purge_data_dir(folder)
    except OSError as exc:
        raise ApiError(500, f"cannot delete {folder}: {exc.strerror or exc}") from None
    log.warning("%s: data folder %s %s", app, folder, "purged" if purged else "was already gone")
    return {"app": app, "folder": str(folder), "purged": purged}
