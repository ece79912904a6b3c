"""What the supervisor holds: its apps and their deploys, ports, hosts, nginx and
switch bookkeeping; and the two look-ups every part uses.

The ``Supervisor`` (``keter.supervisor.core``) is this state plus one part per
concern (a mixin each, in its own module); the parts call one another through
``self``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from keter.config import KeterConfig
from keter.deploys import App, Deploy
from keter.messages import (
    AppSnapshot,
    BundleArrived,
    CertificateIssued,
    Component,
    DeployFinished,
    SwitchMode,
)
from keter.processes.ports import PortPool
from keter.routes import dashboard_site
from keter.supervisor.components import Components
from keter.supervisor.timers import Timers
from keter.switch import StablePorts


@dataclass(frozen=True, kw_only=True)
class HostWait:
    """A bundle refused only because other apps claim some of its hosts."""

    arrival: BundleArrived  # offered again, as it first arrived, once the hosts are free
    hosts: tuple[str, ...]  # those other apps claimed when it was refused


@dataclass(frozen=True, kw_only=True)
class DbRetry:
    """A bundle that deploys again: its deploy found the database server unavailable."""

    deploy_id: int  # the deploy that failed (its RetryDeploy timer carries it)
    arrival: BundleArrived  # offered again as it first arrived


class SupervisorState:
    """The supervisor's state; every part of it (a mixin) builds on this."""

    def __init__(
        self,
        config: KeterConfig,
        components: Components,
        *,
        ports: PortPool | None = None,
        clock: Callable[[], float] = time.monotonic,
        generation: int = 0,
    ) -> None:
        self.config = config
        self.c = components
        self.clock = clock
        self.apps: dict[str, App] = {}
        # Every deploy that has not ENDED, by its own id and by each of its process ids.
        self.owners: dict[int, Deploy] = {}
        self.hosts: dict[str, str] = {}  # host -> the app whose serving or next deploy claims it
        # keter.supervisor.conflicts: bundles refused only for hosts other apps claim.
        # Per host the apps waiting on it, in the order they were refused (a dict as an
        # ordered set); per app its bundle's report and the hosts it waits on.
        self._host_waiters: dict[str, dict[str, None]] = {}
        self._host_waits: dict[str, HostWait] = {}
        self.ports = ports or PortPool(*config.port_range)
        self.exit_code: int | None = None  # set when keter must stop
        self._ids = itertools.count(1)
        # The last nginx generation: numbers go on from the one nginx's config carries
        # from an earlier run (keter.daemon reads it). nginx still serving that config
        # after refusing a reload would answer a reused number and confirm the refusal.
        self._generation = generation
        self._nginx_inflight: int | None = None
        self._nginx_dirty = False
        self._waiting_on_nginx: set[str] = set()  # apps with a switch or removal in flight
        self._watching = False  # the watcher runs (from nginx's first reply on)
        self._nginx_ready = False  # nginx took keter's first config
        # The switch mode, known from the switch component's first report (no component:
        # reload mode at once). Deploys begin only once it is known.
        self.switch_mode = SwitchMode.RELOAD
        self._switch_address = "127.0.0.1"
        self._switch_ready = components.switch is None
        self.stable_ports = StablePorts()
        self._dashboard = dashboard_site(config)  # routed with the apps when configured
        # keter.acme: the certificates it has issued, and the hosts (and their apps) it
        # was last asked for.
        self._certificates: dict[str, CertificateIssued] = {}
        # keter.supervisor.rollout: per app the version a RollBack in flight rolls back.
        self._rollbacks: dict[str, Deploy] = {}
        self._acme_owners: dict[str, str] = {}
        self._published: dict[str, AppSnapshot] = {}
        self._changed: set[str] = set()  # apps whose snapshot may have changed
        self._verdicts: list[DeployFinished] = []  # deploys ended, told after the snapshots
        self._failures: dict[Component, list[float]] = {}  # recent component failures
        self._own_failures: list[float] = []  # recent failures of the supervisor's handlers
        # keter.supervisor.database: per app the deploy whose bundle deploys again once its
        # RetryDeploy is due, and the delay before the next such retry (kept from the
        # first failure until the server answers).
        self._db_retries: dict[str, DbRetry] = {}
        self._db_retry_delays: dict[str, float] = {}
        self.timers = Timers(clock)

    def _next(self, app: str, deploy_id: int) -> Deploy | None:
        """The app's in-flight deploy if it is ``deploy_id``; None for a stale reply."""
        state = self.apps.get(app)
        if state is not None and state.next is not None and state.next.id == deploy_id:
            return state.next
        return None

    def _live(self, deploy: Deploy) -> bool:
        """Whether any process of the deploy has not reported ProcessStopped yet."""
        return any(self.owners.get(pid) is deploy for pid in deploy.process_ids)
