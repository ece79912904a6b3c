"""What limits a process runs under, as the kernel holds them (keter.limits, issue 11.5).

Read independently of keter's own code: the cgroups /proc/PID/cgroup names
(v2 where the controller is enabled there, else the v1 hierarchy's group) and
/proc/PID/limits.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from support.faults import limits_of


def delegated_scope() -> tuple[str, ...]:
    """On a systemd machine: the command that starts keter in a scope of its own whose
    cgroup is delegated to it, as keter.service does (``Delegate=yes``). Without it keter
    shares the test run's session scope, which cgroup v2 lets hand no controller to
    keter's apps. () where there is no systemd to ask (keter then uses what it finds)."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemd-run") is None:
        return ()
    wrapper = ("systemd-run", "--scope", "--quiet", "--collect", "-p", "Delegate=yes", "--")
    probe = subprocess.run([*wrapper, "true"], capture_output=True, timeout=30, check=False)
    return wrapper if probe.returncode == 0 else ()


def cgroup_folders(pid: int) -> dict[str, Path]:
    """The folder of the cgroup carrying each of memory, pids and cpu for ``pid``: its v2
    cgroup where that controller is enabled there, else its group in the v1 hierarchy."""
    v2_mount, v1_mounts = None, {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount, kind = Path(left.split()[4]), right.split()
        if kind[0] == "cgroup2":
            v2_mount = mount
        elif kind[0] == "cgroup":
            for option in kind[2].split(","):
                v1_mounts[option] = mount
    found: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, names, path = line.split(":", 2)
        if number == "0" and v2_mount is not None:
            folder = v2_mount / path.lstrip("/")
            for name in (folder / "cgroup.controllers").read_text().split():
                found[name] = folder  # v2 wins: keter prefers it too
        else:
            for name in names.split(","):
                if name in v1_mounts:
                    found.setdefault(name, v1_mounts[name] / path.lstrip("/"))
    return found


def memory_limit(folder: Path) -> int | None:
    file = folder / "memory.max"
    text = file.read_text() if file.exists() else (folder / "memory.limit_in_bytes").read_text()
    return None if text.strip() in ("max", "9223372036854771712") else int(text)


def cpu_cores(folder: Path) -> float | None:
    if (folder / "cpu.max").exists():
        quota, period = (folder / "cpu.max").read_text().split()
    else:
        quota = (folder / "cpu.cfs_quota_us").read_text().strip()
        period = (folder / "cpu.cfs_period_us").read_text().strip()
    return None if quota in ("max", "-1") else int(quota) / int(period)


def counter(file: Path, key: str) -> int:
    for line in file.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    raise AssertionError(f"no {key} in {file}")


def oom_kills(folder: Path) -> int:
    if (folder / "memory.events").exists():
        return counter(folder / "memory.events", "oom_kill")
    return counter(folder / "memory.oom_control", "oom_kill")


def mechanisms(keter_log: str) -> dict[str, str]:
    """How keter says it carries out each limit, from its line at start:
    {"memory": "cgroup v1", "processes": ..., "open files": "rlimit", "cpu": ...}."""
    match = re.search(r"processes: app limits: (.*?)(;|$)", keter_log, re.M)
    assert match, "keter's line saying how it applies limits"
    return dict(re.findall(r"(memory|processes|open files|cpu) [^,]*?\(([a-z0-9 ]+)\)", match[1]))


def applied(pid: int, how: dict[str, str]) -> dict:
    """Every limit ``pid`` runs under, as the kernel holds it, read where keter says it
    puts each (``how``: ``mechanisms``): its cgroups, else its rlimits."""
    folders, rlimits = cgroup_folders(pid), limits_of(pid)

    def rlimit(name: str) -> int | None:
        soft = rlimits[name][0]
        return None if soft == "unlimited" else int(soft)

    cgroup = {name: how[name].startswith("cgroup") for name in ("memory", "processes", "cpu")}
    return {
        "memory": memory_limit(folders["memory"]) if cgroup["memory"] else rlimit("Max data size"),
        "processes": (
            int((folders["pids"] / "pids.max").read_text())
            if cgroup["processes"]
            else rlimit("Max processes")
        ),
        "open-files": rlimit("Max open files"),
        "cpu": cpu_cores(folders["cpu"]) if cgroup["cpu"] else None,
    }
