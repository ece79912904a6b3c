"""Fault suite, part 2: apps that misbehave, and the resource limits keter puts on them.

Through a real keter: a new version that never listens, apps that daemonize
(what keter can and cannot catch), and the limits every app process gets. The
limits at work are in tests/test_faults_limits.py (rlimits) and tests/test_limits.py.

Covered elsewhere: exits at once, hangs (tests/test_deploy.py); crash loop after
becoming healthy, ignores TERM, forks grandchildren, SIGKILLed keter's orphans
(tests/test_supervision.py); exec failures and every monitor state
(tests/test_processes.py).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes
from support.faults import Rig, assert_one_error, limits_of
from support.limits import applied, mechanisms
from support.net import body, served
from support.processes import alive
from support.wait import wait_for

from keter.processes.groups import group_members


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("apps"), **{"health-check-timeout": 1.5})
    try:
        yield rig
    finally:
        rig.close()


# -- through keter -----------------------------------------------------------------------


def test_new_version_that_never_listens_fails_and_the_old_one_keeps_serving(rig: Rig) -> None:
    bundle = rig.bundles / "mute.keter"
    rig.keter.drop(make_bundle(bundle, config=webapp_config("mute.test", "v1")))
    served(rig.nginx, "mute.test", "v1")
    # nginx may answer before keter's verdict: wait for it, or v1's "now serving" would be
    # read below as v2's outcome.
    wait_for(
        lambda: re.search(r"mute: deploy #\d+ now serving", rig.keter.log()), 10, "v1's verdict"
    )
    [v1] = [p for p in app_processes(rig.keter) if "/mute-" in p.cwd()]
    v1_folder = Path(v1.cwd())

    before = rig.checkpoint()
    config = webapp_config("mute.test", "v2", args=["--never-listen"])
    rig.keter.drop(make_bundle(bundle, config=config))
    outcome = wait_for(
        lambda: re.search(r"mute: deploy #\d+ (failed|now serving)", rig.log_since(before)),
        20,
        "the deploy's outcome",
    )
    assert outcome[1] == "failed", rig.log_since(before)
    assert_one_error(rig.log_since(before), "mute", "did not answer on port", "within 1.5s")
    assert body(rig.nginx, "mute.test") == b"v1\n"
    assert rig.nginx.config_file.read_bytes() == before["config"]
    # The failed version is gone, processes and folder; the serving one is untouched.
    wait_for(
        lambda: [p.pid for p in app_processes(rig.keter) if "/mute-" in p.cwd()] == [v1.pid],
        10,
        "only v1 to run",
    )
    temp = rig.keter.root / "temp"
    wait_for(lambda: sorted(temp.glob("mute-*")) == [v1_folder], 10, "only v1's folder to remain")


# An app that daemonizes a helper the classic way: fork, setsid, fork again, stdio to
# /dev/null. With DAEMON_HOLDS_PORT the daemon keeps the app's listening socket.
DAEMONIZING_APP = r"""
import http.server, os, signal, socket

port = int(os.environ["PORT"])
listener = socket.create_server(("127.0.0.1", port))
if os.fork() == 0:
    os.setsid()
    daemon = os.fork()
    if daemon:
        print(f"daemon pid {daemon}", flush=True)
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if os.environ.get("DAEMON_HOLDS_PORT") != "yes":
        listener.close()
    while True:
        signal.pause()
os.wait()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        data = (os.environ["VERSION"] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
server.socket.close()
server.socket = listener
server.serve_forever()
"""


@pytest.mark.parametrize("holds_port", [True, False], ids=["holding-the-port", "silent"])
def test_a_daemonized_helper_goes_with_its_app(rig: Rig, holds_port: bool) -> None:
    """A process that leaves the app's group (fork, setsid, fork) is stopped with it.

    ``setsid`` takes a daemon out of the app's process group, out of reach of the
    signals keter sends the group; the app's cgroup still holds it, so removing the
    app kills it too (issue 11.3). Without cgroup v2 (keter says so at start) it
    would survive: then keter names it in a warning if it holds the app's port.
    """
    if "no cgroup v2 hierarchy" in rig.keter.log():
        pytest.skip("keter runs without cgroup v2 here")
    app = "daemon" if holds_port else "quiet"
    source = rig.bundles / f"{app}.py"
    source.write_text(DAEMONIZING_APP)
    env = {"DAEMON_HOLDS_PORT": "yes" if holds_port else "no"}
    bundle = make_bundle(
        rig.bundles / f"{app}.keter",
        config=webapp_config(f"{app}.test", "d1", env=env),
        app_source=source,
    )
    rig.keter.drop(bundle)
    served(rig.nginx, f"{app}.test", "d1")
    applog = rig.keter.root / "log" / f"app-{app}.log"
    daemon_pid = int(
        wait_for(lambda: re.search(r"daemon pid (\d+)", applog.read_text()), 10, "the daemon")[1]
    )
    daemon = psutil.Process(daemon_pid)
    try:
        [leader] = [p for p in app_processes(rig.keter) if f"/{app}-" in p.cwd()]
        # Its own session and group: out of reach of the signals keter sends the app's group.
        assert os.getsid(daemon_pid) != os.getsid(leader.pid)
        assert os.getpgid(daemon_pid) != leader.pid

        offset = len(rig.keter.log())
        (rig.keter.incoming / f"{app}.keter").unlink()
        wait_for(lambda: f"{app}: removed" in rig.keter.log()[offset:], 15, "the removal")
        wait_for(lambda: re.search(rf"{app}: deploy #\d+ stopped", rig.keter.log()[offset:]), 10)
        assert not alive(daemon_pid), "the app's cgroup took the daemon with it"
        assert group_members(leader.pid) == []
        log = rig.keter.log()[offset:]
        assert "still held by pid" not in log
        assert "ERROR" not in log
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            daemon.kill()


def test_every_app_runs_under_the_default_limits(rig: Rig) -> None:
    [pid] = [p.pid for p in app_processes(rig.keter) if p.cwd().endswith("/good-1")]
    # keter's defaults (keter.limits.DEFAULTS), where keter says it puts each; open
    # files at most keter's own hard limit (see keter.processes.spawn.ResourceLimits).
    keter_files = limits_of(rig.keter.proc.pid)["Max open files"][1]
    files = 65536 if keter_files == "unlimited" else min(65536, int(keter_files))
    expected = {"memory": None, "processes": 4096, "open-files": files, "cpu": None}
    assert applied(pid, mechanisms(rig.keter.log())) == expected
    assert limits_of(pid)["Max core file size"] == ("0", "0")
