"""From a deployed bundle to what nginx serves for it, and the URL the app is told.

``sites_for`` is pure: it turns a ``BundleConfig`` (every stanza) into the
``Site`` message the nginx writer renders. ``deploy_problems`` is the check
the supervisor runs before nginx is touched: a certificate that went missing
or a TLS stanza with no TLS listener to serve it fails only that deploy, with
its own message, instead of failing ``nginx -t`` for every app.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
from collections.abc import Mapping
from pathlib import Path

import psutil

from keter.bundle import (
    AcmeTls,
    AutoheadConfig,
    BasicAuthConfig,
    BundleConfig,
    HeadersConfig,
    LocalConfig,
    Middleware,
    RateLimiterConfig,
    ReverseProxy,
    Ssl,
    TlsConfig,
)
from keter.config import KeterConfig
from keter.messages import (
    BasicAuth,
    CertificateIssued,
    LocalOnly,
    ProxyApp,
    ProxyRemote,
    RedirectRule,
    Route,
    SendRedirect,
    ServeFiles,
    Site,
    TlsFiles,
)
from keter.names import is_wildcard
from keter.nginx.files import resolvers
from keter.nginx.render import needs_resolver, remote_address, resolver_missing
from keter.switch.nft import Table
from keter.yamlcheck import pem_problem


def sites_for(
    app: str,
    config: BundleConfig,
    folder: Path,
    ports: tuple[int | None, ...],
    settings: KeterConfig,
    *,
    upstream_host: str = "127.0.0.1",
    certificates: Mapping[str, TlsFiles] | None = None,
) -> tuple[Site, ...]:
    """What nginx must serve for one deployed version of ``app``.

    ``folder`` is where the version is unpacked, ``ports`` its web apps' ports in
    ``config.webapps`` order (None for one not started) on ``upstream_host``:
    127.0.0.1 for the processes themselves, or keter's switch address for their
    stable ports (``keter.switch``). ``certificates`` are the ones keter.acme has
    issued, by host. One Site, or none when the bundle serves no host. Raises
    ValueError if a static root lies outside ``folder`` (the parser already
    refuses that; this is a second lock).
    """
    folder = Path(os.path.realpath(folder))
    issued = certificates or {}

    def route(stanza: object, hosts: tuple[str, ...], action: object) -> list[Route]:
        ssl = getattr(stanza, "ssl", False)
        if isinstance(ssl, AcmeTls):
            # A certificate per host: each host is a route of its own, on TLS listeners
            # only once its certificate is there.
            return [
                dataclasses.replace(one(stanza, (host,), action), acme=True, tls=issued.get(host))
                for host in hosts
            ]
        return [one(stanza, hosts, action)]

    def one(stanza: object, hosts: tuple[str, ...], action: object) -> Route:
        middleware = getattr(stanza, "middleware", ())
        return Route(
            hosts=hosts,
            action=action,
            tls=_tls(getattr(stanza, "ssl", False)),
            requires_secure=getattr(stanza, "requires_secure", False),
            basic_auth=_basic_auth(middleware),
            headers=tuple(
                pair for m in middleware if isinstance(m, HeadersConfig) for pair in m.headers
            ),
            local_only=next(
                (LocalOnly(status=m.status, text=m.message) for m in middleware if _local(m)),
                None,
            ),
            rate_limiters=tuple(m for m in middleware if isinstance(m, RateLimiterConfig)),
            autohead=any(isinstance(m, AutoheadConfig) for m in middleware),
            max_body_size=getattr(stanza, "max_body_size", None),
            buffering=getattr(stanza, "proxy_buffering", True),
        )

    routes = []
    for webapp, port in zip(config.webapps, ports, strict=True):
        if port is not None:
            action = ProxyApp(port=port, timeout=webapp.time_bound, host=upstream_host)
            routes.extend(route(webapp, webapp.hosts, action))
    for static in config.static_files:
        if not Path(static.root).is_relative_to(folder):
            raise ValueError(f"{app}: static root {static.root} is outside {folder}")
        action = ServeFiles(root=static.root, listing=static.directory_listing)
        routes.extend(route(static, static.hosts, action))
    for redirect in config.redirects:
        rules = tuple(
            RedirectRule(path=a.path, url=a.url, host=a.host, secure=a.secure, port=a.port)
            for a in redirect.actions
        )
        action = SendRedirect(status=redirect.status, rules=rules)
        routes.extend(route(redirect, redirect.hosts, action))
    for proxy in config.reverse_proxies:
        action = ProxyRemote(
            host=proxy.reversed_host,
            port=proxy.reversed_port,
            ssl=proxy.reversed_ssl,
            host_header=None if proxy.preserve_host else _host_header(proxy),
            timeout=proxy.timeout,
        )
        routes.extend(route(proxy, proxy.hosts, action))
    return (Site(app=app, routes=tuple(routes)),) if routes else ()


# Not a possible bundle name (those start with a letter or digit), so no app can clash.
DASHBOARD_SITE = "_dashboard"


def dashboard_site(settings: KeterConfig) -> Site | None:
    """The dashboard at ``dashboard-host``: nginx asks for a password, then proxies to
    keter's status listener with the client's Host (the status API checks it)."""
    if settings.dashboard_host is None or settings.status_listen is None:
        return None
    address, port = settings.status_listen
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)  # wildcard: loopback
    route = Route(
        hosts=(settings.dashboard_host,),
        # A wildcard listen address is reached on loopback.
        action=ProxyRemote(
            host={"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address), port=port
        ),
        basic_auth=BasicAuth(realm="keter", credentials=settings.dashboard_users),
        # Its password, and the page that restarts apps, never cross the network in clear
        # where nginx can do HTTPS: plain HTTP is redirected (keter.config.status warns
        # where it cannot).
        requires_secure=any(listener.tls for listener in settings.listeners),
    )
    return Site(app=DASHBOARD_SITE, routes=(route,))


def deploy_problems(config: BundleConfig, settings: KeterConfig) -> list[str]:
    """Why nginx could not serve this bundle as configured (empty: it can).

    Run by the supervisor before the deploy reaches nginx. Certificate files
    are read again here: they live outside the bundle and may have changed
    since the bundle was unpacked.
    """
    problems = []
    has_tls_listener = any(listener.tls for listener in settings.listeners)
    for hosts, stanza in _stanzas(config):
        shown = ", ".join(hosts)
        ssl = getattr(stanza, "ssl", False)
        if ssl is not False and not has_tls_listener:
            problems.append(
                f"hosts {shown}: ssl is set, but keter-config.yaml has no TLS listener "
                "(a listener with certificate and key) to serve HTTPS on"
            )
        requires = getattr(stanza, "requires_secure", False)
        if requires and not has_tls_listener and settings.external_https_port is None:
            problems.append(
                f"hosts {shown}: requires-secure redirects to HTTPS, but keter-config.yaml has "
                "no TLS listener (nor an external-https-port served elsewhere)"
            )
        if isinstance(ssl, AcmeTls):
            wildcards = [host for host in hosts if is_wildcard(host)]
            if wildcards:
                problems.append(
                    f"hosts {', '.join(wildcards)}: ssl: acme cannot get a certificate for a "
                    "wildcard host (HTTP-01 validates one name at a time)"
                )
        if isinstance(stanza, ReverseProxy):
            problems += _resolver_problems(shown, stanza.reversed_host, settings)
            problems += _app_port_problems(shown, stanza, settings)
        if isinstance(ssl, TlsConfig):
            files = [(ssl.certificate, "certificate"), (ssl.key, "key")]
            files += [(file, "certificate") for file in ssl.chain]
            for file, kind in files:
                problem = pem_problem(file, kind)
                if problem:
                    problems.append(f"hosts {shown}: ssl {kind}: {problem}")
    return problems


def _resolver_problems(shown: str, host: str, settings: KeterConfig) -> list[str]:
    """A reverse proxy to a host name needs a resolver for nginx to ask."""
    try:
        if not needs_resolver(host):
            return []
    except ValueError as exc:  # the parser checked the host; this is a second lock
        return [f"hosts {shown}: reverse-proxy: {exc}"]
    if resolvers(settings.nginx.resolver):  # as the nginx writer will read them
        return []
    return [f"hosts {shown}: {resolver_missing(host)}"]


def _app_port_problems(shown: str, proxy: ReverseProxy, settings: KeterConfig) -> list[str]:
    """A reverse proxy must not lead to another app past nginx's checks of it (its
    basic-auth, `local`, rate limits): nginx's workers are not kept off apps' ports as
    apps are (keter.switch.nft). A name is resolved by nginx when a request comes, so
    only what a bundle writes as an address can be refused here."""
    try:  # the address nginx will be given, as the renderer reads it (localhost too)
        given = remote_address(proxy.reversed_host)
    except ValueError:  # the parser checked the host; the renderer refuses it alike
        return []
    if given is None:
        return []
    address = ipaddress.ip_address(given.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address == ipaddress.ip_address(Table.for_root(settings.root).address):
        return [f"hosts {shown}: reverse-proxy: {address} is keter's own stable address"]
    low, high = settings.port_range
    local = address.is_loopback or address.is_unspecified or str(address) in _host_addresses()
    if local and low <= proxy.reversed_port <= high:
        return [
            f"hosts {shown}: reverse-proxy: {address}:{proxy.reversed_port} is in keter's "
            f"port-range ({low}-{high}), where apps listen: reach an app through its host"
        ]
    # keter's status API: apps are kept off it (keter.switch.nft), a bundle's host must
    # not publish it past the operator's choice (dashboard-host, status-listen).
    status = settings.status_listen
    if local and status is not None and proxy.reversed_port == status[1]:
        listen = ipaddress.ip_address(status[0])
        # What a connection to ``address`` reaches: the listener's own address, or any
        # local one when it listens on all; 0.0.0.0 and :: connect to loopback.
        if listen.is_unspecified or address == listen or address.is_unspecified:
            where = f"[{address}]" if address.version == 6 else str(address)
            return [
                f"hosts {shown}: reverse-proxy: {where}:{proxy.reversed_port} is keter's "
                "status API (status-listen): no bundle may publish it"
            ]
    return []


def _host_addresses() -> set[str]:
    """This machine's own addresses (a connection to any of them stays on the machine)."""
    try:
        return {
            entry.address.split("%")[0]
            for entries in psutil.net_if_addrs().values()
            for entry in entries
        }
    except OSError:
        return set()


def approot(host: str, *, secure: bool, settings: KeterConfig) -> str:
    """The APPROOT an app gets: its first host, as browsers reach it.

    The scheme is https for an app with ``ssl``. The port is Keter's
    external-http(s)-port when set, else that of the first listener of the
    kind (plain or TLS), left out when it is the scheme's default.
    """
    host = host.removeprefix("*.")
    if secure:
        tls = [listener.port for listener in settings.listeners if listener.tls]
        port = settings.external_https_port or (tls[0] if tls else 443)
        return f"https://{host}" if port == 443 else f"https://{host}:{port}"
    plain = [listener.port for listener in settings.listeners if not listener.tls]
    port = settings.external_http_port or (plain[0] if plain else 80)
    return f"http://{host}" if port == 80 else f"http://{host}:{port}"


def _stanzas(config: BundleConfig) -> list[tuple[tuple[str, ...], object]]:
    stanzas: list[tuple[tuple[str, ...], object]] = []
    for stanza in (
        *config.webapps,
        *config.static_files,
        *config.redirects,
        *config.reverse_proxies,
    ):
        stanzas.append((stanza.hosts, stanza))
    return stanzas


def _tls(ssl: Ssl) -> TlsFiles | None:
    """The stanza's own certificate; None for none (``ssl: true`` uses the listener's).

    The nginx writer copies these files when the site is deployed; nginx reads the copies.
    """
    if not isinstance(ssl, TlsConfig):
        return None
    return TlsFiles(certificate=ssl.certificate, key=ssl.key, chain=ssl.chain)


def _basic_auth(middleware: tuple[Middleware, ...]) -> BasicAuth | None:
    """One htpasswd per route: several basic-auth entries pool their users (first realm)."""
    auths = [m for m in middleware if isinstance(m, BasicAuthConfig)]
    if not auths:
        return None
    credentials = tuple(pair for auth in auths for pair in auth.credentials)
    return BasicAuth(realm=auths[0].realm, credentials=credentials)


def _local(middleware: Middleware) -> bool:
    return isinstance(middleware, LocalConfig)


def _host_header(proxy: ReverseProxy) -> str:
    """The Host Keter's proxy sends upstream: reversed-host, with a non-default port."""
    host = proxy.reversed_host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    default = 443 if proxy.reversed_ssl else 80
    return host if proxy.reversed_port == default else f"{host}:{proxy.reversed_port}"


def with_certificates(
    site: Site, certificates: Mapping[str, CertificateIssued], now: float
) -> Site:
    """``site`` with the certificates keter.acme has issued put into its ssl: acme routes,
    those still valid at ``now``: a host claimed again weeks after its app went (maybe by
    another app) was served the old one it had, expired; without one it serves plain
    HTTP until keter.acme has a new one."""
    routes = tuple(
        dataclasses.replace(route, tls=_valid(certificates.get(route.hosts[0]), now))
        if route.acme and route.hosts
        else route
        for route in site.routes
    )
    return site if routes == site.routes else dataclasses.replace(site, routes=routes)


def _valid(issued: CertificateIssued | None, now: float) -> TlsFiles | None:
    if issued is None or issued.not_after <= now:
        return None
    return TlsFiles(certificate=issued.certificate, key=issued.key)


def acme_hosts_in_turn(sites: tuple[Site, ...]) -> tuple[str, ...]:
    """The hosts that want a certificate from keter.acme (``ssl: acme``), in the order
    it tries them: each app's first host, then each app's second, and so on, so one
    bundle's hundreds of hosts do not keep another app waiting for its certificate."""
    per_app = [
        sorted({host for route in site.all_routes if route.acme for host in route.hosts})
        for site in sorted(sites, key=lambda s: s.app)
    ]
    turns = itertools.zip_longest(*per_app)
    return tuple(dict.fromkeys(host for turn in turns for host in turn if host is not None))


def acme_owners(sites: tuple[Site, ...]) -> dict[str, str]:
    """Each host that wants a certificate from keter.acme, and the app it belongs to."""
    return {
        host: site.app
        for site in sites
        for route in site.all_routes
        if route.acme
        for host in route.hosts
    }
