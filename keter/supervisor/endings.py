"""How deploys and apps end: failed, superseded, drained, retired, removed.

A failure undoes the deploy on its way and never touches the serving version;
whatever waited for a switch or a release (a newer bundle, a removal) goes on
once it ends (``_continue_waiting``).
"""

from __future__ import annotations

import logging

from keter.deploys import App, Deploy, Stage
from keter.messages import (
    EventKind,
    FailureKind,
    Outcome,
    ReleaseServices,
    RemoveFolder,
    ServeLastServed,
    StopProcess,
    WatchDrain,
)
from keter.names import PROBLEMS_LIMIT, cut_text
from keter.supervisor.state import SupervisorState
from keter.supervisor.timers import DrainOver

log = logging.getLogger(__name__)

# The history's reason for a deploy that keter's own stop cut short.
INTERRUPTED = "keter stopped before it finished; it deploys again at the next start"


class Endings(SupervisorState):
    """Failing, abandoning, draining, retiring and ending deploys; removing apps."""

    def _removed(self, app: App, *, drain: bool) -> None:
        """The app's bundle was removed and nginx no longer routes it (or failed to change)."""
        # On failure nginx may still route to the app, but the user removed its bundle:
        # stop it anyway; nginx catches up with its next successful generation.
        if app.serving is not None:
            self._release_hosts(app.serving)
            if drain:
                self._drain(app.serving)
            else:
                self._retire(app.serving, 0)
            app.serving = None
        app.removing, app.remove_generation = False, None
        self._changed.add(app.name)
        log.info("%s: removed", app.name)
        self._event(app.name, EventKind.REMOVED, "bundle removed; app stopped")

    def _continue_waiting(self, app: App) -> None:
        """After a switch ended (either way): carry out what waited for it."""
        if app.removing and app.next is None and app.remove_generation is None:
            self._request_nginx()  # a removal requested mid-switch
        if app.waiting is not None and app.next is None and not app.removing:
            self._begin(app, app.waiting)
        self._forget_if_idle(app)

    def _fail(
        self,
        deploy: Deploy,
        reason: str,
        tail: tuple[str, ...] = (),
        *,
        kind: FailureKind,
        stopped_already: int | None = None,
    ) -> None:
        """The deploy on its way failed: undo it; the serving version is untouched."""
        reason = cut_text(reason, PROBLEMS_LIMIT)  # components cap theirs; this is the last gate
        log.error("%s: deploy #%d failed: %s", deploy.app, deploy.id, reason)
        self._finished(deploy, Outcome.FAILED, reason, kind)
        if tail:
            log.error("%s: last output:\n%s", deploy.app, "\n".join(f"  | {line}" for line in tail))
        app = self.apps[deploy.app]
        if app.next is deploy:
            app.next = None
        self._changed.add(app.name)
        if deploy.stage is Stage.POINTING:
            self._restore_services(app, deploy)
        self._release_hosts(deploy, keep=app.serving)
        self._retire(deploy, 0, skip=stopped_already)
        if app.serving is not None:
            log.info("%s: deploy #%d keeps serving", app.name, app.serving.id)
        elif deploy.at_start and not app.removing and app.waiting is None and self.c.status:
            # The version that served before keter (re)started is gone with it: one bad
            # upload and a reboot must not take the app down. Once only: what this puts
            # back begins after the first scan.
            self.c.status.tell(
                ServeLastServed(
                    app=app.name, failed_sha256=deploy.sha256, failed_mtime=deploy.bundle_mtime
                )
            )
        self._continue_waiting(app)
        self._verdict_held(app.name)

    def _abandon(self, deploy: Deploy, reason: str) -> None:
        log.info("%s: deploy #%d abandoned: %s", deploy.app, deploy.id, reason)
        self._finished(deploy, Outcome.SUPERSEDED, reason)
        app = self.apps[deploy.app]
        app.next = None
        self._release_hosts(deploy, keep=app.serving)
        self._retire(deploy, 0)

    def _keter_stops(self) -> None:
        """Each deploy on its way gets its line of history before keter stops.

        The monitor stops its processes with every other app's; the bundle deploys
        again at the next start, as an attempt of its own.
        """
        for app in self.apps.values():
            deploy = app.next
            if deploy is not None and deploy.outcome is None:
                log.info("%s: deploy #%d cut short: keter stops", app.name, deploy.id)
                self._finished(deploy, Outcome.SUPERSEDED, INTERRUPTED)

    def _drain(self, deploy: Deploy) -> None:
        """A version that served no longer gets new connections (SERVING -> DRAINING).

        It is stopped once its ports hold no connection (the switch reports Drained),
        or when drain-seconds are over, whichever comes first.
        """
        drain = self.config.drain_seconds
        if not self._live(deploy) or drain <= 0:
            self._retire(deploy, 0)
            return
        deploy.move(Stage.DRAINING)
        self._ending(deploy)
        log.info("%s: deploy #%d drains (at most %.1fs)", deploy.app, deploy.id, drain)
        ports = tuple(web.port for web in deploy.web)
        if self.c.switch is not None and ports:
            self.c.switch.tell(
                WatchDrain(app=deploy.app, deploy_id=deploy.id, ports=ports, seconds=drain)
            )
        self.timers.schedule(drain, DrainOver(deploy_id=deploy.id))

    def _retire(self, deploy: Deploy, delay: float, *, skip: int | None = None) -> None:
        """Stop whatever of the deploy runs, then end it (see keter.deploys for the stages)."""
        if deploy.stage in (Stage.UNPACKING, Stage.PROVISIONING):
            # Nothing runs. A deploy still in the unpacker (no config yet) has no folder
            # to remove now: the unpacker's late reply is recognised as stale then.
            self._ended(deploy, remove_folder=deploy.config is not None)
            return
        if not self._live(deploy):
            self._ended(deploy)
            return
        if deploy.stage in (Stage.SERVING, Stage.DRAINING):
            log.info("%s: stopping deploy #%d", deploy.app, deploy.id)
        deploy.move(Stage.RETIRING)
        self._ending(deploy)
        for process_id in deploy.process_ids:
            if process_id != skip and self.owners.get(process_id) is deploy:
                self.c.monitor.tell(StopProcess(app=deploy.app, deploy_id=process_id, delay=delay))

    def _ending(self, deploy: Deploy) -> None:
        """The deploy drains or retires: its app stays known until it has ended."""
        app = self.apps.get(deploy.app)
        if app is not None:
            app.ending.add(deploy.id)

    def _ended(self, deploy: Deploy, *, remove_folder: bool = True) -> None:
        """Nothing of the deploy runs any more: release its ports, remove its folder."""
        deploy.move(Stage.ENDED)
        for port in deploy.ports_held:
            self.ports.release(port)
        self._revoke_ports(deploy.app, deploy.ports_held)
        self._release_stable_ports(deploy)
        self.owners.pop(deploy.id, None)
        if remove_folder and deploy.folder_exists:
            self.c.unpacker.tell(RemoveFolder(path=deploy.folder))
        if deploy.web or deploy.outcome is Outcome.SERVING:
            log.info("%s: deploy #%d stopped and removed", deploy.app, deploy.id)
        app = self.apps.get(deploy.app)
        if app is not None:
            app.ending.discard(deploy.id)
            self._changed.add(app.name)  # a removed app's last processes ended: gone now
            self._forget_if_idle(app)

    def _release_stable_ports(self, deploy: Deploy) -> None:
        """Its stable ports that no other version of the app uses go back, kernel rules too."""
        app = self.apps.get(deploy.app)
        kept = set()
        if app is not None:
            for other in (app.serving, app.next):
                if other is not None and other is not deploy:
                    kept.update(other.services)
        gone = tuple(port for port in deploy.services if port not in kept)
        for port in gone:
            self.stable_ports.release(port)
        if gone and self.c.switch is not None:
            self.c.switch.tell(ReleaseServices(app=deploy.app, ports=gone))

    def _release_hosts(self, deploy: Deploy, keep: Deploy | None = None) -> None:
        """The deploy no longer claims its hosts (those ``keep`` claims stay claimed)."""
        kept = set(keep.hosts) if keep is not None else set()
        released = [h for h in deploy.hosts if h not in kept and self.hosts.get(h) == deploy.app]
        for host in released:
            del self.hosts[host]
        self._hosts_released(released)  # bundles refused for them deploy now

    def _forget_if_idle(self, app: App) -> None:
        gone = app.idle and not app.removing and not app.bundle_present
        if gone and self.apps.get(app.name) is app:
            del self.apps[app.name]
            self._changed.add(app.name)
