"""Checks for the values a bundle config holds, shared by both formats.

A ``Values`` is one parse of one bundle: it knows the unpacked bundle folder
(``folder``), the folder relative paths are resolved against (``config_dir``)
and collects problems and warnings in ``check``. Each method checks one kind
of value, records a problem naming its key path when the value is wrong, and
returns the value for the model (or a harmless default after a problem).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from keter import names
from keter.bundle.model import (
    KETER_RESTART_DELAY,
    RELEASE_TIMEOUT,
    AcmeTls,
    Background,
    Release,
    Ssl,
    TlsConfig,
    WebApp,
)
from keter.limits import NO_LIMITS, Limits, parse_limits
from keter.yamlcheck import (
    MAX_INT,
    MAX_SECONDS,
    Checker,
    describe,
    file_path,
    is_int,
    key_name,
    number,
    pem_file,
    pem_files,
    size,
    unknown_key,
)


class Values:
    """One parse of one bundle config: where its files are, and the problems found."""

    def __init__(self, folder: Path, config_dir: Path) -> None:
        self.folder = folder
        self.config_dir = config_dir
        self.check = Checker()

    # -- programs ----------------------------------------------------------------------

    def exec(self, value: object, path: str) -> Path | None:
        """The program to run: a regular, executable file inside the bundle."""
        check = self.check
        if file_path(value, path, check, "a path to the app's executable") is None:
            return None
        shown = describe(value)
        try:
            target = (self.config_dir / value).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            check.problem(path, f"{shown} cannot be resolved (symlink loop?)")
            return None
        if not inside(target, self.folder):
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

    def release(self, data: dict, prefix: str) -> Release | None:
        """``release``: a path (relative to config/) or [path, args...]; ``release-timeout``."""
        value, timeout = data.get("release"), data.get("release-timeout")
        if value is None:
            if timeout is not None:
                where = f"{prefix}release-timeout"
                self.check.warn(where, "has no effect without release; ignored")
            return None
        path = f"{prefix}release"
        if isinstance(value, list):
            if not value:
                self.check.problem(path, "expected [program, arguments...], got an empty list")
                return None
            program, args = value[0], self.args(value[1:], path)
        else:
            program, args = value, ()
        seconds = RELEASE_TIMEOUT
        if timeout is not None:
            seconds = number(timeout, MAX_SECONDS)
            if seconds is None or seconds <= 0:
                self.check.problem(
                    f"{prefix}release-timeout",
                    f"expected a number of seconds above 0, at most {MAX_SECONDS} (a year), "
                    f"got {describe(timeout)}",
                )
                return None
        program_path = self.exec(program, f"{path}[0]" if isinstance(value, list) else path)
        if program_path is None:
            return None
        return Release(exec=program_path, args=args, timeout=seconds)

    def limits(self, data: dict, prefix: str) -> Limits:
        """``limits``: the stanza's own resource limits (the ceiling is checked later,
        against keter-config.yaml: see keter.limits)."""
        if "limits" not in data:
            return NO_LIMITS
        return parse_limits(data["limits"], f"{prefix}limits", self.check)

    def args(self, value: object, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.check.problem(path, f"expected a list of strings, got {describe(value)}")
            return ()
        args: list[str] = []
        for i, item in enumerate(value):
            # Numbers are fine unquoted (a port, a count); a YAML boolean is more
            # likely an accident (`- yes`), so it must be quoted.
            ok_type = isinstance(item, int | float | str) and not isinstance(item, bool)
            try:
                if ok_type:
                    args.append(names.validate_arg(str(item)))
                    continue
            except ValueError as exc:
                self.check.problem(f"{path}[{i}]", str(exc))
                continue
            self.check.problem(
                f"{path}[{i}]", f"expected a string (quote it), got {describe(item)}"
            )
        return tuple(args) if len(args) == len(value) else ()

    def names(self, value: object, path: str) -> tuple[str, ...]:
        """A list of environment variable names (``forward-env``, ``port-env-vars``)."""
        if not isinstance(value, list):
            self.check.problem(path, f"expected a list of variable names, got {describe(value)}")
            return ()
        found = []
        for i, item in enumerate(value):
            try:
                found.append(names.validate_env_name(item))
            except ValueError as exc:
                self.check.problem(f"{path}[{i}]", str(exc))
        return tuple(dict.fromkeys(found))

    # -- hosts -------------------------------------------------------------------------

    def hosts(
        self, data: dict, prefix: str, keys: tuple[str, ...] = ("host", "hosts", "extra-hosts")
    ) -> tuple[str, ...]:
        """``host``, then ``hosts``, then ``extra-hosts``, validated and without repeats."""
        check = self.check
        before = len(check.problems)
        named: list[tuple[str, object]] = []
        if "host" in keys and "host" in data:
            named.append((f"{prefix}host", data["host"]))
        for key in keys:
            if key == "host" or key not in data:
                continue
            value = data[key]
            if not isinstance(value, list):
                check.problem(
                    f"{prefix}{key}", f"expected a list of host names, got {describe(value)}"
                )
                continue
            named.extend((f"{prefix}{key}[{i}]", item) for i, item in enumerate(value))
        hosts: dict[str, str] = {}  # host -> where it was first given
        for where, value in named:
            host = self.host(value, where)
            if host is None:
                continue
            if host in hosts:
                check.warn(where, f"{host} repeats {hosts[host]}; listed once")
            else:
                hosts[host] = where
        if not named and len(check.problems) == before:
            check.problem(f"{prefix}host", "missing; at least one host is needed (host or hosts)")
        return tuple(hosts)

    def host(self, value: object, path: str, *, wildcard: bool = True) -> str | None:
        if not isinstance(value, str):
            self.check.problem(path, f"expected a host name, got {describe(value)}")
            return None
        try:
            host = names.validate_host(value)
        except ValueError as exc:
            self.check.problem(path, f"{describe(value)} is not a valid host name: {exc}")
            return None
        if not wildcard and names.is_wildcard(host):
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

    def health_path(self, value: object, path: str) -> str | None:
        if value is None:
            return None
        try:
            # Only ever sent in a request line, never written into nginx's config.
            return names.validate_request_path(value)
        except ValueError as exc:
            self.check.problem(path, str(exc))
            return None

    # -- flags and numbers -------------------------------------------------------------

    def flag(self, data: dict, key: str, prefix: str, default: bool = False) -> bool:
        value = data.get(key, default)
        if isinstance(value, bool):
            return value
        self.check.problem(f"{prefix}{key}", f"expected true or false, got {describe(value)}")
        return default

    def microseconds(self, value: object, path: str) -> float | None:
        """Keter's microsecond durations, as seconds (at most a year)."""
        if value is None:
            return None
        if is_int(value) and 0 < value <= MAX_SECONDS * 1_000_000:
            return value / 1_000_000
        self.check.problem(
            path,
            f"expected a positive number of microseconds up to {MAX_SECONDS * 1_000_000} "
            f"(a year), got {describe(value)}",
        )
        return None

    def body_size(self, data: dict, prefix: str) -> int | None:
        """``client-max-body-size``: this stanza's request body limit, if it sets one."""
        if "client-max-body-size" not in data:
            return None
        return size(data["client-max-body-size"], f"{prefix}client-max-body-size", self.check)

    def time_bound(self, data: dict, prefix: str) -> float | None:
        """``connection-time-bound`` (milliseconds, 0 = unbounded) as seconds."""
        value = data.get("connection-time-bound")
        if value is None:
            return None
        if is_int(value) and 0 <= value <= MAX_SECONDS * 1000:
            return value / 1000
        self.check.problem(
            f"{prefix}connection-time-bound",
            f"expected a number of milliseconds from 0 to {MAX_SECONDS * 1000} (a year), "
            f"got {describe(value)}",
        )
        return None

    def seconds(self, value: object, path: str) -> float:
        seconds = number(value, MAX_SECONDS)
        if seconds is not None and seconds >= 0:
            return seconds
        self.check.problem(
            path,
            f"expected a number of seconds from 0 to {MAX_SECONDS} (a year), got {describe(value)}",
        )
        return KETER_RESTART_DELAY

    def restart_count(self, value: object, prefix: str) -> int | None:
        if value == "unlimited":
            return None
        if is_int(value) and 0 <= value <= MAX_INT:
            return value
        self.check.problem(
            f"{prefix}restart-count",
            f'expected a number of restarts or "unlimited", got {describe(value)}',
        )
        return None

    def port(self, value: object, path: str) -> int | None:
        try:
            return names.validate_port(value)
        except ValueError:
            self.check.problem(path, f"expected an integer 1-65535, got {describe(value)}")
            return None

    # -- files -------------------------------------------------------------------------

    def root(self, value: object, path: str) -> Path | None:
        """A static root: a folder inside the bundle, with symlinks resolved."""
        if file_path(value, path, self.check, "a folder path") is None:
            return None
        shown = describe(value)
        try:
            target = (self.config_dir / value).resolve()
        except (OSError, RuntimeError):
            self.check.problem(path, f"{shown} cannot be resolved (symlink loop?)")
            return None
        if not inside(target, self.folder):
            self.check.problem(
                path, f"{shown} escapes the bundle folder; static files must come from the bundle"
            )
            return None
        if not target.is_dir():
            self.check.problem(path, f"{shown} is not a folder in the bundle")
            return None
        # nginx serves the folder in place: its path is written into nginx's config.
        unsafe = names.nginx_path_unsafe(str(target))
        if unsafe:
            self.check.problem(
                path, f"{shown}: nginx cannot serve a folder whose path has {' '.join(unsafe)}"
            )
            return None
        return target

    def ssl(self, value: object, path: str) -> Ssl:
        if isinstance(value, bool):
            return value
        if value == "acme":
            return AcmeTls()
        if not isinstance(value, dict):
            self.check.problem(
                path,
                "expected true, false, acme or {certificate: ..., key: ...}, "
                f"got {describe(value)}",
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


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``folder`` or inside it."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


# What keter sets in an app's environment itself (keter.environment), and why its value
# must win over a bundle's: Keter lets the bundle's env win over all of these.
DATABASE_VARIABLES = (
    "PGHOST", "PGPORT", "PGUSER", "PGPASS", "PGPASSWORD", "PGDATABASE", "DATABASE_URL",
)  # fmt: skip
_WHY = {
    "PORT": "the health check probes the port keter chose",
    "APPROOT": "it names the host and scheme nginx serves the app at",
    "database": "they name the database keter provisioned",
    "KETER_DATA_DIR": "it names the app's own folder, ROOT/data/APP",
}


def never_forwarded(name: str) -> bool:
    """Whether keter keeps ``name`` of its own environment from every app, ``forward-env``
    or not: libpq's variables (an admin password kept out of keter-config.yaml, in
    keter's environment, was any bundle's for the asking, and with it every app's data)
    and systemd's channels to keter (its notify socket, its credentials)."""
    return name.startswith("PG") or name in _NEVER_FORWARDED


_NEVER_FORWARDED = frozenset({"DATABASE_URL", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"})


def warn_overridden_env(stanzas: list[tuple[str, object]], postgres: bool, check: Checker) -> None:
    """One warning for each ``env`` or ``forward-env`` name a stanza gives that keter sets itself.

    ``stanzas`` are (key path prefix, parsed stanza); ``postgres`` whether the bundle
    gets a database (and so its variables).
    """
    for prefix, stanza in stanzas:
        if not isinstance(stanza, WebApp | Background):
            continue
        owned: dict[str, str] = {"KETER_DATA_DIR": _WHY["KETER_DATA_DIR"]}
        if isinstance(stanza, WebApp):
            owned.update({name: _WHY["PORT"] for name in ("PORT", *stanza.port_env_vars)})
            owned["APPROOT"] = _WHY["APPROOT"]
        if postgres:
            owned.update({name: _WHY["database"] for name in DATABASE_VARIABLES})
        for i, name in enumerate(stanza.forward_env):
            if never_forwarded(name) and name not in owned:
                check.warn(
                    f"{prefix}forward-env[{i}]",
                    f"keter's own {name} is never forwarded to an app; ignored",
                )
        given = [(f"env.{name}", name) for name in stanza.env]
        given += [(f"forward-env[{i}]", name) for i, name in enumerate(stanza.forward_env)]
        for where, name in given:
            if name in owned:
                check.warn(
                    f"{prefix}{where}",
                    f"keter sets {name} itself and its value wins ({owned[name]}); "
                    "this one is ignored",
                )
