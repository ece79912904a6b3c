"""Spawning a deploy's processes: its web apps (STARTING), then its background
workers once it serves; and moving a web app whose port a stranger took.
"""

from __future__ import annotations

import logging
from typing import Any

from keter.appdata import app_user, data_dir
from keter.deploys import Deploy, Stage, WebProcess, Worker
from keter.environment import app_environment, worker_environment
from keter.limits import Limits
from keter.messages import HealthCheck, MoveProcess, ProcessSpec, ReleaseServices, StartProcess
from keter.processes.ports import NoFreePort, port_is_free
from keter.supervisor.state import SupervisorState
from keter.supervisor.timers import RetryMove

log = logging.getLogger(__name__)

# A web process a stranger took the port of, with no other port free, tries again after
# this long, doubled each time up to the most.
MOVE_RETRY_FIRST = 0.5
MOVE_RETRY_MAX = 10.0


class Starting(SupervisorState):
    """Spawning a deploy's web apps and workers."""

    def _start(self, deploy: Deploy) -> None:
        """Spawn every web app of the deploy (each on a port of its own), or switch at once."""
        assert deploy.config is not None
        webapps = deploy.config.webapps
        if not webapps:
            # Nothing to start or health-check: nginx can switch to it right away.
            log.info("%s: deploy #%d runs no web app, switching", deploy.app, deploy.id)
            self._switch(deploy)
            return
        deploy.move(Stage.STARTING)
        for index, port in enumerate(deploy.ports_held):
            # The first web app's process is known by the deploy's own id (as in the log's
            # "deploy #N"); further ones and workers take fresh ids from the same counter.
            process_id = deploy.id if index == 0 else next(self._ids)
            deploy.web.append(WebProcess(index=index, process_id=process_id, port=port))
            self.owners[process_id] = deploy
            spec = self._web_spec(deploy, index, port)
            self.c.monitor.tell(StartProcess(app=deploy.app, deploy_id=process_id, spec=spec))

    def _web_spec(self, deploy: Deploy, index: int, port: int) -> ProcessSpec:
        """Web app ``index`` of the deploy on ``port``."""
        assert deploy.config is not None
        webapp = deploy.config.webapps[index]
        health_host = next((h for h in webapp.hosts if "*" not in h), webapp.hosts[0])
        return self._process_spec(
            deploy,
            (str(webapp.exec), *webapp.args),
            self._web_environment(deploy, index, port),
            webapp.limits,
            port=port,
            health=HealthCheck(
                host=health_host.removeprefix("*."),
                path=webapp.health_check_path or "/",
                strict=webapp.health_check_path is not None,
            ),
            health_timeout=webapp.ensure_alive,
        )

    def _process_spec(
        self,
        deploy: Deploy,
        command: tuple[str, ...],
        env: dict[str, str],
        limits: Limits,
        **extra: Any,
    ) -> ProcessSpec:
        """What every process of a deploy (web app, worker, release) shares: it runs in
        the deploy's folder as the app's user, with its data folder, into the app's log."""
        return ProcessSpec(
            command=command,
            cwd=deploy.folder,
            env=env,
            log_path=self.config.log_dir / f"app-{deploy.app}.log",
            user=app_user(self.config, deploy.app),
            data_dir=data_dir(self.config, deploy.app),
            limits=limits,
            **extra,
        )

    def _web_environment(self, deploy: Deploy, index: int, port: int) -> dict[str, str]:
        """Web app ``index``'s environment on ``port``, which its release command gets too."""
        assert deploy.config is not None
        return app_environment(
            self.config,
            deploy.config.webapps[index],
            port,
            deploy.db,
            settings=deploy.settings,
            data_dir=data_dir(self.config, deploy.app),
        )

    def _port_taken(self, process_id: int) -> None:
        """A stranger holds a web process's port (the monitor stopped it): give it a fresh
        one, and if nginx routes to it, re-point nginx at once: the stranger gets nothing."""
        deploy = self.owners.get(process_id)
        web = deploy.web_process(process_id) if deploy is not None else None
        if deploy is None or web is None or deploy.config is None:
            return
        self._lead_nowhere(deploy, web)
        try:
            port = self.ports.allocate()
        except NoFreePort as exc:
            # Waiting for the monitor's next report would wait for good: the app is parked
            # until it gets a port. Ports come back as apps end: look again later.
            web.move_retry = MOVE_RETRY_FIRST
            log.error(
                "%s: cannot move deploy #%d off port %d: %s; trying again until a port is free",
                deploy.app,
                process_id,
                web.port,
                exc,
            )
            self.timers.schedule(web.move_retry, RetryMove(process_id=process_id, port=web.port))
            self._route_nowhere(deploy, web)
            return
        self._move_to(deploy, web, port)

    def _retry_move(self, process_id: int, port: int) -> None:
        """A RetryMove is due: a port may have come back to the pool since."""
        deploy = self.owners.get(process_id)
        web = deploy.web_process(process_id) if deploy is not None else None
        if deploy is None or web is None or web.port != port or web.move_retry is None:
            return  # it ended, or moved, meanwhile
        if port_is_free(port):  # the stranger let go: the pool still counts it the app's
            self._move_to(deploy, web, port)
            return
        try:
            new_port = self.ports.allocate()
        except NoFreePort:
            web.move_retry = min(web.move_retry * 2, MOVE_RETRY_MAX)
            self.timers.schedule(web.move_retry, RetryMove(process_id=process_id, port=port))
            return
        self._move_to(deploy, web, new_port)

    def _lead_nowhere(self, deploy: Deploy, web: WebProcess) -> None:
        """Kernel mode: the stranger's port gets no more of nginx's traffic for the app; the
        stable port leads nowhere (a reset) until the app answers on its new port."""
        if deploy.services and deploy.stage is Stage.SERVING and not web.repoint:
            assert self.c.switch is not None
            web.repoint = True
            stable = deploy.services[web.index]
            self.c.switch.tell(ReleaseServices(app=deploy.app, ports=(stable,)))

    def _route_nowhere(self, deploy: Deploy, web: WebProcess) -> None:
        """Reload mode, no port to move to: nginx routes the web app's hosts to nothing
        (nginx's answer for an unknown host) rather than to the stranger, until it moves."""
        if deploy.services or not deploy.sites or web.unrouted:
            return
        web.unrouted = True
        ports = list(deploy.ports)
        ports[web.index] = None
        deploy.sites = self._sites(deploy, tuple(ports))
        self._request_nginx()

    def _move_to(self, deploy: Deploy, web: WebProcess, port: int) -> None:
        """Move a web process whose port a stranger holds to ``port`` (allocated)."""
        web.move_retry = None
        if port == web.port:  # its own, which the stranger let go of
            log.info("%s: deploy #%d goes back to port %d", deploy.app, web.process_id, port)
        else:
            self.ports.release(web.port)  # the pool skips it while the stranger holds it
            self._revoke_ports(deploy.app, (web.port,))
            self._grant_ports(deploy.app, (port,))
            log.info(
                "%s: deploy #%d moves from port %d to %d",
                deploy.app,
                web.process_id,
                web.port,
                port,
            )
        web.port = port
        held = list(deploy.ports_held)
        held[web.index] = port  # released when the deploy ends
        deploy.ports_held = tuple(held)
        spec = self._web_spec(deploy, web.index, port)
        self.c.monitor.tell(MoveProcess(app=deploy.app, deploy_id=web.process_id, spec=spec))
        self._changed.add(deploy.app)
        if not deploy.services and (deploy.sites or web.unrouted):
            web.unrouted = False
            deploy.sites = self._sites(deploy, deploy.ports)
            self._request_nginx()

    def _start_workers(self, deploy: Deploy) -> None:
        """Start the version's background workers; it serves now (see the module docstring)."""
        assert deploy.config is not None
        for index, worker in enumerate(deploy.config.backgrounds):
            process_id = next(self._ids)
            deploy.workers[process_id] = Worker(index=index, process_id=process_id)
            self.owners[process_id] = deploy
            env = worker_environment(
                self.config,
                worker,
                deploy.db,
                settings=deploy.settings,
                data_dir=data_dir(self.config, deploy.app),
            )
            command = (str(worker.exec), *worker.args)
            spec = self._process_spec(
                deploy, command, env, worker.limits, restart_delay=worker.restart_delay
            )
            log.info(
                "%s: deploy #%d starts background worker #%d (%s)",
                deploy.app,
                deploy.id,
                process_id,
                worker.exec.name,
            )
            self.c.monitor.tell(StartProcess(app=deploy.app, deploy_id=process_id, spec=spec))
