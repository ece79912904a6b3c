"""What the process monitor reports about a deploy's processes, and what follows.

A healthy web app may complete STARTING; a failure while STARTING fails the
deploy; crashes of a serving version are counted (events, watched rollout,
a worker's restart-count); the last process stopped ends a retiring deploy.
"""

from __future__ import annotations

import logging
import time

from keter.deploys import Deploy, Stage, Worker
from keter.messages import (
    EventKind,
    ProcessFailed,
    ProcessStarted,
    ProcessState,
    ProcessStateChanged,
    StopProcess,
)
from keter.supervisor.rollout import WATCH_CRASHES
from keter.supervisor.state import SupervisorState

log = logging.getLogger(__name__)


class ProcessFacts(SupervisorState):
    """The process monitor's reports about a deploy's processes."""

    def _process_started(self, msg: ProcessStarted) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None:
            return
        if msg.deploy_id in deploy.workers:
            log.info("%s: background worker #%d started pid %d", msg.app, msg.deploy_id, msg.pid)
            return
        web = deploy.web_process(msg.deploy_id)
        if web is None:
            return
        web.pid, web.started_at = msg.pid, time.time()
        which = f" (web app {web.index + 1})" if len(deploy.web) > 1 else ""
        log.info(
            "%s: deploy #%d started pid %d on port %s%s",
            msg.app,
            deploy.id,
            msg.pid,
            msg.port,
            which,
        )

    def _process_healthy(self, process_id: int) -> None:
        deploy = self.owners.get(process_id)
        web = deploy.web_process(process_id) if deploy is not None else None
        if deploy is None or web is None or deploy.stage is not Stage.STARTING:
            return
        web.healthy = True
        if deploy.all_healthy:
            log.info("%s: deploy #%d is healthy, switching traffic", deploy.app, deploy.id)
            self._switch(deploy)

    def _process_failed(self, msg: ProcessFailed) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None:
            return
        if msg.deploy_id in deploy.workers:
            # Its deploy serves on; ProcessStopped follows and forgets the worker.
            log.error(
                "%s: background worker #%d could not start: %s", msg.app, msg.deploy_id, msg.reason
            )
            return
        if deploy.stage is Stage.STARTING:
            # The monitor has stopped this process already; ProcessStopped follows.
            self._fail(
                deploy,
                msg.reason,
                msg.output_tail,
                kind=msg.kind,
                stopped_already=msg.deploy_id,
            )

    def _process_state_changed(self, msg: ProcessStateChanged) -> None:
        deploy = self.owners.get(msg.deploy_id)
        if deploy is None:
            return
        if worker := deploy.workers.get(msg.deploy_id):
            self._worker_state_changed(deploy, worker, msg)
            return
        web = deploy.web_process(msg.deploy_id)
        if web is None:
            return
        self._changed.add(deploy.app)
        previous, web.state = web.state, msg.state
        if msg.pid is not None and msg.pid != web.pid:
            web.pid, web.started_at = msg.pid, time.time()
        if deploy.stage is not Stage.SERVING:
            return  # a new version's start is reported through its deploy
        if web.repoint and msg.state is ProcessState.RUNNING:
            web.repoint = False  # it answers on the port it moved to (_port_taken)
            self._point_services(deploy, ((deploy.services[web.index], web.port),))
        # A crash, or a restart that could not start; not keter stopping it to move it off
        # a port a stranger took (that had rolled a watched version back as a crash loop).
        if msg.state is ProcessState.BACKOFF and msg.failed:
            web.restarts += 1
            if previous is ProcessState.RUNNING:
                self._event(msg.app, EventKind.CRASH, msg.detail)
            crashes = sum(w.restarts for w in deploy.web)
            watched = deploy.rollback_to is not None and self.clock() < deploy.watch_until
            if watched and crashes >= WATCH_CRASHES:  # it crash-loops: roll back
                reason = f"crashed {crashes} times since its switch"
                self._unhealthy(deploy.app, deploy.version, reason)
        elif msg.state is ProcessState.RUNNING and previous is ProcessState.STARTING:
            self._event(msg.app, EventKind.RESTART, f"running again ({msg.detail})")

    def _worker_state_changed(
        self, deploy: Deploy, worker: Worker, msg: ProcessStateChanged
    ) -> None:
        """Count a worker's crashes; past its restart-count it is stopped for good."""
        if msg.state is not ProcessState.BACKOFF or deploy.stage is not Stage.SERVING:
            return
        assert deploy.config is not None
        limit = deploy.config.backgrounds[worker.index].restart_count
        worker.restarts += 1
        deploy.worker_restarts += 1
        self._changed.add(deploy.app)  # its restarts are the app's (keter status)
        self._event(msg.app, EventKind.CRASH, f"background worker #{msg.deploy_id}: {msg.detail}")
        if limit is not None and worker.restarts > limit:
            log.error(
                "%s: background worker #%d crashed again after %d restart(s); "
                "restart-count reached, not restarting",
                msg.app,
                msg.deploy_id,
                limit,
            )
            self.c.monitor.tell(StopProcess(app=msg.app, deploy_id=msg.deploy_id, delay=0))

    def _process_stopped(self, process_id: int) -> None:
        deploy = self.owners.pop(process_id, None)
        if deploy is None:
            return
        if deploy.workers.pop(process_id, None) is not None and deploy.stage is Stage.SERVING:
            log.info("%s: background worker #%d stopped", deploy.app, process_id)
            return
        if deploy.stage in (Stage.RETIRING, Stage.DRAINING) and not self._live(deploy):
            self._ended(deploy)
