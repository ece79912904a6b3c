"""Where each resource limit (``keter.limits``) is carried out, and OOM kills (issue 11.5).

Chosen once at start, per controller, in this order:

* **cgroup v2**: when keter's v2 subtree (``keter.processes.cgroups``) can hand the
  controller down to its deploy cgroups: ``memory.max`` (and ``memory.swap.max``
  0), ``pids.max``, ``cpu.max``; OOM kills are counted in ``memory.events``.
  cgroup v2 lets a cgroup with processes of its own hand out no controller, so
  when keter itself sits in the cgroup it was given (systemd's ``Delegate=yes``)
  it first moves into a leaf of its own, ``keter-ID-daemon``.
* **cgroup v1**: when the controller's v1 hierarchy is mounted (Debian's hybrid
  layout, or this project's test machines) and keter can make groups in it:
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` alike),
  ``pids.max``, ``cpu.cfs_quota_us``; OOM kills are counted in
  ``memory.oom_control``. keter's groups are ``keter-ID/dNN-APP`` under keter's
  own group of each hierarchy (ID as in cgroups.py), so nothing else's groups
  are touched.
* **rlimits** otherwise: memory becomes ``RLIMIT_DATA`` (per process: an app
  over it gets ENOMEM rather than the OOM killer), processes ``RLIMIT_NPROC``
  (per user, and never for root); a CPU limit cannot be carried out.

Open files are always ``RLIMIT_NOFILE`` (per process; no controller counts them).

A deploy's groups are made, and its limits written, before its first process
starts; each of its processes joins them in the exec chain before the app's
first instruction (``keter.processes.spawn.chain``). When a
process dies by SIGKILL and the deploy's OOM kill count rose meanwhile, the OOM
killer killed it (``DeployLimits.oom_kills``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from keter.limits import Limits, show, show_bytes
from keter.processes.cgroups import Cgroup, Cgroups, keter_id
from keter.processes.spawn import ResourceLimits
from keter.processes.states import describe_exit

log = logging.getLogger(__name__)

# The controllers keter uses.
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD = 100_000  # microseconds: the kernel's default CFS period
# The file each v1 controller must have in keter's group for keter to use it.
V1_PROBE = {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.cfs_quota_us"}


class Mechanism(enum.StrEnum):
    """How one limit is carried out."""

    CGROUP_V2 = "cgroup v2"
    CGROUP_V1 = "cgroup v1"
    RLIMIT = "rlimit"
    NONE = "not applied"


def write(path: Path, text: str) -> None:
    """One write of a cgroup file (the kernel takes or refuses it whole)."""
    with open(path, "w") as f:
        f.write(text)


# -- what is mounted where -----------------------------------------------------------------


def v1_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, tuple[Path, str]]:
    """Each v1 controller's hierarchy: {controller: (mount point, root of the mount)}."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, tuple[Path, str]] = {}
    for line in lines:
        # "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
        left, _, right = line.partition(" - ")
        parts, kind = left.split(" "), right.split(" ")
        if len(parts) < 5 or len(kind) < 3 or kind[0] != "cgroup":
            continue
        for option in kind[2].split(","):
            if option in CONTROLLERS:
                found.setdefault(option, (Path(_unescape(parts[4])), _unescape(parts[3])))
    return found


def v1_paths(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """keter's own group in each v1 hierarchy: {controller: path} ("4:memory:/a/b")."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if number == "0":
            continue  # the v2 hierarchy
        for name in names.split(","):
            if name in CONTROLLERS:
                found[name] = path
    return found


def _unescape(text: str) -> str:
    """mountinfo writes spaces and the like as octal escapes (``\\040``)."""
    return text.encode().decode("unicode_escape") if "\\" in text else text


def own_v1_group(mount: Path, mount_root: str, own: str) -> Path | None:
    """Where keter's own group of a v1 hierarchy is (None: outside what is mounted)."""
    root = mount_root.rstrip("/") or "/"
    if root != "/" and own != root and not own.startswith(root + "/"):
        return None  # keter's group is not visible under this mount (a container)
    relative = own[len(root) :] if root != "/" else own
    return mount / relative.lstrip("/")


# -- the choice, once at start ---------------------------------------------------------------


@dataclass(frozen=True)
class Controllers:
    """Which controllers keter uses where: handed down to its v2 deploy cgroups (``v2``),
    or keter's subtree in a v1 hierarchy (``v1``). A controller in neither is not used."""

    v2: frozenset[str] = frozenset()
    v1: Mapping[str, Path] = field(default_factory=dict)

    @classmethod
    def find(
        cls,
        root: Path,
        cgroups: Cgroups | None,
        *,
        mountinfo: str = "/proc/self/mountinfo",
        proc_cgroup: str = "/proc/self/cgroup",
    ) -> Controllers:
        """What this machine offers keter on ``root`` (keter's v2 subtree: ``cgroups``)."""
        v2 = enable_v2(cgroups.base) if cgroups is not None else frozenset()
        mounts, own = v1_mounts(mountinfo), v1_paths(proc_cgroup)
        v1 = {}
        for name in CONTROLLERS:
            if name in v2 or name not in mounts or name not in own:
                continue
            group = own_v1_group(*mounts[name], own[name])
            if group is None:
                continue
            base = group / f"keter-{keter_id(root)}"
            try:
                base.mkdir(exist_ok=True)
            except OSError as exc:
                log.debug("processes: cannot use the v1 %s hierarchy: %s", name, exc)
                continue
            if os.access(base / V1_PROBE[name], os.W_OK):
                v1[name] = base
        return cls(v2=v2, v1=v1)

    def mechanism(self, limit: str) -> Mechanism:
        """How ``limit`` ("memory", "processes", "open_files", "cpu") is carried out."""
        if limit == "open_files":
            return Mechanism.RLIMIT
        controller = {"memory": "memory", "processes": "pids", "cpu": "cpu"}[limit]
        if controller in self.v2:
            return Mechanism.CGROUP_V2
        if controller in self.v1:
            return Mechanism.CGROUP_V1
        return Mechanism.NONE if limit == "cpu" else Mechanism.RLIMIT

    def describe(self, defaults: Limits) -> str:
        """``memory 512 MiB (cgroup v1), processes 4096 (cgroup v1), ...``: app-limits'
        defaults and how each is carried out, for the line keter logs at start."""
        parts = []
        for name, shown in (
            ("memory", "memory"),
            ("processes", "processes"),
            ("open_files", "open files"),
            ("cpu", "cpu"),
        ):
            value = getattr(defaults, name)
            value_shown = "unlimited" if value is None else show(name, value)
            parts.append(f"{shown} {value_shown} ({self.mechanism(name)})")
        return ", ".join(parts)

    def fallbacks(self) -> bool:
        """Whether some limit is not carried out by a cgroup (worth a warning at start)."""
        return any(name not in self.v2 and name not in self.v1 for name in CONTROLLERS)

    def rlimits(self, limits: Limits) -> ResourceLimits:
        """The rlimits a process with ``limits`` gets: open files, no core dumps, and the
        limits no controller carries out."""
        return ResourceLimits(
            nofile=limits.open_files,
            nproc=limits.processes if self.mechanism("processes") is Mechanism.RLIMIT else None,
            data=limits.memory if self.mechanism("memory") is Mechanism.RLIMIT else None,
        )

    def for_deploy(self, app: str, deploy_id: int, cgroup: Cgroup | None) -> DeployLimits:
        """The deploy's groups, made (an old group of the same name is emptied and reused);
        ``cgroup`` is its v2 cgroup, if it has one."""
        name = f"d{int(deploy_id)}-{app}"
        groups = {}
        try:
            for controller, base in self.v1.items():
                group = base / name
                if group.is_dir():
                    _kill_listed(group)
                else:
                    group.mkdir(parents=True)  # keter's subtree too, should it be gone
                groups[controller] = group
        except OSError:
            for group in groups.values():
                _remove(group)
            raise
        v2 = cgroup.path if cgroup is not None and self.v2 else None
        return DeployLimits(v2=v2, v2_controllers=self.v2, v1=groups)

    def sweep(self) -> None:
        """At start: kill what a killed keter left in its v1 groups, remove the groups."""
        for base in self.v1.values():
            with contextlib.suppress(OSError):
                for group in sorted(p for p in base.iterdir() if p.is_dir()):
                    _kill_listed(group)
                    _remove(group)

    def remove(self) -> None:
        """keter is stopping: remove its (empty) v1 subtrees."""
        for base in self.v1.values():
            with contextlib.suppress(OSError):  # not empty: the next start sweeps it
                base.rmdir()


def enable_v2(base: Path) -> frozenset[str]:
    """Hand every controller keter uses that its own v2 cgroup has down to ``base``
    (keter's subtree), and so to the deploy cgroups in it; the ones that worked."""
    own = base.parent
    try:
        available = set((own / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()
    enabled = set()
    for name in CONTROLLERS:
        if name not in available:
            continue
        try:
            _enable(own, name, own / f"{base.name}-daemon")
            write(base / "cgroup.subtree_control", f"+{name}")
        except OSError as exc:
            log.debug("processes: cannot use the v2 %s controller: %s", name, exc)
            continue
        enabled.add(name)
    return frozenset(enabled)


def _enable(own: Path, name: str, leaf: Path) -> None:
    """Enable ``name`` for the children of keter's own cgroup.

    cgroup v2 refuses (EBUSY) while the cgroup has processes of its own, as keter's
    does when systemd started it there: keter then moves itself into ``leaf``
    (``keter-ID-daemon``, beside its subtree) and tries again, if it is alone.
    """
    if name in (own / "cgroup.subtree_control").read_text().split():
        return
    try:
        write(own / "cgroup.subtree_control", f"+{name}")
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    pids = (own / "cgroup.procs").read_text().split()
    if pids != [str(os.getpid())]:
        raise OSError(errno.EBUSY, f"{own} holds other processes than keter")
    leaf.mkdir(exist_ok=True)
    write(leaf / "cgroup.procs", str(os.getpid()))
    log.info("processes: keter moved itself to %s to hand controllers to its apps", leaf)
    write(own / "cgroup.subtree_control", f"+{name}")


# -- one deploy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployLimits:
    """One deploy's limit groups: its v2 cgroup (if controllers are handed to it) and its
    group in each v1 hierarchy keter uses."""

    v2: Path | None
    v2_controllers: frozenset[str]
    v1: Mapping[str, Path]

    def apply(self, limits: Limits) -> None:
        """Write ``limits`` (None: unlimited) to every group; OSError if the kernel refuses."""
        for controller, group, v2 in self._groups():
            if controller == "memory":
                _memory(group, limits.memory, v2)
            elif controller == "pids":
                count = limits.processes
                write(group / "pids.max", "max" if count is None else str(count))
            elif controller == "cpu":
                quota = None if limits.cpu is None else round(limits.cpu * CPU_PERIOD)
                if v2:
                    write(group / "cpu.max", f"{'max' if quota is None else quota} {CPU_PERIOD}")
                else:
                    write(group / "cpu.cfs_period_us", str(CPU_PERIOD))
                    write(group / "cpu.cfs_quota_us", str(-1 if quota is None else quota))

    def procs(self) -> tuple[Path, ...]:
        """The v1 ``cgroup.procs`` files a process joins (its v2 cgroup is joined anyway)."""
        return tuple(group / "cgroup.procs" for group in self.v1.values())

    def oom_kills(self) -> int | None:
        """How many of the deploy's processes the OOM killer has killed; None: unknown."""
        if self.v2 is not None and "memory" in self.v2_controllers:
            file, key = self.v2 / "memory.events", "oom_kill"
        elif "memory" in self.v1:
            file, key = self.v1["memory"] / "memory.oom_control", "oom_kill"
        else:
            return None
        try:
            for line in file.read_text().splitlines():
                name, _, count = line.partition(" ")
                if name == key:
                    return int(count)
        except (OSError, ValueError):
            pass
        return None

    def remove(self) -> None:
        """The deploy is gone: remove its v1 groups (its v2 cgroup is cgroups.py's)."""
        for group in self.v1.values():
            _remove(group)

    def _groups(self) -> list[tuple[str, Path, bool]]:
        found = [(c, self.v2, True) for c in CONTROLLERS if self.v2 and c in self.v2_controllers]
        return found + [(c, group, False) for c, group in self.v1.items()]


def oom_reason(memory: int | None, returncode: int) -> str:
    """Why a process died whose deploy's OOM kill count rose meanwhile: killed by the OOM
    killer, or (a wrapper that did not exec its app) exited after it killed a child."""
    limit = "no memory limit: the machine ran out" if memory is None else "memory limit "
    limit += "" if memory is None else show_bytes(memory)
    if returncode == -signal.SIGKILL:
        return f"killed by the OOM killer ({limit})"
    return f"{describe_exit(returncode)} after the OOM killer killed a process of it ({limit})"


def _memory(group: Path, limit: int | None, v2: bool) -> None:
    """The memory limit, swap included: an app over it is OOM-killed, not swapped out."""
    if v2:
        write(group / "memory.max", "max" if limit is None else str(limit))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to limit
            write(group / "memory.swap.max", "max" if limit is None else "0")
        return
    # v1 wants memsw >= limit at every moment: lift it first, then lower both.
    swap = group / "memory.memsw.limit_in_bytes"
    with contextlib.suppress(FileNotFoundError):
        write(swap, "-1")
    write(group / "memory.limit_in_bytes", "-1" if limit is None else str(limit))
    if limit is not None:
        with contextlib.suppress(FileNotFoundError):
            write(swap, str(limit))


def _kill_listed(group: Path) -> None:
    """SIGKILL every process a v1 group lists (a group a killed keter left)."""
    try:
        pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove(group: Path) -> None:
    # A v1 memory group removed with page cache still charged to it stays in the
    # kernel, dead, until memory pressure reclaims those pages; thousands of deploys
    # leave thousands of dead groups, and each new group then costs more. Writing
    # memory.force_empty first has the kernel reclaim them (what it is for). Other
    # controllers' groups have no such file.
    with contextlib.suppress(OSError):
        write(group / "memory.force_empty", "0")
    try:
        group.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a process that left its process group still runs in it
        log.warning("processes: cannot remove %s: %s (the next start retries)", group, exc)
