"""keter.switch's isolation of apps on the network: an app connects to its own ports
and to no other app's (the script and the set's elements, pure; then the kernel).

The kernel tests judge only a uid range of their own (far from keter's default,
which other keters on this machine use) and the listeners' own ports, so the
chain they make stops nothing else running here. A connection is made as an
app's uid by /usr/bin/python3 (readable by every user).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.net import NamingListener
from support.wait import wait_for

from keter import netlink
from keter.messages import (
    GrantPorts,
    PointServices,
    RevokePorts,
    ServicesPointed,
    SwitchMode,
)
from keter.switch import Switch, Table, nft
from keter.switch.nfnetlink import NFPROTO_INET, encode, own_key
from keter.users import AppUsers

NFT = nft.find_nft()
SYSTEM_PYTHON = "/usr/bin/python3"
needs_kernel = pytest.mark.skipif(
    NFT is None or os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root, nft (tests/run installs nftables) and /usr/bin/python3",
)

# -- the script and the elements (pure) ---------------------------------------------------------


def test_the_isolation_chain_judges_new_connections_of_app_uids_to_app_ports() -> None:
    table = Table(name="keter_x", address="127.1.2.3")
    isolation = nft.Isolation(uids=(1_900_000_000, 1_900_999_999), ports=(10_000, 10_199))
    script = table.create_script(isolation=isolation)
    # One transaction replaces both tables: the switch's (ip) and the isolation one (inet).
    assert script.startswith("table inet keter_x\ndelete table inet keter_x\n")
    assert "table ip keter_x {" in script and "table inet keter_x {" in script
    isolate = script[script.index("chain isolate") :]
    # On the output hook after the NAT (-100): it sees the port a stable address led to.
    assert "type filter hook output priority 0; policy accept;" in isolate
    rule = next(line.strip() for line in isolate.splitlines() if "reject" in line)
    assert rule == (
        'oif "lo" tcp flags & (syn | ack) == syn meta skuid 1900000000-1900999999 '
        "tcp dport 10000-10199 meta skuid . tcp dport != @own reject with tcp reset"
    )
    assert "type uid . inet_service" in script and "size 200" in script  # one pair per port
    # Without isolation (setuid, run-apps-as-root) an earlier run's inet table still goes.
    plain = table.create_script()
    assert "table inet keter_x {" not in plain and "delete table inet keter_x" in plain
    assert table.delete_script().count("delete table") == 2


def test_the_set_follows_ports_given_moved_and_taken_back() -> None:
    changes = Table.own_changes
    assert changes({}, {10_000: 7, 10_001: 7}) == ([], [(7, 10_000), (7, 10_001)])
    # A port taken from one app and given to another: its pair is replaced in one change.
    assert changes({10_000: 7}, {10_000: 8}) == ([(7, 10_000)], [(8, 10_000)])
    assert changes({10_000: 7, 10_001: 7}, {10_001: 0, 10_005: 0}) == ([(7, 10_001)], [])
    assert changes({10_000: 7}, {10_000: 7}) == ([], [])  # nothing to change


def test_an_element_is_a_uid_in_host_order_and_a_padded_port() -> None:
    # What nft --debug=netlink shows nft itself sending for "1900000001 . 10005".
    assert own_key(1_900_000_001, 10_005) == struct.pack("=I", 1_900_000_001) + b"\x27\x15\0\0"
    batch, last = encode("keter_x", "own", [], [(own_key(1, 2), None)], 100, family=NFPROTO_INET)
    messages = list(netlink.split(batch))
    assert last == 101 and len(messages) == 3  # begin, the new elements, end
    kind, sequence, payload = messages[1]
    assert (kind & 0xFF, sequence, payload[0]) == (12, 101, NFPROTO_INET)  # NEWSETELEM, inet
    assert own_key(1, 2) in payload


# -- the kernel ------------------------------------------------------------------------------------

CONNECT = r"""
import errno, socket, sys
address, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
with socket.socket(family) as s:
    s.settimeout(5)
    try:
        s.connect((address, port))
        print("ok:" + s.recv(100).decode())
    except OSError as exc:
        print(errno.errorcode.get(exc.errno, str(exc.errno)))
"""


def connect_as(uid: int, address: str, port: int) -> str:
    """As ``uid`` (and gid), connect to address:port: "ok:WHAT-IT-SAID", or an errno name."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", CONNECT, address, str(port)],
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[tuple[AppUsers, NamingListener, NamingListener]]:
    """Two apps' uids (a range of this test's own) and a listener for each."""
    low = 1_960_000_000 + random.randrange(0, 100_000) * 100
    users = AppUsers(tmp_path / "etc", (low, low + 99))
    (tmp_path / "etc").mkdir()
    made = NamingListener("alpha", dualstack=True), NamingListener("beta", dualstack=True)
    yield users, *made
    for listener in made:
        listener.close()


class Running:
    """A Switch actor with isolation, in its thread, and what it reported."""

    def __init__(self, root: Path, users: AppUsers, ports: tuple[int, int], **options) -> None:
        self.reports: queue.Queue = queue.Queue()
        self.switch = Switch(
            root=root,
            port_range=ports,
            pool_seconds=0.5,
            report_to=self.reports,
            users=users,
            **options,
        )
        self.switch.start()
        self.ready = self.reports.get(timeout=10)

    def owned(self) -> dict[int, int]:
        return self.switch.table.read_own(NFT)

    def stop(self) -> None:
        self.switch.stop()
        self.switch.join(10)
        assert not self.switch.table.exists(NFT, "inet")  # a clean stop deletes it


def port_range(*listeners: NamingListener) -> tuple[int, int]:
    ports = [listener.port for listener in listeners]
    return min(ports), max(ports)


@needs_kernel
def test_an_app_reaches_its_own_ports_and_no_other_apps(tmp_path: Path, apps) -> None:
    users, alpha, beta = apps
    run = Running(tmp_path / "root", users, port_range(alpha, beta))
    try:
        assert run.ready.mode is SwitchMode.KERNEL and run.switch.isolating
        a, b = users.uid("alpha"), users.uid("beta")
        run.switch.tell(GrantPorts(app="alpha", ports=(alpha.port,)))
        run.switch.tell(GrantPorts(app="beta", ports=(beta.port,)))
        wait_for(lambda: run.owned() == {alpha.port: a, beta.port: b}, 5, "the pairs")
        for address in ("127.0.0.1", "::1"):
            # Each reaches its own port; the other's is reset (ECONNREFUSED), both ways.
            assert connect_as(a, address, alpha.port) == "ok:alpha"
            assert connect_as(a, address, beta.port) == "ECONNREFUSED"
            assert connect_as(b, address, beta.port) == "ok:beta"
            assert connect_as(b, address, alpha.port) == "ECONNREFUSED"
            # Root (keter's probes) and users outside keter's app range are not judged.
            assert connect_as(0, address, beta.port) == "ok:beta"
            assert connect_as(65534, address, beta.port) == "ok:beta"
        # Through a stable address too: the chain sees the port the NAT led to.
        run.switch.tell(PointServices(app="beta", deploy_id=1, targets=((7500, beta.port),)))
        assert isinstance(run.reports.get(timeout=5), ServicesPointed)
        assert connect_as(b, run.switch.table.address, 7500) == "ok:beta"
        assert connect_as(a, run.switch.table.address, 7500) == "ECONNREFUSED"
        assert connect_as(65534, run.switch.table.address, 7500) == "ok:beta"
        # A port taken back is nobody's: beta's own process is gone from it.
        run.switch.tell(RevokePorts(app="beta", ports=(beta.port,)))
        wait_for(lambda: run.owned() == {alpha.port: a}, 5, "beta's pair to go")
        assert connect_as(b, "127.0.0.1", beta.port) == "ECONNREFUSED"
        # ... and given to another app (revoked and granted in one batch, in order).
        run.switch.tell(RevokePorts(app="alpha", ports=(alpha.port,)))
        run.switch.tell(GrantPorts(app="beta", ports=(alpha.port,)))
        wait_for(lambda: run.owned() == {alpha.port: b}, 5, "the port to change hands")
        assert connect_as(b, "127.0.0.1", alpha.port) == "ok:alpha"
        assert connect_as(a, "127.0.0.1", alpha.port) == "ECONNREFUSED"
    finally:
        run.stop()


@needs_kernel
def test_the_pairs_come_back_with_a_table_deleted_behind_keters_back(
    tmp_path: Path, apps, caplog: pytest.LogCaptureFixture
) -> None:
    users, alpha, beta = apps
    run = Running(tmp_path / "root", users, port_range(alpha, beta))
    try:
        a = users.uid("alpha")
        run.switch.tell(GrantPorts(app="alpha", ports=(alpha.port,)))
        wait_for(lambda: run.owned() == {alpha.port: a}, 5, "alpha's pair")
        # Only the inet table deleted (nft delete table inet ...): both are made again.
        nft.apply(f"delete table inet {run.switch.table.name}\n", NFT)
        wait_for(
            lambda: run.switch.table.exists(NFT, "inet") and run.owned() == {alpha.port: a},
            5,
            "the set made again",
        )
        assert "was deleted by someone else" in caplog.text
        assert connect_as(a, "127.0.0.1", alpha.port) == "ok:alpha"
        assert connect_as(users.uid("beta"), "127.0.0.1", alpha.port) == "ECONNREFUSED"
        # A pair deleted by hand: keter's next change is refused, reads the kernel's set,
        # and lands.
        nft.apply(
            f"delete element inet {run.switch.table.name} own {{ {a} . {alpha.port} }}\n", NFT
        )
        run.switch.tell(RevokePorts(app="alpha", ports=(alpha.port,)))
        run.switch.tell(GrantPorts(app="beta", ports=(beta.port,)))
        wait_for(lambda: run.owned() == {beta.port: users.uid("beta")}, 5, "the change")
        assert "was changed by someone else" in caplog.text
    finally:
        run.stop()


@needs_kernel
def test_no_isolation_without_app_uids_or_in_the_reload_mode(
    tmp_path: Path, apps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "keter.switch")
    users, alpha, beta = apps
    ports = port_range(alpha, beta)
    # setuid or run-apps-as-root: one user for all apps, nothing to tell apart.
    shared = Switch(root=tmp_path / "shared", port_range=ports, pool_seconds=0.5, report_to=None)
    reload = Running(tmp_path / "reload", users, ports, kernel=False)
    try:
        shared.on_start()
        assert shared.mode is SwitchMode.KERNEL and not shared.isolating
        assert not shared.table.exists(NFT, "inet")
        assert "apps share one user" in caplog.text
        assert reload.ready.mode is SwitchMode.RELOAD and not reload.switch.isolating
        assert not reload.switch.table.exists(NFT, "inet")
        assert "apps can connect to each other's ports (no nftables isolation)" in caplog.text
        reload.switch.tell(GrantPorts(app="alpha", ports=(alpha.port,)))  # and are ignored
        assert connect_as(users.uid("beta"), "127.0.0.1", alpha.port) == "ok:alpha"
    finally:
        shared.on_stop()
        reload.stop()
    assert not shared.table.exists(NFT)


@needs_kernel
def test_a_kernel_that_refuses_the_isolation_keeps_the_kernel_switch_and_says_so(
    tmp_path: Path, apps, caplog: pytest.LogCaptureFixture
) -> None:
    users, alpha, beta = apps
    refusing = tmp_path / "nft"
    refusing.write_text(
        "#!/bin/sh\nscript=$(cat)\n"
        'case "$script" in *"chain isolate"*) echo "Error: no reject" >&2; exit 1;; esac\n'
        f'printf "%s\\n" "$script" | exec {NFT} "$@"\n'
    )
    refusing.chmod(0o755)
    run = Running(tmp_path / "root", users, port_range(alpha, beta), nft_program=str(refusing))
    try:
        assert run.ready.mode is SwitchMode.KERNEL and not run.switch.isolating
        assert "apps can connect to each other's ports: nft cannot create" in caplog.text
        assert "no reject" in caplog.text
        assert not run.switch.table.exists(NFT, "inet")
    finally:
        run.switch.stop()
        run.switch.join(10)
