"""App limits (issue 11.5), against the real daemon as root: limits are applied and an OOM
kill is reported.

One keter whose keter-config.yaml sets every default and a ceiling. What an app
runs under is read from the kernel: the cgroup files of the groups its
processes are in (v2 where the controller is there, else v1: on this project's
test machines memory, pids and cpu are v1 controllers) and /proc/PID/limits.
An app that uses more memory than its limit is killed by the OOM killer, and
keter says so in its log, the app's events and, for a first start, its deploy
history (kind ``oom``). A CPU-bound app gets about its share of a core.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, keter_cli, status_api
from support.faults import Rig, assert_one_error, limits_of
from support.limits import (
    applied,
    cgroup_folders,
    counter,
    cpu_cores,
    delegated_scope,
    mechanisms,
    memory_limit,
    oom_kills,
)
from support.net import body, served
from support.wait import wait_for

from keter.limits import Limits
from keter.messages import FailureKind, ProcessFailed, RunFinished, RunOnce
from keter.processes.controllers import Controllers, Mechanism
from keter.processes.spawn import APP_OOM_SCORE_ADJ

MIB = 1 << 20
DEFAULTS = {"memory": "256M", "processes": 300, "open-files": 1000, "cpu": 1}
CEILING = {"memory": "512M", "processes": 500, "open-files": 4096, "cpu": 2}
OWN = {"memory": "128M", "processes": 100, "open-files": 2048, "cpu": "50%"}

pytestmark = pytest.mark.skipif(
    not Path("/sys/fs/cgroup").is_dir(), reason="no cgroup file system mounted"
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    limits = {**DEFAULTS, "max": CEILING}
    base = tmp_path_factory.mktemp("limits")
    rig = Rig(base, wrapper=delegated_scope(), **{"app-limits": limits})
    try:
        yield rig
    finally:
        rig.close()


def pid_of(rig: Rig, app: str, *flags: str, without: str | None = None) -> int:
    """The pid of the app's process (with ``flags`` among its arguments, not ``without``)."""

    def find() -> int | None:
        for process in app_processes(rig.keter):
            try:
                cmdline, cwd = process.cmdline(), process.cwd()
            except psutil.NoSuchProcess:
                continue
            if f"/{app}-" not in cwd or without in cmdline:
                continue
            if cmdline[1:2] != [str(Path(cwd) / "bin" / "app")]:
                continue  # not exec'd yet: still the chain (sh, setpriv) before it
            if all(flag in cmdline for flag in flags):
                return process.pid
        return None

    return wait_for(find, 20, f"{app}'s process")


def deploy(rig: Rig, app: str, config: dict, **bundle: object) -> Path:
    return rig.keter.drop(make_bundle(rig.bundles / f"{app}.keter", config=config, **bundle))


# -- every limit is applied -----------------------------------------------------------------


def test_the_global_defaults_and_a_bundles_own_limits_are_applied(rig: Rig) -> None:
    """keter-config.yaml's defaults bind an app that sets none; a bundle's own limits (each
    stanza its own, in either format) bind its processes instead, through the cgroup
    controllers where the machine has them."""
    how = mechanisms(rig.keter.log())
    assert how["open files"] == "rlimit"
    assert how["memory"] in ("cgroup v2", "cgroup v1", "rlimit")
    assert how["processes"] in ("cgroup v2", "cgroup v1", "rlimit")
    assert how["cpu"] in ("cgroup v2", "cgroup v1", "not applied")
    assert re.search(r"app limits: memory 256 MiB \(.*, processes 300 \(", rig.keter.log())

    deploy(rig, "plain", webapp_config("plain.test", "p1"))
    deploy(rig, "flat", webapp_config("flat.test", "f1", limits=OWN))
    stanzas = {
        "stanzas": [
            {**webapp_config("stanza.test", "s1"), "type": "webapp", "limits": OWN},
            {
                "type": "background",
                "exec": "../bin/app",
                "args": ["--version", "worker"],
                "limits": {"memory": "64M", "cpu": 0.25},
            },
        ]
    }
    deploy(rig, "stanza", stanzas)
    for host, version in (("plain.test", "p1"), ("flat.test", "f1"), ("stanza.test", "s1")):
        served(rig.nginx, host, version)

    cpu = how["cpu"] != "not applied"  # without a cpu controller: no CPU limit at all
    defaults = {"memory": 256 * MIB, "processes": 300, "open-files": 1000, "cpu": 1.0}
    own = {"memory": 128 * MIB, "processes": 100, "open-files": 2048, "cpu": 0.5}
    worker = {**defaults, "memory": 64 * MIB, "cpu": 0.25}
    for expected in (defaults, own, worker):
        expected["cpu"] = expected["cpu"] if cpu else None
    assert applied(pid_of(rig, "plain"), how) == defaults
    assert applied(pid_of(rig, "flat"), how) == own
    assert applied(pid_of(rig, "stanza", without="worker"), how) == own
    assert applied(pid_of(rig, "stanza", "worker"), how) == worker
    # A limit a controller carries out is not also an rlimit (RLIMIT_NPROC would count
    # every version of the app's user together): those stay keter's own.
    plain = limits_of(pid_of(rig, "plain"))
    keter_own = limits_of(rig.keter.proc.pid)
    if how["memory"] != "rlimit":
        assert plain["Max data size"] == keter_own["Max data size"]
    if how["processes"] != "rlimit":
        assert plain["Max processes"] == keter_own["Max processes"]
    assert plain["Max core file size"] == ("0", "0")
    # The OOM killer picks an app before keter: an app spread over processes each a
    # little smaller than keter got keter killed, its apps then running unsupervised.
    # keter lowers its own score where it may (CAP_SYS_RESOURCE; not in every container).
    lowered = "its own OOM score stays as it is" not in rig.keter.log()
    assert oom_score_adj(rig.keter.proc.pid) == (-900 if lowered else 0)
    assert oom_score_adj(pid_of(rig, "plain")) == APP_OOM_SCORE_ADJ
    assert oom_score_adj(pid_of(rig, "stanza", "worker")) == APP_OOM_SCORE_ADJ


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def test_a_bundle_over_the_ceiling_is_refused_and_the_running_version_serves_on(rig: Rig):
    deploy(rig, "greedy", webapp_config("greedy.test", "g1", limits={"memory": "512M"}))
    served(rig.nginx, "greedy.test", "g1")
    before = rig.checkpoint()
    over = {"memory": "1G", "cpu": 1.5}  # 1.5 cores is within the ceiling of 2
    deploy(rig, "greedy", webapp_config("greedy.test", "g2", limits=over))
    line = wait_for(
        lambda: re.search(r"greedy: deploy #\d+ failed: .*", rig.log_since(before)),
        20,
        "the refusal",
    )[0]
    assert_one_error(
        rig.log_since(before),
        "greedy",
        "limits.memory: 1 GiB is above the ceiling of 512 MiB "
        "(app-limits.max.memory in keter-config.yaml)",
    )
    assert "cpu" not in line
    assert body(rig.nginx, "greedy.test") == b"g1\n"
    [last] = status_api(rig.keter).app("greedy")["history"][:1]
    assert (last["outcome"], last["kind"]) == ("failed", "config")


def needs_controller(rig: Rig, limit: str) -> None:
    if not mechanisms(rig.keter.log())[limit].startswith("cgroup"):
        pytest.skip(f"no {limit} controller keter can use on this machine")


def test_an_app_over_its_memory_limit_is_killed_by_the_oom_killer_and_keter_says_so(rig: Rig):
    """A serving version that allocates past its limit: the OOM killer kills it, keter logs
    the crash as such, shows it in the app's events and restarts it."""
    needs_controller(rig, "memory")
    deploy(rig, "hog", webapp_config("hog.test", "h1", limits={"memory": "64M"}))
    served(rig.nginx, "hog.test", "h1")
    pid = pid_of(rig, "hog")
    folder = cgroup_folders(pid)["memory"]
    assert memory_limit(folder) == 64 * MIB and oom_kills(folder) == 0
    offset = len(rig.keter.log())

    rig.nginx.request("hog.test", "/allocate?200")  # its answer is a 502: it is killed
    crash = wait_for(
        lambda: re.search(r"hog: crashed: (.*?); last output", rig.keter.log()[offset:]),
        20,
        "the crash",
    )
    assert crash[1] == "killed by the OOM killer (memory limit 64 MiB)"
    assert oom_kills(folder) >= 1  # the kernel's count: keter did not make it up
    served(rig.nginx, "hog.test", "h1")  # restarted
    api = status_api(rig.keter)
    app = wait_for(lambda: (a := api.app("hog"))["state"] == "running" and a, 10, "running")
    assert app["restarts"] == 1
    [event] = [e for e in app["events"] if e["kind"] == "crash"]
    assert event["text"].startswith("killed by the OOM killer (memory limit 64 MiB); restarting")
    assert re.search(
        r"hog: state RUNNING -> BACKOFF \(killed by the OOM killer \(memory limit 64 MiB\)",
        rig.keter.log()[offset:],
    )


def test_a_first_start_killed_by_the_oom_killer_fails_its_deploy_with_kind_oom(rig: Rig):
    needs_controller(rig, "memory")
    config = webapp_config(
        "bloat.test", "b1", args=["--allocate-at-start", "200"], limits={"memory": "64M"}
    )
    before = rig.checkpoint()
    deploy(rig, "bloat", config)
    wait_for(
        lambda: re.search(r"bloat: deploy #\d+ failed", rig.log_since(before)), 20, "the failure"
    )
    assert_one_error(
        rig.log_since(before),
        "bloat",
        "killed by the OOM killer (memory limit 64 MiB) before answering",
    )
    status = keter_cli(rig.keter.root, "status", "--json")
    assert status.returncode == 0, status.stderr
    [app] = [a for a in json.loads(status.stdout)["apps"] if a["name"] == "bloat"]
    last = app["last_deploy"]
    assert (app["state"], last["outcome"], last["kind"]) == ("failed", "failed", "oom")
    assert last["reason"].startswith("killed by the OOM killer (memory limit 64 MiB)")
    [event] = [e for e in json.loads(status.stdout)["events"] if e["app"] == "bloat"]
    assert "killed by the OOM killer" in event["text"]


def test_a_cpu_bound_app_is_held_near_its_cpu_limit(rig: Rig):
    """A process that never stops computing, under a quarter of a core: the CPU time it
    gets, over the time it takes to get one second of it, is about a quarter (the
    kernel's throttling counts agree)."""
    needs_controller(rig, "cpu")
    limit = 0.25
    deploy(rig, "spin", webapp_config("spin.test", "s1", args=["--spin"], limits={"cpu": "25%"}))
    served(rig.nginx, "spin.test", "s1")
    leader = psutil.Process(pid_of(rig, "spin"))
    [spinner] = wait_for(leader.children, 10, "the spinning child")
    folder = cgroup_folders(spinner.pid)["cpu"]
    assert cpu_cores(folder) == limit
    throttled = counter(folder / "cpu.stat", "nr_throttled")

    def cpu() -> float:
        times = spinner.cpu_times()
        return times.user + times.system

    start_cpu, start = cpu(), time.monotonic()
    wait_for(lambda: cpu() - start_cpu >= 1.0, 30, "a second of CPU time")
    share = (cpu() - start_cpu) / (time.monotonic() - start)
    assert 0.5 * limit < share < 1.5 * limit, share  # unlimited, it would take a whole core
    assert counter(folder / "cpu.stat", "nr_throttled") > throttled


def test_an_apps_limit_groups_go_with_it_and_keters_with_keter(
    keter_factory, private_nginx, tmp_path
):
    """Nothing keter makes in a cgroup hierarchy outlives what it was made for: a deploy's
    groups go when it stops, keter's own subtree when keter stops."""
    keter = keter_factory(wrapper=delegated_scope())
    how = mechanisms(keter.log())
    names = {"memory": "memory", "pids": "processes", "cpu": "cpu"}
    config = webapp_config("brief.test", "b1", limits={"memory": "100M"})
    keter.drop(make_bundle(tmp_path / "brief.keter", config=config))
    served(private_nginx, "brief.test", "b1")  # its processes are in their groups by now
    pid = wait_for(
        lambda: next((p.pid for p in app_processes(keter) if "/brief-" in p.cwd()), None),
        20,
        "the app",
    )
    folders = {
        name: folder
        for name, folder in cgroup_folders(pid).items()
        if name in names and how[names[name]].startswith("cgroup")
    }
    if not folders:
        pytest.skip("no cgroup controller keter can use on this machine")
    assert all(folder.name.endswith("-brief") for folder in folders.values()), folders
    offset = len(keter.log())
    (keter.incoming / "brief.keter").unlink()
    wait_for(lambda: "brief: removed" in keter.log()[offset:], 20, "the removal")
    wait_for(lambda: not any(f.exists() for f in folders.values()), 10, "its groups to go")
    subtrees = {folder.parent for folder in folders.values()}
    assert all(subtree.name.startswith("keter-") for subtree in subtrees), subtrees
    keter.stop()
    assert not any(subtree.exists() for subtree in subtrees)


def test_a_release_killed_by_the_oom_killer_is_reported_as_such(make_monitor, tmp_path):
    """A one-shot process (a release command runs as one) under a memory limit."""
    found = Controllers.find(tmp_path, None)
    if found.mechanism("memory") is not Mechanism.CGROUP_V1:
        pytest.skip("no v1 memory controller here (the daemon tests cover v2 through keter)")
    monitor = make_monitor(controllers=found)
    hog = (sys.executable, "-c", "held = bytearray(b'x') * (200 << 20)")
    spec = monitor.spec(command=hog, limits=Limits(memory=64 * MIB))
    monitor.monitor.tell(RunOnce(app="app", deploy_id=1, spec=spec, timeout=30))
    finished = monitor.expect(RunFinished, deploy_id=1, timeout=30)
    assert finished.reason == "killed by the OOM killer (memory limit 64 MiB)"
    assert not (found.v1["memory"] / "d1-app").exists()  # its group went with it


def test_a_removed_memory_group_leaves_no_page_cache_charged_to_it(make_monitor, tmp_path):
    """The kernel keeps a removed v1 memory group, dead, while page cache is charged to
    it; keter has it reclaimed first. Seen from the file the process read: its pages
    leave the page cache with the group (without that they stay, 4 MiB resident)."""
    found = Controllers.find(tmp_path, None)
    if found.mechanism("memory") is not Mechanism.CGROUP_V1:
        pytest.skip("no v1 memory controller here")
    read = tmp_path / "read-by-the-app"
    read.write_bytes(os.urandom(4 * MIB))
    os.sync()
    with read.open("rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident_bytes(read) == 0
    monitor = make_monitor(controllers=found)
    reader = ("/bin/sh", "-c", f"cat {read} > /dev/null")
    monitor.monitor.tell(
        RunOnce(app="app", deploy_id=1, spec=monitor.spec(command=reader), timeout=30)
    )
    finished = monitor.expect(RunFinished, deploy_id=1, timeout=30)
    assert finished.ok, finished
    assert not (found.v1["memory"] / "d1-app").exists()  # its group went with it
    assert resident_bytes(read) == 0


def resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (util-linux's fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return int(out.split()[0])


def test_what_a_killed_keter_left_in_its_groups_is_swept_at_the_next_start(
    keter_factory, private_nginx, tmp_path
):
    keter = keter_factory(wrapper=delegated_scope())
    how = mechanisms(keter.log())
    config = webapp_config("left.test", "l1", limits={"memory": "100M"})
    keter.drop(make_bundle(tmp_path / "left.keter", config=config))
    served(private_nginx, "left.test", "l1")
    [app] = [p for p in app_processes(keter) if "/left-" in p.cwd()]
    names = {"memory": "memory", "pids": "processes", "cpu": "cpu"}
    folders = [
        folder
        for name, folder in cgroup_folders(app.pid).items()
        if name in names and how[names[name]] == "cgroup v1"
    ]
    if not folders:
        pytest.skip("no v1 controller keter uses on this machine")
    keter.kill()  # SIGKILL: keter removes nothing
    (keter.incoming / "left.keter").unlink()
    assert app.is_running() and all(folder.is_dir() for folder in folders)
    keter.start()
    wait_for(lambda: not app.is_running(), 20, "the leftover app to be stopped")
    wait_for(lambda: not any(folder.exists() for folder in folders), 10, "its groups to go")


def test_a_process_that_cannot_start_leaves_no_group(make_monitor, tmp_path):
    found = Controllers.find(tmp_path, None)
    if not found.v1:
        pytest.skip("no v1 controller keter uses on this machine")
    monitor = make_monitor(controllers=found)
    monitor.start(1, monitor.spec(command=(str(tmp_path / "missing"),)))
    failed = monitor.expect(ProcessFailed, deploy_id=1)
    assert failed.kind is FailureKind.SPAWN
    assert not any((base / "d1-app").exists() for base in found.v1.values())
