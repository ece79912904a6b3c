"""The bind guard (keter.processes.bindguard): an app binds no port of port-range but its own.

Against the real kernel as root: a process in a guarded cgroup v2 binds its own
port and any port outside the range, and gets EPERM for every other port of the
range, on IPv4 and IPv6; a new guard replaces the old. Then the wiring in a real
process monitor (a moved app's new port is guarded before it restarts; without a
guard keter says so once and apps bind as before), and the whole daemon against
a squatter that tries to bind every port of the range.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bundles import make_bundle
from support.daemon import failures
from support.net import app_port_range, bind_when_free, body, free_port, served
from support.wait import wait_for

from keter.messages import MoveProcess, ProcessPortTaken, ProcessStateChanged
from keter.processes import bindguard
from keter.processes.cgroups import Cgroup, Cgroups, unified_mount

PORT_HOG = Path(__file__).parent / "apps" / "port_hog.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every app user, unlike the tests' own Python

pytestmark = pytest.mark.skipif(unified_mount() is None, reason="no cgroup v2 hierarchy")


@pytest.fixture
def cgroups(tmp_path: Path) -> Iterator[Cgroups]:
    """A keter subtree of its own (keter-ID of this test's folder), removed afterwards."""
    found = Cgroups.find(tmp_path)
    if found is None:
        pytest.skip("no cgroup v2 hierarchy this test may write to")
    yield found
    for cgroup in found.leftovers():
        cgroup.kill()
        cgroup.wait_empty(5)
        cgroup.remove()
    found.remove()


def ports_in_a_range(count: int) -> tuple[list[int], tuple[int, int], int]:
    """``count`` free ports, the range they span, and a free port outside it."""
    while True:
        ports = [free_port() for _ in range(count)]
        low, high = min(ports), max(ports)
        # free_port hands out its slice in turn: ports taken as it wrapped around span
        # all of it, and the search for one outside never ended.
        if high - low < 100:
            break
    outside = next(p for p in iter(free_port, None) if not low <= p <= high)
    return ports, (low, high), outside


def bind_results(text: str) -> dict[tuple[int, int], str]:
    """port_hog's ``bind VERSION PORT RESULT`` lines (in an app log: after its time)."""
    found = re.findall(r"\bbind (\d) (\d+) (\w+)$", text, re.M)
    return {(int(version), int(port)): result for version, port, result in found}


def run_in(cgroup: Cgroup, ports: list[int]) -> dict[tuple[int, int], str]:
    """Run port_hog's bind attempts on ``ports`` as a process of ``cgroup``."""
    shell = 'echo 0 > "$1" || exit 126; shift; exec "$@"'
    done = subprocess.run(
        ["/bin/sh", "-c", shell, "sh", str(cgroup.procs), sys.executable, str(PORT_HOG)],
        env={"TRY_PORTS": ",".join(map(str, ports)), "ONLY_TRY": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return bind_results(done.stdout)


# -- the guard itself, against the kernel --------------------------------------------------


def test_a_guarded_cgroup_binds_its_own_port_and_ports_outside_the_range_only(cgroups):
    (own, other), port_range, outside = ports_in_a_range(2)
    cgroup = cgroups.for_deploy("guarded", 1)
    bindguard.guard(cgroup.path, port_range, (own,))
    got = run_in(cgroup, [own, other, outside])
    for version in (4, 6):
        assert got[(version, own)] == "ok", got
        assert got[(version, outside)] == "ok", got
        assert got[(version, other)] == "EPERM", got
    # Root outside the cgroup is not judged: the guard is the cgroup's alone.
    assert bind_when_free(other, timeout=5).close() is None


def test_a_new_guard_replaces_the_old_one(cgroups):
    """A moved process's cgroup gets its new port, and loses its old one."""
    (old, new), port_range, _ = ports_in_a_range(2)
    cgroup = cgroups.for_deploy("moved", 1)
    bindguard.guard(cgroup.path, port_range, (old,))
    bindguard.guard(cgroup.path, port_range, (new,))
    got = run_in(cgroup, [old, new])
    assert got == {(4, old): "EPERM", (6, old): "EPERM", (4, new): "ok", (6, new): "ok"}


def test_a_guard_with_no_port_refuses_the_whole_range(cgroups):
    """A background worker or a release has no port of its own."""
    ports, port_range, _ = ports_in_a_range(3)
    cgroup = cgroups.for_deploy("worker", 1)
    bindguard.guard(cgroup.path, port_range, ())
    assert set(run_in(cgroup, ports).values()) == {"EPERM"}


def test_where_the_kernel_refuses_the_check_says_why_and_leaves_nothing(tmp_path):
    """Not a cgroup: what keter would meet without cgroup v2 or the privilege."""
    why = bindguard.unavailable(tmp_path, (30000, 30010))
    assert why is not None and why.startswith("the kernel refused it"), why
    assert list(tmp_path.iterdir()) == []


# -- the wiring in the process monitor -------------------------------------------------------


def hog_spec(monitor, port: int, try_ports: list[int], version: str = "v1"):
    env = {"TRY_PORTS": ",".join(map(str, try_ports)), "VERSION": version}
    return monitor.spec(port=port, env=env, command=(sys.executable, "-u", str(PORT_HOG)))


def app_log(monitor) -> str:
    return (monitor.tmp_path / "log" / "app.log").read_text()


def test_a_guarded_apps_port_moves_with_it_before_it_restarts(make_monitor, cgroups, caplog):
    """A stranger (not an app: root, outside keter's cgroups) takes a running app's port.
    The app moves to a port of the range keter hands it: its restart binds there (the old
    guard would refuse it) and no longer binds its old port."""
    caplog.set_level(logging.INFO, logger="keter.processes.monitor")
    (port, other, new_port), port_range, _ = ports_in_a_range(3)
    monitor = make_monitor(cgroups=cgroups, port_range=port_range, backoff_base=0.2)
    pid = monitor.healthy(1, hog_spec(monitor, port, [other]))
    assert "bind guard on" in caplog.text
    assert bind_results(app_log(monitor)) == {(4, other): "EPERM", (6, other): "EPERM"}

    os.kill(pid, signal.SIGKILL)
    stranger = bind_when_free(port)
    try:
        taken = monitor.expect(ProcessPortTaken, deploy_id=1)
        monitor.monitor.tell(
            MoveProcess(app="app", deploy_id=1, spec=hog_spec(monitor, new_port, [port]))
        )
        running = monitor.expect(
            ProcessStateChanged, deploy_id=1, state="RUNNING", after=monitor.index(taken)
        )
        assert f"port {new_port}" in running.detail
        wait_for(lambda: (4, port) in bind_results(app_log(monitor)), 10, "the restart's binds")
        assert bind_results(app_log(monitor))[(4, port)] == "EPERM"
        assert bind_results(app_log(monitor))[(6, port)] == "EPERM"
    finally:
        stranger.close()


def test_without_a_bind_guard_keter_says_so_once_and_apps_bind_as_before(
    make_monitor, cgroups, caplog, monkeypatch
):
    monkeypatch.setattr(bindguard, "unavailable", lambda parent, port_range: "forced off")
    (port, other), port_range, _ = ports_in_a_range(2)
    monitor = make_monitor(cgroups=cgroups, port_range=port_range)
    monitor.healthy(1, hog_spec(monitor, port, [other]))
    monitor.healthy(2, hog_spec(monitor, free_port(), []))
    said = [r for r in caplog.records if "bind guard" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, said
    assert "no bind guard (forced off)" in said[0].getMessage()
    wait_for(lambda: bind_results(app_log(monitor)), 10, "the app's binds")
    assert bind_results(app_log(monitor)) == {(4, other): "ok", (6, other): "ok"}


# -- the daemon against a squatter -------------------------------------------------------------


def test_a_squatter_cannot_take_the_port_range_from_other_apps(
    open_base, keter_factory, private_nginx
):
    """An app that binds every port of port-range it can, and snipes any that frees: it
    gets none. Another app deploys after it, and comes back on its own port after a
    crash (the squatter would have taken it in the restart's backoff)."""
    low, high = app_port_range()
    keter = keter_factory(
        root=open_base / "root", **{"port-range": [low, high], "run-apps-as-root": False}
    )
    assert "bind guard on" in keter.log()
    hog = {"exec": "../bin/app", "host": "hog.test"}
    hog["env"] = {"HOG_LOW": str(low), "HOG_HIGH": str(high), "VERSION": "hog"}
    bundle = make_bundle(
        open_base / "hog.keter", config=hog, app_source=PORT_HOG, interpreter=SYSTEM_PYTHON
    )
    keter.drop(bundle)
    served(private_nginx, "hog.test", "hog")
    hog_log = keter.root / "log" / "app-hog.log"
    wait_for(lambda: "holding " in hog_log.read_text(), 20, "the squatter's first pass")
    assert "holding 0 ports" in hog_log.read_text()

    victim = {"exec": "../bin/app", "host": "victim.test", "env": {"VERSION": "victim"}}
    bundle = make_bundle(
        open_base / "victim.keter", config=victim, app_source=PORT_HOG, interpreter=SYSTEM_PYTHON
    )
    keter.drop(bundle)
    served(private_nginx, "victim.test", "victim")
    assert failures(keter, "victim") == []

    started = re.search(r"victim: deploy #(\d+) started pid (\d+) on port (\d+)", keter.log())
    assert started, keter.log()[-3000:]
    port = started[3]
    offset = len(keter.log())
    os.kill(int(started[2]), signal.SIGKILL)  # a crash; the squatter tries for its port
    wait_for(
        lambda: re.search(
            rf"victim: state STARTING -> RUNNING \(pid \d+, port {port}\)", keter.log()[offset:]
        ),
        30,
        lambda: f"the victim back on port {port}: {keter.log()[offset:][-3000:]}",
    )
    assert body(private_nginx, "victim.test") == b"victim\n"
    assert "moves from port" not in keter.log()
    assert "sniped" not in hog_log.read_text()
