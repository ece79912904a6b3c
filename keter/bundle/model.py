"""The bundle model: what a bundle's ``config/keter.yaml`` asks for, validated.

Both of Keter's formats are read into these frozen dataclasses
(``keter.bundle.v04`` and ``keter.bundle.v10``); the rest of keter uses only
these. Paths are absolute and checked, hosts validated and lower-cased,
durations in seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from keter.limits import NO_LIMITS, Limits
from keter.names import cap_problems

KETER_RESTART_DELAY = 5.0  # Keter's default restart-delay-seconds
KETER_REALM = "keter"  # Keter's default basic-auth realm
KETER_LOCAL_STATUS = 401  # Keter's defaults for the local middleware
KETER_LOCAL_MESSAGE = "Unauthorized Accessing from Localhost ONLY"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RELEASE_TIMEOUT = 300.0  # seconds a release command may run (release-timeout)


class BundleConfigError(Exception):
    """The bundle's config is unusable; ``problems`` lists the reasons.

    However many there are, the list is capped at a few KiB of log-safe text,
    the last entry saying how many more there were ("... and 12 more problems").
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = cap_problems(problems)
        super().__init__("; ".join(self.problems))


# -- the model -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """A stanza's own certificate (``ssl: {certificate, key, chain-certificates}``)."""

    certificate: Path  # absolute; checked to hold a PEM certificate
    key: Path  # absolute; checked to hold a PEM private key
    chain: tuple[Path, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AcmeTls:
    """``ssl: acme``: keter gets a certificate for each host from its ACME CA (keter.acme)."""


# ``ssl``: False (HTTP only), True (HTTPS with the TLS listener's certificate),
# the stanza's own certificate, or one keter gets by ACME.
Ssl = bool | TlsConfig | AcmeTls


@dataclass(frozen=True, kw_only=True)
class BasicAuthConfig:
    """The ``basic-auth`` middleware: only these users get through."""

    realm: str = KETER_REALM
    credentials: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True, kw_only=True)
class HeadersConfig:
    """The ``headers`` middleware: response headers added to every answer."""

    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """The ``local`` middleware: callers other than localhost get this answer."""

    status: int = KETER_LOCAL_STATUS
    message: str = KETER_LOCAL_MESSAGE


class RateIdentifier(enum.Enum):
    """Keter's rate-limiter ``identifier_by``: whose requests one counter counts."""

    IP = "ip"
    IP_PATH = "ip+path"
    IP_UA = "ip+ua"
    HEADER = "header"  # a request header's value
    COOKIE = "cookie"  # a cookie's value
    HEADER_IP = "header+ip"


class RateZone(enum.Enum):
    """Keter's rate-limiter ``zone_by``: separate counters per zone."""

    DEFAULT = "default"  # one zone
    IP = "ip"
    HEADER = "header"  # a request header's value


class RateAlgorithm(enum.Enum):
    """The window algorithm a throttle names; nginx's limit_req carries out every one
    the same way (a burst of ``limit``, refilled at limit/period)."""

    FIXED_WINDOW = "FixedWindow"
    SLIDING_WINDOW = "SlidingWindow"
    TOKEN_BUCKET = "TokenBucket"
    LEAKY_BUCKET = "LeakyBucket"
    TINY_LRU = "TinyLRU"


@dataclass(frozen=True, kw_only=True)
class Throttle:
    """One throttle: at most ``limit`` requests per ``period`` seconds per identifier."""

    name: str
    limit: int
    period: int  # seconds
    algorithm: RateAlgorithm
    identifier: RateIdentifier
    identifier_name: str | None = None  # the header or cookie of HEADER, COOKIE, HEADER_IP


@dataclass(frozen=True, kw_only=True)
class RateLimiterConfig:
    """The ``rate-limiter`` middleware (Keter 2.3's keter-rate-limiting-plugin)."""

    zone: RateZone = RateZone.DEFAULT
    zone_header: str | None = None  # the header of RateZone.HEADER
    throttles: tuple[Throttle, ...]


@dataclass(frozen=True, kw_only=True)
class AutoheadConfig:
    """The ``autohead`` middleware: a HEAD request reaches the app as GET (nginx sends
    the headers only)."""


Middleware = BasicAuthConfig | HeadersConfig | LocalConfig | RateLimiterConfig | AutoheadConfig


@dataclass(frozen=True, kw_only=True)
class Release:
    """A web app's ``release`` command: run once per deploy, before the version starts."""

    exec: Path  # absolute, symlinks resolved, inside the bundle folder, executable
    args: tuple[str, ...] = ()
    timeout: float = RELEASE_TIMEOUT  # seconds; then it is stopped and the deploy fails


@dataclass(frozen=True, kw_only=True)
class WebApp:
    """The bundle's HTTP app: how to run it and which hosts it answers."""

    exec: Path  # absolute, symlinks resolved, inside the bundle folder, executable
    args: tuple[str, ...] = ()
    hosts: tuple[str, ...]  # validated, lower-cased, at least one; the first gives APPROOT
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    health_check_path: str | None = None
    forward_env: tuple[str, ...] = ()  # copied from keter's own environment when set there
    port_env_vars: tuple[str, ...] = ()  # extra variables that also receive the port
    ssl: Ssl = False
    requires_secure: bool = False
    ensure_alive: float | None = None  # seconds to answer (Keter's microseconds converted)
    time_bound: float | None = None  # seconds per proxied read/send; 0 = unbounded
    middleware: tuple[Middleware, ...] = ()
    max_body_size: int | None = None  # client-max-body-size; None: the global one
    proxy_buffering: bool = True  # false: answers stream through (server-sent events)
    release: Release | None = None  # see keter.release
    limits: Limits = NO_LIMITS  # its own (and its release's); unset: app-limits in keter-config


@dataclass(frozen=True, kw_only=True)
class Background:
    """A process without a port (a queue worker); restarted when it exits."""

    exec: Path
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    forward_env: tuple[str, ...] = ()
    restart_count: int | None = None  # restarts allowed; None = unlimited
    restart_delay: float = KETER_RESTART_DELAY  # seconds
    limits: Limits = NO_LIMITS  # its own; unset: app-limits in keter-config.yaml


@dataclass(frozen=True, kw_only=True)
class StaticFiles:
    """A folder of the bundle that nginx serves itself."""

    root: Path  # absolute, symlinks resolved, a folder inside the bundle
    hosts: tuple[str, ...]
    directory_listing: bool = False
    requires_secure: bool = False
    ssl: Ssl = False
    middleware: tuple[Middleware, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RedirectAction:
    """Where one request path goes: ``url`` as it is, or the same path on ``host``."""

    path: str | None = None  # this exact path only; None: any path
    url: str | None = None
    host: str | None = None
    secure: bool = False
    port: int | None = None


@dataclass(frozen=True, kw_only=True)
class Redirect:
    """Hosts that only redirect; the first action matching the path wins, else 404."""

    hosts: tuple[str, ...]
    status: int = 303
    actions: tuple[RedirectAction, ...]
    requires_secure: bool = False
    ssl: Ssl = False


@dataclass(frozen=True, kw_only=True)
class ReverseProxy:
    """Requests for ``hosts`` (Keter's reversing-host) go to another server."""

    hosts: tuple[str, ...]
    reversed_host: str  # a host name or IP address
    reversed_port: int
    reversed_ssl: bool = False
    preserve_host: bool = False  # send the client's Host header instead of reversed-host
    timeout: float | None = None  # seconds to wait for the answer; None: the global bound
    max_body_size: int | None = None  # client-max-body-size; None: the global one
    proxy_buffering: bool = True  # false: answers stream through (server-sent events)
    requires_secure: bool = False
    ssl: Ssl = False
    middleware: tuple[Middleware, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PostgresServer:
    """The database server a bundle asks for (Keter's ``plugins: {postgres: [{server, port}]}``).

    Whether keter may provision there is the operator's policy
    (``keter.config.PostgresSettings.server_problem``).
    """

    host: str  # a host name or IP address (keter.names.validate_upstream_host)
    port: int = 5432


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    """A validated bundle config."""

    app: str
    webapps: tuple[WebApp, ...] = ()  # each its own process, port, hosts and health check
    postgres: bool = False
    postgres_server: PostgresServer | None = None  # None: the server keter is configured for
    warnings: tuple[str, ...] = ()
    backgrounds: tuple[Background, ...] = ()
    static_files: tuple[StaticFiles, ...] = ()
    redirects: tuple[Redirect, ...] = ()
    reverse_proxies: tuple[ReverseProxy, ...] = ()
    # keter.stats' watched rollout: seconds to watch a new version after its switch
    # (0: not watched); None: keter-config.yaml's watch-seconds.
    watch_seconds: float | None = None

    @property
    def webapp(self) -> WebApp | None:
        """The first web app, or None (for callers that know only one)."""
        return self.webapps[0] if self.webapps else None

    @property
    def all_hosts(self) -> tuple[str, ...]:
        """Every host any stanza claims (no two stanzas share one)."""
        hosts: list[str] = []
        for stanza in (*self.webapps, *self.static_files, *self.redirects, *self.reverse_proxies):
            hosts.extend(stanza.hosts)
        return tuple(hosts)

    @property
    def serves_http(self) -> bool:
        """Whether nginx routes anything for this bundle."""
        return bool(self.all_hosts)

    @property
    def process_limits(self) -> tuple[tuple[str, Limits], ...]:
        """Each process stanza's own limits, named for a log line ("" if it is the only
        one, else "webapp 2: ")."""
        named = [("webapp", stanza) for stanza in self.webapps]
        named += [("background", stanza) for stanza in self.backgrounds]
        if len(named) == 1:
            return (("", named[0][1].limits),)
        counts: dict[str, int] = {}
        found = []
        for kind, stanza in named:
            counts[kind] = counts.get(kind, 0) + 1
            found.append((f"{kind} {counts[kind]}: ", stanza.limits))
        return tuple(found)

    @property
    def runs_something(self) -> bool:
        return bool(self.webapps) or bool(self.backgrounds)
