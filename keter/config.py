"""The global keter config, ``ROOT/etc/keter-config.yaml``.

The file is optional and every key has a default. Keys use Keter's dashed
names so an existing Keter config keeps working: Keter keys that mean nothing
here are accepted with a warning instead of failing the daemon's start.

Validation is strict and collects every problem before raising, so an operator
fixes the whole file in one round. Each problem names the key path, what was
found and what was expected. Values are echoed JSON-quoted (and shortened) so a
hostile or broken value cannot forge extra log lines.

The YAML reading and value checks it shares with ``keter.bundle`` live in
``keter.yamlcheck``; names and hosts are checked by ``keter.names``.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import math
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from keter import names
from keter.limits import AppLimits, parse_app_limits
from keter.names import (
    cap_problems,
    validate_host,
    validate_ip,
    validate_upstream_host,
    validate_url_path,
)
from keter.yamlcheck import (
    MAX_INT,
    MAX_SECONDS,
    Checker,
    absolute,
    describe,
    file_path,
    integer,
    is_arg,
    is_int,
    key_name,
    number,
    parse_env,
    pem_file,
    pem_files,
    read_yaml_file,
    size,
    string,
    type_name,
    unknown_key,
)
from keter.yamlcheck import pem_problem as pem_problem  # keter.routes imports it from here

log = logging.getLogger(__name__)

CONFIG_NAME = "keter-config.yaml"
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
MIB = 1 << 20
GIB = 1 << 30
# The local PostgreSQL cluster, as Debian runs it; Keter's default server is localhost:5432.
LOCAL_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PG_PORT = 5432
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


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


@dataclass(frozen=True, kw_only=True)
class PostgresSettings:
    """Where keter creates app databases (``postgres:`` in keter-config.yaml)."""

    # libpq conninfo of an admin role (CREATEROLE CREATEDB); empty = the local
    # server as the postgres OS user. May hold a password: kept out of repr.
    admin_dsn: str = field(default="", repr=False)
    # How long a deploy waits for an unreachable server before it fails.
    retry_seconds: float = 30.0

    def server(self) -> tuple[str, int]:
        """The server keter provisions on: the admin DSN's first host and port, or the
        local cluster's socket folder."""
        try:
            info = conninfo_to_dict(self.admin_dsn) if self.admin_dsn else {}
        except Exception:  # checked when the config was read; a default keeps this total
            info = {}
        host = str(info.get("host") or info.get("hostaddr") or LOCAL_SOCKET_DIR).split(",")[0]
        port = str(info.get("port") or DEFAULT_PG_PORT).split(",")[0]
        return host, int(port) if port.isdigit() and len(port) <= 5 else DEFAULT_PG_PORT

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
    # How versions are switched (keter.switch): "auto" re-points stable addresses in the
    # kernel where nftables allows it, else reloads nginx; "reload" always reloads nginx.
    switch: str = "auto"
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


# -- loading -------------------------------------------------------------------------


def load_config(
    target: str | Path, *, ephemeral_range: tuple[int, int] | None = None
) -> KeterConfig:
    """Load the config the way Keter's command line does.

    ``target`` is either ROOT (reads ``ROOT/etc/keter-config.yaml`` if it
    exists, else uses the defaults) or the config file itself, in which case
    ROOT defaults to the parent of the file's folder
    (``/opt/keter/etc/keter-config.yaml`` -> ``/opt/keter``). Relative paths in
    the file, ``root:`` included, are relative to the file's folder.
    """
    target = absolute(Path(target))
    if target.is_dir():
        path = target / "etc" / CONFIG_NAME
        root, base, root_given = target, target / "etc", True
        if not path.exists():
            return parse_config({}, root=root, base=base, ephemeral_range=ephemeral_range)
    elif target.exists():
        path = target
        root, base, root_given = target.parent.parent, target.parent, False
    else:
        raise ConfigError([f"{target}: no such file or folder"])
    try:
        data = read_yaml_file(path)
    except ValueError as exc:
        raise ConfigError([str(exc)], source=str(path)) from None
    try:
        return parse_config(
            data, root=root, base=base, ephemeral_range=ephemeral_range, root_given=root_given
        )
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=str(path)) from None


def read_ephemeral_range(path: Path | None = None) -> tuple[int, int] | None:
    """The kernel's range for outgoing ports (read from /proc), or None if unreadable."""
    try:
        low, high = (int(word) for word in (path or EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return None
    return (low, high)


# -- parsing -------------------------------------------------------------------------

# Keter 2.3.5 keys keter does not act on, each accepted with one warning saying what
# keter does instead (README, "Differences from Keter").
KETER_IGNORED = {
    "cli-port": "keter has no debug port; the operator's interface is the status API on "
    "ROOT/run/keter.sock (status-listen adds TCP)",
    "port-manager": "keter hands out app ports from port-range",
    "rotate-logs": "keter always rotates app logs (log-max-bytes, log-backups)",
    "app-crash-hook": "keter runs no crash hook; a crash is an ERROR line, a history entry "
    "and the app's state in the status API (Keter 2.3.5 reads this key as its "
    "healthcheck path: use healthcheck-path for that)",
    "reverse-proxy": "keter serves no reverse proxies from keter-config.yaml; put each in a "
    "bundle's reverse-proxy stanza",
}
KETER_ONLY_KEYS = tuple(KETER_IGNORED)
# Keter 0.4's listener keys, read as Keter reads them when there is no listeners key:
# one plain listener (host, port) and, with ssl, a TLS one.
KETER_04_LISTENER_KEYS = ("host", "port", "ssl")
# With `ip-from-header: true`, X-Forwarded-For is believed from these peers:
# loopback and the private ranges load balancers sit in (an AWS ELB, a local proxy).
TRUSTED_PROXIES = (
    "127.0.0.0/8",
    "::1",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
TLS_LISTENER_KEYS = ("key", "certificate", "chain-certificates", "session")
# Keter's (warp's) spellings for "every address of one family": "*4"/"*6", and the
# "!4"/"!6" variants that only differ in what warp prefers on a dual-stack host.
WILDCARD_HOSTS = {"*4": "0.0.0.0", "*6": "::", "!4": "0.0.0.0", "!6": "::"}


def parse_config(
    data: object,
    *,
    root: Path,
    base: Path,
    ephemeral_range: tuple[int, int] | None = None,
    root_given: bool = False,
) -> KeterConfig:
    """Validate a parsed YAML value into a KeterConfig, or raise ConfigError.

    ``root`` is used when the data has no ``root:`` key; ``base`` is the folder
    relative paths are resolved against (the config file's folder).
    ``ephemeral_range`` is the kernel's outgoing port range (None: read it from
    /proc). ``root_given`` means the operator named ROOT on the command line, so
    a ``root:`` key must agree with it. Raises nothing but ConfigError: an
    exception nobody anticipated becomes one naming its type (traceback at debug).
    """
    try:
        return _parse_config(
            data, root=root, base=base, ephemeral_range=ephemeral_range, root_given=root_given
        )
    except ConfigError:
        raise
    except Exception as exc:
        log.debug("internal error while reading %s", CONFIG_NAME, exc_info=True)
        raise ConfigError(
            [f"internal error while reading {CONFIG_NAME}: {type(exc).__name__}"]
        ) from None


def _parse_config(
    data: object,
    *,
    root: Path,
    base: Path,
    ephemeral_range: tuple[int, int] | None,
    root_given: bool,
) -> KeterConfig:
    if data is None:  # an empty or all-comments file: every default
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping of settings, got {describe(data)}"])
    check = Checker()
    root, base = absolute(root), absolute(base)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _FIELDS:
            attr, parser = _FIELDS[key]
            parsed = parser(value, key, check, base)
            if parsed is not None:
                values[attr] = parsed
        elif key == "root":
            given = file_path(value, "root", check, "a folder path")
            if given:
                values["root"] = absolute(base / given)
                if root_given and values["root"] != root:
                    check.problem(
                        "root",
                        f"points to {values['root']}, but keter was started with ROOT {root}; "
                        "remove the key or start keter with the config file instead",
                    )
        elif key in KETER_IGNORED:
            check.warn(key, f"accepted for compatibility with Keter; {KETER_IGNORED[key]}")
        elif key in (*KETER_04_LISTENER_KEYS, "graceful-drain-micros"):
            pass  # read below, with the keys they interact with
        else:
            check.problem(key_name(key), unknown_key(key, _KNOWN_KEYS))
    _keter04_listeners(data, values, check, base)
    _graceful_drain(data, values, check)
    _warn_keter_variables(values, check)
    values.setdefault("root", root)
    _check_ports(values, check, ephemeral_range)
    _check_status_port(values, check)
    _check_dashboard(values, check)
    _check_status_auth(values, check)
    if check.problems:
        raise ConfigError(check.problems)
    return KeterConfig(**values, warnings=tuple(check.warnings))


Parser = Callable[[object, str, Checker, Path], object]


def _parse_listeners(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, list) or not value:
        check.problem(
            path, f'expected a list like [{{host: "*", port: 80}}], got {describe(value)}'
        )
        return None
    before = len(check.problems)
    listeners: list[Listener] = []
    seen: dict[tuple[str, int], str] = {}
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        listener = _parse_listener(entry, where, check, base)
        if listener is None:
            continue
        # nginx binds "*" as 0.0.0.0, so the two would be one socket listed twice.
        key = ("0.0.0.0" if listener.host == "*" else listener.host, listener.port)
        if key in seen:
            check.problem(where, f"{listener.host} port {listener.port} repeats {seen[key]}")
        seen[key] = where
        listeners.append(listener)
    if len(check.problems) > before:
        return None
    if not any(not listener.tls for listener in listeners):
        # keter confirms each nginx reload over plain HTTP on the first such listener.
        check.problem(path, "at least one plain HTTP listener (without a certificate) is needed")
        return None
    return tuple(listeners)


def _parse_listener(entry: object, where: str, check: Checker, base: Path) -> Listener | None:
    """The listener (plain, or TLS with certificate and key), or None after a problem."""
    if not isinstance(entry, dict):
        check.problem(
            where, f'expected a mapping like {{host: "*", port: 80}}, got {describe(entry)}'
        )
        return None
    before = len(check.problems)
    tls = any(key in entry for key in TLS_LISTENER_KEYS if key != "session")
    host, port = "*", 443 if tls else 80  # Keter's defaults
    files: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "host":
            host = _parse_listen_host(value, f"{where}.host", check) or host
        elif key == "port":
            port = integer(value, f"{where}.port", check, 1, 65535) or port
        elif key in ("certificate", "key"):
            files[key] = pem_file(value, f"{where}.{key}", check, base, key)
        elif key == "chain-certificates":
            files["chain"] = pem_files(value, f"{where}.{key}", check, base)
        elif key == "session":
            if not isinstance(value, bool):
                check.problem(f"{where}.session", f"expected true or false, got {describe(value)}")
            files["session"] = value is True
        else:
            known = ("host", "port", *TLS_LISTENER_KEYS)
            check.problem(f"{where}.{key_name(key)}", unknown_key(key, known))
    if tls and ("certificate" not in entry or "key" not in entry):
        check.problem(where, "a TLS listener needs both certificate and key")
    elif "session" in entry and not tls:
        check.problem(f"{where}.session", "only a TLS listener (certificate and key) has sessions")
    if len(check.problems) > before:
        return None
    return Listener(host, port, **files)


def _keter04_listeners(data: dict, values: dict[str, Any], check: Checker, base: Path) -> None:
    """Keter 0.4's ``host``/``port``/``ssl`` as listeners, as Keter reads them.

    Keter reads them only when the config has no ``listeners``; then each is
    ignored with a warning, as Keter ignores it.
    """
    given = [key for key in KETER_04_LISTENER_KEYS if key in data]
    if not given:
        return
    if "listeners" in data:
        for key in given:
            check.warn(key, "Keter 0.4's listener key; ignored because listeners is given")
        return
    before = len(check.problems)
    host = _parse_listen_host(data["host"], "host", check) if "host" in data else "*"
    port = integer(data["port"], "port", check, 1, 65535) if "port" in data else 80
    listeners = [Listener(host or "*", port or 80)]
    if "ssl" in data:
        ssl = data["ssl"]
        if not isinstance(ssl, dict):
            check.problem(
                "ssl",
                f"expected a mapping like {{certificate: ..., key: ...}}, got {describe(ssl)}",
            )
        elif "certificate" not in ssl or "key" not in ssl:
            check.problem("ssl", "needs both certificate and key (Keter 0.4's TLS listener)")
        else:
            listener = _parse_listener(ssl, "ssl", check, base)
            if listener is not None:
                listeners.append(listener)
    if len(check.problems) > before:
        return
    if len(listeners) == 2 and _bind_key(listeners[0]) == _bind_key(listeners[1]):
        check.problem("ssl", f"port {listeners[1].port} is also the plain listener's (port)")
        return
    values["listeners"] = tuple(listeners)


def _bind_key(listener: Listener) -> tuple[str, int]:
    # nginx binds "*" as 0.0.0.0, so the two are one socket.
    return ("0.0.0.0" if listener.host == "*" else listener.host, listener.port)


def _graceful_drain(data: dict, values: dict[str, Any], check: Checker) -> None:
    """Keter's ``graceful-drain-micros`` (how long the old version runs on) sets the drain."""
    if "graceful-drain-micros" not in data:
        return
    micros = data["graceful-drain-micros"]
    if not is_int(micros) or not 0 <= micros <= MAX_SECONDS * 1_000_000:
        check.problem(
            "graceful-drain-micros",
            f"expected a number of microseconds from 0 to {MAX_SECONDS * 1_000_000} (a year), "
            f"got {describe(micros)}",
        )
    elif "drain-seconds" in data:
        check.warn("graceful-drain-micros", "ignored: drain-seconds is given and wins")
    else:
        values["drain_seconds"] = micros / 1_000_000


def _warn_keter_variables(values: dict[str, Any], check: Checker) -> None:
    """The global env cannot set what keter sets for each app (Keter lets a bundle's win)."""
    for name in values.get("env", {}):
        if name in ("PORT", "APPROOT", "KETER_DATA_DIR"):
            check.warn(
                f"env.{name}", f"keter sets {name} for each app itself; this value is ignored"
            )


def _parse_listen_host(value: object, path: str, check: Checker) -> str | None:
    expected = 'expected "*", "*4", "*6", "!4", "!6" or an IP address'
    if not isinstance(value, str):
        check.problem(path, f"{expected}, got {describe(value)}")
        return None
    if value == "*":
        return value
    if value in WILDCARD_HOSTS:
        return WILDCARD_HOSTS[value]
    try:
        return validate_ip(value)  # an IPv6 zone id is refused: nginx takes none
    except ValueError as exc:
        check.problem(path, f"{expected}, got {describe(value)} ({exc})")
        return None


def _parse_nginx(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, dict):
        check.problem(path, f"expected a mapping like {{config-file: ...}}, got {describe(value)}")
        return None
    fields: dict[str, Any] = {}
    keys = ("config-file", "test-command", "reload-command", "resolver", "shared-certificates")
    for key, item in value.items():
        where = f"{path}.{key_name(key)}"
        if key == "config-file":
            text = file_path(item, where, check)
            if text:
                fields["config_file"] = absolute(base / text)
        elif key == "resolver":
            fields["resolver"] = _resolver(item, where, check)
        elif key == "shared-certificates":
            text = string(item, where, check, "a folder path")
            if text:
                fields["shared_certificates"] = absolute(base / text)
        elif key in ("test-command", "reload-command"):
            command = _command(item, where, check)
            if command:
                fields[key.replace("-", "_")] = command
        else:
            check.problem(where, unknown_key(key, keys))
    return NginxSettings(**fields)


def _resolver(value: object, path: str, check: Checker) -> tuple[str, ...] | None:
    """DNS servers for nginx: a list of "IP" or "IP:PORT" (IPv6 as "[IP]:PORT")."""
    if not isinstance(value, list):
        check.problem(path, f'expected a list like ["127.0.0.53"], got {describe(value)}')
        return None
    servers = []
    for i, item in enumerate(value):
        text, port = item if isinstance(item, str) else "", None
        if text.startswith("[") and "]:" in text:
            text, _, port = text[1:].partition("]:")
        elif text.count(":") == 1:
            text, _, port = text.partition(":")
        try:
            address = names.validate_ip(text)
            if port is not None:
                names.validate_port(int(port) if port.isdigit() else port)
        except ValueError as exc:
            check.problem(f"{path}[{i}]", f"expected an IP address with an optional port: {exc}")
            continue
        shown = f"[{address}]" if ":" in address else address
        servers.append(shown if port is None else f"{shown}:{int(port)}")
    return tuple(servers)


def _command(value: object, path: str, check: Checker) -> tuple[str, ...] | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(word, str) and word and is_arg(word) for word in value)
    ):
        return tuple(value)
    expected = "a non-empty list of strings like [nginx, -t]"
    check.problem(path, f"expected {expected}, got {describe(value)}")
    return None


def _parse_port_range(value: object, path: str, check: Checker, base: Path) -> object:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(is_int(port) for port in value)
        and 1024 <= value[0] <= value[1] <= 65535
    ):
        return (value[0], value[1])
    check.problem(
        path, f"expected [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535, got {describe(value)}"
    )
    return None


def _parse_uid_range(value: object, path: str, check: Checker, base: Path) -> object:
    # Above Debian's reserved ids (policy 9.2.2: up to 65535), below 2^31 (signed 32 bits).
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(is_int(uid) for uid in value)
        and 65536 <= value[0] <= value[1] < 2**31
    ):
        return (value[0], value[1])
    check.problem(
        path, f"expected [LOW, HIGH] with 65536 <= LOW <= HIGH < 2^31, got {describe(value)}"
    )
    return None


def _check_ports(
    values: dict[str, object], check: Checker, ephemeral: tuple[int, int] | None
) -> None:
    """Cross-key checks: the app port range must not collide with anything."""
    if "port_range" not in values and any(p.startswith("port-range:") for p in check.problems):
        return  # already reported as malformed
    low, high = values.get("port_range", KeterConfig.port_range)
    shown = f"[{low}, {high}]"
    if ephemeral is None:
        ephemeral = read_ephemeral_range()
    if ephemeral is None:
        check.warn("port-range", f"cannot read {EPHEMERAL_RANGE_FILE}; overlap with it not checked")
    elif low <= ephemeral[1] and ephemeral[0] <= high:
        check.problem(
            "port-range",
            f"{shown} overlaps the kernel's ephemeral port range {ephemeral[0]}-{ephemeral[1]} "
            f"({EPHEMERAL_RANGE_FILE}): apps would race outgoing connections for those ports; "
            "choose a range outside it",
        )
    listeners = values.get("listeners", KeterConfig.listeners)
    for i, listener in enumerate(listeners):
        if low <= listener.port <= high:
            check.problem(
                f"listeners[{i}].port",
                f"{listener.port} is inside port-range {shown}, so keter could give it to an app",
            )


def _seconds(minimum: float, *, inclusive: bool) -> Parser:
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(value: object, path: str, check: Checker, base: Path) -> object:
        # Compared before float(): float() of a 400-digit integer overflows.
        real = number(value, math.inf) if not is_int(value) else value
        if real is None or not (real >= minimum if inclusive else real > minimum):
            check.problem(path, f"expected a number of seconds {bound}, got {describe(value)}")
        elif real > MAX_SECONDS:
            check.problem(path, f"{describe(value)} seconds is more than a year ({MAX_SECONDS})")
        else:
            return float(real)
        return None

    return parse


def _parse_bool(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, bool):
        check.problem(path, f"expected true or false, got {describe(value)}")
        return None
    return value


def _parse_size(value: object, path: str, check: Checker, base: Path) -> object:
    return size(value, path, check)


def _parse_ratio(value: object, path: str, check: Checker, base: Path) -> object:
    real = number(value, math.inf) if not is_int(value) else value
    if real is None or not 0 <= real <= 1:
        check.problem(path, f"expected a ratio from 0 to 1 (0.05 is 5%), got {describe(value)}")
        return None
    return float(real)


def _count(minimum: int, maximum: int = MAX_INT) -> Parser:
    def parse(value: object, path: str, check: Checker, base: Path) -> object:
        if is_int(value) and value > maximum:  # a 400-digit count would overflow later
            check.problem(path, f"{describe(value)} is more than {maximum}")
            return None
        return integer(value, path, check, minimum, None)

    return parse


def _parse_env(value: object, path: str, check: Checker, base: Path) -> object:
    return parse_env(value, path, check)


def _parse_acme(value: object, path: str, check: Checker, base: Path) -> object:
    known = ("directory", "email", "eab", "ca-bundle")
    if not isinstance(value, dict):
        check.problem(path, f"expected a mapping like {{email: ...}}, got {describe(value)}")
        return None
    settings: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{path}.{key_name(key)}"
        if key == "directory":
            if isinstance(item, str) and re.fullmatch(r"https?://[\x21-\x7e]{1,2000}", item):
                settings["directory"] = item
            else:
                check.problem(where, f"expected an http(s) URL, got {describe(item)}")
        elif key == "email":
            if isinstance(item, str) and re.fullmatch(r"[^@\s]{1,200}@[A-Za-z0-9.-]{1,253}", item):
                settings["email"] = item
            else:
                check.problem(where, f"expected an email address, got {describe(item)}")
        elif key == "eab":
            eab = item if isinstance(item, dict) else {}
            kid, hmac = eab.get("kid"), eab.get("hmac-key")
            if set(eab) == {"kid", "hmac-key"} and all(
                isinstance(x, str) and re.fullmatch(r"[A-Za-z0-9_=-]{1,512}", x)
                for x in (kid, hmac)
            ):
                settings["eab_kid"], settings["eab_hmac_key"] = kid, hmac
            else:
                check.problem(where, "expected {kid: ..., hmac-key: ...} (the HMAC key base64url)")
        elif key == "ca-bundle":
            file = pem_file(item, where, check, base)
            if file is not None:
                settings["ca_bundle"] = file
        else:
            check.problem(where, unknown_key(key, known))
    return AcmeSettings(**settings)


def _parse_postgres(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, dict):
        check.problem(path, f'expected a mapping like {{admin-dsn: ""}}, got {describe(value)}')
        return None
    settings: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{path}.{key_name(key)}"
        if key == "admin-dsn":
            dsn = _parse_dsn(item, where, check)
            if dsn is not None:
                settings["admin_dsn"] = dsn
        elif key == "retry-seconds":
            seconds = _seconds(0, inclusive=False)(item, where, check, base)
            if seconds is not None:
                settings["retry_seconds"] = seconds
        else:
            check.problem(where, unknown_key(key, ("admin-dsn", "retry-seconds")))
    return PostgresSettings(**settings)


def _parse_app_limits(value: object, path: str, check: Checker, base: Path) -> object:
    return parse_app_limits(value, path, check)


def _parse_dsn(value: object, path: str, check: Checker) -> str | None:
    if not isinstance(value, str):
        # The value may hold a password: name its type only.
        check.problem(path, f"expected a libpq connection string, got {type_name(value)}")
        return None
    try:
        conninfo_to_dict(value)
    except Exception:  # psycopg.ProgrammingError; its text quotes the value
        check.problem(
            path, "not a valid libpq connection string (value not shown: it may hold a password)"
        )
        return None
    return value


def _parse_ip_from_header(value: object, path: str, check: Checker, base: Path) -> object:
    """``true`` (trust the usual proxy networks), ``false``, or a list of trusted networks."""
    if isinstance(value, bool):
        return TRUSTED_PROXIES if value else ()
    if isinstance(value, list) and value:
        networks = []
        for i, item in enumerate(value):
            try:
                if not isinstance(item, str) or "%" in item:  # no booleans, no IPv6 zone ids
                    raise ValueError(item)
                networks.append(str(ipaddress.ip_network(item)))
            except ValueError:
                check.problem(
                    f"{path}[{i}]", f"expected an address or network, got {describe(item)}"
                )
        return tuple(networks) if len(networks) == len(value) else None
    check.problem(path, f"expected true, false or a list of networks, got {describe(value)}")
    return None


def _parse_port(value: object, path: str, check: Checker, base: Path) -> object:
    return integer(value, path, check, 1, 65535)


def _parse_url_path(value: object, path: str, check: Checker, base: Path) -> object:
    # It goes verbatim into an nginx location: the shared grammar's URL path.
    try:
        return validate_url_path(value)
    except ValueError:
        check.problem(path, f'expected a URL path like "/keter-health", got {describe(value)}')
        return None


def _parse_response_file(value: object, path: str, check: Checker, base: Path) -> object:
    text = file_path(value, path, check)
    if text is None:
        return None
    file = absolute(base / text)
    if not file.is_file():
        check.problem(path, f"{file} is not a file")
        return None
    return file


def _parse_setuid(value: object, path: str, check: Checker, base: Path) -> object:
    """A user name, or (as Keter takes it) a numeric uid, given as the user's name."""
    if is_int(value) or (isinstance(value, str) and value.isascii() and value.isdigit()):
        uid = int(value)
        try:
            return pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            check.problem(path, f"no user with uid {describe(value)} on this machine")
            return None
    name = string(value, path, check, "a user name or uid")
    if name is None:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        check.problem(path, f"no user named {describe(name)} on this machine")
        return None
    return name


SWITCH_MODES = ("auto", "reload")


def _parse_switch(value: object, path: str, check: Checker, base: Path) -> object:
    if value in SWITCH_MODES:
        return value
    check.problem(path, f"expected one of {', '.join(SWITCH_MODES)}, got {describe(value)}")
    return None


def _parse_status_listen(value: object, path: str, check: Checker, base: Path) -> object:
    expected = 'expected "ADDRESS:PORT" like "127.0.0.1:8999" or "[::1]:8999"'
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    try:
        # validate_ip refuses IPv6 zone ids; ip_address gives the version.
        address = ipaddress.ip_address(validate_ip(host.removeprefix("[").removesuffix("]")))
    except ValueError:
        address = None
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    if address is None or not digits or not 1 <= int(port) <= 65535:
        check.problem(path, f"{expected}, got {describe(value)}")
        return None
    if (address.version == 6) != host.startswith("["):
        check.problem(path, f"{expected} (IPv6 addresses in brackets), got {describe(value)}")
        return None
    return (str(address), int(port))


def _parse_status_group(value: object, path: str, check: Checker, base: Path) -> object:
    name = string(value, path, check, "a group name")
    if name is None:
        return None
    try:
        grp.getgrnam(name)
    except KeyError:
        check.problem(path, f"no group named {describe(name)} on this machine")
        return None
    return name


def _parse_dashboard_host(value: object, path: str, check: Checker, base: Path) -> object:
    name = string(value, path, check, "a host name")
    if name is None:
        return None
    try:
        return validate_host(name, wildcard=False)
    except ValueError as exc:
        check.problem(path, f"{exc}, got {describe(name)}")
        return None


def _parse_status_hosts(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, list):
        check.problem(path, f"expected a list of host names, got {describe(value)}")
        return None
    hosts = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        name = string(item, where, check, "a host name or IP address")
        if name is None:
            continue
        try:
            # An address in canonical form (no IPv6 zone id) or one host name, no wildcard.
            hosts.append(validate_upstream_host(name))
        except ValueError as exc:
            check.problem(where, f"{exc}, got {describe(name)}")
    return tuple(hosts)


def _parse_dashboard_users(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, dict) or not value:
        check.problem(path, f"expected a mapping like {{admin: PASSWORD}}, got {describe(value)}")
        return None
    users = []
    for name, password in value.items():
        where = f"{path}.{key_name(name)}"
        if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
            check.problem(where, "expected a user name of letters, digits, '.', '_' or '-'")
        elif not isinstance(password, str) or not password or not is_arg(password):
            # The value is a password: name its type only.
            check.problem(where, f"expected a password (a string), got {type_name(password)}")
        else:
            users.append((name, password))
    return tuple(users)


_USER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_dashboard(values: dict[str, object], check: Checker) -> None:
    """The dashboard at dashboard-host restarts and rolls back apps: never open, never unlisted."""
    if values.get("dashboard_host") is None:
        if values.get("dashboard_users") and values.get("status_listen") is None:
            check.warn("dashboard-users", "has no effect without status-listen or dashboard-host")
        return
    if values.get("status_listen") is None:
        check.problem(
            "dashboard-host",
            'needs status-listen (e.g. "127.0.0.1:8999"): nginx reaches the dashboard over TCP',
        )
    if not values.get("dashboard_users"):
        check.problem(
            "dashboard-host",
            "needs dashboard-users ({user: password}): nginx asks for them (basic auth)",
        )


def _check_status_auth(values: dict[str, object], check: Checker) -> None:
    """The status API beyond loopback needs credentials a person can give (dashboard-users).

    Every request on TCP must authenticate; the token file under ROOT/etc only
    reaches local users, so an address others can reach needs dashboard-users.
    """
    listen = values.get("status_listen")
    if listen is None or values.get("dashboard_users"):
        return
    if not ipaddress.ip_address(listen[0]).is_loopback:
        check.problem(
            "status-listen",
            f"{listen[0]} is not a loopback address, and every request there must log in: "
            "set dashboard-users ({user: password}) or listen on 127.0.0.1",
        )


def _check_status_port(values: dict[str, object], check: Checker) -> None:
    """The status listener must not take a port keter hands to apps."""
    listen = values.get("status_listen")
    low, high = values.get("port_range", KeterConfig.port_range)
    if listen is not None and low <= listen[1] <= high:
        check.problem(
            "status-listen",
            f"port {listen[1]} is inside port-range [{low}, {high}], so keter could give it "
            "to an app",
        )


_FIELDS: dict[str, tuple[str, Parser]] = {
    "listeners": ("listeners", _parse_listeners),
    "nginx": ("nginx", _parse_nginx),
    "port-range": ("port_range", _parse_port_range),
    "health-check-timeout": ("health_check_timeout", _seconds(0, inclusive=False)),
    "drain-seconds": ("drain_seconds", _seconds(0, inclusive=True)),
    "stop-timeout": ("stop_timeout", _seconds(0, inclusive=False)),
    "switch": ("switch", _parse_switch),
    "env": ("env", _parse_env),
    "postgres": ("postgres", _parse_postgres),
    "acme": ("acme", _parse_acme),
    "setuid": ("setuid", _parse_setuid),
    "app-uid-range": ("app_uid_range", _parse_uid_range),
    "run-apps-as-root": ("run_apps_as_root", _parse_bool),
    "app-limits": ("app_limits", _parse_app_limits),
    "log-max-bytes": ("log_max_bytes", _count(1)),
    "log-backups": ("log_backups", _count(0, 1000)),
    "max-unpacked-bytes": ("max_unpacked_bytes", _count(1)),
    "max-members": ("max_members", _count(1)),
    "ip-from-header": ("ip_from_header", _parse_ip_from_header),
    "external-http-port": ("external_http_port", _parse_port),
    "external-https-port": ("external_https_port", _parse_port),
    "healthcheck-path": ("healthcheck_path", _parse_url_path),
    "unknown-host-response-file": ("unknown_host_response_file", _parse_response_file),
    "missing-host-response-file": ("missing_host_response_file", _parse_response_file),
    "proxy-exception-response-file": ("proxy_exception_response_file", _parse_response_file),
    "connection-time-bound": ("connection_time_bound", _count(0, MAX_SECONDS * 1000)),
    "status-listen": ("status_listen", _parse_status_listen),
    "status-group": ("status_group", _parse_status_group),
    "archive-keep": ("archive_keep", _count(1, 1000)),
    "dashboard-host": ("dashboard_host", _parse_dashboard_host),
    "dashboard-users": ("dashboard_users", _parse_dashboard_users),
    "status-hosts": ("status_hosts", _parse_status_hosts),
    "traffic-stats": ("traffic_stats", _parse_bool),
    "client-max-body-size": ("client_max_body_size", _parse_size),
    "gzip": ("gzip", _parse_bool),
    "hsts-max-age": ("hsts_max_age", _count(0, 10 * 365 * 24 * 3600)),
    "watch-seconds": ("watch_seconds", _seconds(0, inclusive=True)),
    "watch-max-error-ratio": ("watch_max_error_ratio", _parse_ratio),
    "watch-min-requests": ("watch_min_requests", _count(1, 1_000_000_000)),
    "backup-keep": ("backup_keep", _count(1, 1000)),
    "backup-required": ("backup_required", _parse_bool),
    "backup-timeout": ("backup_timeout", _seconds(0, inclusive=False)),
}
_KNOWN_KEYS = (*_FIELDS, "root", *KETER_ONLY_KEYS, *KETER_04_LISTENER_KEYS, "graceful-drain-micros")
