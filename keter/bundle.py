"""A bundle's own config, ``config/keter.yaml``, and the names bundles may use.

Only Keter 0.4's flat format is understood so far (``exec``, ``host``, ...).
The later ``stanzas:`` format is recognised and refused with a clear message;
``parse_bundle_data`` picks the parser by format, and the web-app keys are
parsed by ``_parse_webapp`` so a stanza parser can reuse it with its own key
path prefix.

Everything a bundle says is untrusted: host names end up in the nginx config
and the exec path is run, so both are checked tightly here, and problems are
collected so the uploader sees all of them in one log line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from keter.config import Checker, describe, key_name, parse_env, read_yaml_file, unknown_key

CONFIG_NAMES = ("keter.yaml", "keter.yml")
MAX_CONFIG_BYTES = 1 << 20


class BundleConfigError(Exception):
    """The bundle's config is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, kw_only=True)
class WebApp:
    """The bundle's HTTP app: how to run it and which hosts it answers."""

    exec: Path  # absolute, symlinks resolved, inside the bundle folder, executable
    args: tuple[str, ...] = ()
    hosts: tuple[str, ...]  # validated, lower-cased, at least one; the first gives APPROOT
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    health_check_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    """A validated bundle config."""

    app: str
    webapp: WebApp | None
    postgres: bool = False
    warnings: tuple[str, ...] = ()


# -- names ---------------------------------------------------------------------------

_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_app_name(name: str) -> str:
    """Check a bundle's file stem (``NAME`` of ``NAME.keter``); raises ValueError(reason).

    The name becomes part of folder names, log file names and the nginx
    config, so it is limited to a plain ASCII alphabet.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("the name is empty")
    if len(name) > 64:
        raise ValueError(f"the name is {len(name)} characters long; at most 64 are allowed")
    if ".." in name:
        raise ValueError('the name contains ".."')
    if not _APP_NAME.fullmatch(name):
        raise ValueError(
            "the name must start with a letter or digit and use only letters, digits, '.', '_', '-'"
        )
    return name


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def validate_host(host: str) -> str:
    """Check a virtual host name and return it lower-cased; raises ValueError(reason).

    RFC 1123 names: dot-separated labels of 1-63 characters from [a-z0-9-]
    that neither start nor end with '-', 253 characters in all, optionally
    preceded by a ``*.`` wildcard. Single-label names (``localhost``) are fine.
    Refused: IP literals (nginx would treat them as a listen address match,
    not a virtual host), and a trailing dot, because ``example.com.`` is a
    different Host header from ``example.com`` and would silently never match
    what browsers send.
    """
    if not isinstance(host, str) or not host:
        raise ValueError("the host name is empty")
    # Checked before lower-casing: some non-ASCII letters lower-case to ASCII
    # (the Kelvin sign becomes "k"), which would let look-alike names through.
    if not host.isascii():
        raise ValueError("the host name has non-ASCII characters (use the xn-- punycode form)")
    name = host.lower()
    if _is_ip_literal(name):
        raise ValueError("an IP address is not a host name")
    if name.endswith("."):
        raise ValueError(
            "the host name ends with a dot; write it without, since browsers send it without"
        )
    if len(name) > 253:
        raise ValueError(f"the host name is {len(name)} characters long; at most 253 are allowed")
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    for label in labels:
        if not label:
            raise ValueError(
                "the host name has an empty label (two dots in a row or a leading dot)"
            )
        if "*" in label:
            raise ValueError(
                "a wildcard is only allowed as a whole leading label, as in *.example.com"
            )
        if len(label) > 63:
            raise ValueError(f"the label {label[:20]}... is longer than 63 characters")
        if not _LABEL.fullmatch(label):
            bad = sorted({c for c in label if not (c.isalnum() or c == "-")})
            if bad:
                raise ValueError(f"the host name contains {describe(''.join(bad))}")
            raise ValueError(f"the label {label} starts or ends with '-'")
    return name


def _is_ip_literal(name: str) -> bool:
    candidate = name.strip("[]")
    try:
        ipaddress.ip_address(candidate)
        return True
    except ValueError:
        pass
    try:
        # inet_aton also takes the short and hex spellings (127.1, 0x7f.1) that
        # resolvers and browsers treat as addresses.
        socket.inet_aton(candidate)
        return True
    except (OSError, ValueError):
        return False


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
    paths (``exec``) are resolved against. The only file system access is
    checking the executable.
    """
    if not isinstance(data, dict):
        expected = "a mapping with keys like exec and host"
        raise BundleConfigError([f"config/keter.yaml: expected {expected}, got {describe(data)}"])
    check = Checker()
    if "stanzas" in data:
        config = _parse_stanzas(data, check, app)
    else:
        config = _parse_flat(data, check, Path(folder), Path(config_dir), app)
    if check.problems:
        raise BundleConfigError(check.problems)
    return config


def _parse_stanzas(data: dict, check: Checker, app: str) -> BundleConfig:
    check.problem(
        "stanzas",
        "the stanza format (Keter 1.0) is not supported yet; use the flat format "
        "(exec, args, host, env at the top level)",
    )
    return BundleConfig(app=app, webapp=None)


# Keter 0.4 keys: web app keys, bundle-wide keys, and keys that come later.
WEBAPP_KEYS = ("exec", "args", "host", "hosts", "extra-hosts", "env", "health-check-path")
BUNDLE_KEYS = ("postgres", "plugins")
LATER_KEYS = ("static-hosts", "redirects", "ssl")
FLAT_KEYS = (*WEBAPP_KEYS, *BUNDLE_KEYS, *LATER_KEYS)


def _parse_flat(
    data: dict, check: Checker, folder: Path, config_dir: Path, app: str
) -> BundleConfig:
    for key in data:
        if key in LATER_KEYS:
            check.warn(key, "not supported yet; ignored")
        elif key not in FLAT_KEYS:
            check.warn(key_name(key), unknown_key(key, FLAT_KEYS) + "; ignored")
    webapp = _parse_webapp(data, "", check, folder, config_dir)
    if webapp is None and not check.problems:
        check.warn("exec", "missing, so this bundle runs no web app")
    return BundleConfig(
        app=app,
        webapp=webapp,
        postgres=_parse_postgres(data, check),
        warnings=tuple(check.warnings),
    )


def _parse_webapp(
    data: dict, prefix: str, check: Checker, folder: Path, config_dir: Path
) -> WebApp | None:
    """The web-app keys of ``data``; ``prefix`` ("" or e.g. "stanzas[0].") starts key paths."""
    if "exec" not in data:
        present = [key for key in WEBAPP_KEYS if key in data]
        if present:
            check.problem(f"{prefix}exec", f"missing, but {', '.join(present)} given for a web app")
        return None
    before = len(check.problems)
    exec_path = _parse_exec(data["exec"], f"{prefix}exec", check, folder, config_dir)
    args = _parse_args(data.get("args", []), f"{prefix}args", check)
    hosts = _parse_hosts(data, prefix, check)
    env = parse_env(data.get("env", {}), f"{prefix}env", check)
    health = _parse_health_path(data.get("health-check-path"), f"{prefix}health-check-path", check)
    if len(check.problems) > before or exec_path is None or args is None or env is None:
        return None
    return WebApp(exec=exec_path, args=args, hosts=hosts, env=env, health_check_path=health)


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


def _parse_hosts(data: dict, prefix: str, check: Checker) -> tuple[str, ...]:
    """``host``, then ``hosts``, then ``extra-hosts``, validated and without repeats."""
    before = len(check.problems)
    named: list[tuple[str, object]] = []
    if "host" in data:
        named.append((f"{prefix}host", data["host"]))
    for key in ("hosts", "extra-hosts"):
        if key not in data:
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
        check.problem(f"{prefix}host", "missing; a web app needs at least one host (host or hosts)")
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


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``folder`` or inside it."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
