"""Reading ``ROOT/etc/keter-config.yaml`` into a ``KeterConfig``.

The file is optional and every key has a default. Keys use Keter's dashed
names so an existing Keter config keeps working: Keter keys that mean nothing
here are accepted with a warning instead of failing the daemon's start
(``keter.config.compat``).

Validation is strict and collects every problem before raising, so an operator
fixes the whole file in one round. Each problem names the key path, what was
found and what was expected. Values are echoed JSON-quoted (and shortened) so a
hostile or broken value cannot forge extra log lines.

``_FIELDS`` is the table of keys: each key's field and the parser that reads
it; the cross-key checks run once every key is read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from keter.config.compat import (
    KETER_04_LISTENER_KEYS,
    KETER_IGNORED,
    KETER_ONLY_KEYS,
    graceful_drain,
    keter04_listeners,
    warn_keter_variables,
)
from keter.config.listeners import parse_listeners
from keter.config.model import ConfigError, KeterConfig
from keter.config.ports import check_addresses, check_ports, check_status_port, parse_port_range
from keter.config.services import parse_acme, parse_nginx, parse_postgres
from keter.config.status import (
    check_dashboard,
    check_status_auth,
    parse_dashboard_host,
    parse_dashboard_users,
    parse_status_group,
    parse_status_hosts,
    parse_status_listen,
)
from keter.config.values import (
    Parser,
    count_key,
    parse_bool,
    parse_env_key,
    parse_ip_from_header,
    parse_limits_key,
    parse_port,
    parse_ratio,
    parse_response_file,
    parse_setuid,
    parse_size,
    parse_switch,
    parse_uid_range,
    parse_url_path,
    seconds_key,
    without_nulls,
)
from keter.yamlcheck import (
    MAX_SECONDS,
    Checker,
    absolute,
    describe,
    file_path,
    key_name,
    read_yaml_file,
    unknown_key,
)

log = logging.getLogger(__name__)


CONFIG_NAME = "keter-config.yaml"


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
            config = parse_config({}, root=root, base=base, ephemeral_range=ephemeral_range)
            return _settled(config, target)
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
        config = parse_config(
            data, root=root, base=base, ephemeral_range=ephemeral_range, root_given=root_given
        )
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=str(path)) from None
    return _settled(config, target)


def _settled(config: KeterConfig, source: Path) -> KeterConfig:
    """ROOT as its real path, fixed now: a link on the way that someone re-points while
    keter runs changes nothing (keter.rootcheck checks that real path's owners)."""
    return replace(config, root=Path(os.path.realpath(config.root)), source=source)


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
    data = without_nulls(data)  # null is the default, for every key (compat's too)
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
                # The same folder, however named (keter runs on its real path).
                same = os.path.realpath(values["root"]) == os.path.realpath(root)
                if root_given and not same:
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
    keter04_listeners(data, values, check, base)
    graceful_drain(data, values, check)
    warn_keter_variables(values, check)
    values.setdefault("root", root)
    check_ports(values, check, ephemeral_range)
    check_status_port(values, check)
    check_dashboard(values, check)
    check_status_auth(values, check)
    check_addresses(values, check)  # last: a status-listen refused already is not bound
    if check.problems:
        raise ConfigError(check.problems)
    return KeterConfig(**values, warnings=tuple(check.warnings))


_FIELDS: dict[str, tuple[str, Parser]] = {
    "listeners": ("listeners", parse_listeners),
    "nginx": ("nginx", parse_nginx),
    "port-range": ("port_range", parse_port_range),
    "health-check-timeout": ("health_check_timeout", seconds_key(0, inclusive=False)),
    "drain-seconds": ("drain_seconds", seconds_key(0, inclusive=True)),
    "stop-timeout": ("stop_timeout", seconds_key(0, inclusive=False)),
    "switch": ("switch", parse_switch),
    "env": ("env", parse_env_key),
    "postgres": ("postgres", parse_postgres),
    "acme": ("acme", parse_acme),
    "setuid": ("setuid", parse_setuid),
    "app-uid-range": ("app_uid_range", parse_uid_range),
    "run-apps-as-root": ("run_apps_as_root", parse_bool),
    "app-limits": ("app_limits", parse_limits_key),
    "log-max-bytes": ("log_max_bytes", count_key(1)),
    "log-backups": ("log_backups", count_key(0, 1000)),
    "max-unpacked-bytes": ("max_unpacked_bytes", count_key(1)),
    "max-members": ("max_members", count_key(1)),
    "ip-from-header": ("ip_from_header", parse_ip_from_header),
    "external-http-port": ("external_http_port", parse_port),
    "external-https-port": ("external_https_port", parse_port),
    "healthcheck-path": ("healthcheck_path", parse_url_path),
    "unknown-host-response-file": ("unknown_host_response_file", parse_response_file),
    "missing-host-response-file": ("missing_host_response_file", parse_response_file),
    "proxy-exception-response-file": ("proxy_exception_response_file", parse_response_file),
    "connection-time-bound": ("connection_time_bound", count_key(0, MAX_SECONDS * 1000)),
    "status-listen": ("status_listen", parse_status_listen),
    "status-group": ("status_group", parse_status_group),
    "archive-keep": ("archive_keep", count_key(1, 1000)),
    "dashboard-host": ("dashboard_host", parse_dashboard_host),
    "dashboard-users": ("dashboard_users", parse_dashboard_users),
    "status-hosts": ("status_hosts", parse_status_hosts),
    "traffic-stats": ("traffic_stats", parse_bool),
    "client-max-body-size": ("client_max_body_size", parse_size),
    "app-max-connections": ("app_max_connections", count_key(0, 1_000_000)),
    "gzip": ("gzip", parse_bool),
    "hsts-max-age": ("hsts_max_age", count_key(0, 10 * 365 * 24 * 3600)),
    "watch-seconds": ("watch_seconds", seconds_key(0, inclusive=True)),
    "watch-max-error-ratio": ("watch_max_error_ratio", parse_ratio),
    "watch-min-requests": ("watch_min_requests", count_key(1, 1_000_000_000)),
    "backup-keep": ("backup_keep", count_key(1, 1000)),
    "backup-required": ("backup_required", parse_bool),
    "backup-timeout": ("backup_timeout", seconds_key(0, inclusive=False)),
}


_KNOWN_KEYS = (*_FIELDS, "root", *KETER_ONLY_KEYS, *KETER_04_LISTENER_KEYS, "graceful-drain-micros")
