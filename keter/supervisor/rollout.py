"""Watched rollout (issue 14): keter.stats watches a new version, the supervisor decides.

A version that made things worse (or crash-loops) within its watch-seconds is
rolled back once: its predecessor's archived bundle is deployed again.
"""

from __future__ import annotations

import logging

from keter.deploys import Deploy
from keter.messages import EventKind, Outcome, RollBack, RollBackDone, WatchVersion
from keter.supervisor.state import SupervisorState

log = logging.getLogger(__name__)

# This many crashes of a watched version within its window roll it back; a verdict
# arriving this long after the window (the stats lag a second) still counts.
WATCH_CRASHES = 3
WATCH_GRACE = 5.0


class Rollout(SupervisorState):
    """Watching a new version, and rolling it back once if it made things worse."""

    def _watch(self, deploy: Deploy, previous: Deploy | None) -> float:
        """Have the stats component watch a version that replaced ``previous``; the seconds.

        Not watched: the first version (nothing to go back to), or watch-seconds 0. The
        same version again (a restart, ``keter env set``, a restore's redeploy) is no new
        version: "rolling back" to itself redeployed it, again and again, and the version
        before it never came back. It stays under the watch it was under, if any, until
        that watch's end (the stats component's watch goes on: it is by version).
        """
        assert deploy.config is not None
        seconds = deploy.config.watch_seconds
        if seconds is None:
            seconds = self.config.watch_seconds
        if previous is not None and previous.sha256 == deploy.sha256:
            left = previous.watch_until - self.clock()
            if previous.rollback_to is None or left <= 0:
                return 0.0
            deploy.rollback_to, deploy.watch_until = previous.rollback_to, previous.watch_until
            return left
        if self.c.stats is None or previous is None or not previous.sha256 or seconds <= 0:
            return 0.0
        deploy.rollback_to = previous.sha256
        deploy.watch_until = self.clock() + seconds
        self.c.stats.tell(
            WatchVersion(
                app=deploy.app,
                version=deploy.version,
                previous=previous.version,
                seconds=seconds,
                max_error_ratio=self.config.watch_max_error_ratio,
                min_requests=self.config.watch_min_requests,
            )
        )
        return seconds

    def _unhealthy(self, app_name: str, version: str, reason: str) -> None:
        """A watched version made things worse: roll back to the version before it, once.

        The archived bundle goes back into incoming/ (the status component holds the
        archive) and the usual pipeline deploys it, with no request lost.
        """
        app = self.apps.get(app_name)
        deploy = app.serving if app is not None else None
        if deploy is None or deploy.version != version or deploy.rollback_to is None:
            return  # replaced, removed or rolled back meanwhile
        if self.clock() > deploy.watch_until + WATCH_GRACE:
            return  # the watch is over
        if app.next is not None:
            # A newer bundle (or a restart) is on its way: it replaces this version, or
            # fails and this verdict stands (``_verdict_held``).
            text = "%s: version %s made things worse (%s); a deploy is on its way"
            log.info(text, app_name, version, reason)
            deploy.held_verdict = reason
            return
        target, deploy.rollback_to = deploy.rollback_to, None
        log.warning("%s: version %s made things worse (%s)", app_name, version, reason)
        if self.c.status is not None:
            # Kept for RollBackDone: by then the version put back may have deployed
            # and replaced it.
            self._rollbacks[app_name] = deploy
            order = RollBack(
                app=app_name, version=version, sha256=target, reason=reason, replaces=deploy.sha256
            )
            self.c.status.tell(order)

    def _verdict_held(self, app_name: str) -> None:
        """The deploy on its way ended without replacing the version serving: a verdict
        held for it is acted on now, within its watch."""
        app = self.apps.get(app_name)
        deploy = app.serving if app is not None else None
        if deploy is None or deploy.held_verdict is None:
            return
        if app.next is not None or app.waiting is not None or app.removing:
            return  # still one on its way: it decides
        reason, deploy.held_verdict = deploy.held_verdict, None
        self._unhealthy(app_name, deploy.version, reason)

    def _rollback_done(self, msg: RollBackDone) -> None:
        """Recorded as rolled back only once its predecessor is back in incoming/ (it may
        not be archived: pruned by archive-keep, or replaced before it was archived)."""
        deploy = self._rollbacks.pop(msg.app, None)
        if msg.failure is not None:
            text = f"version {msg.version} made things worse ({msg.reason}), and stays: "
            log.error("%s: %s%s", msg.app, text, msg.failure)
            self._event(msg.app, EventKind.NO_ROLLBACK, text + msg.failure)
            return
        log.warning("%s: version %s rolled back: %s", msg.app, msg.version, msg.reason)
        if deploy is not None and deploy.version == msg.version:
            self._finished(deploy, Outcome.ROLLED_BACK, msg.reason, history_only=True)
