"""Where ports could collide: ``port-range`` against the kernel's ephemeral
range, the listeners and the status listener.
"""

from __future__ import annotations

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
