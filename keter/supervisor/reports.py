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
        """Tell the status component what changed (only apps touched by the last message)."""
        changed, self._changed = self._changed, set()
        if self.c.status is None:
            return
        for name in changed:
            app = self.apps.get(name)
            if app is None:
                if self._published.pop(name, None) is not None:
                    self.c.status.tell(AppGone(app=name))
                    if self.c.stats is not None:  # it closes the app's access log
                        self.c.stats.tell(AppGone(app=name))
                continue
            snapshot = app.snapshot()
            if self._published.get(name) != snapshot:
                self._published[name] = snapshot
                self.c.status.tell(AppChanged(snapshot=snapshot))

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
        # The app first (a deploy can end in the message that made its app): the status
        # component counts a verdict under an app's name only if it knows that app.
        self._publish()
        if self.c.status is not None:
            self.c.status.tell(
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
