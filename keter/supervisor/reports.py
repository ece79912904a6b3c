"""What the status component hears: app snapshots (only those that changed),
events, and every deploy's end (``DeployFinished``).
"""

from __future__ import annotations

import time

from keter.deploys import Deploy
from keter.messages import (
    AppChanged,
    AppEvent,
    AppGone,
    DeployFinished,
    EventKind,
    FailureKind,
    Outcome,
)
from keter.supervisor.state import SupervisorState


class Reports(SupervisorState):
    """What the status component is told."""

    def _publish(self) -> None:
        """Tell the status component what the last message changed: the apps touched by
        it, then the deploys it ended, then the apps it removed.

        A deploy's end goes after its app's new state: a client woken by the end read
        the app before its next deploy showed (superseded, "nothing more coming", and
        `keter db restore` failed a restore whose newer version went on to serve). It
        goes before its app's removal: the status component counts a verdict only
        under an app it knows.
        """
        changed, self._changed = self._changed, set()
        verdicts, self._verdicts = self._verdicts, []
        if self.c.status is None:
            return
        gone = []
        for name in changed:
            app = self.apps.get(name)
            if app is None:
                gone.append(name)
                continue
            snapshot = app.snapshot()
            if self._published.get(name) != snapshot:
                self._published[name] = snapshot
                self.c.status.tell(AppChanged(snapshot=snapshot))
        for verdict in verdicts:
            self.c.status.tell(verdict)
        for name in gone:
            if self._published.pop(name, None) is not None:
                self.c.status.tell(AppGone(app=name))
                if self.c.stats is not None:  # it closes the app's access log
                    self.c.stats.tell(AppGone(app=name))

    def _event(self, app: str, kind: EventKind, text: str) -> None:
        if self.c.status is not None:
            self.c.status.tell(AppEvent(app=app, kind=kind, text=text, at=time.time()))

    def _finished(
        self,
        deploy: Deploy,
        outcome: Outcome,
        reason: str = "",
        kind: FailureKind | None = None,
        watch_seconds: float = 0.0,
        *,
        history_only: bool = False,
    ) -> None:
        """The deploy's outcome: kept on it (unless ``history_only``: a rollback leaves a
        version serving until it is replaced), and a line of the app's history."""
        if not history_only:
            deploy.outcome = outcome
        self._changed.add(deploy.app)
        # Told with what else the message changed (``_publish``).
        self._verdicts.append(
            DeployFinished(
                app=deploy.app,
                version=deploy.version,
                sha256=deploy.sha256,
                bundle_mtime=deploy.bundle_mtime,
                outcome=outcome,
                reason=reason,
                duration=self.clock() - deploy.began,
                at=time.time(),
                kind=kind,
                watch_seconds=watch_seconds,
            )
        )
