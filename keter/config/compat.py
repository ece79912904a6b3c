"""Keter's own keys: those keter accepts but does not act on (one warning
each), Keter 0.4's ``host``/``port``/``ssl`` listeners and Keter's
``graceful-drain-micros``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keter.config.listeners import bind_key, parse_listen_host, parse_listener
from keter.config.model import Listener
from keter.yamlcheck import MAX_SECONDS, Checker, describe, integer, is_int

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


def keter04_listeners(data: dict, values: dict[str, Any], check: Checker, base: Path) -> None:
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
    host = parse_listen_host(data["host"], "host", check) if "host" in data else "*"
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
            listener = parse_listener(ssl, "ssl", check, base)
            if listener is not None:
                listeners.append(listener)
    if len(check.problems) > before:
        return
    if len(listeners) == 2 and bind_key(listeners[0]) == bind_key(listeners[1]):
        check.problem("ssl", f"port {listeners[1].port} is also the plain listener's (port)")
        return
    values["listeners"] = tuple(listeners)


def graceful_drain(data: dict, values: dict[str, Any], check: Checker) -> None:
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


def warn_keter_variables(values: dict[str, Any], check: Checker) -> None:
    """The global env cannot set what keter sets for each app (Keter lets a bundle's win)."""
    for name in values.get("env", {}):
        if name in ("PORT", "APPROOT", "KETER_DATA_DIR"):
            check.warn(
                f"env.{name}", f"keter sets {name} for each app itself; this value is ignored"
            )
