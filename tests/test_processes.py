"""The process monitor with real child processes (tests/apps/versioned_app.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import logging
import os
import pwd
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.bundles import VERSIONED_APP
from support.net import bind_when_free, free_port
from support.processes import Harness, alive
from support.wait import wait_for

from keter.messages import (
    HealthCheck,
    MoveProcess,
    ProcessFailed,
    ProcessHealthy,
    ProcessPortTaken,
    ProcessStarted,
    ProcessState,
    ProcessStateChanged,
    ProcessStopped,
    StopProcess,
)
from keter.processes import applog as applog_module
from keter.processes import health as health_module
from keter.processes import monitor as monitor_module
from keter.processes.applog import (
    MAX_PARTIAL,
    TAIL_LINE_LIMIT,
    AppLog,
    LogRegistry,
    OutputCapture,
)
from keter.processes.cgroups import Cgroups
from keter.processes.groups import group_members, wait_group_gone
from keter.processes.health import Prober, is_healthy
from keter.processes.ports import port_is_free
from keter.processes.programs import SHELL
from keter.processes.reader import (
    MAX_PIPE_BUFFER,
    OUTPUT_BURST,
    READ_CHUNK,
    OutputReader,
    _Budget,
    _Watched,
    drain,
)
from keter.processes.spawn import APP_ENV, ROOT_ENV, SpawnError, environment_file
from keter.processes.states import (
    TRANSITIONS,
    IllegalTransition,
    backoff_delay,
    check_transition,
    describe_exit,
)

APP = VERSIONED_APP
STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 ")
S = ProcessState


def get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


@pytest.fixture
def monitor(make_monitor):
    return make_monitor()


# -- starting ---------------------------------------------------------------------------


def test_start_becomes_healthy_with_exactly_its_env(monitor, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="keter.processes")
    monkeypatch.setenv("KETER_SECRET_OF_THE_DAEMON", "must not leak")
    port = free_port()
    monitor.start(1, monitor.spec(port=port, env={"MARKER": "yes"}))

    started = monitor.expect(ProcessStarted, deploy_id=1)
    monitor.expect(ProcessHealthy, deploy_id=1)
    assert started.port == port
    assert monitor.states(1) == ["STARTING", "RUNNING"]
    assert get(port) == "v1\n"
    env = json.loads(get(port, "/env"))
    assert env["MARKER"] == "yes"
    assert "KETER_SECRET_OF_THE_DAEMON" not in env
    # Its own session and group, so keter can signal all of it at once.
    assert os.getsid(started.pid) == os.getpgid(started.pid) == started.pid
    assert f"app: state STARTING -> RUNNING (pid {started.pid}, port {port})" in caplog.messages

    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "processes").iterdir()]
    assert records == [
        {
            "pid": started.pid,
            "pgid": started.pid,
            "create_time": psutil.Process(started.pid).create_time(),
            "app": "app",
            "deploy_id": 1,
        }
    ]
    log_lines = (tmp_path / "log" / "app.log").read_bytes().splitlines()
    assert any(line.endswith(b"listening on port %d version v1" % port) for line in log_lines)
    assert all(STAMP.match(line) for line in log_lines)


def test_a_state_leaves_no_deadline_that_would_wake_the_monitor(monitor):
    """Issue 16.5 (idle CPU): the health deadline of an app that answered, and the SIGKILL
    deadline of one that stopped, are cancelled: 1000 apps leave no 1000 wakeups."""
    actor = monitor.monitor

    def pending() -> list[str]:
        cancelled = set(actor._timers_cancelled)
        return [type(m).__name__ for _, n, m in list(actor._timers) if n not in cancelled]

    monitor.start(1, monitor.spec(port=free_port()))
    monitor.expect(ProcessHealthy, deploy_id=1)
    assert "_HealthDeadline" not in pending()
    actor.tell(StopProcess(app="app", deploy_id=1))
    monitor.expect(ProcessStopped, deploy_id=1)
    assert "_Escalate" not in pending()


def test_without_health_check_it_runs_once_spawned(monitor):
    # The app never listens, so only "no health check" can make it RUNNING.
    spec = monitor.spec("--never-listen", port=free_port(), health=None)
    monitor.start(1, spec)
    monitor.expect(ProcessHealthy, deploy_id=1)
    assert monitor.states(1) == ["STARTING", "RUNNING"]


@pytest.mark.parametrize(
    ("mode", "error"),
    [(None, "No such file or directory"), (0o644, "Permission denied")],
)
def test_exec_failure_is_reported_at_once(monitor, tmp_path, mode, error):
    program = tmp_path / "program"
    if mode is not None:
        program.write_text("#!/bin/sh\n")
        program.chmod(mode)
    command = (str(program),)
    monitor.start(1, monitor.spec(port=free_port(), command=command))

    failed = monitor.expect(ProcessFailed, timeout=2, deploy_id=1)
    assert failed.reason == f"cannot run {command[0]}: {error}"
    monitor.expect(ProcessStopped, timeout=2, deploy_id=1)
    assert monitor.states(1) == ["FATAL"]


def test_missing_working_directory_is_named(monitor, tmp_path):
    spec = dataclasses.replace(monitor.spec(port=free_port()), cwd=tmp_path / "gone")
    monitor.start(1, spec)
    failed = monitor.expect(ProcessFailed, timeout=2, deploy_id=1)
    assert failed.reason == (
        f"cannot run {sys.executable}: {tmp_path / 'gone'}: No such file or directory"
    )


def test_unknown_user_is_reported(monitor):
    monitor.start(1, monitor.spec(port=free_port(), user="no-such-user-here"))
    failed = monitor.expect(ProcessFailed, timeout=2, deploy_id=1)
    assert failed.reason == "unknown user 'no-such-user-here'"


def test_port_already_taken_is_reported(monitor):
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        monitor.start(1, monitor.spec(port=port))
        failed = monitor.expect(ProcessFailed, timeout=2, deploy_id=1)
    assert failed.reason == f"port {port} is already in use"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_runs_as_the_configured_user_with_its_groups(monitor, tmp_path):
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    # /usr/bin/python3 and tests/apps are readable by nobody; root's pyenv is not.
    spec = monitor.spec(port=port, user="nobody", command=("/usr/bin/python3", "-u", str(APP)))
    monitor.healthy(1, spec)
    ids = json.loads(get(port, "/whoami"))
    assert (ids["uid"], ids["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    assert set(ids["groups"]) == set(os.getgrouplist("nobody", nobody.pw_gid))


# -- failed first starts ----------------------------------------------------------------


def test_exit_at_start_fails_fast_with_its_output(monitor):
    spec = monitor.spec("--exit-at-start", "3", port=free_port())
    start = time.monotonic()
    monitor.start(1, spec)

    failed = monitor.expect(ProcessFailed, deploy_id=1)
    assert time.monotonic() - start < 5  # the health check timeout is 10 s
    assert failed.reason == "exited with status 3 before answering"
    assert failed.output_tail[-1] == "fatal: exiting with status 3"
    monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.states(1) == ["STARTING", "STOPPING", "FATAL"]


def test_exit_is_seen_while_a_grandchild_holds_the_pipe(monitor):
    spec = monitor.spec("--exit-at-start", "4", "--grandchildren", "1", port=free_port())
    monitor.start(1, spec)

    failed = monitor.expect(ProcessFailed, deploy_id=1)
    assert failed.reason == "exited with status 4 before answering"
    grandchild = next(int(line.split()[-1]) for line in failed.output_tail if "grandchild" in line)
    monitor.expect(ProcessStopped, deploy_id=1)
    assert not alive(grandchild)


def test_app_that_never_listens_times_out(make_monitor):
    # 2 s: time for the app to print its first line (its start took over 0.5 s under
    # the suite's load once, and the failure then carried no output).
    monitor = make_monitor(health_check_timeout=2.0)
    port = free_port()
    asked = time.monotonic()
    monitor.start(1, monitor.spec("--never-listen", port=port))

    started = monitor.expect(ProcessStarted, deploy_id=1)
    failed = monitor.expect(ProcessFailed, deploy_id=1)
    assert not alive(started.pid)  # a failed version is reported once it is stopped
    assert monitor.when(failed) - asked >= 2.0
    assert failed.reason == f"did not answer on port {port} within 2s (last: connection refused)"
    assert failed.output_tail == (f"starting version v1 as pid {started.pid}",)
    stopped = monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.index(stopped) > monitor.index(failed)


@pytest.mark.parametrize(
    ("path", "strict", "answer"),
    [
        ("/", False, "HTTP 200"),
        ("/", True, "HTTP 200"),
        ("/missing", False, "HTTP 404"),  # any answer below 500 shows the app is up
        ("/missing", True, None),  # an explicit health path must answer 2xx/3xx
        ("/fail", True, None),
        ("/fail", False, None),
    ],
)
def test_health_check_status_rules(make_monitor, path, strict, answer):
    # 2 s: the failing cases wait it out, and the app must have started (a busy machine).
    monitor = make_monitor(health_check_timeout=2.0)
    port = free_port()
    health = HealthCheck(host="app.test", path=path, strict=strict)
    monitor.start(1, monitor.spec("--fail-path", "/fail", port=port, health=health))
    if answer:
        monitor.expect(ProcessHealthy, deploy_id=1)
        assert probe_http(port, health) == (True, f"{answer} on {path}")
    else:
        failed = monitor.expect(ProcessFailed, deploy_id=1)
        status = 500 if path == "/fail" else 404
        assert failed.reason.endswith(f"(last: HTTP {status} on {path})")


@pytest.mark.parametrize(("host", "healthy"), [("app.test", True), ("other.test", False)])
def test_health_check_sends_the_configured_host(make_monitor, host, healthy):
    # The healthy case needs the app started within the timeout, on a busy machine too
    # (0.5 s was missed once in CI: the app said it listened, the last probe was refused).
    monitor = make_monitor(health_check_timeout=10.0 if healthy else 0.5)
    health = HealthCheck(host=host)
    monitor.start(1, monitor.spec("--require-host", "app.test", port=free_port(), health=health))
    monitor.expect(ProcessHealthy if healthy else ProcessFailed, deploy_id=1)


def test_a_hanging_probe_does_not_delay_other_apps(make_monitor, tmp_path):
    monitor = make_monitor(probe_timeout=3.0)
    hanging_port, good_port = free_port(), free_port()
    monitor.start(1, monitor.spec("--hang", port=hanging_port, log_name="hanging"), app="hanging")
    hanging_log = tmp_path / "log" / "hanging.log"
    wait_for(lambda: b"holding a connection" in hanging_log.read_bytes(), what="a stuck probe")
    started = time.monotonic()
    monitor.start(2, monitor.spec(port=good_port), app="good")

    monitor.expect(ProcessHealthy, deploy_id=2)
    assert time.monotonic() - started < 3.0  # before the hanging probe could give up
    assert monitor.states(1) == ["STARTING"]


# -- crashes and restarts ---------------------------------------------------------------


def test_crash_is_restarted_on_the_same_port(monitor, caplog):
    caplog.set_level(logging.INFO, logger="keter.processes")
    port = free_port()
    pid = monitor.healthy(1, monitor.spec(port=port))

    os.kill(pid, signal.SIGKILL)
    backoff = monitor.expect(ProcessStateChanged, deploy_id=1, state="BACKOFF")
    assert backoff.detail.startswith("killed by SIGKILL; restarting in ")
    assert backoff.failed  # a crash: what a crash loop counts
    after = monitor.index(backoff)
    restarted = monitor.expect(ProcessStateChanged, deploy_id=1, state="STARTING", after=after)
    monitor.expect(ProcessStateChanged, deploy_id=1, state="RUNNING", after=after)
    new_pid = monitor.pid_of(restarted)
    assert new_pid != pid
    assert get(port) == "v1\n"
    crash = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert crash.getMessage().startswith("app: crashed: killed by SIGKILL; last output: starting")
    # A restart is not a new deploy: no second ProcessStarted / ProcessHealthy.
    assert sum(isinstance(m, ProcessHealthy) for m in monitor.messages()) == 1


def test_a_spec_can_shorten_its_own_health_timeout(make_monitor):
    # Keter's ensure-alive-time-bound: one app's bound, not the global timeout.
    monitor = make_monitor(health_check_timeout=30)
    port = free_port()
    monitor.start(1, monitor.spec("--never-listen", port=port, health_timeout=0.4))
    failed = monitor.expect(ProcessFailed, deploy_id=1)
    assert failed.reason.startswith(f"did not answer on port {port} within 0.4s")


def test_a_spec_with_a_restart_delay_restarts_at_that_pace(monitor):
    # Keter's restart-delay-seconds for background workers: the delay while the crash
    # loop's own backoff is shorter.
    monitor.healthy(
        1, monitor.spec("--exit-after-requests", "1", port=free_port(), restart_delay=0.2)
    )
    assert backoff_delays(monitor, 1, 3) == [0.2, 0.2, 0.2]


def test_a_restart_delay_of_zero_still_backs_off_a_crash_loop(monitor):
    # At 0 a worker that exits at once was restarted at once, for as long as it ran.
    monitor.healthy(
        1, monitor.spec("--exit-after-requests", "1", port=free_port(), restart_delay=0.0)
    )
    delays = backoff_delays(monitor, 1, 4)
    assert delays[0] > 0
    assert delays[3] >= 4 * delays[0]


def backoff_delays(monitor: Harness, deploy_id: int, count: int) -> list[float]:
    delays, after = [], 0
    for _ in range(count):
        change = monitor.expect(
            ProcessStateChanged, deploy_id=deploy_id, state="BACKOFF", after=after
        )
        after = monitor.index(change) + 1
        delays.append(float(re.search(r"restarting in ([\d.]+)s", change.detail).group(1)))
    return delays


def test_crash_loop_backs_off_exponentially(monitor):
    # Healthy for one probe, then it exits: every restart crashes at once.
    monitor.healthy(1, monitor.spec("--exit-after-requests", "1", port=free_port()))
    delays = backoff_delays(monitor, 1, 4)

    assert 0.0125 <= delays[0] <= 0.025  # the first restart is quick
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))
    assert delays[3] >= 4 * delays[0]
    backoffs = [m for m in monitor.messages() if getattr(m, "state", None) == "BACKOFF"]
    waited = monitor.when(backoffs[3]) - monitor.when(backoffs[0])
    assert waited >= sum(delays[:3]) - 0.02


def test_backoff_resets_after_the_app_stayed_up(make_monitor):
    monitor = make_monitor(backoff_reset=0.2)
    # Each run stays up ~0.4 s (longer than backoff_reset) before it crashes.
    monitor.healthy(1, monitor.spec("--exit-after", "0.4", port=free_port()))
    assert all(delay <= 0.1 for delay in backoff_delays(monitor, 1, 3))


def test_a_restart_that_never_answers_is_killed_and_retried(make_monitor, tmp_path):
    # 1 s: long enough for the first run to start on a busy machine, short for the test.
    monitor = make_monitor(health_check_timeout=1.0)
    port = free_port()
    first_run = ("--first-run-only", str(tmp_path / "ran"), "--exit-after-requests", "1")
    monitor.healthy(1, monitor.spec(*first_run, port=port))
    backoff_delays(monitor, 1, 3)

    # Restarts that never answer are crashes of a running deploy: retried, never FATAL.
    changes = [m for m in monitor.messages() if isinstance(m, ProcessStateChanged)]
    states = ["STARTING", "RUNNING", "BACKOFF", "STARTING", "BACKOFF", "STARTING"]
    assert [c.state for c in changes[:6]] == states
    assert changes[4].detail.startswith(f"did not answer on port {port} within 1s")
    assert not any(isinstance(m, ProcessFailed) for m in monitor.messages())


# -- stopping ---------------------------------------------------------------------------


def test_stop_after_the_drain_delay(monitor):
    port = free_port()
    pid = monitor.healthy(1, monitor.spec(port=port))
    asked = time.monotonic()
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1, delay=0.3))

    stopping = monitor.expect(ProcessStateChanged, deploy_id=1, state="STOPPING")
    assert monitor.when(stopping) - asked >= 0.3
    monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.states(1) == ["STARTING", "RUNNING", "STOPPING", "EXITED"]
    assert not alive(pid)
    assert port_is_free(port)


@pytest.mark.parametrize(
    "family, address, v6only",
    [(socket.AF_INET, "127.0.0.1", None), (socket.AF_INET6, "::1", 1), (socket.AF_INET6, "::", 1)],
)
def test_a_port_held_on_any_address_of_either_family_is_not_free(family, address, v6only):
    # The monitor counts a listener on any address a stranger: a test of IPv4 alone had an
    # app moved back, again and again, onto a port an IPv6-only listener held.
    port = free_port()
    with socket.socket(family, socket.SOCK_STREAM) as stranger:
        if v6only is not None:
            stranger.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        stranger.bind((address, port))
        stranger.listen()
        assert not port_is_free(port)
    assert port_is_free(port)


def test_app_ignoring_sigterm_is_killed_after_stop_timeout(make_monitor, caplog):
    monitor = make_monitor(stop_timeout=0.3)
    pid = monitor.healthy(1, monitor.spec("--ignore-term", port=free_port()))
    asked = time.monotonic()
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))

    stopped = monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.when(stopped) - asked >= 0.3
    assert not alive(pid)
    assert any("sending SIGKILL" in message for message in caplog.messages)


def test_stop_waits_for_grandchildren_that_hold_the_port(make_monitor):
    monitor = make_monitor(stop_timeout=0.3)
    port = free_port()
    args = ("--grandchildren", "2", "--grandchildren-ignore-term")
    pid = monitor.healthy(1, monitor.spec(*args, port=port))
    members = wait_for(lambda: len(group_members(pid)) == 3 and group_members(pid), what="3 pids")
    asked = time.monotonic()
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))

    # The leader dies of SIGTERM at once; its grandchildren only of the SIGKILL.
    stopped = monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.when(stopped) - asked >= 0.3
    assert not any(alive(member) for member in members)
    assert port_is_free(port)


def test_stop_during_backoff_is_immediate(make_monitor):
    monitor = make_monitor(backoff_base=60.0)
    monitor.start(1, monitor.spec("--exit-at-start", "3", port=free_port(), health=None))
    monitor.expect(ProcessStateChanged, deploy_id=1, state="BACKOFF")
    asked = time.monotonic()
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1, delay=30.0))

    stopped = monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.when(stopped) - asked < 2
    assert monitor.states(1) == ["STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED"]


def test_stop_while_starting_is_not_a_failure(monitor):
    monitor.start(1, monitor.spec("--never-listen", port=free_port()))
    started = monitor.expect(ProcessStarted, deploy_id=1)
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))

    monitor.expect(ProcessStopped, deploy_id=1)
    assert monitor.states(1) == ["STARTING", "STOPPING", "EXITED"]
    assert not any(isinstance(m, ProcessFailed) for m in monitor.messages())
    assert not alive(started.pid)


def test_stop_right_after_start_stops_the_process_once_spawned(monitor):
    # The stop arrives while the spawn is (most likely) still in the spawn pool.
    for deploy_id in range(1, 6):
        monitor.start(deploy_id, monitor.spec(port=free_port()))
        monitor.monitor.tell(StopProcess(app="app", deploy_id=deploy_id))
    for deploy_id in range(1, 6):
        monitor.expect(ProcessStopped, deploy_id=deploy_id)
        started = monitor.expect(ProcessStarted, deploy_id=deploy_id)
        assert monitor.states(deploy_id) == ["STARTING", "STOPPING", "EXITED"]
        assert not alive(started.pid)
    assert not any(isinstance(m, ProcessFailed) for m in monitor.messages())


def test_stop_of_an_unknown_deploy_is_answered(monitor):
    monitor.monitor.tell(StopProcess(app="ghost", deploy_id=99))
    monitor.expect(ProcessStopped, app="ghost", deploy_id=99)


def test_shutdown_stops_everything_in_parallel(make_monitor, tmp_path):
    monitor = make_monitor(stop_timeout=0.5)
    pids = [
        monitor.healthy(1, monitor.spec(port=free_port())),
        monitor.healthy(2, monitor.spec("--ignore-term", port=free_port())),
        monitor.healthy(
            3, monitor.spec("--grandchildren", "2", "--grandchildren-ignore-term", port=free_port())
        ),
    ]
    members = [m for pid in pids for m in group_members(pid)]
    asked = time.monotonic()
    monitor.monitor.stop()
    monitor.monitor.join(timeout=10)

    # One shared deadline for both stubborn apps, not one stop_timeout each.
    assert 0.5 <= time.monotonic() - asked < 0.95
    assert not any(alive(member) for member in members)
    assert list((tmp_path / "run" / "processes").iterdir()) == []
    for deploy_id in (1, 2, 3):
        monitor.expect(ProcessStopped, deploy_id=deploy_id)


def test_waiting_for_a_group_works_with_descriptors_past_1024():
    """With a thousand apps keter holds more than 1024 descriptors; a stop still waits."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    # Hold the low descriptors so the pidfds wait_group_gone opens land past select's 1024.
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert not wait_group_gone(proc.pid, time.monotonic() + 0.05)  # still alive
        os.killpg(proc.pid, signal.SIGKILL)
        threading.Timer(0.1, proc.wait).start()  # reap it, as the output reader would
        assert wait_group_gone(proc.pid, time.monotonic() + 5)
    finally:
        for fd in held:
            os.close(fd)
        proc.kill()
        proc.wait()


# -- leftovers of a keter that was SIGKILLed ----------------------------------------------


def orphan(*args: str, port: int) -> int:
    """Start the app in its own session under a parent that exits: as a dead keter leaves it."""
    launcher = (
        "import subprocess, sys;"
        "p = subprocess.Popen(sys.argv[1:], start_new_session=True,"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
        "print(p.pid)"
    )
    command = [sys.executable, "-c", launcher, sys.executable, str(APP), *args]
    env = {**os.environ, "PORT": str(port)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_orphans_of_a_killed_keter_are_stopped_on_start(make_monitor, tmp_path, caplog):
    stubborn_port = free_port()
    stubborn = orphan("--ignore-term", port=stubborn_port)
    # Listening means it has also set SIGTERM to be ignored.
    wait_for(lambda: not port_is_free(stubborn_port), what="the orphan listening")
    grandparent = orphan("--grandchildren", "1", "--exit-at-start", "0", port=free_port())
    # The leader exits; its grandchild lives on in the group.
    grandchild = wait_for(lambda: set(group_members(grandparent)) - {grandparent}, what="fork")
    innocent = subprocess.Popen(
        [sys.executable, str(APP), "--never-listen"], start_new_session=True
    )
    records = [
        {
            "pid": pid,
            "pgid": pid,
            "create_time": psutil.Process(pid).create_time() if alive(pid) else 0.0,
            "app": "old",
            "deploy_id": n,
        }
        for n, pid in enumerate((stubborn, grandparent), start=1)
    ]
    (tmp_path / "run" / "processes").mkdir(parents=True)
    for record in records:
        path = tmp_path / "run" / "processes" / f"{record['deploy_id']}.json"
        path.write_text(json.dumps(record))
    # This pid was reused by a process keter never started: not to be touched. Its
    # record is in the single file older keters wrote, which is read too.
    reused = {"pid": innocent.pid, "pgid": innocent.pid, "create_time": 1.0, "app": "x"}
    (tmp_path / "run" / "processes.json").write_text(json.dumps([reused]))
    try:
        monitor = make_monitor(stop_timeout=0.3)
        # Messages are handled only after on_start, so this answer means it is done.
        monitor.monitor.tell(StopProcess(app="sync", deploy_id=0))
        monitor.expect(ProcessStopped, deploy_id=0)

        assert not alive(stubborn)
        assert not any(alive(pid) for pid in grandchild)
        assert alive(innocent.pid)
        assert list((tmp_path / "run" / "processes").iterdir()) == []
        assert not (tmp_path / "run" / "processes.json").exists()
        stopped = [m for m in caplog.messages if "from a previous keter run was stopped" in m]
        assert len(stopped) == 2
    finally:
        innocent.kill()
        innocent.wait()


# -- output capture ---------------------------------------------------------------------


def test_a_flood_of_output_is_rotated_within_the_cap(make_monitor, tmp_path):
    max_bytes, backups = 1_000_000, 3
    monitor = make_monitor(log_max_bytes=max_bytes, log_backups=backups)
    # 12 MB: past the reader's burst of 8 MiB, the rest read at 1 MiB/s (keter.processes.reader).
    monitor.start(1, monitor.spec("--spam-mb", "12"))
    log_path = tmp_path / "log" / "app.log"

    wait_for(lambda: log_path.read_bytes().endswith(b" DONE\n"), timeout=60, what="12 MB read")
    files = sorted(tmp_path.joinpath("log").iterdir())
    assert [f.name for f in files] == ["app.log", "app.log.1", "app.log.2", "app.log.3"]
    longest_line = 1000 + len("2024-01-01T00:00:00.000+00:00 ")
    assert sum(f.stat().st_size for f in files) <= max_bytes * (backups + 1) + longest_line
    for f in files:
        assert f.stat().st_size <= max_bytes
        lines = f.read_bytes().splitlines()
        assert all(STAMP.match(line) for line in lines[:5] + lines[-5:])


def test_an_app_log_is_never_written_through_a_link(tmp_path):
    # keter writes what an app prints, as root: through a link planted in log/, into any
    # file (/etc/cron.d/x).
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    (tmp_path / "a.log").symlink_to(victim)
    with pytest.raises(OSError):
        AppLog(tmp_path / "a.log", max_bytes=100, backups=2)
    assert victim.read_bytes() == b""


def test_applog_rotates_and_keeps_the_newest(tmp_path):
    applog = AppLog(tmp_path / "a.log", max_bytes=100, backups=2)
    for n in range(20):
        applog.write_line(b"line %02d" % n)  # 30 + 8 bytes: two lines per file
    applog.close()

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.log", "a.log.1", "a.log.2"]
    newest = (tmp_path / "a.log").read_bytes().splitlines()
    assert [line[-7:] for line in newest] == [b"line 18", b"line 19"]
    assert (tmp_path / "a.log.2").read_bytes().splitlines()[0].endswith(b"line 14")


def test_applog_without_backups_truncates(tmp_path):
    applog = AppLog(tmp_path / "a.log", max_bytes=100, backups=0)
    for n in range(5):
        applog.write_line(b"line %02d" % n)
    applog.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]
    assert (tmp_path / "a.log").read_bytes().splitlines()[-1].endswith(b"line 04")


def test_applog_appends_to_an_existing_file(tmp_path):
    (tmp_path / "a.log").write_bytes(b"from the previous version\n")
    applog = AppLog(tmp_path / "a.log", max_bytes=1000, backups=1)
    applog.write_line(b"new")
    applog.close()
    assert (tmp_path / "a.log").read_bytes().startswith(b"from the previous version\n")


def test_applog_whose_new_file_cannot_be_made_logs_again_once_it_can(tmp_path, monkeypatch, caplog):
    # A rotation that could not open the new file (no inode left) had stopped the app's
    # log for good, silently, even after space came back.
    applog = AppLog(tmp_path / "a.log", max_bytes=100, backups=2)
    capture = OutputCapture("app", applog)
    capture.feed(b"line 00\nline 01\n")
    real_open = open

    def no_inode_left(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(applog_module, "open", no_inode_left, raising=False)
    with caplog.at_level(logging.INFO, logger=applog_module.__name__):
        for n in range(2, 8):  # a rotation falls in, and each write after it fails
            capture.feed(b"line %02d\n" % n)
        monkeypatch.setattr(applog_module, "open", real_open, raising=False)
        capture.feed(b"line 08\nline 09\n")
    applog.close()
    said = [record.getMessage() for record in caplog.records]
    assert said == [
        f"app: cannot write {tmp_path / 'a.log'}: [Errno 28] No space left on device",
        f"app: writing {tmp_path / 'a.log'} again",
    ]
    assert (tmp_path / "a.log").read_bytes().splitlines()[-1].endswith(b"line 09")


def flooded_pipe(tmp_path: Path) -> tuple[AppLog, OutputCapture, int, bytes]:
    """An app's log and capture, and the read end of a full pipe its exited run left: a
    flood (480 KB, 8 chunks), then its last words."""
    applog = AppLog(tmp_path / "a.log", max_bytes=10_000_000, backups=1)
    capture = OutputCapture("app", applog)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, MAX_PIPE_BUFFER)
    os.set_blocking(read_end, False)
    flood = b"".join(b"flood %06d\n" % n for n in range(40_000))
    os.write(write_end, flood + b"last words\n")
    os.close(write_end)
    return applog, capture, read_end, flood


def test_draining_past_the_budget_logs_the_last_words_and_drops_the_rest(tmp_path):
    """At an exit, a run past its app's output budget: its pipe's whole content logged
    (16 floods of 1 MiB pipes) held other apps' exit reports up to 3 s."""
    applog, capture, read_end, flood = flooded_pipe(tmp_path)
    open_, _, dropped = drain(capture, read_end, allowance=0)
    os.close(read_end)
    capture.flush()
    applog.close()
    lines = (tmp_path / "a.log").read_bytes().splitlines()
    assert not open_ and lines[-1].endswith(b"last words")
    assert len(lines) < READ_CHUNK // 12 + 2  # one chunk's lines, not 40,000
    assert len(flood) - READ_CHUNK < dropped < len(flood)
    assert capture.tail(1) == ("last words",)


def test_an_exit_drain_logs_no_more_than_the_budget_left_and_the_last_words(tmp_path, caplog):
    """A byte of budget left was enough for the exit's drain to log the whole pipe: 16
    apps exiting at once, each just within its budget, still held exit reports 2 s."""
    applog, capture, read_end, _ = flooded_pipe(tmp_path)
    nearly_spent = _Budget(tokens=1, counted_at=time.monotonic(), runs=1)
    done = subprocess.Popen(["true"])  # the run's process: only named in log lines
    done.wait()
    watched = _Watched(
        key=1, proc=done, capture=capture, fd=read_end, pidfd=-1, budget=nearly_spent
    )
    reader = OutputReader(LogRegistry(max_bytes=1, backups=0), on_exit=lambda *args: None)
    with caplog.at_level(logging.WARNING, logger="keter.processes.reader"):
        assert reader._drain(watched) is False  # end of file
    os.close(read_end)
    capture.flush()
    applog.close()
    lines = (tmp_path / "a.log").read_bytes().splitlines()
    assert lines[-1].endswith(b"last words")
    assert len(lines) < 2 * (READ_CHUNK // 12 + 2)  # its first and its last chunk
    assert any("of its output dropped" in r.getMessage() for r in caplog.records)


def test_an_app_quiet_since_its_flood_has_its_whole_last_output_logged(tmp_path):
    """Its budget, spent an hour ago, was not brought up to date before the exit's drain:
    all but the pipe's last 64 KiB was dropped, for an app within its rate for an hour."""
    applog = AppLog(tmp_path / "a.log", max_bytes=10_000_000, backups=1)
    capture = OutputCapture("app", applog)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, MAX_PIPE_BUFFER)
    os.set_blocking(read_end, False)
    os.write(write_end, b"".join(b"line %06d\n" % n for n in range(20_000)))  # 240 KB
    os.close(write_end)
    spent = _Budget(tokens=-OUTPUT_BURST, counted_at=time.monotonic() - 3600, runs=1)
    quiet = subprocess.Popen(["true"])  # the run's process: only named in log lines
    quiet.wait()
    watched = _Watched(key=1, proc=quiet, capture=capture, fd=read_end, pidfd=-1, budget=spent)
    reader = OutputReader(LogRegistry(max_bytes=1, backups=0), on_exit=lambda *args: None)
    assert reader._drain(watched) is False  # end of file
    os.close(read_end)
    capture.flush()
    applog.close()
    assert len((tmp_path / "a.log").read_bytes().splitlines()) == 20_000


def test_output_capture_joins_split_lines_and_keeps_a_tail(tmp_path):
    registry = LogRegistry(max_bytes=10_000_000, backups=1)
    applog = registry.acquire(tmp_path / "a.log")
    assert registry.acquire(tmp_path / "a.log") is applog  # shared by versions
    capture = OutputCapture("app", applog)
    capture.feed(b"hel")
    capture.feed(b"lo\r\nwor")
    capture.feed(b"ld\n" + b"".join(b"n%d\n" % n for n in range(100)) + b"unfinished")
    assert capture.tail(3) == ("n97", "n98", "n99")
    assert len(capture.tail(1000)) == 50
    capture.flush()
    assert capture.tail(1) == ("unfinished",)

    capture.feed(b"y" * (MAX_PARTIAL + 10))  # never ends its line: memory stays bounded
    [quoted] = capture.tail(1)
    cut = TAIL_LINE_LIMIT
    assert quoted.startswith("y" * cut + "... (") and quoted.endswith(
        f" [{MAX_PARTIAL} bytes in all]"
    )
    capture.feed(b"\n" + "\x1b[2J\rbell\x07 \u2028<0>forged\n".encode())
    assert capture.tail(1) == ("\\x1b[2J\\rbell\\x07 \\u2028<0>forged",)
    registry.release(applog)
    registry.release(applog)
    assert applog._file.closed
    lines = [line[30:] for line in (tmp_path / "a.log").read_bytes().split(b"\n")]
    assert lines[:3] == [b"hello", b"world", b"n0"]
    # The file keeps what the app wrote, as it wrote it (`keter logs` escapes it).
    assert lines[-5:] == [
        b"unfinished",
        b"y" * MAX_PARTIAL,
        b"y" * 10,
        "\x1b[2J\rbell\x07 \u2028<0>forged".encode(),
        b"",  # after the last newline
    ]


# -- pure functions ---------------------------------------------------------------------


def test_transitions_are_checked():
    assert check_transition(S.STARTING, S.RUNNING)
    assert check_transition(S.BACKOFF, S.STOPPING)
    for old, new in [(S.RUNNING, S.STARTING), (S.EXITED, S.RUNNING), (S.FATAL, S.STARTING)]:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)
    assert not any(old is S.FATAL for old, _ in TRANSITIONS)  # FATAL is final


def test_backoff_delay_doubles_to_a_cap_with_jitter():
    assert backoff_delay(0, 0.1, 60, jitter=1.0) == pytest.approx(0.1)
    assert backoff_delay(0, 0.1, 60, jitter=0.0) == pytest.approx(0.05)
    assert backoff_delay(3, 0.1, 60, jitter=1.0) == pytest.approx(0.8)
    assert backoff_delay(30, 0.1, 60, jitter=1.0) == 60
    assert backoff_delay(10_000, 0.1, 60, jitter=0.0) == 30


def test_exit_descriptions():
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


def test_health_status_rules():
    assert is_healthy(404, strict=False) and not is_healthy(404, strict=True)
    assert is_healthy(302, strict=True) and is_healthy(204, strict=True)
    assert not is_healthy(500, strict=False) and not is_healthy(199, strict=True)


def probe_http(port: int, check: HealthCheck, timeout: float = 1.0) -> tuple[bool, str]:
    """One probe, run as the monitor runs them: by a Prober (of its own here)."""
    answers: queue.Queue = queue.Queue()
    prober = Prober(lambda key, healthy, detail: answers.put((key, healthy, detail)))
    try:
        prober.probe("the one", port, check, timeout)
        key, healthy, detail = answers.get(timeout=timeout + 10)
    finally:
        prober.close(timeout=5)
    assert key == "the one"
    return healthy, detail


def test_probe_of_a_closed_port_and_of_bad_input():
    check = HealthCheck(host="app.test")
    assert probe_http(free_port(), check) == (False, "connection refused")
    injected = HealthCheck(host="app.test", path="/ HTTP/1.1\r\nX: y")
    assert probe_http(free_port(), injected)[0] is False


def test_apps_that_accept_and_never_answer_delay_no_other_apps_probe():
    # Eight apps (twice the four workers probes once shared) hold their probes for
    # their whole 3 s; an app that answers is told healthy meanwhile, at once.
    answers: queue.Queue = queue.Queue()
    prober = Prober(
        lambda key, healthy, detail: answers.put((key, healthy, detail, time.monotonic()))
    )
    check = HealthCheck(host="app.test")
    with contextlib.ExitStack() as stack:
        silent = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(8)]
        stack.callback(prober.close, 5)
        for n, server in enumerate(silent):
            prober.probe(f"silent {n}", server.getsockname()[1], check, 3.0)
        good = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        asked = time.monotonic()
        prober.probe("good", good.getsockname()[1], check, 3.0)
        connection, _ = good.accept()
        with connection:
            connection.recv(4096)
            connection.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        key, healthy, detail, at = answers.get(timeout=10)
        assert (key, healthy, detail) == ("good", True, "HTTP 204 on /")
        assert at - asked < 1.5  # the silent ones end at 3 s
        silent_answers = [answers.get(timeout=10) for _ in silent]
    assert sorted(key for key, *_ in silent_answers) == [f"silent {n}" for n in range(8)]
    assert {detail for _, _, detail, _ in silent_answers} == {"no answer within 3s"}


def test_many_probes_at_once_each_get_their_own_answer():
    # 300 apps answering at once, half of them 503: every probe is reported once,
    # under its own key, with its own app's answer.
    answers: queue.Queue = queue.Queue()
    prober = Prober(lambda key, healthy, detail: answers.put((key, healthy, detail)))
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(300)]
    stop = threading.Event()

    def serve() -> None:
        import selectors

        with selectors.DefaultSelector() as selector:
            for n, server in enumerate(servers):
                selector.register(server, selectors.EVENT_READ, n)
            while not stop.is_set():
                for selected, _ in selector.select(0.1):
                    connection, _ = selected.fileobj.accept()
                    with connection:
                        connection.recv(4096)
                        status = b"503" if selected.data % 2 else b"200"
                        connection.sendall(b"HTTP/1.1 " + status + b" X\r\n\r\n")

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    try:
        for n, server in enumerate(servers):
            prober.probe(n, server.getsockname()[1], HealthCheck(host="app.test"), 10.0)
        got = [answers.get(timeout=30) for _ in servers]
    finally:
        stop.set()
        server_thread.join(5)
        prober.close(5)
        for server in servers:
            server.close()
    assert sorted(key for key, _, _ in got) == list(range(300))
    for key, healthy, detail in got:
        assert (healthy, detail) == (
            (False, "HTTP 503 on /") if key % 2 else (True, "HTTP 200 on /")
        )
    assert answers.empty()


def answering(answer: bytes) -> tuple[socket.socket, threading.Thread]:
    """A server that answers its one connection with ``answer`` and closes it."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(4096)
            with contextlib.suppress(OSError):
                connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (b"HTTP/1.1 200\r\n\r\n", (True, "HTTP 200 on /")),  # no reason phrase
        (b"HTTP/1.0 404 Not Found\n\n", (True, "HTTP 404 on /")),  # a bare LF
        (b"HTTP/1.1 000 Zero\r\n\r\n", (False, "not an HTTP answer")),
        (b"HTTP/1.1 2000 OK\r\n\r\n", (False, "not an HTTP answer")),
        (b"HTTP/1.1 200 " + b"x" * 100_000, (False, "not an HTTP answer")),  # no line end
        (b"HTTP/1.1 200 OK", (False, "not an HTTP answer")),  # closed mid-line
    ],
    ids=["no-reason", "bare-lf", "status-000", "four-digits", "endless-line", "cut-line"],
)
def test_only_a_whole_status_line_with_a_real_code_is_an_answer(answer, verdict):
    server, thread = answering(answer)
    with server:
        assert probe_http(server.getsockname()[1], HealthCheck(host="app.test")) == verdict
    thread.join(5)


def test_a_probe_that_cannot_start_fails_alone(monkeypatch):
    # A bug (or a full selector) starting one probe fails that probe; the thread that
    # runs every app's probes goes on.
    real, calls = health_module.Exchange, []

    def exchange(*args):
        calls.append(args)
        if len(calls) == 1:
            raise ValueError("a bug")
        return real(*args)

    monkeypatch.setattr(health_module, "Exchange", exchange)
    answers: queue.Queue = queue.Queue()
    prober = Prober(lambda key, healthy, detail: answers.put((key, healthy, detail)))
    try:
        prober.probe("first", free_port(), HealthCheck(host="app.test"), 1.0)
        assert answers.get(timeout=10) == ("first", False, "probe failed: ValueError")
        server, thread = answering(b"HTTP/1.1 200 OK\r\n\r\n")
        with server:
            prober.probe("second", server.getsockname()[1], HealthCheck(host="app.test"), 5.0)
            assert answers.get(timeout=10) == ("second", True, "HTTP 200 on /")
        thread.join(5)
    finally:
        prober.close(5)


def test_a_failing_report_stops_no_later_probe():
    answers: queue.Queue = queue.Queue()

    def report(key: object, healthy: bool, detail: str) -> None:
        if key == "first":
            raise RuntimeError("a bug in whoever is told")
        answers.put((key, detail))

    prober = Prober(report)
    try:
        prober.probe("first", free_port(), HealthCheck(host="app.test"), 1.0)
        prober.probe("second", free_port(), HealthCheck(host="app.test"), 1.0)
        assert answers.get(timeout=10) == ("second", "connection refused")
    finally:
        prober.close(5)


# Listens and never accepts; a child holds the listener while the leader exits.
SILENT_THEN_EXIT = r"""
import os, socket, time
server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
time.sleep(0.3)  # a probe is out meanwhile, waiting in the listener's backlog
raise SystemExit(3)
"""


def test_a_stop_while_the_leaders_exit_waits_for_a_probe_finishes(make_monitor):
    # A leader's exit while a probe is out waits for the probe's answer. A stop then
    # had the deploy STOPPING, which takes no probe answer: ProcessStopped never came,
    # and the deploy's port and folder were never given back.
    monitor = make_monitor(stop_timeout=1.0, probe_timeout=30.0)
    monitor.start(
        1, monitor.spec(port=free_port(), command=(sys.executable, "-c", SILENT_THEN_EXIT))
    )
    monitor.expect(ProcessStarted, deploy_id=1)
    wait_for(
        lambda: getattr(monitor.monitor._entries.get(1), "exit_pending", None) is not None,
        10,
        "the leader's exit to wait for the probe",
    )
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1, delay=0))
    monitor.expect(ProcessStopped, deploy_id=1, timeout=10)  # the probe has 30 s left


def test_a_probe_of_an_app_that_dribbles_its_answer_ends_at_its_timeout():
    # A byte every 0.1 s, never a whole status line: each receive is quick, the probe
    # is not. One deadline covers the whole probe.
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:

        def dribble() -> None:
            connection, _ = server.accept()
            with connection:
                while not stop.wait(0.1):
                    with contextlib.suppress(OSError):
                        connection.sendall(b"H")

        threading.Thread(target=dribble, daemon=True).start()
        started = time.monotonic()
        result = probe_http(server.getsockname()[1], HealthCheck(host="app.test"), timeout=0.5)
        took = time.monotonic() - started
        stop.set()
    assert result == (False, "no answer within 0.5s")
    assert took < 2


# -- cgroups -------------------------------------------------------------------------------

# Prints the cgroup it started in, then daemonizes a helper the classic way (fork,
# setsid, fork again) that prints its pid and waits; the leader waits too.
DAEMONIZING = r"""
import os, signal, sys
sys.stdout.write("cgroup " + open("/proc/self/cgroup").read().split("0::", 1)[1])
sys.stdout.flush()
if os.fork() == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
    sys.stdout.write(f"daemon pid {os.getpid()}\n")
    sys.stdout.flush()
    while True:
        signal.pause()
os.wait()
while True:
    signal.pause()
"""


@pytest.fixture
def cgroups(tmp_path):
    found = Cgroups.find(tmp_path)
    if found is None:
        pytest.skip("no writable cgroup v2 hierarchy")
    yield found
    assert not found.base.exists()  # the monitor removed it (and each deploy's) on stopping


def test_whose_socket_is_whose_is_told_by_its_cgroup_never_by_reading_file_descriptors(
    cgroups, make_monitor, monkeypatch
):
    # Reading every descriptor of the app's processes (one readlink each) at each health
    # check and stop: an app holding millions of them stalled the monitor, which every
    # app waits on, for tens of seconds, and other apps' deploys failed meanwhile.
    read: list[int] = []

    def socket_pids(inode: int, pids: list[int] | None = None) -> list[int]:
        read.append(inode)
        return real(inode, pids)

    real = monitor_module.socket_pids
    monkeypatch.setattr(monitor_module, "socket_pids", socket_pids)
    monitor = make_monitor(cgroups=cgroups, stop_timeout=0.5)
    monitor.healthy(1, monitor.spec(port=free_port()))
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))
    monitor.expect(ProcessStopped, deploy_id=1)
    assert read == []


def test_a_setsid_daemon_stays_in_the_apps_cgroup_and_goes_with_it(cgroups, make_monitor, tmp_path):
    # cgroups first: its check that keter removed its subtree runs after make_monitor's stop
    monitor = make_monitor(cgroups=cgroups, stop_timeout=0.5)
    script = tmp_path / "daemonizing.py"
    script.write_text(DAEMONIZING)
    monitor.start(1, monitor.spec(command=(sys.executable, str(script))))
    started = monitor.expect(ProcessStarted, deploy_id=1)
    log_path = tmp_path / "log" / "app.log"
    daemon = int(
        wait_for(lambda: re.search(rb"daemon pid (\d+)", log_path.read_bytes()), what="daemon")[1]
    )
    cgroup = cgroups.base / "d1-app"
    # In its cgroup from its first instruction, and the daemon with it, though in a
    # session of its own (out of reach of the app's process group).
    assert f"/{cgroups.base.name}/d1-app\n".encode() in log_path.read_bytes()
    assert os.getsid(daemon) != os.getsid(started.pid)
    assert set(cgroup.joinpath("cgroup.procs").read_text().split()) >= {
        str(started.pid),
        str(daemon),
    }

    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))
    monitor.expect(ProcessStopped, deploy_id=1)
    assert not alive(daemon) and not alive(started.pid)
    assert not cgroup.exists()


LEAVES_A_SESSION = r"""
import os, signal, sys
if os.fork() == 0:
    os.setsid()  # out of the group, still in the cgroup
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.write(f"session pid {os.getpid()}\n")
    sys.stdout.flush()
    while True:
        signal.pause()
while True:
    signal.pause()
"""


def take_pid(pid: int) -> subprocess.Popen | None:
    """A new session (its pgid its pid) as the next process made, with ``pid`` if that
    number is free; None if it is not (or the kernel will not be told, ns_last_pid)."""
    for _ in range(20):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_the_group_id_is_kept_until_the_group_is_no_longer_signalled(
    cgroups, make_monitor, tmp_path
):
    # The leader exits at SIGTERM; a child in a session of its own ignores it and keeps
    # the cgroup populated. The leader was reaped at once: with its group empty, its
    # number (the group's id) went to the next process made, and keter's SIGKILL to the
    # group at stop-timeout killed that stranger's whole session.
    # stop-timeout: the time the test has to try to take the number
    monitor = make_monitor(cgroups=cgroups, stop_timeout=3.0)
    script = tmp_path / "leaves.py"
    script.write_text(LEAVES_A_SESSION)
    monitor.start(1, monitor.spec(command=(sys.executable, str(script))))
    leader = monitor.expect(ProcessStarted, deploy_id=1).pid
    log_path = tmp_path / "log" / "app.log"
    wait_for(lambda: b"session pid" in log_path.read_bytes(), what="the child's session")
    monitor.monitor.tell(StopProcess(app="app", deploy_id=1))
    wait_for(
        lambda: not psutil.pid_exists(leader) or psutil.Process(leader).status() == "zombie",
        what="the leader to exit",
    )
    stranger = take_pid(leader)
    try:
        assert stranger is None  # its number is still taken: by its zombie
        assert psutil.Process(leader).status() == "zombie"
        monitor.expect(ProcessStopped, deploy_id=1)
        assert not psutil.pid_exists(leader)  # reaped once the group was gone
    finally:
        if stranger is not None:
            alive_then = stranger.poll() is None
            stranger.kill()
            stranger.wait()
            assert alive_then, "keter killed a stranger's session"


# -- ports that cannot be stolen ---------------------------------------------------------------


def test_a_stranger_on_a_crashed_apps_port_makes_it_move(make_monitor):
    monitor = make_monitor(backoff_base=0.2)  # time for the stranger to win the race
    port = free_port()
    pid = monitor.healthy(1, monitor.spec(port=port))

    os.kill(pid, signal.SIGKILL)
    stranger = bind_when_free(port)
    try:
        taken = monitor.expect(ProcessPortTaken, deploy_id=1)
        assert taken.port == port
        parked = monitor.expect(
            ProcessStateChanged, deploy_id=1, state="BACKOFF", after=monitor.index(taken) - 1
        )
        assert f"port {port} taken by pid {os.getpid()} (user root)" in parked.detail
        assert not parked.failed  # keter stopped it to move it: no crash of the version's
        new_port = free_port()
        spec = monitor.spec(port=new_port)
        monitor.monitor.tell(MoveProcess(app="app", deploy_id=1, spec=spec))
        running = monitor.expect(
            ProcessStateChanged, deploy_id=1, state="RUNNING", after=monitor.index(taken)
        )
        assert f"port {new_port}" in running.detail
        assert get(new_port) == "v1\n"
        with pytest.raises(BlockingIOError):
            stranger.accept()  # keter never sent it anything, not even a health probe
    finally:
        stranger.close()


# -- the app's environment, handed over after the privilege drop ---------------------------

_ENV_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda name: name not in ("PWD", "OLDPWD")  # the shell's own
)
_ENV_VALUE = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)))
PRINT_ENV = "import json, os; print(json.dumps(dict(os.environ)))"


@given(st.dictionaries(_ENV_NAME, _ENV_VALUE, max_size=6))
@settings(max_examples=60, deadline=None)
def test_the_environment_file_gives_the_app_exactly_its_environment(env: dict[str, str]):
    # Quotes, backslashes, $, backticks, newlines, any Unicode: sourced by the real shell.
    fd = environment_file(env)
    try:
        done = subprocess.run(
            [SHELL, "-c", APP_ENV, "keter-env", "/usr/bin/python3", "-c", PRINT_ENV],
            stdin=fd,
            env=ROOT_ENV,
            capture_output=True,
            check=True,
        )
    finally:
        os.close(fd)
    seen = json.loads(done.stdout)
    assert {name: seen.get(name) for name in env} == env


def test_an_environment_name_the_shell_cannot_export_fails_the_start():
    with pytest.raises(SpawnError, match="invalid environment variable name"):
        environment_file({"A-B": "x"})
