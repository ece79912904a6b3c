"""Failures of keter itself: a component that raised, or a bug in a handler here.

One-for-one: only the deploy the failing message was about fails; the
component restarts (same object and inbox, a new thread) after a backoff.
Repeated failures within a window make keter stop, non-zero.
"""

from __future__ import annotations

import logging
import traceback

from keter.actor import answer_failure
from keter.messages import Component, ComponentFailed, FailureKind, Rescan
from keter.names import log_text
from keter.supervisor.components import Teller
from keter.supervisor.state import SupervisorState
from keter.supervisor.timers import RestartComponent

log = logging.getLogger(__name__)

# A component restarted more often than this within the window means keter cannot go on.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
RESTART_FIRST_DELAY = 0.05  # doubled for each recent failure
RESTART_MAX_DELAY = 5.0


class Restarts(SupervisorState):
    """One-for-one restarts of failed components; bugs in the supervisor's handlers."""

    def _component(self, name: Component) -> Teller:
        return next(c for c in self.c.all() if c.component == name)

    def _restart_component(self, component: Component) -> None:
        """Its backoff is over: the same object and inbox, a new thread."""
        part = self._component(component)
        part.join(1.0)  # it reported its failure as its thread's last act
        part.restart()
        log.warning("keter: component %s restarted", component)
        if part is self.c.watcher:
            part.tell(Rescan())  # file events during its failure may be lost

    def _component_failed(self, failed: ComponentFailed) -> None:
        """One-for-one: fail the deploy the failing message was about, restart the component.

        A component that keeps failing (more than RESTART_LIMIT times within
        RESTART_WINDOW seconds) means keter cannot go on: it stops, non-zero.
        """
        log.critical(
            "keter: component %s failed handling %s: %s\n%s",
            failed.component,
            failed.message or "its start",
            log_text(failed.error),
            failed.traceback.rstrip(),
        )
        reason = f"internal error in {failed.component}: {log_text(failed.error)}"
        if failed.deploy_id is not None:
            self._fail_owner(failed.deploy_id, reason)
        if failed.component is Component.NGINX and self._nginx_inflight is not None:
            # The generation it was applying will never be answered.
            self._nginx_replied(self._nginx_inflight, reason, {})

        recent = self._recent(self._failures.setdefault(failed.component, []))
        if len(recent) > RESTART_LIMIT:
            log.critical(
                "keter: component %s failed %d times within %gs; keter cannot go on",
                failed.component,
                len(recent),
                RESTART_WINDOW,
            )
            self.exit_code = 1
            return
        delay = min(RESTART_MAX_DELAY, RESTART_FIRST_DELAY * 2 ** (len(recent) - 1))
        self.timers.schedule(delay, RestartComponent(component=failed.component))

    def _handler_failed(self, msg: object, exc: Exception) -> None:
        """A bug in the supervisor's own handler: fail that message's deploy and go on."""
        log.critical(
            "keter: internal error handling %s: %s: %s\n%s",
            type(msg).__name__,
            type(exc).__name__,
            exc,
            traceback.format_exc().rstrip(),
        )
        answer_failure(msg, "the supervisor", exc)
        recent = self._recent(self._own_failures)
        deploy_id = getattr(msg, "deploy_id", None)
        if isinstance(deploy_id, int):
            try:
                self._fail_owner(deploy_id, f"internal error in keter: {type(exc).__name__}")
            except Exception:
                log.critical("keter: cannot fail the deploy either; its state is unknown")
                recent.append(self.clock())
        if len(recent) > RESTART_LIMIT:
            log.critical(
                "keter: %d internal errors within %gs; stopping", len(recent), RESTART_WINDOW
            )
            self.exit_code = 1

    def _fail_owner(self, some_id: int, reason: str) -> None:
        """Fail the deploy on its way that ``some_id`` (a deploy or process id) belongs to."""
        deploy = self.owners.get(some_id)
        if deploy is None:
            return
        app = self.apps.get(deploy.app)
        if app is not None and app.next is deploy:
            self._fail(deploy, reason, kind=FailureKind.INTERNAL)

    def _recent(self, times: list[float]) -> list[float]:
        """Record a failure now; ``times`` keeps only those within the window."""
        now = self.clock()
        times[:] = [t for t in times if now - t < RESTART_WINDOW] + [now]
        return times
