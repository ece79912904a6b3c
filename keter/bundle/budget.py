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
are cheap for nginx (they share their stanza's server block) and count only
against ``MAX_HOSTS``: every operator view lists an app's hosts (the status
API the dashboard polls each second, ``keter status``), and 3,000 of them made
one app's row 200,000 characters wide; a host of an ``ssl: acme`` stanza is a
server block of its own (its own certificate), and counted there too.
"""

from __future__ import annotations

from keter.bundle.model import AcmeTls, BundleConfig, RateLimiterConfig
from keter.names import is_wildcard
from keter.yamlcheck import Checker

MAX_PROCESSES = 64  # web app and background stanzas
# Per listener: one per stanza with hosts, one per wildcard host, one per ssl: acme host.
MAX_SERVER_BLOCKS = 100
MAX_RATE_ZONES = 64  # rate-limit throttles, 1 MiB of nginx's shared memory each
MAX_HOSTS = 500  # host names of all routed stanzas together


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
    servers = zones = hosts = 0
    for stanza in routed:
        servers += _server_blocks(stanza)
        hosts += len(stanza.hosts)
        for middleware in getattr(stanza, "middleware", ()):
            if isinstance(middleware, RateLimiterConfig):
                zones += len(middleware.throttles)
    if servers > MAX_SERVER_BLOCKS:
        check.problem(
            "stanzas",
            f"{servers} nginx server blocks (one per stanza with hosts, one per wildcard "
            f"host and one per ssl: acme host); at most {MAX_SERVER_BLOCKS} are allowed",
        )
    if hosts > MAX_HOSTS:
        check.problem("stanzas", f"{hosts} host names; at most {MAX_HOSTS} are allowed")
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
