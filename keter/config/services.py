"""The sections for the services keter drives: ``nginx``, ``postgres``, ``acme``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from keter import names
from keter.config.model import (
    AcmeSettings,
    NginxSettings,
    PostgresSettings,
    conninfo,
    first_server,
)
from keter.config.values import count_key, seconds_key, without_nulls
from keter.yamlcheck import (
    Checker,
    absolute,
    describe,
    file_path,
    is_arg,
    key_name,
    pem_file,
    string,
    type_name,
    unknown_key,
)


def parse_nginx(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, dict):
        check.problem(path, f"expected a mapping like {{config-file: ...}}, got {describe(value)}")
        return None
    fields: dict[str, Any] = {}
    keys = (
        "config-file",
        "test-command",
        "reload-command",
        "error-log",
        "resolver",
        "shared-certificates",
    )
    for key, item in without_nulls(value, keep=("error-log",)).items():
        where = f"{path}.{key_name(key)}"
        if key == "config-file":
            text = file_path(item, where, check)
            if text:
                fields["config_file"] = absolute(base / text)
        elif key == "error-log":
            if item is None:
                fields["error_log"] = None
            elif text := file_path(item, where, check):
                fields["error_log"] = absolute(base / text)
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


def parse_acme(value: object, path: str, check: Checker, base: Path) -> object:
    known = ("directory", "email", "eab", "ca-bundle")
    if not isinstance(value, dict):
        check.problem(path, f"expected a mapping like {{email: ...}}, got {describe(value)}")
        return None
    settings: dict[str, Any] = {}
    for key, item in without_nulls(value).items():
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
        elif key == "eab" and item == {}:
            pass  # no binding: the default
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


# PostgreSQL's own bound on max_connections.
MAX_CONNECTION_LIMIT = 262143


def parse_postgres(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, dict):
        check.problem(path, f'expected a mapping like {{admin-dsn: ""}}, got {describe(value)}')
        return None
    settings: dict[str, Any] = {}
    for key, item in without_nulls(value).items():
        where = f"{path}.{key_name(key)}"
        if key == "admin-dsn":
            dsn = _parse_dsn(item, where, check)
            if dsn is not None:
                settings["admin_dsn"] = dsn
        elif key == "retry-seconds":
            seconds = seconds_key(0, inclusive=False)(item, where, check, base)
            if seconds is not None:
                settings["retry_seconds"] = seconds
        elif key == "connection-limit":
            limit = count_key(0, MAX_CONNECTION_LIMIT)(item, where, check, base)
            if limit is not None:
                settings["connection_limit"] = limit
        else:
            known = ("admin-dsn", "retry-seconds", "connection-limit")
            check.problem(where, unknown_key(key, known))
    return PostgresSettings(**settings)


def _parse_dsn(value: object, path: str, check: Checker) -> str | None:
    if not isinstance(value, str):
        # The value may hold a password: name its type only.
        check.problem(path, f"expected a libpq connection string, got {type_name(value)}")
        return None
    try:
        params = conninfo(value)
    except Exception:  # psycopg.ProgrammingError; its text quotes the value
        check.problem(
            path, "not a valid libpq connection string (value not shown: it may hold a password)"
        )
        return None
    try:
        first_server(params)
    except ValueError as exc:
        check.problem(path, f"{exc} (value not shown: it may hold a password)")
        return None
    return value
