"""The bind guard (keter.processes.bindguard): an app binds no port of port-range but its own.

Against the real kernel as root: a process in a guarded cgroup v2 binds its own
port and any port outside the range, and gets EPERM for every other port of the
range, on IPv4 and IPv6; a new guard replaces the old.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.net import bind_when_free, free_port

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
    ports = [free_port() for _ in range(count)]
    low, high = min(ports), max(ports)
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
