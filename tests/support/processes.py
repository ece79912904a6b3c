"""Driving a real ProcessMonitor in tests: the Harness, the make_monitor fixture, pids."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from keter.messages import (
    HealthCheck,
    ProcessHealthy,
    ProcessSpec,
    ProcessStarted,
    ProcessStateChanged,
    StartProcess,
)
from keter.processes import ProcessMonitor
from keter.processes.groups import group_members
from support.bundles import VERSIONED_APP

HEALTH = HealthCheck(host="app.test")


def stop_child(process: subprocess.Popen | None, timeout: float = 5) -> None:
    """A helper server the tests started: TERM, then KILL if it is still there after
    ``timeout`` seconds; it is reaped either way. None: nothing was started."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it may never be reaped here)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def own_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if alive(p.pid)]


class Harness:
    """A running ProcessMonitor plus a record of everything it reported."""

    def __init__(self, tmp_path: Path, **options: object) -> None:
        self.tmp_path = tmp_path
        self.reports: queue.Queue = queue.Queue()
        self.seen: list[tuple[float, object]] = []
        settings = {
            "health_check_timeout": 10.0,
            "stop_timeout": 2.0,
            "log_max_bytes": 1_000_000,
            "log_backups": 3,
        }
        settings.update(options)
        self.monitor = ProcessMonitor(report_to=self.reports, run_dir=tmp_path / "run", **settings)
        self.pgids: set[int] = set()

    def spec(
        self,
        *args: str,
        port: int | None = None,
        health: HealthCheck | None = HEALTH,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] | None = None,
        log_name: str = "app",
        **fields: object,
    ) -> ProcessSpec:
        environment = {"VERSION": "v1", **(env or {})}
        if port is not None:
            environment["PORT"] = str(port)
        return ProcessSpec(
            command=command or (sys.executable, "-u", str(VERSIONED_APP), *args),
            cwd=self.tmp_path,
            env=environment,
            log_path=self.tmp_path / "log" / f"{log_name}.log",
            port=port,
            health=health if port is not None else None,
            **fields,
        )

    def start(self, deploy_id: int, spec: ProcessSpec, app: str = "app") -> None:
        self.monitor.tell(StartProcess(app=app, deploy_id=deploy_id, spec=spec))

    def expect(self, kind: type, timeout: float = 10.0, after: int = 0, **fields: object):
        """The first report of ``kind`` with these fields (at index >= after), waiting for it."""
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.seen):
                message = self.seen[index][1]
                index += 1
                if isinstance(message, kind) and all(
                    getattr(message, k) == v for k, v in fields.items()
                ):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind.__name__} {fields}; seen: {self.messages()}")
            try:
                message = self.reports.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append((time.monotonic(), message))
            if isinstance(message, ProcessStateChanged) and message.state == "STARTING":
                self.pgids.add(self.pid_of(message))  # checked for leftovers at the end

    def index(self, message: object) -> int:
        return next(i for i, (_, m) in enumerate(self.seen) if m is message)

    def when(self, message: object) -> float:
        return self.seen[self.index(message)][0]

    def messages(self) -> list[object]:
        return [m for _, m in self.seen]

    def states(self, deploy_id: int) -> list[str]:
        return [
            m.state
            for m in self.messages()
            if isinstance(m, ProcessStateChanged) and m.deploy_id == deploy_id
        ]

    @staticmethod
    def pid_of(change: ProcessStateChanged) -> int:
        return int(re.search(r"pid (\d+)", change.detail).group(1))

    def healthy(self, deploy_id: int, spec: ProcessSpec) -> int:
        """Start a deploy, wait until it is healthy, return its pid."""
        self.start(deploy_id, spec)
        self.expect(ProcessHealthy, deploy_id=deploy_id)
        return self.expect(ProcessStarted, deploy_id=deploy_id).pid


@pytest.fixture
def make_monitor(tmp_path):
    """Start ProcessMonitors; afterwards stop them and check no process is left."""
    harnesses: list[Harness] = []
    # A process another test left behind is that test's failure, not one of every test after.
    before = {p.pid for p in own_children()}

    def make(**options: object) -> Harness:
        harness = Harness(tmp_path, **options)
        harness.monitor.start()
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.monitor.stop()
        harness.monitor.join(timeout=30)
        assert not harness.monitor.is_alive()
        for pgid in harness.pgids:
            assert group_members(pgid) == [], f"group {pgid} survived the monitor"
    assert [p for p in own_children() if p.pid not in before] == []
