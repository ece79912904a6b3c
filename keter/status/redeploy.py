"""Restart and rollback: the only requests that change anything, run in the actor's thread.

Both put a bundle into incoming/ and let the usual pipeline deploy it: restart
touches the current bundle (the watcher redeploys a touched bundle), rollback
copies an archived version over it. HTTP threads hand them over as a
``Redeploy`` with a future for the answer (``StatusServer.command``), so every
change to incoming/ and the archive happens in one thread.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from dataclasses import field
from enum import StrEnum
from pathlib import Path

from keter.archive import SUFFIX, ArchivedBundle, ArchiveError
from keter.config import KeterConfig
from keter.incoming.files import NotABundleFile, open_regular
from keter.incoming.unpack import bundle_limit
from keter.messages import RollBack, ServeLastServed, message
from keter.status.errors import ApiError
from keter.status.views import StatusBoard

log = logging.getLogger(__name__)


class Action(StrEnum):
    RESTART = "restart"
    ROLLBACK = "rollback"


@message
class Redeploy:
    """From an HTTP thread to the status actor; the answer comes back in ``reply``."""

    action: Action
    app: str
    version: str | None = None  # rollback: a sha256 prefix; None: the one served before
    reply: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def run(board: StatusBoard, request: Redeploy) -> None:
    """Carry out ``request`` and answer it: a dict for the client, or an ApiError;
    nothing if the HTTP thread gave up waiting and withdrew it."""
    if not request.reply.set_running_or_notify_cancel():
        return
    try:
        if request.action is Action.RESTART:
            result = restart(board, request.app)
        else:
            result = rollback(board, request.app, request.version)
    except ApiError as exc:
        request.reply.set_exception(exc)
    except OSError as exc:
        action = request.action.value
        log.error("%s: %s failed: %s", request.app, action, exc)
        request.reply.set_exception(ApiError(500, f"{action} failed: {exc}"))
    else:
        request.reply.set_result(result)


def restart(board: StatusBoard, app: str) -> dict:
    if board.snapshot(app) is None:
        raise ApiError(404, f"no app named {app}")
    after = board.history.seq
    sha256 = incoming_sha256(board.config, app, touch=True)
    log.info("%s: restart requested through the status API", app)
    return {"app": app, "version": sha256[:12], "sha256": sha256, "after": after}


def incoming_sha256(config: KeterConfig, app: str, *, touch: bool = False) -> str:
    """The sha256 of the app's bundle in incoming/, touched (the watcher redeploys it)
    if ``touch``; raises ApiError(409) when there is none.

    Whoever may write incoming/ chooses what lies there: a FIFO would hold this thread
    for ever, a link would have root hash and touch whatever it names, and a file
    larger than any bundle (a hole of terabytes costs no disk) would hold it for hours.
    Opened as the watcher opens bundles, touched through that descriptor.
    """
    bundle = config.incoming_dir / f"{app}{SUFFIX}"
    try:
        fd, st = open_regular(bundle)
    except FileNotFoundError:
        raise ApiError(409, f"{app} has no bundle in incoming/") from None
    except NotABundleFile as exc:
        raise ApiError(409, f"incoming/{bundle.name} is no bundle: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        if st.st_size > bundle_limit(config.max_unpacked_bytes, config.max_members):
            raise ApiError(
                409,
                f"incoming/{bundle.name} is no bundle: {st.st_size} bytes, larger than any "
                "bundle keter unpacks",
            )
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        if touch:
            os.utime(f.fileno())
    return sha256


def rollback(board: StatusBoard, app: str, version: str | None) -> dict:
    chosen = rollback_target(board, app, version)
    after = board.history.seq
    snapshot = board.snapshot(app)
    coming = snapshot.deploying if snapshot is not None else None
    try:
        board.archive.restore(app, chosen, board.config.incoming_dir)
    except ArchiveError as exc:
        raise ApiError(409, str(exc)) from None
    log.info("%s: rolling back to version %s", app, chosen.version)
    answer = {"app": app, "version": chosen.version, "sha256": chosen.sha256, "after": after}
    if coming is not None and coming not in (snapshot.version, chosen.version):
        # An upload on its way is replaced, as the operator asked; said, not silent
        # (a rollback --with-data restoring for minutes met uploads most).
        replaced = coming or "not read yet"
        log.warning("%s: the rollback replaces the bundle on its way (%s)", app, replaced)
        answer["replaced"] = replaced
    return answer


def rollback_target(board: StatusBoard, app: str, version: str | None) -> ArchivedBundle:
    """The archived version a rollback would deploy (``version``, else the one before)."""
    archived = board.archive.versions(app)
    snapshot = board.snapshot(app)
    if snapshot is None and not archived:
        raise ApiError(404, f"no app named {app}")
    try:
        if version:
            return board.archive.find(app, version)
    except ArchiveError as exc:
        raise ApiError(409, str(exc)) from None
    current = snapshot.version if snapshot is not None else None
    older = [bundle for bundle in archived if bundle.version != current]
    if not older:
        shown = ", ".join(bundle.version for bundle in archived) or "none"
        raise ApiError(409, f"{app} has no earlier version archived ({shown})")
    return older[0]


def serve_last_served(board: StatusBoard, order: ServeLastServed) -> bool:
    """The version that served last (the archive's newest) back into incoming/, after
    the bundle there failed at keter's start; False if there is none (a first deploy)
    or it cannot be (with a line)."""
    versions = board.archive.versions(order.app)
    if not versions:
        return False
    last = versions[0]
    if last.sha256 == order.failed_sha256:
        log.error("%s: the version that served last is the one failing; nothing serves", order.app)
        return False
    incoming = board.config.incoming_dir
    bundle = incoming / f"{order.app}{SUFFIX}"
    try:
        seen = _identity(bundle)
        if seen is None or not _is_failed_bundle(board.config, order, seen):
            log.info(
                "%s: incoming/%s changed since it failed; it deploys instead of version %s",
                order.app,
                bundle.name,
                last.version,
            )
            return False
        changed = f"incoming/{bundle.name} changed meanwhile"
        board.archive.restore(
            order.app, last, incoming, unless=lambda: changed if _identity(bundle) != seen else None
        )
    except (ArchiveError, OSError) as exc:
        log.error("%s: cannot put back version %s: %s", order.app, last.version, exc)
        return False
    log.warning(
        "%s: the bundle in incoming/ failed at keter's start; version %s, which served "
        "before, goes back into incoming/ in its place",
        order.app,
        last.version,
    )
    return True


def roll_back(board: StatusBoard, order: RollBack) -> str | None:
    """The supervisor's automatic rollback (a watched version made things worse).

    Puts the archived version back into incoming/; why it cannot, or None. Only over
    the bundle it rolls back: one removed meanwhile (the app is being removed) or
    replaced by a newer upload stays as the operator left it.
    """
    incoming = board.config.incoming_dir
    bundle = incoming / f"{order.app}{SUFFIX}"
    changed = f"incoming/{bundle.name} was removed or replaced meanwhile"
    try:
        seen = _identity(bundle)
        if seen is None or incoming_sha256(board.config, order.app) != order.replaces:
            raise ArchiveError(changed)
        chosen = board.archive.find(order.app, order.sha256)
        # Asked again just before the copy takes its place (the copy takes a while).
        board.archive.restore(
            order.app,
            chosen,
            incoming,
            unless=lambda: changed if _identity(bundle) != seen else None,
        )
    except ApiError as exc:  # incoming_sha256: no bundle, not a regular file, too large
        return f"cannot put {order.sha256[:12]} back: {exc.message}"
    except (ArchiveError, OSError) as exc:
        return f"cannot put {order.sha256[:12]} back: {exc}"
    log.info("%s: rolling back to version %s", order.app, chosen.version)
    return None


def _is_failed_bundle(config: KeterConfig, order: ServeLastServed, seen: tuple) -> bool:
    """Whether incoming/ still holds the bundle that failed (``seen``: its identity)."""
    if order.failed_sha256:
        try:
            return incoming_sha256(config, order.app) == order.failed_sha256
        except ApiError:  # gone, or no regular file
            return False
    return seen[3] / 1e9 == order.failed_mtime  # as the supervisor has it (mtime_ns / 1e9)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells one file at ``path`` from another (or from itself rewritten); None if
    there is none."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
