"""The unpacker actor: unpacks a bundle (``unpack.safe_unpack``) and parses its config.

Unpacking one bundle is where a hostile archive does its work, so this is a
fault boundary: whatever happens while unpacking and parsing one bundle, an
error nobody anticipated included, becomes that deploy's ``UnpackFailed`` with
one reason (the traceback at debug level), the half-written folder is
removed, and the actor goes on with the next message.

The extraction itself (``safe_unpack``) runs in a process of keter's own
(``keter.incoming.worker``: why, and what happens when it dies); the config
is parsed here, in the actor's thread.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import traceback
from pathlib import Path

from keter.actor import Actor
from keter.bundle import BundleConfigError, parse_bundle_config
from keter.incoming.unpack import UnpackError
from keter.incoming.worker import UnpackWorker
from keter.messages import (
    BundleUnpacked,
    Component,
    FailureKind,
    RemoveFolder,
    UnpackBundle,
    UnpackFailed,
)
from keter.names import log_text
from keter.users import AppUsers, NoFreeUid, publish_static, secure_folder

log = logging.getLogger(__name__)


class Unpacker(Actor):
    """Unpacks bundles into folders under ``temp_dir`` and removes old ones."""

    def __init__(
        self,
        temp_dir: Path,
        *,
        max_bytes: int,
        max_members: int,
        report_to: queue.Queue,
        users: AppUsers | None = None,
    ) -> None:
        super().__init__(Component.UNPACKER, report_to)
        self.users = users  # each app's own group gets its folder (keter.users)
        self.temp_dir = Path(temp_dir)
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.worker = UnpackWorker()

    def on_start(self) -> None:
        """Remove the folders a previous run left behind: no process uses them now."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.temp_dir.iterdir()):
            self._remove(entry, why="stale ")
        self.worker.start()  # now rather than at the first deploy

    def stop(self) -> None:
        """Queue Stop and give up a bundle being unpacked (a stuck one would hold keter's
        stop until the worker is found stuck)."""
        self.worker.cancelled.set()
        super().stop()

    def on_stop(self) -> None:
        self.worker.stop()

    def handle(self, message: object) -> None:
        match message:
            case UnpackBundle():
                self._unpack(message)
            case RemoveFolder(path=path):
                self._remove(path)
            case _:
                self.unexpected(message)

    def _unpack(self, msg: UnpackBundle) -> None:
        if not self._inside_temp(msg.dest):
            self._failed(msg, f"destination {msg.dest} is not inside {self.temp_dir}")
            return
        try:
            self._unpack_and_parse(msg)
        except Exception as exc:
            # A bug, or a failure nobody foresaw: this bundle's, not the unpacker's. Its
            # traceback is what a fix needs.
            log.error("%s: unpacking failed:\n%s", msg.app, traceback.format_exc())
            shutil.rmtree(msg.dest, ignore_errors=True)
            reason = log_text(f"{type(exc).__name__}: {exc}")
            self._failed(
                msg,
                f"cannot unpack {msg.bundle.name}: internal error: {reason}",
                FailureKind.INTERNAL,
            )

    def _unpack_and_parse(self, msg: UnpackBundle) -> None:
        try:
            sha256 = self.worker.unpack(
                msg.bundle, msg.dest, max_bytes=self.max_bytes, max_members=self.max_members
            )
        except UnpackError as exc:
            gone = not os.path.lexists(msg.bundle)
            self._failed(msg, f"cannot unpack {msg.bundle.name}: {exc}", gone=gone)
            return
        try:
            config = parse_bundle_config(msg.dest, msg.app)
        except (BundleConfigError, OSError) as exc:
            shutil.rmtree(msg.dest, ignore_errors=True)
            self._failed(msg, f"bad config in {msg.bundle.name}: {exc}", FailureKind.CONFIG)
            return
        if self.users is not None:
            try:
                secure_folder(msg.dest, self.users.uid(msg.app))
                publish_static(msg.dest, (static.root for static in config.static_files))
            except (OSError, ValueError, NoFreeUid) as exc:
                shutil.rmtree(msg.dest, ignore_errors=True)
                self._failed(msg, f"cannot hand {msg.dest.name} to its app's group: {exc}")
                return
        log.info("%s: unpacked %s into %s", msg.app, msg.bundle.name, msg.dest)
        self.report(
            BundleUnpacked(
                app=msg.app,
                deploy_id=msg.deploy_id,
                folder=msg.dest,
                config=config,
                warnings=tuple(config.warnings),
                sha256=sha256,
            )
        )

    def _failed(
        self,
        msg: UnpackBundle,
        reason: str,
        kind: FailureKind = FailureKind.UNPACK,
        *,
        gone: bool = False,
    ) -> None:
        # The supervisor logs the failure ("APP: deploy failed: REASON"); once is enough.
        log.debug("%s: %s", msg.app, reason)
        self.report(
            UnpackFailed(app=msg.app, deploy_id=msg.deploy_id, reason=reason, kind=kind, gone=gone)
        )

    def _remove(self, path: Path, why: str = "") -> None:
        if not self._inside_temp(path):
            log.error("unpacker: refusing to remove %s: not inside %s", path, self.temp_dir)
            return
        if not os.path.lexists(path):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)  # a stray file, or a symlink (never followed)
        except OSError as exc:
            log.error("unpacker: cannot remove %s%s: %s", why, path, exc)
            return
        log.info("unpacker: removed %s%s", why, path)

    def _inside_temp(self, path: Path) -> bool:
        """True if ``path`` names an entry strictly below ``temp_dir``.

        The parent is resolved but the last component is not, so a symlink
        placed in temp_dir is itself removed, never what it points to.
        """
        path = Path(path)
        if path.name in ("", ".", ".."):
            return False
        if path.parent == self.temp_dir:
            # The usual case (temp/NAME-ID), and the same answer as below without the
            # lstat of every component twice: under a mass deploy, a fifth of this
            # thread's time went to those.
            return True
        root = os.path.realpath(self.temp_dir)
        return os.path.commonpath([root, os.path.realpath(path.parent)]) == root
