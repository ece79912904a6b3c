"""The real ``keter ROOT`` daemon as a child process: fixtures, and the operator's side
(status API, CLI) and what tests read of it (its log, its apps)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from keter.client import KeterClient
from keter.processes import cgroups, controllers
from keter.switch import Table, nft
from support.net import app_port_range, app_uid_range
from support.wait import wait_for

LOG_SHOWN = 120  # lines of each keter's log a failed test shows


class KeterDaemon:
    """One keter process on a private ROOT, pointed at a private nginx."""

    def __init__(self, root: Path, settings: dict, wrapper: tuple[str, ...] = ()) -> None:
        self.root = root
        self.wrapper = wrapper  # a command keter is started through (exec'ing it in place)
        self.settings = settings
        self.incoming = root / "incoming"
        self.stderr_path = root.parent / f"{root.name}-keter.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        (self.root / "etc").mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "keter-config.yaml").write_text(yaml.safe_dump(self.settings))

    def start(self, *, wait_ready: bool = True, env: dict[str, str] | None = None) -> None:
        self.write_config()
        self._log_offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "keter", str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        stderr.close()
        if wait_ready:
            wait_for(lambda: "initial scan done" in self.log_since_start(), 20, "keter to be ready")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_since_start(self) -> str:
        return self.log()[self._log_offset :]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL keter alone (not its apps), like an OOM kill or a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def children(self) -> list[psutil.Process]:
        """keter's descendants: its apps and what they start, its `nginx -t` and the
        like; not its own unpacking worker (``unpacking_worker``), which lives as long
        as keter does."""
        return [child for child in self._descendants() if not is_unpacking_worker(child)]

    def unpacking_worker(self) -> psutil.Process | None:
        """keter's unpacking worker (keter.incoming.worker), if it runs."""
        found = [child for child in self._descendants() if is_unpacking_worker(child)]
        return found[0] if found else None

    def _descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def drop(self, bundle: Path, name: str | None = None) -> Path:
        """Copy a bundle in the way careful users do: write a hidden temp name, rename in."""
        target = self.incoming / (name or bundle.name)
        tmp = self.incoming / f".{target.name}.part"
        tmp.write_bytes(bundle.read_bytes())
        os.replace(tmp, target)
        return target


def keter_settings(nginx, **overrides) -> dict:
    """Settings for a test keter: the private nginx, a private port range, short timers."""
    settings = nginx.keter_config()
    settings.update(
        {
            "port-range": app_port_range(),
            "app-uid-range": app_uid_range(),
            "health-check-timeout": 10,
            # nginx's old workers may take new connections briefly after a reload.
            "drain-seconds": 1,
            "stop-timeout": 3,
            # The tests' apps run on the tests' own Python under /root, which the users
            # keter gives each app cannot read; tests of those users turn this off.
            "run-apps-as-root": True,
        }
    )
    settings.update(overrides)
    return settings


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A folder in /tmp every user may cross (tmp_path is root's alone), for a ROOT whose
    apps run as users of their own; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="keter-open-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def keter_factory(request, tmp_path, private_nginx) -> Iterator:
    """Make (and on teardown stop) keter daemons: ``keter_factory(name="root", **settings)``
    (``wrapper``: a command keter is started through, see ``KeterDaemon``). A failed test
    shows each daemon's last log lines (its tmp folder is gone by the time one looks)."""
    daemons: list[KeterDaemon] = []

    def make(
        name: str = "root",
        *,
        start: bool = True,
        root: Path | None = None,
        wrapper: tuple[str, ...] = (),
        **overrides,
    ) -> KeterDaemon:
        settings = keter_settings(private_nginx, **overrides)
        daemon = KeterDaemon(root or tmp_path / name, settings, wrapper=wrapper)
        daemons.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        for daemon in daemons:
            print(f"--- the last {LOG_SHOWN} lines of keter's log on {daemon.root} ---")
            print("\n".join(daemon.log().splitlines()[-LOG_SHOWN:]))
    for daemon in daemons:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.stop()
        forget_kernel_rules(daemon.root)
        forget_cgroups(daemon.root)


def forget_kernel_rules(root: Path) -> None:
    """Delete the nftables table of a keter on ``root`` (a killed keter leaves it behind)."""
    program = nft.find_nft()
    if program is not None:
        with contextlib.suppress(nft.NftError):
            nft.apply(Table.for_root(root).delete_script(), program)


def forget_cgroups(root: Path) -> None:
    """Remove the empty cgroups a killed keter on ``root`` left (keter-ID in the v2
    hierarchy and in each v1 one it uses): the test machine's hierarchies stay tidy. A
    cgroup with a process in it is left alone (rmdir refuses)."""
    ident = f"keter-{cgroups.keter_id(root)}"
    bases = []
    mount, own = cgroups.unified_mount(), cgroups.own_cgroup()
    if mount is not None and own is not None:
        bases.append(mount / own.lstrip("/") / ident)
    mounts, paths = controllers.v1_mounts(), controllers.v1_paths()
    for name in set(mounts) & set(paths):
        group = controllers.own_v1_group(*mounts[name], paths[name])
        if group is not None:
            bases.append(group / ident)
    for base in bases:
        with contextlib.suppress(OSError):
            for child in base.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            base.rmdir()


@pytest.fixture
def keter(keter_factory) -> KeterDaemon:
    return keter_factory()


# -- the operator's side: status API and CLI (keter.status, keter.commands) -------------


def status_api(daemon: KeterDaemon, timeout: float = 10) -> KeterClient:
    """A client of the daemon's status socket, once the socket answers."""
    client = KeterClient(daemon.root)
    wait_for(client.status, timeout, "the status API to answer")
    return client


def keter_cli(
    root: Path, *args: str, stdin: bytes | None = None, timeout: float = 60, **popen
) -> subprocess.CompletedProcess:
    """Run ``keter COMMAND --root ROOT ARGS...`` as its own process (text output)."""
    command, *rest = args
    result = subprocess.run(
        [sys.executable, "-m", "keter", command, "--root", str(root), *rest],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
        **popen,
    )
    result.stdout = result.stdout.decode(errors="replace")
    result.stderr = result.stderr.decode(errors="replace")
    return result


# -- what tests read of a daemon ----------------------------------------------------------


def failures(keter: KeterDaemon, app: str) -> list[str]:
    """The "APP: deploy #N failed: ..." lines of keter's log."""
    return re.findall(rf"^.*{re.escape(app)}: deploy #\d+ failed: .*$", keter.log(), re.M)


def app_processes(keter: KeterDaemon) -> list[psutil.Process]:
    """keter's live descendants that run a bundle's bin/app (one that just died is not)."""
    found = []
    for process in keter.children():
        try:
            if "bin/app" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone, or a zombie not reaped yet
            continue
    return found


def is_unpacking_worker(process: psutil.Process) -> bool:
    """Whether ``process`` is a keter's unpacking worker (keter.incoming.worker)."""
    try:
        return "keter.incoming.worker" in process.cmdline()
    except psutil.Error:
        return False
