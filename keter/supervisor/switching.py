"""Leading traffic to a healthy deploy: STARTING -> POINTING -> SWITCHING -> SERVING.

Kernel mode (``keter.switch``) points stable addresses at the new version and
touches nginx only when routes change; reload mode is an nginx generation with
the version's own ports. Also when deploys may begin at all (``_start_watching``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from keter.deploys import App, Deploy, Stage
from keter.messages import (
    FailureKind,
    GrantPorts,
    Outcome,
    PointServices,
    RevokePorts,
    Site,
    SwitchMode,
    SwitchReady,
    VersionServing,
)
from keter.routes import sites_for
from keter.supervisor.state import SupervisorState
from keter.switch import NoStablePort

log = logging.getLogger(__name__)


class Switching(SupervisorState):
    """Leading traffic to a healthy deploy (kernel or nginx) until it serves."""

    def _switch(self, deploy: Deploy) -> None:
        """Lead traffic to the deploy: through the kernel (kernel mode), else nginx.

        Its sites are computed once, here. In kernel mode they name stable
        addresses: those of the version it replaces when that gives the very
        same sites (the kernel switch is then all there is), else new ones.
        """
        if self.switch_mode is SwitchMode.KERNEL and deploy.web:
            self._point(deploy)
            return
        try:
            deploy.sites = self._sites(deploy, deploy.ports)
        except ValueError as exc:  # the bundle parser refuses this already; a second lock
            self._fail(deploy, f"cannot route it: {exc}", kind=FailureKind.CONFIG)
            return
        deploy.move(Stage.SWITCHING)
        self._request_nginx()

    def _sites(
        self, deploy: Deploy, ports: tuple[int | None, ...], host: str = "127.0.0.1"
    ) -> tuple[Site, ...]:
        """The deploy's sites, its web apps on ``ports`` at ``host``.

        Its version goes into every access record nginx writes (keter.stats), except
        behind stable addresses: the kernel switches those without nginx, so the
        records say "-" and the stats component tells versions apart by the time
        each began serving (``VersionServing``).
        """
        assert deploy.config is not None
        found = sites_for(
            deploy.app, deploy.config, deploy.folder, ports, self.config, upstream_host=host
        )
        version = "-" if host != "127.0.0.1" else deploy.version
        return tuple(dataclasses.replace(site, version=version) for site in found)

    def _point(self, deploy: Deploy) -> None:
        """Kernel mode: lead stable addresses to the deploy (STARTING -> POINTING)."""
        old = self.apps[deploy.app].serving
        previous: tuple[tuple[int, int], ...] = ()
        try:
            if old is not None and len(old.services) == len(deploy.web):
                sites = self._sites(deploy, old.services, self._switch_address)
                if sites == old.sites:
                    deploy.services, deploy.sites = old.services, sites
                    previous = tuple(zip(old.services, old.ports, strict=True))
            if not deploy.services:
                deploy.services = tuple(self.stable_ports.allocate() for _ in deploy.web)
                deploy.sites = self._sites(deploy, deploy.services, self._switch_address)
                deploy.reroute = True
        except (ValueError, NoStablePort) as exc:
            kind = FailureKind.PORTS if isinstance(exc, NoStablePort) else FailureKind.CONFIG
            self._fail(deploy, f"cannot route it: {exc}", kind=kind)
            return
        deploy.move(Stage.POINTING)
        self._point_services(deploy, previous=previous)

    def _point_services(
        self,
        deploy: Deploy,
        targets: tuple[tuple[int, int], ...] | None = None,
        previous: tuple[tuple[int, int], ...] = (),
    ) -> None:
        """Have the switch lead stable ports to ``targets`` (stable, port) pairs; by
        default every one of the deploy's stable ports to its web app's own port."""
        assert self.c.switch is not None
        if targets is None:
            targets = tuple(zip(deploy.services, deploy.ports, strict=True))
        self.c.switch.tell(
            PointServices(app=deploy.app, deploy_id=deploy.id, targets=targets, previous=previous)
        )

    def _services_pointed(self, deploy_id: int, at: float) -> None:
        deploy = self.owners.get(deploy_id)
        if deploy is None or deploy.stage is not Stage.POINTING:
            return  # a restore after a failure, or a deploy that ended meanwhile
        deploy.pointed_at = at or None
        app = self.apps[deploy.app]
        if deploy.reroute:
            # Its stable addresses lead to it; nginx must now route its hosts to them.
            deploy.move(Stage.SWITCHING)
            self._request_nginx()
            return
        log.info("%s: deploy #%d: the kernel leads new connections to it", app.name, deploy.id)
        self._switched(app, deploy)
        self._continue_waiting(app)

    def _restore_services(self, app: App, deploy: Deploy) -> None:
        """A deploy failed while POINTING at stable ports it shares with the serving
        version: lead them back to that version (the switch may not have done it)."""
        serving = app.serving
        if serving is None or deploy.reroute or serving.services != deploy.services:
            return
        self._point_services(serving)

    def _switched(self, app: App, deploy: Deploy) -> None:
        """The deploy takes the traffic (POINTING or SWITCHING -> SERVING); the old drains."""
        old, app.serving, app.next = app.serving, deploy, None
        deploy.move(Stage.SERVING)
        self._changed.add(app.name)
        took = self.clock() - deploy.began
        hosts = ", ".join(deploy.hosts)
        log.info("%s: deploy #%d now serving %s (took %.2fs)", app.name, deploy.id, hosts, took)
        if self.c.stats is not None:  # before any watch of it: records are named by time
            self.c.stats.tell(
                VersionServing(
                    app=app.name, version=deploy.version, since=deploy.pointed_at or time.time()
                )
            )
        self._finished(deploy, Outcome.SERVING, watch_seconds=self._watch(deploy, old))
        self._start_workers(deploy)
        if old is not None:
            self._release_hosts(old, keep=deploy)
            self._drain(old)

    def _grant_ports(self, app: str, ports: tuple[int, ...]) -> None:
        """The app's processes may connect to these ports of its own, no other app's may
        (the switch's isolation set; told whatever the mode, which it alone knows)."""
        if ports and self.c.switch is not None:
            self.c.switch.tell(GrantPorts(app=app, ports=ports))

    def _revoke_ports(self, app: str, ports: tuple[int, ...]) -> None:
        """Nothing of the app listens on these ports any more: they are no longer its."""
        if ports and self.c.switch is not None:
            self.c.switch.tell(RevokePorts(app=app, ports=ports))

    def _switch_known(self, ready: SwitchReady) -> None:
        """The switch component's one report at start: the mode for this run."""
        self.switch_mode = ready.mode
        if ready.address is not None:
            self._switch_address = ready.address
        if self.c.status is not None:
            self.c.status.tell(ready)
        self._switch_ready = True
        self._start_watching()

    def _start_watching(self) -> None:
        """Deploys may begin once nginx took keter's first config and the switch mode is
        known (the monitor, started earlier, has already stopped an earlier run's leftovers)."""
        if self._watching or not (self._nginx_ready and self._switch_ready):
            return
        if self.exit_code is None:
            self._watching = True
            self.c.watcher.start()
