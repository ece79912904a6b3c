"""keter survives its own failures (issue 10, tests (c) and (e)), against the real daemon.

- A component whose handler raises fails only the deploy it was handling, is
  restarted, and every app keeps serving (the fault is injected from outside
  keter's code: tests/apps/fault_injection/sitecustomize.py).
- Shutdown has a deadline: a component stuck in a call cannot keep keter alive
  past stop-timeout plus a small margin, and every app is still stopped.
- A second SIGTERM means stop now.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, failures
from support.net import body, served
from support.wait import wait_for

from keter.cli import INCOMING_QUIET
from keter.daemon import SHUTDOWN_MARGIN
from keter.fsutil import remove_partial_writes
from keter.supervisor.endings import INTERRUPTED
from keter.supervisor.restarts import RESTART_LIMIT

FAULTS = Path(__file__).parent / "apps" / "fault_injection"


def fault_env(component: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "KETER_TEST_FAULT": component}


@pytest.mark.parametrize("component", ["unpacker", "processes"])
def test_a_failing_component_is_restarted_and_only_its_deploy_fails(
    keter_factory, private_nginx, tmp_path, component
):
    keter = keter_factory(start=False)
    keter.start(env=fault_env(component))
    keter.drop(make_bundle(tmp_path / "good.keter", config=webapp_config("good.test", "v1")))
    served(private_nginx, "good.test", "v1")

    keter.drop(make_bundle(tmp_path / "boom.keter", config=webapp_config("boom.test", "v1")))
    [line] = wait_for(lambda: failures(keter, "boom"), 20, "boom's deploy to fail")
    assert f"internal error in {component}: RuntimeError: injected fault" in line
    wait_for(lambda: f"component {component} restarted" in keter.log(), 10, "the restart")
    assert keter.proc.poll() is None
    assert body(private_nginx, "good.test") == b"v1\n"

    # The restarted component works: a new version of the good app deploys through it.
    keter.drop(make_bundle(tmp_path / "good.keter", config=webapp_config("good.test", "v2")))
    served(private_nginx, "good.test", "v2")
    if component == "processes":
        # ... and it still supervises what it ran before its failure.
        [app] = wait_for(
            lambda: len(found := app_processes(keter)) == 1 and found, 10, "v1 to be retired"
        )
        app.kill()
        wait_for(
            lambda: [p.pid for p in app_processes(keter)] not in ([], [app.pid]),
            10,
            "the crashed app to be restarted",
        )
        served(private_nginx, "good.test", "v2")


def test_keter_giving_up_on_a_failing_monitor_still_stops_every_app(
    keter_factory, private_nginx, tmp_path
):
    """The process monitor fails again and again: keter stops, non-zero. The monitor's
    thread was dead then (its failure ended it, the restart's backoff not over), so
    nobody handled the Stop that stops every app: they ran on without a keter."""
    keter = keter_factory(start=False, **{"stop-timeout": 2})
    keter.start(env=fault_env("processes"))
    keter.drop(make_bundle(tmp_path / "good.keter", config=webapp_config("good.test", "v1")))
    served(private_nginx, "good.test", "v1")
    [app] = app_processes(keter)

    try:
        for n in range(RESTART_LIMIT + 1):
            config = webapp_config(f"boom{n}.test", "v1")
            keter.drop(make_bundle(tmp_path / f"boom{n}.keter", config=config))
        assert keter.proc.wait(60) == 1
        assert "failed 6 times" in keter.log() and "keter cannot go on" in keter.log()
        assert not app.is_running() or app.status() == psutil.STATUS_ZOMBIE
        assert "keter: stopped" in keter.log()
    finally:
        with contextlib.suppress(psutil.Error):
            app.kill()


def test_shutdown_has_a_deadline_when_a_component_is_stuck(keter_factory, private_nginx, tmp_path):
    """The nginx writer hangs in its reload command; SIGTERM still ends keter and its apps."""
    stall = tmp_path / "stall"
    stuck = ["sh", "-c", f'[ -e "{stall}" ] && exec sleep 600; exec "$@"', "sh"]
    keter = keter_factory(start=False, **{"stop-timeout": 2})
    nginx = keter.settings["nginx"]
    nginx["reload-command"] = stuck + nginx["reload-command"]
    keter.start()
    keter.drop(make_bundle(tmp_path / "app.keter", config=webapp_config("app.test", "v1")))
    served(private_nginx, "app.test", "v1")
    pids = [p.pid for p in app_processes(keter)]

    stall.touch()
    # A new host: nginx must take a new config (the same routes would switch in the kernel).
    v2 = webapp_config("app.test", "v2", **{"extra-hosts": ["app2.test"]})
    keter.drop(make_bundle(tmp_path / "app.keter", config=v2))
    sleeper = wait_for(
        lambda: [p for p in keter.children() if "sleep" in p.cmdline()], 20, "the reload to hang"
    )
    began = time.monotonic()
    keter.proc.send_signal(signal.SIGTERM)
    try:
        keter.proc.wait(2 + SHUTDOWN_MARGIN + 5)
        took = time.monotonic() - began
        assert took < 2 + SHUTDOWN_MARGIN + 3, took
        assert "nginx did not stop in time" in keter.log()
        assert not [pid for pid in pids if psutil.pid_exists(pid)]
    finally:
        for process in sleeper:
            process.kill()


def test_a_second_sigterm_stops_at_once(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"stop-timeout": 60})
    config = webapp_config("stub.test", "v1", args=["--ignore-term"])
    keter.drop(make_bundle(tmp_path / "stub.keter", config=config))
    served(private_nginx, "stub.test", "v1")
    [app] = app_processes(keter)

    keter.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in keter.log(), 10, "the first SIGTERM")
    began = time.monotonic()
    keter.proc.send_signal(signal.SIGTERM)
    assert keter.proc.wait(10) == 0
    assert time.monotonic() - began < 5
    assert "again: killing every app now" in keter.log()
    wait_for(lambda: not psutil.pid_exists(app.pid), 5, "the app to be gone")


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of process ``pid`` (tgkill(2); Python has no call for
    another process's thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


SYS_TGKILL = 234  # x86_64


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="tgkill's number is x86_64's")
def test_a_sigterm_that_lands_on_another_thread_still_stops_keter(keter, private_nginx):
    """The kernel may hand a process's signal to any of its threads; Python runs the
    handler in the main thread only once that thread runs again. An idle keter (no
    timer due) must still stop."""
    wait_for(lambda: "initial scan done" in keter.log(), 10, "keter to be idle")
    threads = [t.id for t in psutil.Process(keter.proc.pid).threads() if t.id != keter.proc.pid]
    tgkill(keter.proc.pid, threads[-1], signal.SIGTERM)
    assert keter.proc.wait(10) == 0
    assert "SIGTERM received" in keter.log()


def test_a_killed_keters_half_written_files_are_removed_at_the_next_start(keter, private_nginx):
    # A keter killed while it copied a bundle into the archive left a temporary file
    # of up to the bundle's size there for good (and so in etc/, incoming/, run/).
    keter.kill()
    root = keter.root
    (root / "archive" / "app").mkdir(parents=True, exist_ok=True)
    left = [
        root / "archive" / "app" / f".{'0' * 64}.keter.k7ykvdzj.tmp",
        root / "etc" / ".history.json.a_b0c1d2.tmp",
        root / "incoming" / ".app.keter.zzzzzzzz.tmp",
        root / "run" / "processes" / ".7.json.12345678.tmp",
    ]
    kept = [
        root / "incoming" / ".hidden",
        root / "etc" / "notes.tmp",
        root / "etc" / ".x.short.tmp",
        # A `keter deploy` copying in right now (it had failed at its rename).
        root / "incoming" / ".web.keter.aq6vfj0m.tmp",
    ]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    long_ago = time.time() - INCOMING_QUIET - 60
    os.utime(root / "incoming" / ".app.keter.zzzzzzzz.tmp", (long_ago, long_ago))
    keter.start()
    assert [path for path in left if path.exists()] == []
    assert all(path.exists() for path in kept)
    assert "keter: removed 4 half-written files a stopped keter left" in keter.log()


def test_deep_trees_an_app_or_an_uploader_made_do_not_stop_keters_start(keter, private_nginx):
    # The start's search for half-written files walked all of run/ (the apps' own /tmp)
    # and incoming/'s folders recursively: 1100 nested folders ended every start with a
    # RecursionError, the killed run's apps never stopped.
    keter.kill()
    tops = (keter.root / "run" / "tmp" / "deep-1" / "tmp", keter.incoming / "deep")
    for top in tops:
        top.mkdir(parents=True, exist_ok=True)
        fd = os.open(top, os.O_RDONLY)
        try:
            for _ in range(1100):
                os.mkdir("d", dir_fd=fd)
                inner = os.open("d", os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = inner
        finally:
            os.close(fd)
    try:
        keter.start()
        assert keter.proc.poll() is None
    finally:
        # Python's own rmtree (pytest's clean-up of old runs) recurses as deep; rm does not.
        subprocess.run(["rm", "-rf", *map(str, tops)], check=True)


def test_the_search_for_half_written_files_stays_in_keters_own_folders(tmp_path):
    top = tmp_path / "etc"
    (top / "env").mkdir(parents=True)
    (top / "theirs").mkdir()
    os.chown(top / "theirs", 65534, 65534)  # an app's (or an uploader's) folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (top / "linked").symlink_to(elsewhere)
    partial = ".state.json.abcd1234.tmp"
    for folder in (top, top / "env", top / "theirs", elsewhere):
        (folder / partial).write_bytes(b"half")
    (top / "env" / "deeper").mkdir()
    (top / "env" / "deeper" / partial).write_bytes(b"half")
    assert remove_partial_writes(top, depth=1) == 2
    assert not (top / partial).exists() and not (top / "env" / partial).exists()
    kept = [top / "theirs", elsewhere, top / "env" / "deeper"]
    assert all((folder / partial).exists() for folder in kept)


def test_a_deploy_keter_stops_in_the_middle_of_keeps_its_line_of_history(
    keter, private_nginx, tmp_path
):
    # The bundle deploys again at the next start, as an attempt of its own; the one
    # keter's stop cut short was in no history.
    config = webapp_config("slow.test", "v1", args=["--never-listen"])
    keter.drop(make_bundle(tmp_path / "slow.keter", config=config))
    wait_for(lambda: app_processes(keter), 10, "the app to start")
    assert keter.stop() == 0
    history = json.loads((keter.root / "etc" / "history.json").read_text())
    [entry] = history["apps"]["slow"]
    assert entry["outcome"] == "superseded"
    assert entry["reason"] == INTERRUPTED
    assert len(entry["sha256"]) == 64
    assert "slow: deploy #1 cut short: keter stops" in keter.log()


def test_a_new_run_numbers_nginx_generations_after_the_last_run(keter, private_nginx, tmp_path):
    # Each run began again at 1: nginx, refusing a new run's reload, answered the same
    # number with the earlier run's config, and keter took the refusal for a yes.
    keter.drop(make_bundle(tmp_path / "app.keter", config=webapp_config("app.test", "v1")))
    served(private_nginx, "app.test", "v1")
    keter.stop()
    last = max(int(n) for n in re.findall(r"nginx: generation (\d+) applied", keter.log()))
    keter.start()
    served(private_nginx, "app.test", "v1")
    wait_for(lambda: "nginx: generation" in keter.log_since_start(), 30, "a generation")
    first = re.search(r"nginx: generation (\d+) applied", keter.log_since_start())
    assert first is not None and int(first.group(1)) == last + 1


def test_a_keter_frozen_past_a_health_deadline_asks_once_more_before_failing(
    keter_factory, private_nginx, tmp_path
):
    # Frozen (a VM paused, swapping) right after a start, keter woke past the deadline and
    # failed a version that had answered all along: it was never asked meanwhile.
    keter = keter_factory(**{"health-check-timeout": 2})
    keter.drop(make_bundle(tmp_path / "app.keter", config=webapp_config("app.test", "v1")))
    served(private_nginx, "app.test", "v1")
    keter.drop(make_bundle(tmp_path / "app.keter", config=webapp_config("app.test", "v2")))
    wait_for(lambda: "app: deploy #2 started" in keter.log(), 20, "v2 started")
    os.kill(keter.proc.pid, signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        wait_for(lambda: time.monotonic() - frozen > 2 + 3.5, 10, "the deadline long past")
    finally:
        os.kill(keter.proc.pid, signal.SIGCONT)
    served(private_nginx, "app.test", "v2")
    assert "did not answer" not in keter.log()
