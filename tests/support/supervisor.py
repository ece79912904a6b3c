"""Driving the supervisor without threads: fake components, a clock, the ``rig`` fixture.

Every component is a ``FakeComponent`` that records what it is told; a test
plays the components' replies with the ``Rig``'s helpers (tests/test_supervisor.py
and tests/test_supervisor_release.py). ``make_rig(kernel=True)`` adds a switch
component in kernel mode (keter.switch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from keter.bundle import BundleConfig, StaticFiles, WebApp
from keter.config import KeterConfig
from keter.deploys import Stage
from keter.messages import (
    AppChanged,
    ApplyNginx,
    AppState,
    BundleArrived,
    BundleUnpacked,
    Component,
    DeployFinished,
    NginxApplied,
    ProcessHealthy,
    ProcessStarted,
    ProcessStopped,
    SiteRefused,
    StartProcess,
    StopProcess,
    SwitchMode,
    SwitchReady,
    UnpackBundle,
)
from keter.processes.ports import PortPool, port_is_free
from keter.supervisor import Components, Supervisor


class FakeComponent:
    """Records every message; start/restart are counted, never run."""

    def __init__(self, name: str) -> None:
        self.component = Component(name)
        self.told: list[object] = []
        self.started = 0
        self.restarted = 0

    def tell(self, message: object) -> None:
        self.told.append(message)

    def start(self) -> None:
        self.started += 1

    def restart(self) -> None:
        self.restarted += 1

    def join(self, timeout: float | None = None) -> None:
        pass

    def take(self, kind: type = object) -> list:
        """The messages of ``kind`` told since the last take (removed from the record)."""
        taken = [m for m in self.told if isinstance(m, kind)]
        self.told = [m for m in self.told if not isinstance(m, kind)]
        return taken

    def one(self, kind: type):
        [message] = self.take(kind)
        return message


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    sup: Supervisor
    watcher: FakeComponent
    unpacker: FakeComponent
    monitor: FakeComponent
    nginx: FakeComponent
    postgres: FakeComponent
    status: FakeComponent
    clock: Clock
    tmp: Path
    backups: FakeComponent
    switch: FakeComponent | None = None
    stats: FakeComponent | None = None  # make_rig(stats=True): watched rollout

    def send(self, *messages: object) -> None:
        for message in messages:
            self.sup.dispatch(message)

    # -- playing the components ---------------------------------------------------------

    def arrive(self, app: str, size: int = 100) -> UnpackBundle:
        self.send(BundleArrived(app=app, path=self.tmp / f"{app}.keter", mtime_ns=1, size=size))
        return self.unpacker.one(UnpackBundle)

    def unpacked(self, unpack: UnpackBundle, config: BundleConfig, sha: str = "ab" * 32) -> None:
        self.send(
            BundleUnpacked(
                app=unpack.app,
                deploy_id=unpack.deploy_id,
                folder=unpack.dest,
                config=config,
                sha256=sha,
            )
        )

    def healthy(self, start: StartProcess, pid: int = 4242) -> None:
        self.send(
            ProcessStarted(app=start.app, deploy_id=start.deploy_id, pid=pid, port=start.spec.port),
            ProcessHealthy(app=start.app, deploy_id=start.deploy_id),
        )

    def nginx_ok(self, refused: tuple[SiteRefused, ...] = ()) -> ApplyNginx:
        apply = self.nginx.one(ApplyNginx)
        self.send(NginxApplied(generation=apply.generation, refused=refused))
        return apply

    def drain_over(self) -> None:
        """drain-seconds pass: every draining version's timer is due."""
        self.clock.now += self.sup.config.drain_seconds
        for timer in self.sup.due_timers():
            self.send(timer)

    def stopped(self, *stops: StopProcess) -> None:
        for stop in stops:
            self.send(ProcessStopped(app=stop.app, deploy_id=stop.deploy_id))

    def deploy(self, app: str, config: BundleConfig, sha: str = "ab" * 32) -> StartProcess:
        """A whole deploy up to serving; returns the StartProcess of its web app."""
        unpack = self.arrive(app)
        self.unpacked(unpack, config, sha)
        start = self.monitor.one(StartProcess)
        self.healthy(start)
        self.nginx_ok()
        return start

    def finished(self) -> list[DeployFinished]:
        return self.status.take(DeployFinished)

    def snapshot(self, app: str):
        changes = [m.snapshot for m in self.status.told if isinstance(m, AppChanged)]
        return [s for s in changes if s.app == app][-1]


SWITCH_ADDRESS = "127.9.9.9"


def webapp(tmp: Path, host: str = "a.test", **extra) -> BundleConfig:
    """A bundle of one web app on ``host`` (``extra``: more ``WebApp`` fields); its app
    is the host's first label. ``dataclasses.replace`` it for the bundle's own keys."""
    return BundleConfig(
        app=host.split(".")[0],
        webapps=(WebApp(exec=tmp / "bin/app", hosts=(host,), **extra),),
    )


def static_only(folder: Path, host: str = "docs.test") -> BundleConfig:
    """A bundle that runs nothing: static files from ``folder`` (made here) on ``host``."""
    folder.mkdir(parents=True, exist_ok=True)
    return BundleConfig(
        app=host.split(".")[0], static_files=(StaticFiles(root=folder, hosts=(host,)),)
    )


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    """A supervisor without a switch component: every switch reloads nginx."""
    return make_rig(tmp_path, kernel=False)


def free_range(size: int = 100) -> int:
    """The first of ``size`` ports nothing holds now: the pool skips ports others hold,
    and benches and other suites on this machine hold whole ranges (1000 apps' ports)."""
    for _ in range(100):
        base = random.randrange(61000, 65535 - size)  # above the kernel's ephemeral range
        if all(port_is_free(port) for port in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} free ports in a row above 61000")


def fake_components(
    *, switch: bool, status: bool = True, stats: bool = False
) -> tuple[dict[Component, FakeComponent], Components]:
    """A ``FakeComponent`` for every component, and the ``Components`` the supervisor gets:
    the switch, status and stats components only when asked (acme never)."""
    parts = {name: FakeComponent(name) for name in Component}
    components = Components(
        watcher=parts[Component.WATCHER],
        unpacker=parts[Component.UNPACKER],
        monitor=parts[Component.PROCESSES],
        nginx=parts[Component.NGINX],
        postgres=parts[Component.POSTGRES],
        backups=parts[Component.BACKUPS],
        status=parts[Component.STATUS] if status else None,
        switch=parts[Component.SWITCH] if switch else None,
        stats=parts[Component.STATS] if stats else None,
    )
    return parts, components


@pytest.fixture
def serving(rig: Rig) -> StartProcess:
    """App "a" serves version 11.. (no release); the next deploy may fail anywhere."""
    start = rig.deploy("a", webapp(rig.tmp), sha="11" * 32)
    rig.finished()
    return start


def assert_kept_serving(rig: Rig, serving: StartProcess) -> None:
    """The version that served (the ``serving`` fixture's) serves on, untouched."""
    app = rig.sup.apps["a"]
    assert app.serving.id == serving.deploy_id and app.serving.stage is Stage.SERVING
    assert not any(s.deploy_id == serving.deploy_id for s in rig.monitor.take(StopProcess))
    assert rig.snapshot("a").state is AppState.RUNNING


def make_rig(tmp_path: Path, *, kernel: bool, stats: bool = False) -> Rig:
    base = free_range()
    config = KeterConfig(root=tmp_path / "root", port_range=(base, base + 99), drain_seconds=2)
    parts, components = fake_components(switch=kernel, stats=stats)
    clock = Clock()
    sup = Supervisor(config, components, ports=PortPool(base, base + 99), clock=clock)
    rig = Rig(
        sup,
        parts[Component.WATCHER],
        parts[Component.UNPACKER],
        parts[Component.PROCESSES],
        parts[Component.NGINX],
        parts[Component.POSTGRES],
        parts[Component.STATUS],
        clock,
        tmp_path,
        parts[Component.BACKUPS],
        parts[Component.SWITCH] if kernel else None,
        parts[Component.STATS] if stats else None,
    )
    sup.start()
    rig.nginx_ok()  # keter's first config; the watcher starts with its reply
    if kernel:
        rig.send(SwitchReady(mode=SwitchMode.KERNEL, address=SWITCH_ADDRESS))
    return rig
