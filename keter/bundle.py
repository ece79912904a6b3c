"""A bundle's own config, ``config/keter.yaml``, and the names bundles may use.

Both of Keter's formats are read into one model, ``BundleConfig``:

* the flat format of Keter 0.4 (``exec``, ``args``, ``host``, ``extra-hosts``,
  ``static-hosts``, ``redirects``, ``ssl``, ``postgres``), and
* the ``stanzas:`` list of Keter 1.0 and later, with the stanza types
  ``webapp``, ``background``, ``static-files``, ``redirect`` and
  ``reverse-proxy``, plus ``plugins: {postgres: true}``.

A flat config means what Keter 0.4 meant: its ``static-hosts`` list folders
(``directory-listing: true``) and its ``redirects`` send every path to the
other host with a 301.

Everything a bundle says is untrusted: host names, URLs and header values end
up in the nginx config, paths are served or run, so all of them are checked
tightly here. Problems are collected so the uploader sees all of them in one
log line, each with its key path (``stanzas[2].root``); Keter features that
nginx cannot provide (most middleware) are warnings and are skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from keter import names
from keter.config import (
    Checker,
    describe,
    key_name,
    parse_env,
    pem_file,
    pem_files,
    read_yaml_file,
    type_name,
    unknown_key,
)
from keter.names import validate_app_name

__all__ = ["validate_app_name"]  # re-exported: the watcher, commands and status use it

CONFIG_NAMES = ("keter.yaml", "keter.yml")
MAX_CONFIG_BYTES = 1 << 20
KETER_RESTART_DELAY = 5.0  # Keter's default restart-delay-seconds
KETER_REALM = "keter"  # Keter's default basic-auth realm
KETER_LOCAL_STATUS = 401  # Keter's defaults for the local middleware
KETER_LOCAL_MESSAGE = "Unauthorized Accessing from Localhost ONLY"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class BundleConfigError(Exception):
    """The bundle's config is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# -- the model -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """A stanza's own certificate (``ssl: {certificate, key, chain-certificates}``)."""

    certificate: Path  # absolute; checked to hold a PEM certificate
    key: Path  # absolute; checked to hold a PEM private key
    chain: tuple[Path, ...] = ()


# ``ssl``: False (HTTP only), True (HTTPS with the TLS listener's certificate),
# or the stanza's own certificate.
Ssl = bool | TlsConfig


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


Middleware = BasicAuthConfig | HeadersConfig | LocalConfig


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


@dataclass(frozen=True, kw_only=True)
class Background:
    """A process without a port (a queue worker); restarted when it exits."""

    exec: Path
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    forward_env: tuple[str, ...] = ()
    restart_count: int | None = None  # restarts allowed; None = unlimited
    restart_delay: float = KETER_RESTART_DELAY  # seconds


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
    requires_secure: bool = False
    ssl: Ssl = False
    middleware: tuple[Middleware, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    """A validated bundle config."""

    app: str
    webapp: WebApp | None
    postgres: bool = False
    warnings: tuple[str, ...] = ()
    backgrounds: tuple[Background, ...] = ()
    static_files: tuple[StaticFiles, ...] = ()
    redirects: tuple[Redirect, ...] = ()
    reverse_proxies: tuple[ReverseProxy, ...] = ()

    @property
    def all_hosts(self) -> tuple[str, ...]:
        """Every host any stanza claims (no two stanzas share one)."""
        hosts = list(self.webapp.hosts) if self.webapp else []
        for stanza in (*self.static_files, *self.redirects, *self.reverse_proxies):
            hosts.extend(stanza.hosts)
        return tuple(hosts)

    @property
    def serves_http(self) -> bool:
        """Whether nginx routes anything for this bundle."""
        return bool(self.all_hosts)

    @property
    def runs_something(self) -> bool:
        return self.webapp is not None or bool(self.backgrounds)


# -- names ---------------------------------------------------------------------------


def validate_host(host: object) -> str:
    """``keter.names.validate_host``, with ``*`` only as the leading label for now.

    Wildcards elsewhere (``foo.*.example.com``) are accepted once the nginx
    renderer writes them as regex server names (``keter.names.nginx_server_name``).
    """
    name = names.validate_host(host)
    if names.WILDCARD in name.split(".")[1:]:
        raise ValueError(
            "a wildcard is only allowed as the leading label, as in *.example.com, for now"
        )
    return name


# -- reading config/keter.yaml -------------------------------------------------------


def parse_bundle_config(folder: Path, app: str) -> BundleConfig:
    """Read and validate ``folder/config/keter.yaml`` (or ``.yml``) of an unpacked bundle."""
    folder = Path(folder)
    config_dir = folder / "config"
    found = [config_dir / name for name in CONFIG_NAMES if (config_dir / name).exists()]
    if not found:
        raise BundleConfigError(["missing config/keter.yaml"])
    if len(found) > 1:
        raise BundleConfigError(
            ["both config/keter.yaml and config/keter.yml exist; keep only one"]
        )
    path = found[0]
    shown = f"config/{path.name}"
    problem = _config_file_problem(path, folder)
    if problem:
        raise BundleConfigError([f"{shown}: {problem}"])
    try:
        data = read_yaml_file(path, MAX_CONFIG_BYTES)
    except ValueError as exc:
        raise BundleConfigError([f"{shown}: {exc}"]) from None
    return parse_bundle_data(data, folder=folder, config_dir=config_dir, app=app)


def _config_file_problem(path: Path, folder: Path) -> str | None:
    """Why the config file must not be read, if it must not."""
    # A symlink out of the bundle could make keter read (and quote in errors)
    # any file on the machine.
    if not _inside(path, folder):
        return "is a link to a file outside the bundle"
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size > MAX_CONFIG_BYTES:
        return f"is {info.st_size} bytes; at most {MAX_CONFIG_BYTES} are allowed"
    return None


def parse_bundle_data(data: object, *, folder: Path, config_dir: Path, app: str) -> BundleConfig:
    """Validate a parsed ``config/keter.yaml`` value; raises BundleConfigError.

    ``folder`` is the unpacked bundle and ``config_dir`` the folder relative
    paths (``exec``, ``root``, certificates) are resolved against. File system
    access: checking the executables, static roots and certificate files.
    """
    if not isinstance(data, dict):
        expected = "a mapping with keys like exec and host"
        raise BundleConfigError([f"config/keter.yaml: expected {expected}, got {describe(data)}"])
    parser = _Parser(Path(folder), Path(config_dir))
    parse = parser.stanza_format if "stanzas" in data else parser.flat_format
    config = parse(data, app)
    if parser.check.problems:
        raise BundleConfigError(parser.check.problems)
    return config


# Keter 0.4's flat keys: the web app's, the bundle's, and the 0.4 extras.
WEBAPP_KEYS = ("exec", "args", "host", "hosts", "extra-hosts", "env", "health-check-path")
BUNDLE_KEYS = ("postgres", "plugins")
FLAT_EXTRA_KEYS = ("static-hosts", "redirects", "ssl")
FLAT_KEYS = (*WEBAPP_KEYS, *BUNDLE_KEYS, *FLAT_EXTRA_KEYS)

# Keys every stanza may carry besides its own.
COMMON_STANZA_KEYS = ("type", "requires-secure")
STANZA_KEYS = {
    "webapp": (
        "exec", "args", "env", "forward-env", "host", "hosts", "ssl", "port-env-vars",
        "ensure-alive-time-bound", "connection-time-bound", "health-check-path", "middleware",
    ),
    "background": (
        "exec", "args", "env", "forward-env", "restart-count", "restart-delay-seconds",
    ),
    "static-files": (
        "root", "host", "hosts", "directory-listing", "ssl", "middleware",
        "connection-time-bound",
    ),
    "redirect": ("host", "hosts", "status", "actions", "ssl"),
    "reverse-proxy": (
        "reversed-host", "reversed-port", "reversed-ssl", "reversing-host", "preserve-host",
        "timeout", "ssl", "middleware", "connection-time-bound", "rewrite-request",
        "rewrite-response",
    ),
}  # fmt: skip
# Keter middleware nginx has no equivalent for here: warned about and skipped.
SKIPPED_MIDDLEWARE = (
    "accept-override",
    "autohead",
    "jsonp",
    "method-override",
    "method-override-post",
    "rate-limiter",
)
_SUPPORTED_MIDDLEWARE = ("basic-auth", "headers", "local")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Printable ASCII: header values, realms and URLs go into the nginx config
# (quoted and escaped) and into HTTP headers, where control characters split lines.
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
# A request path for an exact match: no quotes, spaces, braces, ';' or '$',
# which would end or change an nginx location.
_REDIRECT_PATH = re.compile(r"/[A-Za-z0-9._~!&()*+,=:@%/-]{0,1023}")
_URL = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:|/)[\x21-\x7e]{0,2047}")


class _Parser:
    """One parse of one bundle config: where files are, and the problems found."""

    def __init__(self, folder: Path, config_dir: Path) -> None:
        self.folder = folder
        self.config_dir = config_dir
        self.check = Checker()

    # -- the two formats -----------------------------------------------------------

    def flat_format(self, data: dict, app: str) -> BundleConfig:
        check = self.check
        for key in data:
            if key not in FLAT_KEYS:
                check.warn(key_name(key), unknown_key(key, FLAT_KEYS) + "; ignored")
        webapp_data = {key: data[key] for key in (*WEBAPP_KEYS, "ssl") if key in data}
        webapp = self.webapp(webapp_data, "", flat=True)
        statics = self.static_hosts(data["static-hosts"]) if "static-hosts" in data else []
        redirects = self.old_redirects(data["redirects"]) if "redirects" in data else []
        self.check_shared_hosts([("", webapp), *statics, *redirects])
        if webapp is None and not statics and not redirects and not check.problems:
            check.warn("exec", "missing, so this bundle runs no web app")
        config = BundleConfig(
            app=app,
            webapp=webapp,
            postgres=_parse_postgres(data, check),
            static_files=tuple(stanza for _, stanza in statics),
            redirects=tuple(stanza for _, stanza in redirects),
        )
        return self.finish(config)

    def stanza_format(self, data: dict, app: str) -> BundleConfig:
        check = self.check
        for key in data:
            if key not in ("stanzas", *BUNDLE_KEYS):
                known = ("stanzas", *BUNDLE_KEYS)
                check.warn(key_name(key), unknown_key(key, known) + "; ignored")
        stanzas = data["stanzas"]
        if not isinstance(stanzas, list) or not stanzas:
            check.problem(
                "stanzas",
                f"expected a list of stanzas like [{{type: webapp}}], got {describe(stanzas)}",
            )
            stanzas = []
        parsed: dict[str, list] = {kind: [] for kind in STANZA_KEYS}
        webapp_at: str | None = None
        for i, stanza in enumerate(stanzas):
            prefix = f"stanzas[{i}]."
            kind = self.stanza_type(stanza, f"stanzas[{i}]")
            if kind is None:
                continue
            for key in stanza:
                if key not in (*COMMON_STANZA_KEYS, *STANZA_KEYS[kind]):
                    known = (*COMMON_STANZA_KEYS, *STANZA_KEYS[kind])
                    check.warn(f"{prefix}{key_name(key)}", unknown_key(key, known) + "; ignored")
            if kind == "webapp" and webapp_at is not None:
                check.problem(
                    f"stanzas[{i}]",
                    f"a second webapp stanza ({webapp_at} is the first); "
                    "keter runs one web app per bundle, so split it into two bundles",
                )
                continue
            if kind == "webapp":
                webapp_at = f"stanzas[{i}]"
            result = self.stanza(kind, stanza, prefix)
            if result is not None:
                parsed[kind].append((prefix, result))
        config = BundleConfig(
            app=app,
            webapp=parsed["webapp"][0][1] if parsed["webapp"] else None,
            postgres=_parse_postgres(data, check),
            backgrounds=tuple(item for _, item in parsed["background"]),
            static_files=tuple(item for _, item in parsed["static-files"]),
            redirects=tuple(item for _, item in parsed["redirect"]),
            reverse_proxies=tuple(item for _, item in parsed["reverse-proxy"]),
        )
        self.check_shared_hosts([entry for entries in parsed.values() for entry in entries])
        return self.finish(config)

    def finish(self, config: BundleConfig) -> BundleConfig:
        return dataclasses.replace(config, warnings=tuple(self.check.warnings))

    def stanza_type(self, stanza: object, where: str) -> str | None:
        if not isinstance(stanza, dict):
            self.check.problem(where, f"expected a mapping with a type, got {describe(stanza)}")
            return None
        kind = stanza.get("type")
        if isinstance(kind, str) and kind in STANZA_KEYS:
            return kind
        if kind is None:
            self.check.problem(f"{where}.type", f"missing; one of {', '.join(STANZA_KEYS)}")
        elif isinstance(kind, str):
            hint = unknown_key(kind, tuple(STANZA_KEYS)).removeprefix("unknown key")
            self.check.problem(f"{where}.type", f"unknown stanza type {describe(kind)}{hint}")
        else:
            self.check.problem(
                f"{where}.type", f"expected one of {', '.join(STANZA_KEYS)}, got {describe(kind)}"
            )
        return None

    def stanza(self, kind: str, data: dict, prefix: str) -> object:
        match kind:
            case "webapp":
                return self.webapp(data, prefix, flat=False)
            case "background":
                return self.background(data, prefix)
            case "static-files":
                return self.static_files(data, prefix)
            case "redirect":
                return self.redirect(data, prefix)
            case _:
                return self.reverse_proxy(data, prefix)

    def check_shared_hosts(self, stanzas: list[tuple[str, object]]) -> None:
        """No host may belong to two stanzas: nginx could route it to only one."""
        owners: dict[str, str] = {}
        for prefix, stanza in stanzas:
            where = prefix.rstrip(".") or "host"
            for host in getattr(stanza, "hosts", ()):
                first = owners.setdefault(host, where)
                if first != where:
                    self.check.problem(where, f"host {host} is already claimed by {first}")

    # -- stanzas ---------------------------------------------------------------------

    def webapp(self, data: dict, prefix: str, *, flat: bool) -> WebApp | None:
        """The web-app keys of ``data``; ``prefix`` ("" or "stanzas[0].") starts key paths."""
        check = self.check
        if "exec" not in data:
            present = [key for key in data if key in WEBAPP_KEYS]
            if not flat:
                check.problem(f"{prefix}exec", "missing; a webapp stanza needs the program to run")
            elif present:
                check.problem(
                    f"{prefix}exec", f"missing, but {', '.join(present)} given for a web app"
                )
            return None
        before = len(check.problems)
        host_keys = ("host", "hosts", "extra-hosts") if flat else ("host", "hosts")
        webapp = WebApp(
            exec=self.exec(data["exec"], f"{prefix}exec") or Path(),
            args=self.args(data.get("args", []), f"{prefix}args"),
            hosts=self.hosts(data, prefix, host_keys),
            env=parse_env(data.get("env", {}), f"{prefix}env", check) or MappingProxyType({}),
            health_check_path=_parse_health_path(
                data.get("health-check-path"), f"{prefix}health-check-path", check
            ),
            forward_env=self.names(data.get("forward-env", []), f"{prefix}forward-env"),
            port_env_vars=self.names(data.get("port-env-vars", []), f"{prefix}port-env-vars"),
            ssl=self.ssl(data.get("ssl", False), f"{prefix}ssl"),
            requires_secure=self.flag(data, "requires-secure", prefix),
            ensure_alive=self.microseconds(
                data.get("ensure-alive-time-bound"), f"{prefix}ensure-alive-time-bound"
            ),
            time_bound=self.time_bound(data, prefix),
            middleware=self.middleware(data.get("middleware"), f"{prefix}middleware"),
        )
        return webapp if len(check.problems) == before else None

    def background(self, data: dict, prefix: str) -> Background | None:
        check = self.check
        if "exec" not in data:
            check.problem(f"{prefix}exec", "missing; a background stanza needs the program to run")
            return None
        before = len(check.problems)
        worker = Background(
            exec=self.exec(data["exec"], f"{prefix}exec") or Path(),
            args=self.args(data.get("args", []), f"{prefix}args"),
            env=parse_env(data.get("env", {}), f"{prefix}env", check) or MappingProxyType({}),
            forward_env=self.names(data.get("forward-env", []), f"{prefix}forward-env"),
            restart_count=self.restart_count(data.get("restart-count", "unlimited"), prefix),
            restart_delay=self.seconds(
                data.get("restart-delay-seconds", KETER_RESTART_DELAY),
                f"{prefix}restart-delay-seconds",
            ),
        )
        return worker if len(check.problems) == before else None

    def static_files(self, data: dict, prefix: str, listing: bool = False) -> StaticFiles | None:
        check = self.check
        before = len(check.problems)
        if "connection-time-bound" in data:
            check.warn(
                f"{prefix}connection-time-bound", "has no effect on files nginx serves; ignored"
            )
        root = None
        if "root" not in data:
            check.problem(f"{prefix}root", "missing; the bundle folder to serve")
        else:
            root = self.root(data["root"], f"{prefix}root")
        stanza = StaticFiles(
            root=root or Path(),
            hosts=self.hosts(data, prefix, ("host", "hosts")),
            directory_listing=self.flag(data, "directory-listing", prefix, listing),
            requires_secure=self.flag(data, "requires-secure", prefix),
            ssl=self.ssl(data.get("ssl", False), f"{prefix}ssl"),
            middleware=self.middleware(data.get("middleware"), f"{prefix}middleware"),
        )
        return stanza if len(check.problems) == before else None

    def redirect(self, data: dict, prefix: str) -> Redirect | None:
        check = self.check
        before = len(check.problems)
        status = data.get("status", 303)
        if status not in REDIRECT_STATUSES or isinstance(status, bool):
            shown = ", ".join(map(str, REDIRECT_STATUSES))
            check.problem(f"{prefix}status", f"expected one of {shown}, got {describe(status)}")
        actions = data.get("actions")
        parsed: list[RedirectAction] = []
        if not isinstance(actions, list) or not actions:
            check.problem(
                f"{prefix}actions",
                f"expected a list like [{{host: example.com}}], got {describe(actions)}",
            )
        else:
            for i, item in enumerate(actions):
                action = self.redirect_action(item, f"{prefix}actions[{i}]")
                if action is not None:
                    parsed.append(action)
        stanza = Redirect(
            hosts=self.hosts(data, prefix, ("host", "hosts")),
            status=status if isinstance(status, int) else 303,
            actions=tuple(parsed),
            requires_secure=self.flag(data, "requires-secure", prefix),
            ssl=self.ssl(data.get("ssl", False), f"{prefix}ssl"),
        )
        return stanza if len(check.problems) == before else None

    def redirect_action(self, item: object, where: str) -> RedirectAction | None:
        check = self.check
        if not isinstance(item, dict):
            check.problem(
                where, f"expected a mapping like {{host: example.com}}, got {describe(item)}"
            )
            return None
        before = len(check.problems)
        known = ("path", "url", "host", "secure", "port")
        for key in item:
            if key not in known:
                check.problem(f"{where}.{key_name(key)}", unknown_key(key, known))
        path = item.get("path")
        if path is not None and not (isinstance(path, str) and _REDIRECT_PATH.fullmatch(path)):
            check.problem(
                f"{where}.path", f'expected a URL path starting with "/", got {describe(path)}'
            )
        url, host, port = item.get("url"), item.get("host"), item.get("port")
        if url is not None and host is not None:
            check.problem(where, "give url or host, not both")
        elif url is not None:
            if not (isinstance(url, str) and _URL.fullmatch(url)):
                check.problem(
                    f"{where}.url",
                    f"expected an absolute URL without spaces or quotes, got {describe(url)}",
                )
            elif '"' in url or "\\" in url:
                check.problem(
                    f"{where}.url", f"percent-encode quotes and backslashes in {describe(url)}"
                )
        elif host is not None:
            host = self.host(host, f"{where}.host", wildcard=False)
        else:
            check.problem(where, "missing url or host: where to redirect to")
        if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
            check.problem(f"{where}.port", f"expected an integer 1-65535, got {describe(port)}")
        secure = self.flag(item, "secure", f"{where}.")
        if len(check.problems) > before:
            return None
        return RedirectAction(path=path, url=url, host=host, secure=secure, port=port)

    def reverse_proxy(self, data: dict, prefix: str) -> ReverseProxy | None:
        check = self.check
        before = len(check.problems)
        for key in ("rewrite-request", "rewrite-response"):
            if key in data:
                check.warn(f"{prefix}{key}", "header rewriting is not supported; skipped")
        reversed_host = self.upstream_host(data.get("reversed-host"), f"{prefix}reversed-host")
        port = data.get("reversed-port")
        if not _is_int(port) or not 1 <= port <= 65535:
            check.problem(
                f"{prefix}reversed-port", f"expected an integer 1-65535, got {describe(port)}"
            )
        hosts: tuple[str, ...] = ()
        if "reversing-host" not in data:
            check.problem(f"{prefix}reversing-host", "missing; the host this proxy answers for")
        else:
            host = self.host(data["reversing-host"], f"{prefix}reversing-host")
            hosts = (host,) if host else ()
        timeout = self.microseconds(data.get("timeout"), f"{prefix}timeout")
        stanza = ReverseProxy(
            hosts=hosts,
            reversed_host=reversed_host or "",
            reversed_port=port if _is_int(port) else 0,
            reversed_ssl=self.flag(data, "reversed-ssl", prefix),
            preserve_host=self.flag(data, "preserve-host", prefix),
            timeout=timeout if timeout is not None else self.time_bound(data, prefix),
            requires_secure=self.flag(data, "requires-secure", prefix),
            ssl=self.ssl(data.get("ssl", False), f"{prefix}ssl"),
            middleware=self.middleware(data.get("middleware"), f"{prefix}middleware"),
        )
        return stanza if len(check.problems) == before else None

    # -- Keter 0.4's extras ------------------------------------------------------------

    def static_hosts(self, value: object) -> list[tuple[str, StaticFiles]]:
        """``static-hosts: [{host, root}]``: Keter 0.4 listed their folders."""
        if not isinstance(value, list):
            self.check.problem(
                "static-hosts",
                f"expected a list like [{{host: h, root: ..}}], got {describe(value)}",
            )
            return []
        found = []
        for i, item in enumerate(value):
            where = f"static-hosts[{i}]"
            if not isinstance(item, dict):
                self.check.problem(
                    where, f"expected a mapping with host and root, got {describe(item)}"
                )
                continue
            for key in item:
                if key not in ("host", "root"):
                    self.check.problem(
                        f"{where}.{key_name(key)}", unknown_key(key, ("host", "root"))
                    )
            stanza = self.static_files(item, f"{where}.", listing=True)
            if stanza is not None:
                found.append((f"{where}.", stanza))
        return found

    def old_redirects(self, value: object) -> list[tuple[str, Redirect]]:
        """``redirects: [{from, to}]``: every path of ``from`` to ``to``, with a 301."""
        if not isinstance(value, list):
            self.check.problem(
                "redirects", f"expected a list like [{{from: a, to: b}}], got {describe(value)}"
            )
            return []
        found = []
        for i, item in enumerate(value):
            where = f"redirects[{i}]"
            if not isinstance(item, dict) or set(item) != {"from", "to"}:
                self.check.problem(
                    where, f"expected a mapping with from and to, got {describe(item)}"
                )
                continue
            source = self.host(item["from"], f"{where}.from")
            target = self.host(item["to"], f"{where}.to", wildcard=False)
            if source and target:
                action = RedirectAction(host=target)
                found.append(
                    (f"{where}.", Redirect(hosts=(source,), status=301, actions=(action,)))
                )
        return found

    # -- values ------------------------------------------------------------------------

    def exec(self, value: object, path: str) -> Path | None:
        return _parse_exec(value, path, self.check, self.folder, self.config_dir)

    def args(self, value: object, path: str) -> tuple[str, ...]:
        return _parse_args(value, path, self.check) or ()

    def hosts(self, data: dict, prefix: str, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _parse_hosts(data, prefix, self.check, keys)

    def host(self, value: object, path: str, *, wildcard: bool = True) -> str | None:
        if not isinstance(value, str):
            self.check.problem(path, f"expected a host name, got {describe(value)}")
            return None
        try:
            host = validate_host(value)
        except ValueError as exc:
            self.check.problem(path, f"{describe(value)} is not a valid host name: {exc}")
            return None
        if not wildcard and host.startswith("*."):
            self.check.problem(
                path, f"expected one host name, not a wildcard, got {describe(value)}"
            )
            return None
        return host

    def upstream_host(self, value: object, path: str) -> str | None:
        """A host name or an IP address (no IPv6 zone id) to connect to."""
        if value is None:
            self.check.problem(path, "missing; the server to pass requests to")
            return None
        try:
            return names.validate_upstream_host(value)
        except ValueError as exc:
            self.check.problem(path, f"{describe(value)} is not a valid host name: {exc}")
            return None

    def names(self, value: object, path: str) -> tuple[str, ...]:
        """A list of environment variable names (``forward-env``, ``port-env-vars``)."""
        if not isinstance(value, list):
            self.check.problem(path, f"expected a list of variable names, got {describe(value)}")
            return ()
        names = []
        for i, item in enumerate(value):
            if isinstance(item, str) and _ENV_NAME.fullmatch(item):
                names.append(item)
            else:
                self.check.problem(
                    f"{path}[{i}]",
                    f"expected a variable name of letters, digits and _, got {describe(item)}",
                )
        return tuple(dict.fromkeys(names))

    def flag(self, data: dict, key: str, prefix: str, default: bool = False) -> bool:
        value = data.get(key, default)
        if isinstance(value, bool):
            return value
        self.check.problem(f"{prefix}{key}", f"expected true or false, got {describe(value)}")
        return default

    def microseconds(self, value: object, path: str) -> float | None:
        """Keter's microsecond durations, as seconds."""
        if value is None:
            return None
        if _is_int(value) and value > 0:
            return value / 1_000_000
        self.check.problem(
            path, f"expected a positive number of microseconds, got {describe(value)}"
        )
        return None

    def time_bound(self, data: dict, prefix: str) -> float | None:
        """``connection-time-bound`` (milliseconds, 0 = unbounded) as seconds."""
        value = data.get("connection-time-bound")
        if value is None:
            return None
        if _is_int(value) and value >= 0:
            return value / 1000
        self.check.problem(
            f"{prefix}connection-time-bound",
            f"expected a number of milliseconds >= 0, got {describe(value)}",
        )
        return None

    def seconds(self, value: object, path: str) -> float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and value >= 0:
            return float(value)
        self.check.problem(path, f"expected a number of seconds >= 0, got {describe(value)}")
        return KETER_RESTART_DELAY

    def restart_count(self, value: object, prefix: str) -> int | None:
        if value == "unlimited":
            return None
        if _is_int(value) and value >= 0:
            return value
        self.check.problem(
            f"{prefix}restart-count",
            f'expected a number of restarts or "unlimited", got {describe(value)}',
        )
        return None

    def root(self, value: object, path: str) -> Path | None:
        """A static root: a folder inside the bundle, with symlinks resolved."""
        if not isinstance(value, str) or not value or "\0" in value:
            self.check.problem(path, f"expected a folder path, got {describe(value)}")
            return None
        shown = describe(value)
        try:
            target = (self.config_dir / value).resolve()
        except (OSError, RuntimeError):
            self.check.problem(path, f"{shown} cannot be resolved (symlink loop?)")
            return None
        if not _inside(target, self.folder):
            self.check.problem(
                path, f"{shown} escapes the bundle folder; static files must come from the bundle"
            )
            return None
        if not target.is_dir():
            self.check.problem(path, f"{shown} is not a folder in the bundle")
            return None
        return target

    def ssl(self, value: object, path: str) -> Ssl:
        if isinstance(value, bool):
            return value
        if not isinstance(value, dict):
            self.check.problem(
                path,
                f"expected true, false or {{certificate: ..., key: ...}}, got {describe(value)}",
            )
            return False
        known = ("certificate", "key", "chain-certificates")
        for key in value:
            if key not in known:
                self.check.problem(f"{path}.{key_name(key)}", unknown_key(key, known))
        missing = [key for key in ("certificate", "key") if key not in value]
        if missing:
            self.check.problem(path, f"missing {' and '.join(missing)}")
            return False
        before = len(self.check.problems)
        certificate = pem_file(
            value["certificate"], f"{path}.certificate", self.check, self.config_dir
        )
        key = pem_file(value["key"], f"{path}.key", self.check, self.config_dir, "key")
        chain = pem_files(
            value.get("chain-certificates", []),
            f"{path}.chain-certificates",
            self.check,
            self.config_dir,
        )
        if len(self.check.problems) > before or certificate is None or key is None:
            return False
        return TlsConfig(certificate=certificate, key=key, chain=chain or ())

    # -- middleware --------------------------------------------------------------------

    def middleware(self, value: object, path: str) -> tuple[Middleware, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.check.problem(path, f"expected a list of middleware, got {describe(value)}")
            return ()
        found: list[Middleware] = []
        for i, item in enumerate(value):
            where = f"{path}[{i}]"
            name, body = item, None
            if isinstance(item, dict) and len(item) == 1:
                [(name, body)] = item.items()
            if name in SKIPPED_MIDDLEWARE:
                self.check.warn(where, f"{name} has no nginx equivalent in keter; skipped")
            elif name in _SUPPORTED_MIDDLEWARE and isinstance(item, dict):
                parse = {"basic-auth": self.basic_auth, "headers": self.add_headers}.get(
                    name, self.local
                )
                found.extend(parse(body, f"{where}.{name}"))
            elif isinstance(name, str):
                # Refused rather than skipped: a misspelt basic-auth would publish
                # what it was meant to protect.
                known = (*_SUPPORTED_MIDDLEWARE, *SKIPPED_MIDDLEWARE)
                hint = unknown_key(name, known).removeprefix("unknown key")
                self.check.problem(where, f"unknown middleware {describe(name)}{hint}")
            else:
                self.check.problem(
                    where, f"expected a middleware name or a one-key mapping, got {describe(item)}"
                )
        return tuple(found)

    def basic_auth(self, body: object, path: str) -> list[Middleware]:
        body = {} if body is None else body
        if not isinstance(body, dict):
            self.check.problem(
                path, f"expected a mapping with realm and creds, got {type_name(body)}"
            )
            return []
        for key in body:
            if key not in ("realm", "creds"):
                self.check.problem(f"{path}.{key_name(key)}", unknown_key(key, ("realm", "creds")))
        realm = body.get("realm", KETER_REALM)
        if not (isinstance(realm, str) and _PRINTABLE.fullmatch(realm)):
            self.check.problem(f"{path}.realm", f"expected printable text, got {describe(realm)}")
        creds = body.get("creds") or {}
        if not isinstance(creds, dict):
            self.check.problem(
                f"{path}.creds", f"expected a mapping of user: password, got {type_name(creds)}"
            )
            return []
        pairs = []
        for user, password in creds.items():
            where = f"{path}.creds.{key_name(user)}"
            # htpasswd lines are "user:hash": no colon in a name, no line breaks anywhere.
            if not (isinstance(user, str) and re.fullmatch(r"[\x21-\x39\x3b-\x7e]{1,255}", user)):
                self.check.problem(
                    where, "expected a user name of printable characters without ':'"
                )
            elif isinstance(password, bool) or not isinstance(password, str | int | float):
                self.check.problem(where, f"expected a password string, got {type_name(password)}")
            elif not str(password) or re.search(r"[\x00-\x1f\x7f]", str(password)):
                # The password itself is never shown.
                self.check.problem(where, "the password is empty or has control characters")
            else:
                pairs.append((user, str(password)))
        if not creds:
            self.check.warn(path, "no creds, so nobody can get through")
        return [BasicAuthConfig(realm=realm, credentials=tuple(pairs))]

    def add_headers(self, body: object, path: str) -> list[Middleware]:
        if not isinstance(body, dict) or not body:
            self.check.problem(
                path, f"expected a mapping of Header-Name: value, got {describe(body)}"
            )
            return []
        headers = []
        for name, value in body.items():
            where = f"{path}.{key_name(name)}"
            if not (isinstance(name, str) and _HEADER_NAME.fullmatch(name)):
                self.check.problem(where, "expected a header name of letters, digits and '-'")
            elif isinstance(value, bool) or not isinstance(value, str | int | float):
                self.check.problem(where, f"expected a header value, got {type_name(value)}")
            elif not _PRINTABLE.fullmatch(str(value)):
                self.check.problem(where, f"expected printable ASCII, got {describe(value)}")
            else:
                headers.append((name, str(value)))
        return [HeadersConfig(headers=tuple(headers))]

    def local(self, body: object, path: str) -> list[Middleware]:
        body = {} if body is None else body
        if not isinstance(body, dict):
            self.check.problem(
                path, f"expected a mapping with status and message, got {describe(body)}"
            )
            return []
        for key in body:
            if key not in ("status", "message"):
                self.check.problem(
                    f"{path}.{key_name(key)}", unknown_key(key, ("status", "message"))
                )
        status = body.get("status", KETER_LOCAL_STATUS)
        message = body.get("message", KETER_LOCAL_MESSAGE)
        if not _is_int(status) or not 200 <= status <= 599:
            self.check.problem(
                f"{path}.status", f"expected an HTTP status 200-599, got {describe(status)}"
            )
            return []
        if not isinstance(message, str) or not message.isprintable():
            self.check.problem(
                f"{path}.message", f"expected printable text, got {describe(message)}"
            )
            return []
        return [LocalConfig(status=status, message=message)]


def _parse_exec(
    value: object, path: str, check: Checker, folder: Path, config_dir: Path
) -> Path | None:
    if not isinstance(value, str) or not value or "\0" in value:
        check.problem(path, f"expected a path to the app's executable, got {describe(value)}")
        return None
    shown = describe(value)
    try:
        target = (config_dir / value).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        check.problem(path, f"{shown} cannot be resolved (symlink loop?)")
        return None
    if not _inside(target, folder):
        check.problem(path, f"{shown} escapes the bundle folder")
        return None
    try:
        info = target.stat()
    except OSError:
        check.problem(path, f"{shown} does not exist in the bundle")
        return None
    if not stat.S_ISREG(info.st_mode):
        check.problem(path, f"{shown} is not a regular file")
        return None
    if not info.st_mode & 0o111:
        check.problem(path, f"{shown} is not executable (no x permission bit)")
        return None
    return target


def _parse_args(value: object, path: str, check: Checker) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        check.problem(path, f"expected a list of strings, got {describe(value)}")
        return None
    args: list[str] = []
    for i, item in enumerate(value):
        # Numbers are fine unquoted (a port, a count); a YAML boolean is more
        # likely an accident (`- yes`), so it must be quoted.
        ok_type = isinstance(item, int | float | str) and not isinstance(item, bool)
        if ok_type and "\0" not in str(item):
            args.append(str(item))
            continue
        check.problem(f"{path}[{i}]", f"expected a string (quote it), got {describe(item)}")
    return tuple(args) if len(args) == len(value) else None


def _parse_hosts(
    data: dict,
    prefix: str,
    check: Checker,
    keys: tuple[str, ...] = ("host", "hosts", "extra-hosts"),
) -> tuple[str, ...]:
    """``host``, then ``hosts``, then ``extra-hosts``, validated and without repeats."""
    before = len(check.problems)
    named: list[tuple[str, object]] = []
    if "host" in keys and "host" in data:
        named.append((f"{prefix}host", data["host"]))
    for key in keys:
        if key == "host" or key not in data:
            continue
        value = data[key]
        if not isinstance(value, list):
            check.problem(f"{prefix}{key}", f"expected a list of host names, got {describe(value)}")
            continue
        named.extend((f"{prefix}{key}[{i}]", item) for i, item in enumerate(value))
    hosts: dict[str, str] = {}  # host -> where it was first given
    for where, value in named:
        if not isinstance(value, str):
            check.problem(where, f"expected a host name, got {describe(value)}")
            continue
        try:
            host = validate_host(value)
        except ValueError as exc:
            check.problem(where, f"{describe(value)} is not a valid host name: {exc}")
            continue
        if host in hosts:
            check.warn(where, f"{host} repeats {hosts[host]}; listed once")
        else:
            hosts[host] = where
    if not named and len(check.problems) == before:
        check.problem(f"{prefix}host", "missing; at least one host is needed (host or hosts)")
    return tuple(hosts)


def _parse_health_path(value: object, path: str, check: Checker) -> str | None:
    if value is None:
        return None
    # Printable ASCII without spaces: the path goes verbatim into an HTTP request line.
    if isinstance(value, str) and re.fullmatch(r"/[\x21-\x7e]{0,1023}", value):
        return value
    check.problem(
        path, f'expected a URL path starting with "/" without spaces, got {describe(value)}'
    )
    return None


def _parse_postgres(data: dict, check: Checker) -> bool:
    """``postgres: true`` or Keter's ``plugins: {postgres: true}``."""
    wanted: dict[str, bool] = {}
    if "postgres" in data:
        value = data["postgres"]
        if isinstance(value, bool):
            wanted["postgres"] = value
        else:
            check.problem("postgres", f"expected true or false, got {describe(value)}")
    plugins = data.get("plugins")
    if isinstance(plugins, dict):
        for key, value in plugins.items():
            where = f"plugins.{key_name(key)}"
            if key != "postgres":
                check.warn(where, unknown_key(key, ("postgres",)) + "; ignored")
            elif isinstance(value, bool):
                wanted[where] = value
            elif isinstance(value, list):
                check.problem(where, "remote database servers are not supported yet; use true")
            else:
                check.problem(where, f"expected true or false, got {describe(value)}")
    elif plugins is not None:
        check.problem(
            "plugins", f"expected a mapping like {{postgres: true}}, got {describe(plugins)}"
        )
    if len(set(wanted.values())) > 1:
        check.problem("postgres", "postgres and plugins.postgres disagree")
    return any(wanted.values())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``folder`` or inside it."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
