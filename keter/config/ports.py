"""Where ports could collide: ``port-range`` against the kernel's ephemeral
range, the listeners and the status listener; and that the addresses they
listen on are this machine's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

from keter.config.model import KeterConfig
from keter.yamlcheck import Checker, describe, is_int

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def read_ephemeral_range(path: Path | None = None) -> tuple[int, int] | None:
    """The kernel's range for outgoing ports (read from /proc), or None if unreadable."""
    try:
        low, high = (int(word) for word in (path or EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return None
    return (low, high)


def parse_port_range(value: object, path: str, check: Checker, base: Path) -> object:
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


def check_ports(
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


def check_status_port(values: dict[str, object], check: Checker) -> None:
    """The status listener must not take a port keter hands to apps."""
    listen = values.get("status_listen")
    low, high = values.get("port_range", KeterConfig.port_range)
    if listen is not None and low <= listen[1] <= high:
        check.problem(
            "status-listen",
            f"port {listen[1]} is inside port-range [{low}, {high}], so keter could give it "
            "to an app",
        )


# Addresses that are every address of their family: always this machine's.
WILDCARDS = ("*", "0.0.0.0", "::")


def not_local(address: str) -> str | None:
    """Why ``address`` is none of this machine's (nginx could not listen there), or None.

    Binding a socket to it on port 0 asks the kernel itself: it refuses an address no
    interface has (EADDRNOTAVAIL), and a family the machine lacks.
    """
    if address in WILDCARDS:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return f"{address} is not an address of this machine ({exc.strerror})"
    return None


def _overlap(one: str, other: str) -> bool:
    """Whether a socket on ``one`` and one on ``other`` (same port) would collide."""
    one, other = ("0.0.0.0" if a == "*" else a for a in (one, other))
    if one == other:
        return True
    v6 = [ipaddress.ip_address(a).version == 6 for a in (one, other)]
    if v6[0] != v6[1]:
        return False  # nginx listens on [::] for IPv6 only (ipv6only=on)
    wildcard = "::" if v6[0] else "0.0.0.0"
    return wildcard in (one, other)


def check_addresses(values: dict[str, object], check: Checker) -> None:
    """Cross-key checks at start: every address nginx and the status API listen on is
    this machine's (an address of another one passed, then every deploy failed at
    nginx's bind), and the status API takes no port a listener has."""
    listeners = values.get("listeners", KeterConfig.listeners)
    for i, listener in enumerate(listeners):
        if problem := not_local(listener.host):
            check.problem(f"listeners[{i}].host", f"{problem}: nginx could not listen there")
    listen = values.get("status_listen")
    if listen is None or any(p.startswith("status-listen:") for p in check.problems):
        return  # none, or already refused
    if problem := not_local(listen[0]):
        check.problem("status-listen", f"{problem}: keter could not listen there")
        return
    for i, listener in enumerate(listeners):
        if listener.port == listen[1] and _overlap(listener.host, listen[0]):
            check.problem(
                "status-listen",
                f"port {listen[1]} on {listen[0]} is also listeners[{i}]'s "
                f"({listener.host} port {listener.port}), where nginx listens",
            )
            return
