"""Benchmark 7: what putting an app in its limit groups costs (issue 11.5).

keter's own spawn (``keter.processes.spawn.spawn``, as the process monitor calls it)
of a program that prints one line, timed from the call until the line is read:

* the chain with the deploy's v2 cgroup only (``sh`` joins it and sets the
  rlimits, ``setpriv`` to an app uid, the program): the reference;
* the same chain also joining the deploy's limit groups (its v1 memory, pids
  and cpu groups on a hybrid machine) with its rlimits: the figure;
* a plain ``Popen`` of the program, for scale.

In rounds, the three back to back in turn, so load on a shared machine hits
them alike. Then the per-deploy cost: a deploy's groups made, its limits
written, the groups removed (against the v2 cgroup alone, made and removed).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from harness import Row, Settings, median, spread

from keter.limits import Limits
from keter.messages import ProcessSpec
from keter.processes.cgroups import Cgroups
from keter.processes.controllers import Controllers
from keter.processes.spawn import Identity, ResourceLimits, spawn

NAME = "spawn"
TARGET = 0.001  # joining the limit groups may add at most 1 ms to a start
LIMITS = Limits(memory=256 << 20, processes=100, open_files=1000, cpu=0.5)
APP_UID = 1_900_999_123  # an app uid as keter.users hands them out (no passwd entry)


def run(settings: Settings) -> list[Row]:
    rounds = settings.pick(300, 30)
    root = Path(tempfile.mkdtemp(prefix="spawn-", dir=settings.workdir))
    cgroups = Cgroups.find(root)
    controllers = Controllers.find(root, cgroups)
    if cgroups is None or not (controllers.v1 or controllers.v2):
        shown = "no cgroup v2 hierarchy" if cgroups is None else "no cgroup controller"
        return [Row("spawn: joining the limit groups", f"not measured: {shown}", "", "", None)]
    try:
        cgroup = cgroups.for_deploy("bench", 1)
        groups = controllers.for_deploy("bench", 1, cgroup)
        groups.apply(LIMITS)
        spec = ProcessSpec(
            command=("/bin/echo", "ready"),
            cwd=Path("/"),
            env={"PATH": "/usr/bin:/bin"},
            log_path=Path("/dev/null"),
        )
        identity = Identity(APP_UID, APP_UID)
        starts = {
            "plain": lambda: subprocess.Popen(["/bin/echo", "ready"], stdout=subprocess.PIPE),
            "cgroup": lambda: spawn(spec, ResourceLimits(), identity=identity, cgroup=cgroup),
            "limits": lambda: spawn(
                spec,
                controllers.rlimits(LIMITS),
                identity=identity,
                cgroup=cgroup,
                join=groups.procs(),
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in starts}
        for _ in range(rounds):
            for name, start in starts.items():
                times[name].append(_timed(start))
        per_deploy, cgroup_only = [], []
        for n in range(rounds):
            began = time.perf_counter()
            other = cgroups.for_deploy("bench", 1000 + n)
            other_groups = controllers.for_deploy("bench", 1000 + n, other)
            other_groups.apply(LIMITS)
            other_groups.remove()
            other.remove()
            per_deploy.append(time.perf_counter() - began)
            began = time.perf_counter()
            other = cgroups.for_deploy("bench", 5000 + n)
            other.remove()
            cgroup_only.append(time.perf_counter() - began)
        groups.remove()
        cgroup.remove()
    finally:
        cgroups.remove()
        controllers.remove()

    added = median(times["limits"]) - median(times["cgroup"])
    how = ", ".join(f"{name} {where}" for name, where in _where(controllers).items())
    return [
        Row(
            "spawn: an app's start joining its limit groups",
            f"{spread(times['limits'])}: {added * 1000:+.2f} ms over the cgroup alone ({how})",
            f"chain with its v2 cgroup only {spread(times['cgroup'])}; "
            f"plain Popen {spread(times['plain'])}",
            f"<= +{TARGET * 1000:g} ms",
            added <= TARGET,
        ),
        Row(
            "spawn: a deploy's limit groups made, written, removed",
            spread(per_deploy),
            f"its v2 cgroup alone {spread(cgroup_only)}",
            "",
            None,
        ),
    ]


def _timed(start) -> float:
    """Seconds from the spawn call until the program's line is read."""
    began = time.perf_counter()
    process = start()
    process.stdout.readline()
    took = time.perf_counter() - began
    process.wait()
    process.stdout.close()
    return took


def _where(controllers: Controllers) -> dict[str, str]:
    return {
        name: "v2" if name in controllers.v2 else "v1"
        for name in ("memory", "pids", "cpu")
        if name in controllers.v2 or name in controllers.v1
    }
