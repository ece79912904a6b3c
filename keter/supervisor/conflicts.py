"""Host conflicts: a bundle refused for a host another app claims waits for it.

A bundle is refused when another app's serving or next deploy claims one of its
hosts (one line naming both apps, a failed deploy in the history). When that was
its only problem, it waits on those hosts: once no other app claims any of them
(the app holding one was removed, or its new version serves without it, or the
deploy that claimed it failed), the bundle is offered again as it first arrived,
by itself, so incoming/ converges without an operator.

Only the released host's waiters are looked at, never every app. Waiters are
offered again in the order they were refused; the unpacker answers in that order,
so the first refused claims the host and the others are refused again, with the
usual line, and wait on it. Any new deploy of a waiting app (a newer bundle, a
restart) or its bundle's removal ends its wait: nothing stale is offered.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from keter.deploys import Deploy
from keter.supervisor.state import HostWait, SupervisorState

log = logging.getLogger(__name__)


class Conflicts(SupervisorState):
    """Which apps claim a bundle's hosts; bundles waiting for a host to be released."""

    def _conflicts(self, deploy: Deploy) -> dict[str, str]:
        """Each host of the deploy that another app (or keter's dashboard) claims: its owner."""
        assert deploy.config is not None
        found = {}
        for host in deploy.config.all_hosts:
            owner = self._host_owner(host, deploy.app)
            if owner is not None:
                found[host] = owner
        return found

    def _host_owner(self, host: str, app: str) -> str | None:
        if host == self.config.dashboard_host:
            return "keter (its dashboard-host)"
        owner = self.hosts.get(host)
        return owner if owner != app else None

    def _wait_for_hosts(self, deploy: Deploy, conflicts: dict[str, str]) -> None:
        """The deploy was refused for these hosts alone: its bundle waits for them."""
        if deploy.arrival is None or self.config.dashboard_host in conflicts:
            return  # keter's dashboard never lets go of its host
        self._stop_waiting(deploy.app)
        self._host_waits[deploy.app] = HostWait(arrival=deploy.arrival, hosts=tuple(conflicts))
        for host in conflicts:
            self._host_waiters.setdefault(host, {})[deploy.app] = None
        owners = ", ".join(sorted(set(conflicts.values())))
        log.info("%s: deploys by itself once app %s lets go of its hosts", deploy.app, owners)

    def _stop_waiting(self, app: str) -> None:
        """The app's bundle no longer waits (a new deploy of it began, or it was removed)."""
        wait = self._host_waits.pop(app, None)
        if wait is None:
            return
        for host in wait.hosts:
            waiters = self._host_waiters.get(host)
            if waiters is not None:
                waiters.pop(app, None)
                if not waiters:
                    del self._host_waiters[host]

    def _hosts_released(self, hosts: list[str]) -> None:
        """No app claims these hosts any more: offer again the bundles that waited on them
        and on no host still claimed."""
        for host in hosts:
            for app in list(self._host_waiters.get(host, ())):
                wait = self._host_waits.get(app)
                if wait is None:
                    continue  # offered again for an earlier host of this very release
                if all(self._host_owner(other, app) is None for other in wait.hosts):
                    self._offer_again(app, wait)

    def _offer_again(self, app_name: str, wait: HostWait) -> None:
        self._stop_waiting(app_name)
        app = self.apps.get(app_name)
        if app is None or app.next is not None or app.removing or not app.bundle_present:
            return  # each of these ended the wait already; nothing left to offer
        log.info("%s: %s free now, its bundle deploys again", app_name, ", ".join(wait.hosts))
        # Not at_start: keter's start is long past, and what ServeLastServed puts back
        # must not replace a bundle that was merely waiting its turn.
        self._begin(app, replace(wait.arrival, at_start=False))
