"""nginx generations: what nginx should route, one generation in flight at a time.

Every switch (SWITCHING) and removal rides on a generation; the writer's reply
finishes all of them, either way. Requests made while one is in flight are
batched into the next.
"""

from __future__ import annotations

import logging
import time

from keter.deploys import App, Deploy, Stage
from keter.messages import ApplyNginx, CertificatesWanted, FailureKind, Site
from keter.routes import acme_hosts_in_turn, acme_owners, with_certificates
from keter.supervisor.state import SupervisorState

log = logging.getLogger(__name__)


class Routing(SupervisorState):
    """What nginx routes, one generation in flight at a time."""

    def _routed(self, app: App) -> Deploy | None:
        """The deploy nginx should route the app to: the one switching, else the serving one."""
        if app.next is not None and app.next.stage is Stage.SWITCHING:
            return app.next
        return app.serving if not app.removing else None

    def _desired_sites(self) -> tuple[Site, ...]:
        sites: list[Site] = []
        for app in self.apps.values():
            deploy = self._routed(app)
            if deploy is not None:
                sites.extend(deploy.sites)
        if self._dashboard is not None:
            sites.append(self._dashboard)
        now = time.time()
        sites = [with_certificates(site, self._certificates, now) for site in sites]
        return tuple(sorted(sites, key=lambda s: s.app))

    def _request_nginx(self) -> None:
        """Send the desired routing to nginx; one generation in flight at a time."""
        if self._nginx_inflight is not None:
            self._nginx_dirty = True  # sent again, with everything since, when the reply comes
            return
        self._generation += 1
        generation = self._generation
        for app in self.apps.values():
            deploy = app.next
            if deploy is not None and deploy.stage is Stage.SWITCHING and deploy.generation is None:
                deploy.generation = generation
                self._waiting_on_nginx.add(app.name)
            if app.removing and app.remove_generation is None:
                app.remove_generation = generation
                self._waiting_on_nginx.add(app.name)
        self._nginx_inflight = generation
        self._nginx_dirty = False
        sites = self._desired_sites()
        self.c.nginx.tell(ApplyNginx(generation=generation, sites=sites))
        wanted = acme_owners(sites)
        if wanted != self._acme_owners and self.c.acme is not None:
            self._acme_owners = wanted
            self.c.acme.tell(CertificatesWanted(hosts=acme_hosts_in_turn(sites), owners=wanted))

    def _nginx_replied(self, generation: int, failure: str | None, refused: dict[str, str]) -> None:
        """Finish every switch and removal that rode on ``generation``, either way.

        The nginx writer has logged a failure already; each deploy it sinks says so too.
        A reply about a generation that is not the one in flight is late (the writer
        failed, and the supervisor gave that generation up): it finishes nothing, and
        clearing the one in flight would let a second generation go out beside it.
        """
        if generation != self._nginx_inflight:
            log.warning(
                "nginx: a late reply about generation %d ignored (in flight: %s)",
                generation,
                self._nginx_inflight,
            )
            return
        for name in sorted(self._waiting_on_nginx):
            app = self.apps.get(name)
            if app is None:
                self._waiting_on_nginx.discard(name)
                continue
            done = True
            deploy = app.next
            if deploy is not None and deploy.generation is not None:
                if deploy.generation > generation:
                    done = False
                elif failure is None and name not in refused:
                    self._switched(app, deploy)
                elif failure is not None:
                    reason = f"nginx did not take the new config: {failure}"
                    self._fail(deploy, reason, kind=FailureKind.NGINX)
                else:
                    reason = f"nginx refused its site: {refused[name]}"
                    self._fail(deploy, reason, kind=FailureKind.NGINX)
            if app.removing and app.remove_generation is not None:
                if app.remove_generation > generation:
                    done = False
                else:
                    self._removed(app, drain=failure is None)
            if done:
                self._waiting_on_nginx.discard(name)
            self._continue_waiting(app)
        for name, reason in refused.items():
            app = self.apps.get(name)
            if app is not None and app.serving is not None and app.next is None:
                # nginx withdrew a site that had been serving (its files changed outside keter).
                log.error("%s: nginx withdrew its site: %s", name, reason)
                # No longer routed: nginx is not asked for it again, and the app's next
                # deploy (even one with the very same routes) goes through nginx.
                app.serving.sites = ()
        # Cleared only now, so requests made while handling the reply are batched into one.
        self._nginx_inflight = None
        if self._nginx_dirty:
            self._request_nginx()
        self._nginx_ready = True
        self._start_watching()
