"""What the operator's config is, once read: ``KeterConfig`` and its sections.

Every field but ``root`` has Keter's default, so an absent file is a valid config.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from keter.limits import AppLimits
from keter.names import cap_problems

MIB = 1 << 20
GIB = 1 << 30
# The local PostgreSQL cluster, as Debian runs it; Keter's default server is localhost:5432.
LOCAL_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PG_PORT = 5432
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class SwitchSetting(enum.StrEnum):
    """How the operator wants versions switched (``switch:``; keter.switch decides the rest)."""

    AUTO = "auto"  # re-point stable addresses in the kernel where nftables allows it
    RELOAD = "reload"  # always reload nginx


class ConfigError(Exception):
    """The global config is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = cap_problems(problems)  # a few KiB at most, then "... and N more"
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


@dataclass(frozen=True, slots=True)
class Listener:
    """One address nginx listens on, for plain HTTP or (with a certificate) HTTPS.

    ``host`` is ``"*"`` (every address) or one IP address in its canonical
    spelling. Keter's ``"*4"`` / ``"*6"`` (every IPv4 / IPv6 address) are read
    as ``"0.0.0.0"`` / ``"::"``, which say the same in nginx's terms. A TLS
    listener's certificate is the default for every host without its own.
    """

    host: str
    port: int
    certificate: Path | None = None
    key: Path | None = None
    chain: tuple[Path, ...] = ()  # Keter's chain-certificates
    session: bool = False  # TLS session resumption (an nginx session cache)

    @property
    def tls(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True, slots=True)
class NginxSettings:
    """Where keter writes its nginx config and how it checks and reloads nginx."""

    config_file: Path = Path("/etc/nginx/sites-enabled/keter")
    test_command: tuple[str, ...] = ("nginx", "-t")
    reload_command: tuple[str, ...] = ("nginx", "-s", "reload")
    # nginx's error log: its [emerg] line says why nginx refused a reload (a listen
    # port taken), at once rather than at the confirmation's timeout. None: not read.
    error_log: Path | None = Path("/var/log/nginx/error.log")
    # DNS servers nginx asks for reverse-proxy host names ("IP" or "IP:PORT");
    # None: the name servers of /etc/resolv.conf.
    resolver: tuple[str, ...] | None = None
    # A folder of certificates nginx may read in place (renewed by another tool);
    # any other certificate is copied by keter when its site is deployed.
    shared_certificates: Path | None = None


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True, kw_only=True)
class AcmeSettings:
    """Where stanzas with ``ssl: acme`` get their certificates (``acme:``; keter.acme)."""

    directory: str = LETS_ENCRYPT  # any RFC 8555 CA's directory URL
    email: str | None = None  # the account's contact
    # External account binding (some CAs require one): the key id and its base64url HMAC key.
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None  # PEM file trusted for the directory's own HTTPS


def conninfo(dsn: str) -> dict[str, str]:
    """libpq's reading of a connection string; raises psycopg's error if it has none.

    psycopg is imported here, not with the module: it loads libpq (~14 MB), which
    only a config naming a database server needs (keter.postgres).
    """
    from psycopg.conninfo import conninfo_to_dict

    return conninfo_to_dict(dsn)


def first_server(params: Mapping[str, str]) -> tuple[str, int]:
    """The server a DSN names first: host (or socket folder) and port, from libpq's
    reading of it (``conninfo``), libpq's defaults where it names none.

    libpq takes lists (``host=a,b port=5432,5433``: servers to try in turn); keter
    creates roles on, and hands apps, the first. Raises ValueError for a port that is
    no port number.
    """
    host = str(params.get("host") or params.get("hostaddr") or LOCAL_SOCKET_DIR).split(",")[0]
    port = str(params.get("port") or DEFAULT_PG_PORT).split(",")[0]
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("the port is not a port number")
    return host, int(port)


@dataclass(frozen=True, kw_only=True)
class PostgresSettings:
    """Where keter creates app databases (``postgres:`` in keter-config.yaml)."""

    # libpq conninfo of an admin role (CREATEROLE CREATEDB); empty = the local
    # server as the postgres OS user. May hold a password: kept out of repr.
    admin_dsn: str = field(default="", repr=False)
    # How long a deploy waits for an unreachable server before it fails.
    retry_seconds: float = 30.0
    # Connections each app's role may hold at once (0: no limit): one app cannot take
    # every connection of the server.
    connection_limit: int = 20

    def server(self) -> tuple[str, int]:
        """The server keter provisions on: the admin DSN's first host and port, or the
        local cluster's socket folder."""
        try:
            return first_server(conninfo(self.admin_dsn) if self.admin_dsn else {})
        except Exception:  # checked when the config was read; a default keeps this total
            return LOCAL_SOCKET_DIR, DEFAULT_PG_PORT

    def server_problem(self, host: str, port: int) -> str | None:
        """Why keter must not provision a bundle's database on ``host``:``port``, if so.

        keter can only create roles where its admin connection reaches: the server
        of ``postgres.admin-dsn`` (by default the local cluster). localhost,
        127.0.0.1, ::1 and a socket folder all name the local server.
        """
        own_host, own_port = self.server()

        def local(name: str) -> bool:
            return name.lower() in LOCAL_NAMES or name.startswith("/")

        same = host.lower() == own_host.lower() or (local(host) and local(own_host))
        if same and port == own_port:
            return None
        shown = "the local server" if local(own_host) else own_host
        return (
            f"asks for a database on {host} port {port}, but keter provisions databases only "
            f"on {shown} port {own_port} (postgres.admin-dsn in keter-config.yaml)"
        )


@dataclass(frozen=True, kw_only=True)
class KeterConfig:
    """The validated global config; every field but ``root`` has Keter's default."""

    root: Path
    listeners: tuple[Listener, ...] = (Listener("*", 80),)
    nginx: NginxSettings = NginxSettings()
    port_range: tuple[int, int] = (4000, 4999)
    health_check_timeout: float = 30.0
    drain_seconds: float = 2.0
    stop_timeout: float = 10.0
    # How versions are switched (keter.switch); AUTO falls back to reloading nginx.
    switch: SwitchSetting = SwitchSetting.AUTO
    # Values may be secrets (API keys, a DSN with a password): kept out of repr.
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    postgres: PostgresSettings = PostgresSettings()
    acme: AcmeSettings = AcmeSettings()
    setuid: str | None = None
    # Apps run under a uid and gid of their own from this range (keter.users), unless
    # setuid names one user for all, or the operator opts in to running them as root.
    app_uid_range: tuple[int, int] = (1_900_000_000, 1_900_999_999)
    run_apps_as_root: bool = False
    app_limits: AppLimits = field(default_factory=AppLimits)
    log_max_bytes: int = 10 * MIB
    log_backups: int = 5
    max_unpacked_bytes: int = 2 * GIB
    max_members: int = 100_000
    # Keter's proxy keys, carried out by nginx (see keter.nginx.ProxyOptions).
    ip_from_header: tuple[str, ...] = ()  # proxies trusted to set X-Forwarded-For
    external_http_port: int | None = None  # for APPROOT; None: the first plain listener's
    external_https_port: int | None = None  # for APPROOT; None: the first TLS listener's
    healthcheck_path: str | None = None
    unknown_host_response_file: Path | None = None
    missing_host_response_file: Path | None = None
    proxy_exception_response_file: Path | None = None
    connection_time_bound: int = 300_000  # milliseconds; 0 = unbounded
    # The operator's side (keter.status): an optional TCP address for the API and dashboard
    # besides ROOT/run/keter.sock, the group allowed to use that socket, how many served
    # bundles each app keeps for rollback, and the host nginx may route to the dashboard.
    status_listen: tuple[str, int] | None = None
    status_group: str | None = None
    archive_keep: int = 3
    dashboard_host: str | None = None
    # Who may open the dashboard (basic auth in nginx at dashboard-host, and in the status
    # API on TCP, which also takes the token in ROOT/etc/status-token): (user, password).
    dashboard_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # More names the status API answers to (Host header), besides localhost, the
    # status-listen address and dashboard-host: with 0.0.0.0 the only way to add one.
    status_hosts: tuple[str, ...] = ()
    # Traffic statistics and access logs (keter.stats): nginx logs every request of an
    # app to keter. After a switch, keter watches the new version for watch_seconds (0:
    # never; a bundle's own watch-seconds wins) and rolls it back if its 5xx share passes
    # both watch_max_error_ratio and the previous version's, over at least
    # watch_min_requests requests, or if it crash-loops.
    traffic_stats: bool = True
    # The HTTP features nginx adds (keter.nginx): a request body limit (bytes; 0:
    # unlimited; a stanza may set its own), gzip for text answers, and the HSTS
    # max-age for requires-secure stanzas (0: no header).
    client_max_body_size: int = 10 << 20
    # Connections each nginx worker opens to one app version at most (0: no cap): one app
    # holding requests open cannot take every connection nginx has from the others.
    app_max_connections: int = 256
    gzip: bool = True
    hsts_max_age: int = 31_536_000
    watch_seconds: float = 60.0
    watch_max_error_ratio: float = 0.05
    watch_min_requests: int = 20
    # Backups taken before a release (keter.backups): how many each app keeps, whether a
    # failed backup fails the deploy, and how long pg_dump and pg_restore may take.
    backup_keep: int = 5
    backup_required: bool = True
    backup_timeout: float = 600.0
    warnings: tuple[str, ...] = ()
    # What load_config read: ROOT or the config file, as keter was started with (None:
    # parsed from data). keter reads it again on SIGHUP, only to say if it has changed.
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def config_file(self) -> Path | None:
        """The file keter's settings come from (it may not exist), or None."""
        if self.source is None:
            return None
        return self.source / "etc" / "keter-config.yaml" if self.source.is_dir() else self.source

    @property
    def postgres_admin_dsn(self) -> str:
        return self.postgres.admin_dsn

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    @property
    def temp_dir(self) -> Path:
        return self.root / "temp"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def etc_dir(self) -> Path:
        return self.root / "etc"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def archive_dir(self) -> Path:
        return self.root / "archive"

    @property
    def backups_dir(self) -> Path:
        return self.root / "backups"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"
