"""``listeners``: the addresses nginx listens on, plain or TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keter.config.model import Listener
from keter.config.values import without_nulls
from keter.names import validate_ip
from keter.yamlcheck import Checker, describe, integer, key_name, pem_file, pem_files, unknown_key

TLS_LISTENER_KEYS = ("key", "certificate", "chain-certificates", "session")
# Keter's (warp's) spellings for "every address of one family": "*4"/"*6", and the
# "!4"/"!6" variants that only differ in what warp prefers on a dual-stack host.
WILDCARD_HOSTS = {"*4": "0.0.0.0", "*6": "::", "!4": "0.0.0.0", "!6": "::"}


def parse_listeners(value: object, path: str, check: Checker, base: Path) -> object:
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
        listener = parse_listener(entry, where, check, base)
        if listener is None:
            continue
        key = bind_key(listener)  # "*" and 0.0.0.0 would be one socket listed twice
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


def parse_listener(entry: object, where: str, check: Checker, base: Path) -> Listener | None:
    """The listener (plain, or TLS with certificate and key), or None after a problem."""
    if not isinstance(entry, dict):
        check.problem(
            where, f'expected a mapping like {{host: "*", port: 80}}, got {describe(entry)}'
        )
        return None
    entry = without_nulls(entry)  # host: null is "*", certificate: null none (a plain listener)
    before = len(check.problems)
    tls = any(key in entry for key in TLS_LISTENER_KEYS if key != "session")
    host, port = "*", 443 if tls else 80  # Keter's defaults
    files: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "host":
            host = parse_listen_host(value, f"{where}.host", check) or host
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


def bind_key(listener: Listener) -> tuple[str, int]:
    # nginx binds "*" as 0.0.0.0, so the two are one socket.
    return ("0.0.0.0" if listener.host == "*" else listener.host, listener.port)


def parse_listen_host(value: object, path: str, check: Checker) -> str | None:
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
