"""Resource limits of app processes (issue 11.5): the values, how YAML writes them, the
ceiling.

Four limits, each for one process stanza of a bundle (a web app, a background
worker, a release command) and everything it starts:

* ``memory``: bytes, or a size with a binary suffix (``512M``, ``2G``; K M G T);
* ``processes``: processes and threads;
* ``open-files``: open files per process;
* ``cpu``: cores, as a number (``0.5``, ``2``) or a percentage of one core
  (``"50%"``, ``"200%"``).

``keter-config.yaml``'s ``app-limits`` gives every process its defaults; its
``max`` is the operator's ceiling for what a bundle's own ``limits:`` may ask
(``max`` of a limit defaults to that limit's default: without ``max`` a bundle
may lower its limits, not raise them). A bundle above the ceiling is refused
(``AppLimits.over_ceiling``, checked by the supervisor before anything starts).

How each limit is carried out (a cgroup controller, or an rlimit) is
``keter.processes.controllers``'.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

from keter.yamlcheck import Checker, describe, is_int, key_name, number, unknown_key

KIB = 1 << 10
MIB = 1 << 20
MAX_MEMORY = 1 << 50  # 1 PiB: no machine has more; a bigger number is a mistake
MIN_MEMORY = MIB  # below that not even a shell starts
MAX_PROCESSES = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_OPEN_FILES = (1 << 31) - 1  # above the kernel's largest fs.nr_open
MIN_CPU = 0.01  # the kernel's smallest CFS quota is 1 ms per 100 ms period
MAX_CPU = 4096.0

_SIZE = re.compile(r"(\d{1,16})\s*([KkMmGgTt]?)")
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": 1 << 30, "t": 1 << 40}
_PERCENT = re.compile(r"(\d{1,6}(?:\.\d{1,4})?)\s*%")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """One process stanza's limits; None: not limited (or, in a bundle, not given, so the
    operator's default applies)."""

    memory: int | None = None  # bytes, for all its processes together
    processes: int | None = None  # processes and threads, all together
    open_files: int | None = None  # per process
    cpu: float | None = None  # cores (0.5: half of one core's time)

    def merged(self, override: Limits) -> Limits:
        """These limits with every limit ``override`` gives taking the place of ours."""
        given = {f.name: getattr(override, f.name) for f in fields(override)}
        return replace(self, **{name: value for name, value in given.items() if value is not None})

    def shown(self) -> str:
        """``memory 256 MiB, processes 100, open files 4096, cpu 0.5 cores`` (set ones only)."""
        parts = [f"{_KEYS[name]} {show(name, value)}" for name, value in self.items()]
        return ", ".join(parts) or "none"

    def items(self) -> list[tuple[str, int | float]]:
        """(field, value) of every limit that is set."""
        return [(f.name, v) for f in fields(self) if (v := getattr(self, f.name)) is not None]


NO_LIMITS = Limits()  # a stanza that gives none of its own

# The YAML keys of the fields, and what keter-config.yaml applies when it says nothing.
KEYS = {"memory": "memory", "processes": "processes", "open-files": "open_files", "cpu": "cpu"}
_KEYS = {field: key for key, field in KEYS.items()}
DEFAULTS = Limits(processes=4096, open_files=65536)


@dataclass(frozen=True, kw_only=True)
class AppLimits:
    """``app-limits``: the defaults every process runs under, and the ceiling for a bundle's
    own limits (None in ``ceiling``: a bundle may ask for any value of that limit)."""

    defaults: Limits = DEFAULTS
    ceiling: Limits = DEFAULTS

    def over_ceiling(self, stanzas: Iterable[tuple[str, Limits]]) -> list[str]:
        """One problem per limit a bundle's stanza asks for above the ceiling.

        ``stanzas`` are (where, limits) pairs; ``where`` ("", "webapp 2: ") starts
        each problem.
        """
        problems = []
        for where, own in stanzas:
            for name, value in own.items():
                most = getattr(self.ceiling, name)
                if most is not None and value > most:
                    key = _KEYS[name]
                    problems.append(
                        f"{where}limits.{key}: {show(name, value)} is above the ceiling of "
                        f"{show(name, most)} (app-limits.max.{key} in keter-config.yaml)"
                    )
        return problems


def show(name: str, value: int | float) -> str:
    """A limit's value as an operator reads it: ``256 MiB``, ``100``, ``0.5 cores``."""
    if name == "memory":
        return show_bytes(int(value))
    if name == "cpu":
        return f"{value:g} core" if value == 1 else f"{value:g} cores"
    return str(value)


def show_bytes(count: int) -> str:
    """``256 MiB``; exact: a count that is no whole number of KiB is shown in bytes."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if count >= unit and count % unit == 0:
            return f"{count // unit} {name}"
    return f"{count} bytes"


# -- YAML ----------------------------------------------------------------------------------


def parse_limits(value: object, path: str, check: Checker, *, nulls: bool = False) -> Limits:
    """A mapping of limits (a bundle's ``limits:``, ``app-limits`` without ``max``).

    ``nulls``: a limit may be null (keter-config.yaml: no limit); a bundle must give a
    value. Problems go to ``check``; an unknown key is one (a misspelt limit must not
    pass unnoticed). Returns what could be read.
    """
    if not isinstance(value, dict):
        check.problem(
            path, f"expected a mapping like {{memory: 512M, cpu: 0.5}}, got {describe(value)}"
        )
        return Limits()
    found: dict[str, int | float | None] = {}
    for key, item in value.items():
        where = f"{path}.{key_name(key)}"
        if key not in KEYS:
            check.problem(where, unknown_key(key, tuple(KEYS)))
        elif item is None and nulls:
            found[KEYS[key]] = None
        else:
            parsed = _PARSERS[key](item)
            if parsed is None:
                check.problem(where, f"expected {_EXPECTED[key]}, got {describe(item)}")
            else:
                found[KEYS[key]] = parsed
    return Limits(**found)


def parse_app_limits(value: object, path: str, check: Checker) -> AppLimits:
    """keter-config.yaml's ``app-limits``: the defaults, and ``max``, the ceiling."""
    if not isinstance(value, dict):
        check.problem(
            path, f"expected a mapping like {{memory: 512M, max: {{...}}}}, got {describe(value)}"
        )
        return AppLimits()
    given = {key: item for key, item in value.items() if key != "max"}
    before = len(check.problems)
    own = parse_limits(given, path, check, nulls=True)
    # A limit the file does not name keeps keter's default, unless only its max is given:
    # then the max is also the default (the operator meant "never more than this"); a
    # null max lifts the ceiling and leaves the default alone.
    ceiling_given = value.get("max", {})
    ceiling = parse_limits(ceiling_given, f"{path}.max", check, nulls=True)
    defaults, maxima = {}, {}
    for key, name in KEYS.items():
        in_max = isinstance(ceiling_given, dict) and key in ceiling_given
        if key in given:
            defaults[name] = getattr(own, name)
        elif in_max and getattr(ceiling, name) is not None:
            defaults[name] = getattr(ceiling, name)
        else:
            defaults[name] = getattr(DEFAULTS, name)
        maxima[name] = getattr(ceiling, name) if in_max else defaults[name]
    result = AppLimits(defaults=Limits(**defaults), ceiling=Limits(**maxima))
    if len(check.problems) > before:
        return result
    for key, name in KEYS.items():
        default, most = defaults[name], maxima[name]
        if most is None or (default is not None and default <= most):
            continue
        shown = "null (no limit)" if default is None else show(name, default)
        check.problem(
            f"{path}.{key}",
            f"{shown} is above {path}.max.{key} ({show(name, most)}): the default must be "
            "within the ceiling",
        )
    return result


def _memory(value: object) -> int | None:
    if is_int(value):
        count = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        count = int(match[1]) * _UNITS[match[2].lower()]
    else:
        return None
    return count if MIN_MEMORY <= count <= MAX_MEMORY else None


def _count(maximum: int):
    def parse(value: object) -> int | None:
        return value if is_int(value) and 1 <= value <= maximum else None

    return parse


def _cpu(value: object) -> float | None:
    if isinstance(value, str) and (match := _PERCENT.fullmatch(value.strip())):
        cores = float(match[1]) / 100
    else:
        cores = number(value, MAX_CPU)
    if cores is None or not MIN_CPU <= cores <= MAX_CPU:
        return None
    return cores


_PARSERS = {
    "memory": _memory,
    "processes": _count(MAX_PROCESSES),
    "open-files": _count(MAX_OPEN_FILES),
    "cpu": _cpu,
}
_EXPECTED = {
    "memory": 'a size from 1M to 1024T like "512M", "2G" or a byte count',
    "processes": f"a count of processes and threads from 1 to {MAX_PROCESSES}",
    "open-files": f"a count of open files from 1 to {MAX_OPEN_FILES}",
    "cpu": f'cores from {MIN_CPU:g} to {MAX_CPU:g} like 0.5, or a percentage of a core like "50%"',
}
