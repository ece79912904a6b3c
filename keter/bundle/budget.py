"""What one bundle may take of the parts every app shares.

Each web app and background stanza is a process of keter's (with its output
pipe, its log and, for a web app, a port of the shared range); each stanza is
an nginx server block per listener, and each wildcard host one more; each
rate-limit throttle is a 1 MiB zone of nginx's shared memory, which every
reload maps again. Nothing else bounds them but the config file's size (1 MiB:
tens of thousands of stanzas or hosts), and a bundle that asked for them all
would take the port range from the other apps, or nginx's memory (20,000
wildcard hosts: 1.4 GB in each nginx process) and seconds from every later
reload. So a bundle asking for more than these bounds is refused when it is
read, before anything of it starts, with the count and the bound. Plain hosts
are cheap (they share their stanza's server block) and are not counted; a host
of an ``ssl: acme`` stanza is a server block of its own (its own certificate),
and counted.
"""

from __future__ import annotations

from keter.bundle.model import AcmeTls, BundleConfig, RateLimiterConfig
from keter.names import is_wildcard
from keter.yamlcheck import Checker

MAX_PROCESSES = 64  # web app and background stanzas
# Per listener: one per stanza with hosts, one per wildcard host, one per ssl: acme host.
MAX_SERVER_BLOCKS = 100
MAX_RATE_ZONES = 64  # rate-limit throttles, 1 MiB of nginx's shared memory each


def check_budget(config: BundleConfig, check: Checker) -> None:
    """A problem for each bound ``config`` asks more than."""
    processes = len(config.webapps) + len(config.backgrounds)
    if processes > MAX_PROCESSES:
        check.problem(
            "stanzas",
            f"{processes} web app and background stanzas, each a process; "
            f"at most {MAX_PROCESSES} are allowed",
        )
    routed = (*config.webapps, *config.static_files, *config.redirects, *config.reverse_proxies)
    servers = zones = 0
    for stanza in routed:
        servers += _server_blocks(stanza)
        for middleware in getattr(stanza, "middleware", ()):
            if isinstance(middleware, RateLimiterConfig):
                zones += len(middleware.throttles)
    if servers > MAX_SERVER_BLOCKS:
        check.problem(
            "stanzas",
            f"{servers} nginx server blocks (one per stanza with hosts, one per wildcard "
            f"host and one per ssl: acme host); at most {MAX_SERVER_BLOCKS} are allowed",
        )
    if zones > MAX_RATE_ZONES:
        check.problem(
            "middleware",
            f"{zones} rate-limit throttles, each 1 MiB of nginx's shared memory; "
            f"at most {MAX_RATE_ZONES} are allowed",
        )


def _server_blocks(stanza: object) -> int:
    hosts = stanza.hosts
    if isinstance(getattr(stanza, "ssl", False), AcmeTls):
        return len(hosts)  # keter.routes: a route, so a server block, per host
    wildcards = sum(1 for host in hosts if is_wildcard(host))
    return wildcards + (len(hosts) > wildcards)
