"""One-shot processes in the real process monitor (``RunOnce``, what runs a release).

Run once, never restarted, no health check; reported once with the exit
status and the last lines of output; stopped at their timeout; nothing of
their process group survives them.
"""

from __future__ import annotations

import os
import stat
import sys

from support.processes import alive

from keter.messages import ProcessStateChanged, RunFinished, RunOnce, StopProcess

PY = sys.executable


def run_once(harness, deploy_id: int, script: str, timeout: float = 10.0, **fields) -> None:
    spec = harness.spec(command=(PY, "-u", "-c", script), health=None, **fields)
    harness.monitor.tell(RunOnce(app="app", deploy_id=deploy_id, spec=spec, timeout=timeout))


def test_a_one_shot_runs_once_and_reports_its_status_and_output(make_monitor) -> None:
    harness = make_monitor()
    run_once(harness, 1, "print('creating table notes'); print('done')")
    done = harness.expect(RunFinished, deploy_id=1)
    assert done.ok and done.returncode == 0 and not done.timed_out
    assert done.output_tail == ("creating table notes", "done")
    log = (harness.tmp_path / "log" / "app.log").read_text()
    assert "creating table notes" in log  # its output is in the app's log

    run_once(harness, 2, "import sys; print('relation exists'); sys.exit(3)")
    failed = harness.expect(RunFinished, deploy_id=2)
    assert not failed.ok and failed.returncode == 3
    assert failed.reason == "exited with status 3"
    assert failed.output_tail == ("relation exists",)
    # Never restarted: it went STARTING, RUNNING, STOPPING, EXITED, once.
    assert harness.states(2) == ["STARTING", "RUNNING", "STOPPING", "EXITED"]
    assert [m for m in harness.messages() if isinstance(m, RunFinished)] == [done, failed]


def test_a_one_shot_is_stopped_at_its_timeout_with_its_group(make_monitor) -> None:
    harness = make_monitor(stop_timeout=1.0)
    script = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # must be killed, not asked
        "if os.fork() == 0:\n"
        "    time.sleep(600)\n"
        "print('migrating forever', flush=True)\n"
        "time.sleep(600)\n"
    )
    run_once(harness, 1, script, timeout=0.5)
    started = harness.expect(ProcessStateChanged, deploy_id=1, state="RUNNING")
    done = harness.expect(RunFinished, deploy_id=1, timeout=15)
    assert done.timed_out and not done.ok
    assert done.reason == "did not finish within 0.5s (killed by SIGKILL)"
    assert done.output_tail == ("migrating forever",)
    assert not alive(started.pid)  # and the fixture checks its whole group is gone


def test_nothing_a_one_shot_started_outlives_it(make_monitor) -> None:
    harness = make_monitor()
    script = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(600)\n"
        "print(pid, flush=True)\n"
    )
    run_once(harness, 1, script)
    done = harness.expect(RunFinished, deploy_id=1)
    assert done.ok
    assert not alive(int(done.output_tail[-1]))


def test_a_one_shot_stops_on_request(make_monitor) -> None:
    harness = make_monitor()
    run_once(harness, 1, "import time; print('working', flush=True); time.sleep(600)")
    harness.expect(ProcessStateChanged, deploy_id=1, state="RUNNING")
    harness.monitor.tell(StopProcess(app="app", deploy_id=1))
    done = harness.expect(RunFinished, deploy_id=1)
    assert not done.ok and not done.timed_out
    assert done.reason == "stopped on request (killed by SIGTERM)"


def test_a_one_shot_that_cannot_start_is_reported(make_monitor) -> None:
    harness = make_monitor()
    spec = harness.spec(command=("bin/no-such-migrate",), health=None)
    harness.monitor.tell(RunOnce(app="app", deploy_id=1, spec=spec, timeout=5))
    done = harness.expect(RunFinished, deploy_id=1)
    assert done.returncode is None and not done.ok
    assert done.reason.startswith("cannot run bin/no-such-migrate")


def test_the_data_folder_is_made_before_the_spawn(make_monitor) -> None:
    harness = make_monitor()
    data = harness.tmp_path / "data" / "app"
    script = "import os; open(os.environ['KETER_DATA_DIR'] + '/kept', 'w').write('x')"
    run_once(harness, 1, script, data_dir=data, env={"KETER_DATA_DIR": str(data)})
    assert harness.expect(RunFinished, deploy_id=1).ok
    info = os.stat(data)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(data.parent).st_mode) == 0o711
    assert (data / "kept").read_text() == "x"
