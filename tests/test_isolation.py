"""Apps cannot touch each other (issue 11): a user of its own per app, private files,
ports that cannot be stolen.

Against the real daemon as root, with keter's default of one uid and gid per
app: two apps with secrets in their environment. Whatever one tries against
the other, run with its own identity, fails with EACCES or EPERM: reading
the other's /proc/PID/environ, its bundle, its unpacked files and its log,
and signalling its process. The same attempts against its own files succeed,
so the failures are the isolation and not a broken probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, failures
from support.net import app_port_range, bind_when_free, body, served
from support.wait import wait_for

from keter.processes.spawn import SETPRIV
from keter.switch import Table
from keter.users import DEFAULT_RANGE

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike the tests' own Python

# Run as one app's uid and gid: try everything against another app, print errno names.
ATTACK = r"""
import errno, json, os, signal, sys
pid, bundle, folder, log = sys.argv[1:5]
results = {}
def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("environ", lambda: open(f"/proc/{pid}/environ", "rb").read())
attempt("bundle", lambda: open(bundle, "rb").read())
attempt("listing", lambda: os.listdir(folder))
attempt("unpacked", lambda: open(os.path.join(folder, "config", "keter.yaml"), "rb").read())
attempt("log", lambda: open(log, "rb").read())
attempt("signal", lambda: os.kill(int(pid), signal.SIGTERM if sys.argv[5] == "kill" else 0))
print(json.dumps(results))
"""


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A folder every user may cross (tmp_path is root's alone); removed after keter stops."""
    base = Path(tempfile.mkdtemp(prefix="keter-isolation-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def uid_of(pid: int) -> int:
    return psutil.Process(pid).uids().real


def attack(uid: int, target_pid: int, root: Path, app: str, signal_mode: str) -> dict:
    [folder] = (root / "temp").glob(f"{app}-*")
    command = [
        SETPRIV,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        SYSTEM_PYTHON,
        "-c",
        ATTACK,
        str(target_pid),
        str(root / "incoming" / f"{app}.keter"),
        str(folder),
        str(root / "log" / f"app-{app}.log"),
        signal_mode,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
    return json.loads(done.stdout)


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_two_apps_cannot_read_or_signal_each_other(open_base, keter_factory, private_nginx):
    keter = keter_factory(
        root=open_base / "root",
        **{"port-range": app_port_range(), "run-apps-as-root": False},
    )
    for app in ("alpha", "beta"):
        config = webapp_config(f"{app}.test", "v1", env={"SECRET": f"{app}-secret-42"})
        bundle = make_bundle(open_base / f"{app}.keter", config=config, interpreter=SYSTEM_PYTHON)
        keter.drop(bundle)
    pids = {}
    for app in ("alpha", "beta"):
        served(private_nginx, f"{app}.test", "v1")  # they work, as users of their own
        pids[app] = wait_for(
            lambda app=app: [p.pid for p in app_processes(keter) if f"/{app}-" in p.cwd()],
            20,
            f"{app} running",
        )[0]
    # Each app runs as a uid (and gid) of its own, from keter's range, recorded.
    uids = {app: uid_of(pid) for app, pid in pids.items()}
    assert uids["alpha"] != uids["beta"]
    assert all(DEFAULT_RANGE[0] <= uid <= DEFAULT_RANGE[1] for uid in uids.values())
    assert json.loads((keter.root / "etc" / "app-users.json").read_text()) == uids
    assert all(psutil.Process(pid).gids().real == uids[app] for app, pid in pids.items())

    for me, other in (("alpha", "beta"), ("beta", "alpha")):
        stolen = attack(uids[me], pids[other], keter.root, other, "kill")
        assert stolen == {
            "environ": stolen["environ"],
            "bundle": "EACCES",
            "listing": "EACCES",
            "unpacked": "EACCES",
            "log": "EACCES",
            "signal": "EPERM",
        }, stolen
        assert stolen["environ"] in ("EACCES", "EPERM"), stolen
        # The same probe on its own things works: the failures above are the isolation.
        own = attack(uids[me], pids[me], keter.root, me, "probe")
        assert own["environ"] == "ok" and own["unpacked"] == "ok" and own["listing"] == "ok"
        assert own["signal"] == "ok"
        # A bundle and a log belong to keter, not to the app.
        assert own["bundle"] == "EACCES" and own["log"] == "EACCES"
    assert all(psutil.Process(pid).is_running() for pid in pids.values())


def test_a_stranger_on_a_crashed_apps_port_gets_no_traffic(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"port-range": app_port_range()})
    bundle = make_bundle(tmp_path / "moving.keter", config=webapp_config("moving.test", "v1"))
    keter.drop(bundle)
    served(private_nginx, "moving.test", "v1")
    started = re.search(r"moving: deploy #(\d+) started pid (\d+) on port (\d+)", keter.log())
    assert started
    deploy, pid, port = (int(group) for group in started.groups())

    offset = len(keter.log())
    os.kill(pid, signal.SIGKILL)
    stranger = bind_when_free(port)  # before keter restarts the app (its backoff)
    try:
        moved = wait_for(
            lambda: re.search(
                rf"moving: deploy #{deploy} moves from port {port} to (\d+)", keter.log()[offset:]
            ),
            15,
            "the move to another port",
        )
        new_port = int(moved[1])
        [error] = [line for line in keter.log()[offset:].splitlines() if "is held by" in line]
        assert "ERROR" in error
        assert f"moving: port {port} is held by pid {os.getpid()} (user root)" in error, error
        # nginx routes the app to its stable address (keter.switch); the kernel leads
        # that to the new port once the app answers there, without nginx.
        table = Table.for_root(keter.root)
        wait_for(lambda: new_port in table.read().values(), 15, "the kernel to take the port")
        assert port not in table.read().values()
        served(private_nginx, "moving.test", "v1")
        for _ in range(20):
            assert body(private_nginx, "moving.test") == b"v1\n"
        with pytest.raises(BlockingIOError):
            stranger.accept()  # not one request: not even keter's health probe
    finally:
        stranger.close()


def test_a_stranger_that_takes_the_port_while_a_restart_starts_gets_no_probe(
    keter_factory, private_nginx, tmp_path
):
    """The restart's health probe asks who listens before it connects: a stranger that
    bound the port after the respawn (the app has not listened yet) is never sent it."""
    keter = keter_factory(**{"port-range": app_port_range()})
    first_run = keter.root / "data" / "late" / "ran"  # the app's own folder: its user writes it
    config = webapp_config("late.test", "v1", args=["--first-run-only", str(first_run)])
    keter.drop(make_bundle(tmp_path / "late.keter", config=config))
    served(private_nginx, "late.test", "v1")
    started = re.search(r"late: deploy #(\d+) started pid (\d+) on port (\d+)", keter.log())
    assert started
    deploy, pid, port = (int(group) for group in started.groups())

    offset = len(keter.log())
    app_log = keter.root / "log" / "app-late.log"
    os.kill(pid, signal.SIGKILL)
    # The restart runs and will never listen; keter probes its port meanwhile.
    wait_for(lambda: "not the first run" in app_log.read_text(errors="replace"), 15, "the restart")
    stranger = bind_when_free(port)
    try:
        first_run.unlink()  # the run after the move listens again
        moved = wait_for(
            lambda: re.search(
                rf"late: deploy #{deploy} moves from port {port} to (\d+)", keter.log()[offset:]
            ),
            15,
            "the move to another port",
        )
        assert f"late: port {port} is held by pid {os.getpid()} (user root)" in keter.log()
        new_port = int(moved[1])
        table = Table.for_root(keter.root)
        wait_for(lambda: new_port in table.read().values(), 15, "the kernel to take the port")
        served(private_nginx, "late.test", "v1")
        with pytest.raises(BlockingIOError):
            stranger.accept()
    finally:
        stranger.close()


def test_a_new_version_whose_port_a_stranger_takes_fails_and_the_old_one_serves(
    keter_factory, private_nginx, tmp_path
):
    """The new version never listens; a stranger binds its port while keter probes it.
    The deploy fails naming the stranger, no probe reaches it, v1 keeps serving."""
    keter = keter_factory(**{"port-range": app_port_range()})
    keter.drop(make_bundle(tmp_path / "taken.keter", config=webapp_config("taken.test", "v1")))
    served(private_nginx, "taken.test", "v1")

    v2 = webapp_config("taken.test", "v2", args=["--never-listen"])
    keter.drop(make_bundle(tmp_path / "taken.keter", config=v2))
    started = wait_for(
        lambda: re.search(r"taken: deploy #2 started pid \d+ on port (\d+)", keter.log()),
        15,
        "v2 to start",
    )
    port = int(started[1])
    stranger = bind_when_free(port)
    try:
        reason = f"port {port} is held by pid {os.getpid()} (user root), not by the app"
        wait_for(lambda: reason in "\n".join(failures(keter, "taken")), 15, "v2 to fail")
        assert f"taken: port {port} is held by pid {os.getpid()}" in keter.log()
        for _ in range(20):
            assert body(private_nginx, "taken.test") == b"v1\n"
        # No probe reaches the stranger, save one whose connect raced its bind in the
        # microseconds after keter's last look (README, "Ports cannot be stolen").
        reached = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                stranger.accept()[0].close()
                reached += 1
        assert reached <= 1
    finally:
        stranger.close()


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_a_bundles_environment_reaches_only_its_app_never_what_runs_as_root(
    open_base, keter_factory, private_nginx
):
    """The loader and libc obey LD_PRELOAD, LD_AUDIT, GCONV_PATH... from the environment.
    Here LD_DEBUG_OUTPUT makes every program that starts with the bundle's environment
    leave a file, owned by whoever it ran as: none may be root (the start's shell and
    setpriv, before they drop to the app's user)."""
    traces = open_base / "traces"
    traces.mkdir(mode=0o1777)
    traces.chmod(0o1777)
    keter = keter_factory(
        root=open_base / "root",
        **{"port-range": app_port_range(), "run-apps-as-root": False},
    )
    odd = 'it\'s "quoted" $HOME `date` \\ \n and a new line'
    env = {"LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": str(traces / "ld"), "ODD": odd}
    config = webapp_config("env.test", "v1", env=env)
    keter.drop(make_bundle(open_base / "env.keter", config=config, interpreter=SYSTEM_PYTHON))
    served(private_nginx, "env.test", "v1")
    [pid] = wait_for(lambda: [p.pid for p in app_processes(keter)], 20, "the app")
    owners = {path.stat().st_uid for path in traces.iterdir()}
    assert owners == {uid_of(pid)}  # the app's processes, and nothing as root
    # The app has its environment, every character as the bundle gave it.
    seen = json.loads(body(private_nginx, "env.test", "/env"))
    assert (seen["ODD"], seen["LD_DEBUG_OUTPUT"]) == (odd, str(traces / "ld"))
