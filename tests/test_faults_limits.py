"""Fault suite, part 3: the resource limits keter puts on apps, at work.

A fork bomb, an fd hog and a memory hog each run as a real process under the
process monitor with small limits (so a test stays cheap and the machine safe),
hit their limit inside the app, and leave nothing behind once stopped. The
monitor here has no cgroup controllers, so these are the rlimits keter falls
back to (keter.processes.controllers); the cgroup limits and OOM kills, and
every app's default limits, are checked through a real keter in
tests/test_limits.py.

``RLIMIT_NPROC`` does not bind root (see keter.processes.spawn), so the fork bomb runs
as ``nobody``, as apps do under keter's ``setuid``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from support.processes import Harness
from support.wait import wait_for

from keter.limits import Limits
from keter.messages import ProcessStarted, ProcessStopped, StopProcess
from keter.processes.groups import group_members

NOBODY_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a virtualenv under /root

# A fork bomb with a bound (193 processes), so that a limit that failed to apply could
# not hurt the machine. The leader alone forks more often than the test's limit allows,
# so it is the one that must be refused, whatever its children manage meanwhile.
FORK_BOMB = r"""
import os, signal
refused = None
for _ in range(64):
    try:
        child = os.fork()
    except OSError as exc:
        refused = exc.strerror
        break
    if child == 0:
        for _ in range(2):  # every child forks too, as a bomb's would
            try:
                if os.fork() == 0:
                    break
            except OSError:
                break
        while True:
            signal.pause()
print(f"fork refused: {refused}" if refused else "never refused", flush=True)
while True:
    signal.pause()
"""

FD_HOG = r"""
import os, signal
fds = []
try:
    while len(fds) < 100_000:
        fds.append(os.open(os.devnull, os.O_RDONLY))
except OSError as exc:
    print(f"refused after {len(fds)} files: {exc.strerror}", flush=True)
else:
    print("never refused", flush=True)
while True:
    signal.pause()
"""

MEMORY_HOG = r"""
import signal
blocks = []
try:
    while len(blocks) < 512:
        blocks.append(bytearray(8 << 20))
except MemoryError:
    print(f"refused after {len(blocks) * 8} MiB", flush=True)
else:
    print("never refused", flush=True)
while True:
    signal.pause()
"""


def run_hog(
    monitor: Harness, source: str, command: tuple[str, ...] = (), **fields: object
) -> tuple[int, str]:
    """Start Python ``source`` (or ``command``) as a no-port app; wait for its verdict line.

    Returns the app's pid and the line.
    """
    command = command or (NOBODY_PYTHON, "-c", source)
    spec = monitor.spec(health=None, command=command, **fields)
    monitor.start(1, dataclasses.replace(spec, cwd=Path("/")))
    pid = monitor.expect(ProcessStarted, deploy_id=1).pid
    applog = monitor.tmp_path / "log" / "app.log"
    line = wait_for(
        lambda: re.search(r"(fork refused|refused after|never refused).*", applog.read_text()),
        20,
        "the app's verdict",
    )[0]
    return pid, line


def stop(monitor: Harness, pid: int) -> None:
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))
    monitor.expect(ProcessStopped, deploy_id=1, timeout=20)
    assert group_members(pid) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="running the app as nobody needs root")
def test_fork_bomb_hits_the_process_limit_and_leaves_nothing(make_monitor) -> None:
    monitor = make_monitor(limits=Limits(processes=24), stop_timeout=1.0)
    pid, line = run_hog(monitor, FORK_BOMB, user="nobody")
    assert line == "fork refused: Resource temporarily unavailable"
    assert len(group_members(pid)) <= 24
    stop(monitor, pid)


def test_fd_hog_hits_the_open_files_limit(make_monitor) -> None:
    monitor = make_monitor(limits=Limits(open_files=64))
    pid, line = run_hog(monitor, FD_HOG)
    count = int(re.search(r"after (\d+) files", line)[1])
    assert "Too many open files" in line and 50 < count <= 64
    stop(monitor, pid)


def test_memory_hog_hits_the_data_limit(make_monitor) -> None:
    monitor = make_monitor(limits=Limits(memory=256 << 20))
    pid, line = run_hog(monitor, MEMORY_HOG)
    assert re.fullmatch(r"refused after \d+ MiB", line), line
    assert int(line.split()[2]) < 256
    stop(monitor, pid)


def test_limits_hold_from_the_apps_first_instruction(make_monitor) -> None:
    """The chain's shell sets the limits before it execs the app, so even a program that
    looks at once (cat, ~1 ms after exec) sees them: no window to fork around them."""
    monitor = make_monitor(limits=Limits(open_files=64, processes=77))
    command = ("/bin/sh", "-c", "cat /proc/self/limits; echo never refused; exec sleep 600")
    pid, _ = run_hog(monitor, "", command=command)
    text = (monitor.tmp_path / "log" / "app.log").read_text()
    assert re.search(r"Max open files\s+64\s+64 ", text), text
    assert re.search(r"Max processes\s+77\s+77 ", text), text
    assert re.search(r"Max core file size\s+0\s+0 ", text), text
    stop(monitor, pid)
