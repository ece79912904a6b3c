"""keter raises its own soft limit on open files (keter.daemon.raise_open_files_limit).

keter holds a few descriptors per app; started from a shell (1024 open files,
the usual soft limit) rather than by keter.service (65536), it would refuse
every deploy after a few hundred apps with "Too many open files".
"""

from __future__ import annotations

import resource
from pathlib import Path


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard limits on open files of process ``pid`` (/proc/PID/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files line in /proc/{pid}/limits")


def test_keter_started_with_a_low_open_files_limit_takes_its_hard_limit(keter_factory) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # prlimit sets the soft limit alone and execs keter in its place (the same pid).
    keter = keter_factory(wrapper=("prlimit", "--nofile=256:", "--"))
    assert open_files(keter.proc.pid) == (hard, hard)
    assert f"open files limit raised from 256 to {hard}" in keter.log_since_start()


def test_keter_leaves_a_limit_already_at_its_hard_limit_alone(keter_factory) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    keter = keter_factory(wrapper=("prlimit", f"--nofile={hard}:", "--"))
    assert open_files(keter.proc.pid) == (hard, hard)
    assert "open files limit raised" not in keter.log_since_start()
