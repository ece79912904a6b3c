"""App limits (issue 11.5) in pieces: the YAML of app-limits and of a bundle's limits,
the ceiling, the choice of mechanism per controller and what keter writes to a
deploy's groups (on fake cgroup trees in tmp_path), the exec chain that joins
them, and the OOM reason. Through the real daemon: tests/test_limits.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.bundles import make_bundle

from keter.bundle import BundleConfigError, parse_bundle_config
from keter.config import ConfigError, parse_config
from keter.limits import (
    DEFAULTS,
    AppLimits,
    Limits,
    parse_app_limits,
    parse_limits,
    show_bytes,
)
from keter.processes import controllers
from keter.processes.controllers import Controllers, DeployLimits, Mechanism, oom_reason
from keter.processes.spawn import ResourceLimits, chain
from keter.yamlcheck import Checker

MIB = 1 << 20
ROOT = Path("/srv/keter")


def limits(value: object, *, nulls: bool = False) -> tuple[Limits, list[str]]:
    check = Checker()
    return parse_limits(value, "limits", check, nulls=nulls), check.problems


def app_limits(value: object) -> tuple[AppLimits, list[str]]:
    check = Checker()
    return parse_app_limits(value, "app-limits", check), check.problems


# -- the values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"memory": 268435456}, Limits(memory=256 * MIB)),
        ({"memory": "256M"}, Limits(memory=256 * MIB)),
        ({"memory": "2g"}, Limits(memory=2 << 30)),
        ({"memory": "1T"}, Limits(memory=1 << 40)),
        ({"memory": "4096k"}, Limits(memory=4 * MIB)),
        ({"processes": 100, "open-files": 4096}, Limits(processes=100, open_files=4096)),
        ({"cpu": 0.5}, Limits(cpu=0.5)),
        ({"cpu": 2}, Limits(cpu=2.0)),
        ({"cpu": "50%"}, Limits(cpu=0.5)),
        ({"cpu": "150%"}, Limits(cpu=1.5)),
        ({"cpu": "2.5%"}, Limits(cpu=0.025)),
        ({}, Limits()),
    ],
)
def test_limits_in_every_unit(value, expected) -> None:
    assert limits(value) == (expected, [])


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"memory": "512k"}, "limits.memory: expected a size from 1M"),  # below 1 MiB
        ({"memory": "2P"}, "limits.memory: expected a size"),
        ({"memory": "1.5G"}, "limits.memory: expected a size"),
        ({"memory": -1}, "limits.memory: expected a size"),
        ({"memory": None}, "limits.memory: expected a size"),  # a bundle gives a value
        ({"processes": 0}, "limits.processes: expected a count"),
        ({"processes": True}, "limits.processes: expected a count"),
        ({"processes": 1 << 23}, "limits.processes: expected a count"),
        ({"open-files": "many"}, "limits.open-files: expected a count"),
        ({"cpu": 0}, "limits.cpu: expected cores from 0.01"),
        ({"cpu": "0.5%"}, "limits.cpu: expected cores"),
        ({"cpu": float("nan")}, "limits.cpu: expected cores"),
        ({"cpu": "half"}, "limits.cpu: expected cores"),
        ({"memroy": "1G"}, "limits.memroy: unknown key"),
        ("1G", "limits: expected a mapping"),
    ],
)
def test_a_wrong_limit_is_a_problem_naming_its_key(value, problem) -> None:
    _, problems = limits(value)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


@settings(deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["memory", "processes", "open-files", "cpu", "x"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        max_size=5,
    )
)
def test_any_limits_value_is_read_or_refused_never_raises(value) -> None:
    parsed, problems = limits(value)
    if not problems:
        assert parsed.memory is None or MIB <= parsed.memory <= 1 << 50
        assert parsed.cpu is None or 0.01 <= parsed.cpu <= 4096


def test_app_limits_defaults_and_ceiling() -> None:
    assert app_limits({}) == (AppLimits(), [])
    assert AppLimits().defaults == DEFAULTS == Limits(processes=4096, open_files=65536)
    # Without max, a bundle may lower a limit, not raise it; an unlimited default has none.
    parsed, problems = app_limits({"memory": "512M", "cpu": 1})
    assert problems == []
    assert parsed.defaults == Limits(memory=512 * MIB, processes=4096, open_files=65536, cpu=1)
    assert parsed.ceiling == parsed.defaults
    parsed, _ = app_limits({"max": {"memory": "2G", "cpu": "400%"}, "memory": "256M"})
    assert parsed.defaults.memory == 256 * MIB and parsed.ceiling.memory == 2 << 30
    assert parsed.defaults.cpu == 4 and parsed.ceiling.cpu == 4  # only a max: the default too
    parsed, _ = app_limits({"memory": None, "max": {"processes": None}})
    assert parsed.defaults.memory is None and parsed.ceiling.memory is None
    assert parsed.defaults.processes == 4096 and parsed.ceiling.processes is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            {"memory": "2G", "max": {"memory": "1G"}},
            "app-limits.memory: 2 GiB is above app-limits.max.memory (1 GiB)",
        ),
        (
            {"memory": None, "max": {"memory": "1G"}},
            "app-limits.memory: null (no limit) is above app-limits.max.memory (1 GiB)",
        ),
        ({"max": {"cpu": "fast"}}, "app-limits.max.cpu: expected cores"),
        ({"max": 3}, "app-limits.max: expected a mapping"),
        ({"swap": 1}, "app-limits.swap: unknown key"),
        ([1], "app-limits: expected a mapping"),
    ],
)
def test_wrong_app_limits_are_problems(value, problem) -> None:
    _, problems = app_limits(value)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_keter_config_reads_app_limits() -> None:
    data = {"app-limits": {"memory": "1G", "cpu": 0.5, "max": {"memory": "4G", "cpu": 2}}}
    config = parse_config(data, root=ROOT, base=ROOT / "etc", ephemeral_range=(32768, 60999))
    assert config.app_limits.defaults.memory == 1 << 30
    assert config.app_limits.ceiling == Limits(
        memory=4 << 30, processes=4096, open_files=65536, cpu=2
    )
    with pytest.raises(ConfigError, match=r"app-limits\.open-files"):
        parse_config({"app-limits": {"open-files": 0}}, root=ROOT, base=ROOT / "etc")


def test_the_ceiling_refuses_each_limit_above_it_in_one_line_each() -> None:
    settings = AppLimits(
        defaults=Limits(memory=256 * MIB, processes=100),
        ceiling=Limits(memory=512 * MIB, processes=200, cpu=1),
    )
    within = Limits(memory=512 * MIB, processes=50, open_files=10**6, cpu=1)
    assert settings.over_ceiling([("", within)]) == []  # open files: no ceiling given
    over = Limits(memory=1 << 30, cpu=1.5)
    assert settings.over_ceiling([("", within), ("webapp 2: ", over)]) == [
        "webapp 2: limits.memory: 1 GiB is above the ceiling of 512 MiB "
        "(app-limits.max.memory in keter-config.yaml)",
        "webapp 2: limits.cpu: 1.5 cores is above the ceiling of 1 core "
        "(app-limits.max.cpu in keter-config.yaml)",
    ]
    # What the process monitor runs a stanza under: the defaults, with what it gives instead.
    own = Limits(cpu=0.5)
    assert settings.defaults.merged(own) == Limits(memory=256 * MIB, processes=100, cpu=0.5)


def test_sizes_are_shown_exactly() -> None:
    shown = [show_bytes(n) for n in (64 * MIB, 3 << 29, 1 << 40, 3 << 10, 1536, 1000)]
    assert shown == ["64 MiB", "1536 MiB", "1 TiB", "3 KiB", "1536 bytes", "1000 bytes"]


# -- in bundles ----------------------------------------------------------------------------


def bundle(tmp_path: Path, config: dict):
    folder = make_bundle(tmp_path / "b", config=config, unpacked=True)
    return parse_bundle_config(folder, "app")


def test_a_bundle_gives_each_process_stanza_its_own_limits(tmp_path) -> None:
    config = {
        "stanzas": [
            {"type": "webapp", "exec": "../bin/app", "host": "a.test", "limits": {"cpu": 0.5}},
            {"type": "webapp", "exec": "../bin/app", "host": "b.test"},
            {"type": "background", "exec": "../bin/app", "limits": {"memory": "64M"}},
        ]
    }
    parsed = bundle(tmp_path, config)
    assert [w.limits for w in parsed.webapps] == [Limits(cpu=0.5), Limits()]
    assert parsed.backgrounds[0].limits == Limits(memory=64 * MIB)
    assert parsed.process_limits == (
        ("webapp 1: ", Limits(cpu=0.5)),
        ("webapp 2: ", Limits()),
        ("background 1: ", Limits(memory=64 * MIB)),
    )


def test_the_flat_format_takes_limits_too(tmp_path) -> None:
    config = {"exec": "../bin/app", "host": "a.test", "limits": {"processes": 10}}
    parsed = bundle(tmp_path, config)
    assert parsed.webapp.limits == Limits(processes=10)
    assert parsed.process_limits == (("", Limits(processes=10)),)


def test_a_bundle_with_a_wrong_limit_is_refused_naming_it(tmp_path) -> None:
    config = {"stanzas": [{"type": "webapp", "exec": "../bin/app", "host": "a.test",
                           "limits": {"memory": "lots"}}]}  # fmt: skip
    with pytest.raises(BundleConfigError, match=r"stanzas\[0\]\.limits\.memory: expected a size"):
        bundle(tmp_path, config)


# -- the mechanism, chosen per controller ----------------------------------------------------


V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {base}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / {base}/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /inner {base}/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / {base}/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = """\
8:pids:/inner/keter.service
4:memory:/process_api/abc
1:cpu,cpuacct:/
0::/
"""
V1_FILES = {
    "memory": "memory.limit_in_bytes",
    "pids": "pids.max",
    "cpu,cpuacct": "cpu.cfs_quota_us",
}


def fake_v1(tmp_path: Path, own: dict[str, str]) -> tuple[str, str]:
    """A v1 layout under tmp_path: the mountinfo and /proc/self/cgroup files for it."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V1_MOUNTINFO.format(base=tmp_path))
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text(V1_CGROUP)
    root_id = controllers.keter_id(ROOT)
    for hierarchy, path in own.items():
        group = tmp_path / hierarchy / path.lstrip("/")
        (group / f"keter-{root_id}").mkdir(parents=True)
        (group / f"keter-{root_id}" / V1_FILES[hierarchy]).write_text("max\n")
    return str(mountinfo), str(proc_cgroup)


def test_v1_controllers_are_found_under_keters_own_groups(tmp_path) -> None:
    mountinfo, proc_cgroup = fake_v1(
        tmp_path, {"memory": "/process_api/abc", "pids": "/keter.service", "cpu,cpuacct": "/"}
    )
    found = Controllers.find(ROOT, None, mountinfo=mountinfo, proc_cgroup=proc_cgroup)
    ident = f"keter-{controllers.keter_id(ROOT)}"
    assert found.v2 == frozenset()
    assert found.v1 == {
        "memory": tmp_path / "memory/process_api/abc" / ident,
        # the pids hierarchy is mounted from /inner: keter's /inner/keter.service is there
        "pids": tmp_path / "pids/keter.service" / ident,
        "cpu": tmp_path / "cpu,cpuacct" / ident,
    }
    assert {limit: found.mechanism(limit) for limit in ("memory", "processes", "cpu")} == {
        "memory": Mechanism.CGROUP_V1,
        "processes": Mechanism.CGROUP_V1,
        "cpu": Mechanism.CGROUP_V1,
    }
    assert found.mechanism("open_files") is Mechanism.RLIMIT
    assert not found.fallbacks()
    # The limits the cgroups carry out are no rlimits; open files and core dumps are.
    rlimits = found.rlimits(Limits(memory=MIB, processes=5, open_files=7, cpu=1))
    assert (rlimits.nofile, rlimits.nproc, rlimits.data, rlimits.core) == (7, None, None, 0)


def test_without_controllers_memory_and_processes_fall_back_to_rlimits(tmp_path) -> None:
    found = Controllers.find(
        ROOT, None, mountinfo=str(tmp_path / "none"), proc_cgroup=str(tmp_path / "none")
    )
    assert found == Controllers()
    assert found.fallbacks()
    assert found.mechanism("memory") is Mechanism.RLIMIT
    assert found.mechanism("processes") is Mechanism.RLIMIT
    assert found.mechanism("cpu") is Mechanism.NONE
    rlimits = found.rlimits(Limits(memory=MIB, processes=5, open_files=7, cpu=1))
    assert (rlimits.nofile, rlimits.nproc, rlimits.data) == (7, 5, MIB)
    assert found.describe(Limits(memory=MIB, open_files=7)) == (
        "memory 1 MiB (rlimit), processes unlimited (rlimit), open files 7 (rlimit), "
        "cpu unlimited (not applied)"
    )


def test_a_v1_hierarchy_without_keters_group_in_view_is_not_used(tmp_path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"35 31 0:32 /elsewhere {tmp_path}/memory rw - cgroup cgroup rw,memory\n")
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("4:memory:/process_api/abc\n")
    found = Controllers.find(ROOT, None, mountinfo=str(mountinfo), proc_cgroup=str(proc_cgroup))
    assert found.v1 == {}


class FakeCgroups:
    def __init__(self, base: Path) -> None:
        self.base = base


def fake_v2(tmp_path: Path, available: str) -> Path:
    own = tmp_path / "unified" / "system.slice" / "keter.service"
    base = own / f"keter-{controllers.keter_id(ROOT)}"
    base.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(available + "\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (base / "cgroup.subtree_control").write_text("\n")
    return base


def test_v2_controllers_are_handed_down_to_the_deploy_cgroups_first(tmp_path) -> None:
    base = fake_v2(tmp_path, "cpuset cpu io memory pids")
    mountinfo, proc_cgroup = fake_v1(tmp_path, {"memory": "/process_api/abc"})
    found = Controllers.find(ROOT, FakeCgroups(base), mountinfo=mountinfo, proc_cgroup=proc_cgroup)
    assert found.v2 == {"memory", "pids", "cpu"}
    assert found.v1 == {}  # v2 wins for every controller it has
    assert found.mechanism("memory") is Mechanism.CGROUP_V2
    # Each was written as its own "+name" (the fake file keeps the last write).
    assert (base / "cgroup.subtree_control").read_text() == "+cpu"


def test_v2_and_v1_mix_per_controller(tmp_path) -> None:
    base = fake_v2(tmp_path, "pids hugetlb")
    mountinfo, proc_cgroup = fake_v1(tmp_path, {"memory": "/process_api/abc", "cpu,cpuacct": "/"})
    found = Controllers.find(ROOT, FakeCgroups(base), mountinfo=mountinfo, proc_cgroup=proc_cgroup)
    assert found.v2 == {"pids"}
    assert set(found.v1) == {"memory", "cpu"}
    assert found.describe(Limits(memory=MIB, processes=9, cpu=0.5)).split(", ") == [
        "memory 1 MiB (cgroup v1)",
        "processes 9 (cgroup v2)",
        "open files unlimited (rlimit)",
        "cpu 0.5 cores (cgroup v1)",
    ]


def test_keter_leaves_a_cgroup_with_processes_of_its_own_to_hand_controllers_down(
    tmp_path, monkeypatch
) -> None:
    """cgroup v2 refuses (EBUSY) to enable controllers for the children of a cgroup with
    processes, as keter's own is under systemd: keter moves itself to a leaf first."""
    base = fake_v2(tmp_path, "memory")
    own = base.parent
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    writes: list[tuple[Path, str]] = []
    moved = []

    def write(path: Path, text: str) -> None:
        writes.append((path, text))
        if path == own / "cgroup.subtree_control" and not moved:
            raise OSError(errno.EBUSY, "Device or resource busy")
        if path.name == "cgroup.procs":
            moved.append(path.parent)

    monkeypatch.setattr(controllers, "write", write)
    assert controllers.enable_v2(base) == {"memory"}
    leaf = own / f"{base.name}-daemon"
    assert moved == [leaf] and leaf.is_dir()
    assert writes[-2:] == [
        (own / "cgroup.subtree_control", "+memory"),
        (base / "cgroup.subtree_control", "+memory"),
    ]


def test_keter_does_not_move_when_it_is_not_alone_in_its_cgroup(tmp_path, monkeypatch) -> None:
    base = fake_v2(tmp_path, "memory pids")
    (base.parent / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")

    def write(path: Path, text: str) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(controllers, "write", write)
    assert controllers.enable_v2(base) == frozenset()
    assert not (base.parent / f"{base.name}-daemon").exists()


# -- one deploy's groups ---------------------------------------------------------------------


def test_limits_are_written_to_v1_groups(tmp_path) -> None:
    bases = {name: tmp_path / name / "keter-x" for name in ("memory", "pids", "cpu")}
    for base in bases.values():
        base.mkdir(parents=True)
    found = Controllers(v1=bases)
    groups = found.for_deploy("app", 7, None)
    assert groups.v1 == {name: base / "d7-app" for name, base in bases.items()}
    (groups.v1["memory"] / "memory.memsw.limit_in_bytes").write_text("")
    groups.apply(Limits(memory=64 * MIB, processes=100, cpu=0.25))
    read = {
        name: (group / name).read_text()
        for group in groups.v1.values()
        for name in os.listdir(group)
    }
    assert read == {
        "memory.limit_in_bytes": str(64 * MIB),
        "memory.memsw.limit_in_bytes": str(64 * MIB),
        "pids.max": "100",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "25000",
    }
    groups.apply(Limits())  # a reused group: everything lifted
    assert (groups.v1["memory"] / "memory.limit_in_bytes").read_text() == "-1"
    assert (groups.v1["pids"] / "pids.max").read_text() == "max"
    assert (groups.v1["cpu"] / "cpu.cfs_quota_us").read_text() == "-1"
    assert groups.procs() == tuple(group / "cgroup.procs" for group in groups.v1.values())


def test_limits_are_written_to_the_v2_cgroup(tmp_path) -> None:
    cgroup = tmp_path / "d3-app"
    cgroup.mkdir()
    groups = DeployLimits(v2=cgroup, v2_controllers=frozenset({"memory", "cpu"}), v1={})
    (cgroup / "memory.swap.max").write_text("")
    groups.apply(Limits(memory=128 * MIB, processes=10, cpu=1.5))
    assert (cgroup / "memory.max").read_text() == str(128 * MIB)
    assert (cgroup / "memory.swap.max").read_text() == "0"
    assert (cgroup / "cpu.max").read_text() == "150000 100000"
    assert not (cgroup / "pids.max").exists()  # not a controller keter uses here
    assert groups.procs() == ()  # its v2 cgroup is joined as the deploy's cgroup


def test_the_oom_kill_count_is_read_from_v2_else_v1(tmp_path) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir(), v1.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert DeployLimits(v2=v2, v2_controllers=frozenset({"memory"}), v1={}).oom_kills() == 2
    assert DeployLimits(v2=None, v2_controllers=frozenset(), v1={"memory": v1}).oom_kills() == 5
    assert DeployLimits(v2=v2, v2_controllers=frozenset({"pids"}), v1={}).oom_kills() is None


def test_the_oom_reason() -> None:
    assert oom_reason(64 * MIB, -9) == "killed by the OOM killer (memory limit 64 MiB)"
    assert oom_reason(None, -9) == (
        "killed by the OOM killer (no memory limit: the machine ran out)"
    )
    assert oom_reason(64 * MIB, 137) == (
        "exited with status 137 after the OOM killer killed a process of it (memory limit 64 MiB)"
    )


# -- the exec chain joins every group before the app's first instruction ----------------------


NO_LIMITS = ResourceLimits(nofile=None, nproc=None, core=None)


def test_the_chain_joins_every_group_then_execs_the_command(tmp_path) -> None:
    procs = [tmp_path / "a.procs", tmp_path / "b.procs"]
    command = chain(procs, NO_LIMITS, ["/bin/sh", "-c", 'echo "ran $0"', "--"])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (0, "ran --\n")
    assert [p.read_text() for p in procs] == ["0\n", "0\n"]


def test_the_chain_sets_every_limit_soft_and_hard_then_execs_the_command() -> None:
    limits = ResourceLimits(nofile=77, nproc=55, core=0, data=(300 << 20) + 1000)
    command = chain([], limits, ["/bin/cat", "/proc/self/limits"])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    shown = {line[:26].strip(): line[26:].split()[:2] for line in result.stdout.splitlines()[1:]}
    assert shown["Max open files"] == ["77", "77"]
    assert shown["Max processes"] == ["55", "55"]
    assert shown["Max core file size"] == ["0", "0"]
    assert shown["Max data size"] == [str(300 << 20)] * 2  # whole KiB


def test_only_no_core_dumps_or_keters_own_limit_is_taken() -> None:
    with pytest.raises(ValueError, match="core must be 0"):
        ResourceLimits(core=4096)


def test_the_chain_stops_before_the_command_when_a_limit_is_refused(tmp_path) -> None:
    marker = tmp_path / "ran"
    # Above keter's own hard limit (root may raise it: ask what no kernel gives).
    limits = ResourceLimits(nofile=None, nproc=None, core=None)
    command = chain([], limits, ["/bin/touch", str(marker)])
    # The ulimit options follow the second "--" (after the mounts, then the groups).
    at = command.index("--", command.index("--") + 1) + 1
    command[at:at] = ["-n", "99999999999"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 126
    assert not marker.exists()


def test_the_chain_stops_before_the_command_when_a_mount_fails(tmp_path) -> None:
    """A private /tmp that cannot be mounted (keter.processes.private) starts nothing: the
    app would otherwise run with the machine's. (No namespace here: the source is
    missing, so nothing is mounted.)"""
    marker = tmp_path / "ran"
    target = tmp_path / "target"
    target.mkdir()
    mounts = ["none", "bind", str(tmp_path / "missing"), str(target)]
    command = chain([], NO_LIMITS, ["/bin/touch", str(marker)], mounts)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 126
    assert not marker.exists()


def test_the_chain_stops_before_the_command_when_a_group_refuses(tmp_path) -> None:
    refused = tmp_path / "no-such-group" / "cgroup.procs"
    marker = tmp_path / "ran"
    command = chain([refused], NO_LIMITS, ["/bin/touch", str(marker)])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 126
    assert not marker.exists()
