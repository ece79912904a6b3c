"""keter.switch on the real kernel: nftables tables, DNAT on loopback, sock_diag.

Every table here is made for a ROOT under tmp_path, so its name is unique to
this test; each test deletes what it made and never touches another table.
Needs root and Debian's nftables (tests/run installs it).
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.net import NamingListener
from support.spool import spool_line
from support.wait import wait_for

from keter import sockdiag
from keter.config import KeterConfig
from keter.messages import (
    Drained,
    PointFailed,
    PointServices,
    ReleaseServices,
    ServicesPointed,
    SwitchMode,
    SwitchReady,
    VersionServing,
    WatchDrain,
)
from keter.processes import cgroups
from keter.stats.component import StatsCollector
from keter.switch import StablePorts, Switch, Table, nft
from keter.switch import actor as switch_actor
from keter.switch.nfnetlink import NetlinkError

NFT = nft.find_nft()
pytestmark = pytest.mark.skipif(NFT is None, reason="needs nft (tests/run installs nftables)")


def ask(address: str, port: int) -> bytes:
    """What answers on a fresh connection to address:port."""
    with socket.create_connection((address, port), timeout=2) as conn:
        return conn.recv(100)


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Table]:
    made = Table.for_root(tmp_path / "root")
    yield made
    nft.apply(made.delete_script(), NFT)


@pytest.fixture
def listeners() -> Iterator[list[NamingListener]]:
    made: list[NamingListener] = []
    yield made
    for listener in made:
        listener.close()


def point(table: Table, current: dict[int, int], wanted: dict[int, int]) -> None:
    """Change the table's map as the switch component does (netlink, one transaction)."""
    writer = table.writer()
    try:
        writer.change(*table.changes(current, wanted))
    finally:
        writer.close()


def listen(listeners: list[NamingListener], name: bytes) -> NamingListener:
    listener = NamingListener(name)
    listeners.append(listener)
    return listener


# -- names and scripts (pure) ----------------------------------------------------------------


def test_each_root_gets_its_own_table_and_loopback_address(tmp_path: Path) -> None:
    tables = [Table.for_root(tmp_path / f"root{i}") for i in range(50)]
    assert len({t.name for t in tables}) == 50 and len({t.address for t in tables}) == 50
    for t in tables:
        octets = [int(part) for part in t.address.split(".")]
        assert octets[0] == 127 and octets[1] != 0 and 0 < octets[3] < 255
        assert t.name.startswith("keter_") and len(t.name) == 18
    assert Table.for_root(tmp_path / "root0") == tables[0]  # the same ROOT, the same names


def test_a_changed_element_is_deleted_and_added_in_one_change() -> None:
    t = Table(name="keter_x", address="127.1.2.3")
    gone, added = t.changes({5000: 4001, 5001: 4002}, {5000: 4003, 5001: 0, 5002: 4004})
    assert (gone, added) == ([5000, 5001], [(5000, 4003), (5002, 4004)])
    assert t.changes({5000: 4001}, {5000: 4001, 5009: 0}) == ([], [])  # nothing to change


def test_stable_ports_go_round() -> None:
    pool = StablePorts()
    first, second = pool.allocate(), pool.allocate()
    assert first != second
    pool.release(first)
    assert pool.allocate() not in (first, second)  # a released port is the last to return


# -- the kernel --------------------------------------------------------------------------------


def test_a_stable_port_leads_where_the_map_says_and_nowhere_else(
    table: Table, listeners: list[NamingListener]
) -> None:
    one, two = listen(listeners, b"one"), listen(listeners, b"two")
    nft.apply(table.create_script(), NFT)
    point(table, {}, {7000: one.port})
    assert ask(table.address, 7000) == b"one"
    # An established connection keeps its mapping when the map changes.
    held = socket.create_connection((table.address, 7000), timeout=2)
    assert held.recv(100) == b"one"
    point(table, {7000: one.port}, {7000: two.port})
    assert ask(table.address, 7000) == b"two"
    assert table.read(NFT) == {7000: two.port}
    held.sendall(b"still there?")  # no reset: the old mapping holds
    assert sockdiag.connections(one.port, one.port)[one.port] == 1
    held.close()
    # A port without an element is refused, even if something listens on it everywhere.
    with socket.create_server(("0.0.0.0", 0)) as everywhere:
        port = everywhere.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            ask(table.address, port)


def test_a_refused_change_changes_nothing(table: Table) -> None:
    """The deletes and adds of one change are one transaction: when the kernel refuses
    any part of it, the map stays as it was, and the writer still works after."""
    nft.apply(table.create_script(), NFT)
    writer = table.writer()
    try:
        writer.change([], [(7000, 4001), (7001, 4002)])
        with pytest.raises(NetlinkError) as refused:
            writer.change([7001, 7005], [(7002, 4003)])  # 7005 has no element
        assert refused.value.errno == errno.ENOENT
        with pytest.raises(NetlinkError) as clash:
            writer.change([], [(7002, 4003), (7000, 4009)])  # 7000 leads elsewhere already
        assert clash.value.errno == errno.EEXIST
        assert table.read(NFT) == {7000: 4001, 7001: 4002}
        writer.change([7000], [(7000, 4005)])
        assert table.read(NFT) == {7000: 4005, 7001: 4002}
    finally:
        writer.close()
    missing = Table(name="keter_nosuchtable", address="127.1.2.3").writer()
    with pytest.raises(NetlinkError) as absent:
        missing.change([], [(7000, 4001)])
    assert absent.value.errno == errno.ENOENT
    missing.close()


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(
        st.dictionaries(
            st.sampled_from([1, 80, 255, 256, 7000, 40000, 65535]),
            st.sampled_from([0, 1, 443, 8080, 65535]),
            max_size=5,
        ),
        max_size=6,
    )
)
def test_the_kernels_map_follows_any_series_of_changes(tmp_path_factory, steps) -> None:
    """Keys and values at the edges of a port's two bytes, elements added, changed
    and removed in any order: the kernel holds exactly what the switch believes."""
    table = Table.for_root(tmp_path_factory.mktemp("root"))
    nft.apply(table.create_script(), NFT)
    writer, mapping = table.writer(), {}
    try:
        for wanted in steps:
            writer.change(*table.changes(mapping, wanted))
            mapping = {k: v for k, v in {**mapping, **wanted}.items() if v}
        assert table.read(NFT) == mapping
    finally:
        writer.close()
        nft.apply(table.delete_script(), NFT)


CONNTRACK = Path("/proc/net/nf_conntrack")


def closed_entry(server: socket.socket, address: str, port: int) -> tuple[str, int]:
    """Connect to address:port (leading to ``server``); the server closes first, then
    the client: that connection's conntrack entry as (state, seconds left)."""
    client = socket.create_connection((address, port), timeout=2)
    source = client.getsockname()[1]
    accepted, _ = server.accept()
    accepted.close()
    assert client.recv(10) == b""
    client.close()  # both sides have closed: TIME_WAIT
    for fields in map(str.split, CONNTRACK.read_text().splitlines()):
        if {f"dst={address}", f"sport={source}", f"dport={port}"} <= set(fields):
            return fields[5], int(fields[4])
    raise AssertionError(f"no conntrack entry for port {source} -> {address}:{port}")


@pytest.mark.skipif(not CONNTRACK.exists(), reason="no /proc/net/nf_conntrack")
def test_closed_connections_through_the_table_leave_conntrack_within_seconds(
    table: Table,
) -> None:
    """nginx reconnects many times a second under load: with the kernel's two minutes
    per closed connection, one busy app could fill the machine's conntrack table. So
    could an app opening plain loopback connections: the table's NAT has the kernel
    track every connection on the machine, and those kept the kernel's two minutes."""
    nft.apply(table.create_script(), NFT)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        point(table, {}, {7000: port})
        for address, to in ((table.address, 7000), ("127.0.0.1", port)):
            state, left = closed_entry(server, address, to)
            assert state == "TIME_WAIT" and 0 < left <= nft.SHORT_CLOSE


@pytest.mark.skipif(not CONNTRACK.exists(), reason="no /proc/net/nf_conntrack")
def test_nothing_but_tcp_over_loopback_is_tracked(table: Table) -> None:
    """The table's NAT has the kernel track every connection on the machine: one app
    sending UDP between loopback addresses (no descriptor per entry, two minutes each
    once answered) filled conntrack's 262,144 entries in 4 s, and every new connection
    of every program was dropped."""
    nft.apply(table.create_script(), NFT)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        sender.sendto(b"x", receiver.getsockname())
        _, source = receiver.recvfrom(10)
        receiver.sendto(b"y", source)  # answered: an entry conntrack would keep
        assert sender.recv(10) == b"y"
        ports = {f"sport={sender.getsockname()[1]}", f"dport={receiver.getsockname()[1]}"}
        lines = CONNTRACK.read_text().splitlines()
    assert [line for line in lines if ports <= set(line.split())] == []


def test_creating_the_table_replaces_an_earlier_runs_rules_only_its_own(
    tmp_path: Path, table: Table, listeners: list[NamingListener]
) -> None:
    other = Table.for_root(tmp_path / "another-root")
    try:
        nft.apply(other.create_script(), NFT)
        point(other, {}, {7000: 1234})
        nft.apply(table.create_script(), NFT)
        point(table, {}, {7000: 4321})
        nft.apply(table.create_script(), NFT)  # what a restarted keter does
        assert table.read(NFT) == {}
        assert other.read(NFT) == {7000: 1234}
        nft.apply(table.delete_script(), NFT)
        assert not table.exists(NFT) and other.exists(NFT)
    finally:
        nft.apply(other.delete_script(), NFT)


def test_sock_diag_counts_live_connections_and_finds_where_one_landed(
    listeners: list[NamingListener],
) -> None:
    server = listen(listeners, b"x")
    assert sockdiag.connections(server.port, server.port)[server.port] == 0
    client = socket.create_connection(("127.0.0.1", server.port), timeout=2)
    client.recv(10)
    local = client.getsockname()[1]
    assert sockdiag.connections(server.port, server.port)[server.port] == 1
    assert sockdiag.accepted_on(server.port, local)
    assert not sockdiag.accepted_on(server.port, local + 1 if local < 65535 else local - 1)
    client.close()
    # Closed by the client: the app owes it nothing any more.
    wait_for(lambda: sockdiag.connections(server.port, server.port)[server.port] == 0, 5)
    # Who listens: its owner and its socket, as /proc/net/tcp would say, and its cgroup
    # (the inode of the cgroup v2 folder this process is in).
    inode = os.fstat(server.sock.fileno()).st_ino
    [found] = sockdiag.listening(server.port)
    assert (found.uid, found.inode) == (os.getuid(), inode)
    mount, own = cgroups.unified_mount(), cgroups.own_cgroup()
    if mount is not None and own is not None:
        assert found.cgroup == os.stat(mount / own.lstrip("/")).st_ino
    # An IPv6 listener holds IPv4 connections with mapped addresses.
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as six:
        port = six.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client6:
            assert sockdiag.accepted_on(port, client6.getsockname()[1])
            assert sockdiag.connections(port, port)[port] == 1


# -- the component -------------------------------------------------------------------------------


class Running:
    """A Switch actor in its thread, and what it reported."""

    def __init__(self, tmp_path: Path, **options) -> None:
        self.reports: queue.Queue = queue.Queue()
        settings = {"root": tmp_path / "root", "port_range": (1024, 65535), "pool_seconds": 0.5}
        settings.update(options)
        self.switch = Switch(report_to=self.reports, **settings)
        self.switch.start()

    def next(self, timeout: float = 5) -> object:
        return self.reports.get(timeout=timeout)

    def stop(self) -> None:
        self.switch.stop()
        self.switch.join(10)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    made = Running(tmp_path)
    yield made
    made.stop()
    assert not made.switch.table.exists(NFT)  # a clean stop deletes the table


def pointed(report: object) -> tuple[str, int]:
    assert isinstance(report, ServicesPointed), report
    return report.app, report.deploy_id


def test_the_component_points_confirms_and_waits_for_the_old_pool(
    running: Running, listeners: list[NamingListener]
) -> None:
    ready = running.next()
    assert ready == SwitchReady(mode=SwitchMode.KERNEL, address=running.switch.table.address)
    address = ready.address
    old, new = listen(listeners, b"old"), listen(listeners, b"new")
    running.switch.tell(PointServices(app="a", deploy_id=1, targets=((7100, old.port),)))
    assert pointed(running.next()) == ("a", 1)
    assert ask(address, 7100) == b"old"

    # A connection pooled to the old version: the report waits until it is gone.
    pooled = socket.create_connection((address, 7100), timeout=2)
    pooled.recv(10)
    before_switch = time.time()
    running.switch.tell(
        PointServices(
            app="a", deploy_id=2, targets=((7100, new.port),), previous=((7100, old.port),)
        )
    )
    wait_for(lambda: running.switch.table.read(NFT) == {7100: new.port}, 5, "the switch")
    assert ask(address, 7100) == b"new"  # new connections at once
    with pytest.raises(queue.Empty):
        running.next(timeout=0.2)
    pooled.close()
    report = running.next()
    assert pointed(report) == ("a", 2)
    assert before_switch <= report.at <= time.time()  # when the kernel began leading to it

    # ... but never longer than pool_seconds (nginx closes what it pooled by then).
    pooled = socket.create_connection((address, 7100), timeout=2)
    pooled.recv(10)
    running.switch.tell(
        PointServices(
            app="a", deploy_id=3, targets=((7100, old.port),), previous=((7100, new.port),)
        )
    )
    assert pointed(running.next(timeout=2)) == ("a", 3)
    pooled.close()

    running.switch.tell(ReleaseServices(app="a", ports=(7100,)))
    wait_for(lambda: running.switch.table.read(NFT) == {}, 5, "the element to go")


def test_a_switch_that_does_not_land_is_undone(
    running: Running, listeners: list[NamingListener]
) -> None:
    address = running.next().address
    serving = listen(listeners, b"serving")
    running.switch.tell(PointServices(app="a", deploy_id=1, targets=((7200, serving.port),)))
    assert isinstance(running.next(), ServicesPointed)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    running.switch.tell(
        PointServices(
            app="a", deploy_id=2, targets=((7200, dead),), previous=((7200, serving.port),)
        )
    )
    failed = running.next()
    assert isinstance(failed, PointFailed) and failed.deploy_id == 2
    assert str(dead) in failed.reason or "refused" in failed.reason
    assert ask(address, 7200) == b"serving"
    assert running.switch.table.read(NFT) == {7200: serving.port}


def test_a_map_changed_behind_keters_back_is_read_again_and_the_switches_land(
    tmp_path: Path, listeners: list[NamingListener], caplog: pytest.LogCaptureFixture
) -> None:
    """Switches queued together share one transaction. An operator deleted app a's
    element by hand, so the kernel refuses the deletion keter's picture asks for: each
    command is tried alone, the one refused makes keter read the kernel's map, and both
    switches land. Driven in this thread: both commands must be in the inbox when the
    first is handled."""
    reports: queue.Queue = queue.Queue()
    switch = Switch(
        report_to=reports, root=tmp_path / "root", port_range=(1024, 65535), pool_seconds=0.5
    )
    switch.on_start()
    try:
        address = reports.get_nowait().address
        names = (b"a1", b"b1", b"a2", b"b2")
        a_old, b_old, a_new, b_new = (listen(listeners, name) for name in names)
        switch.handle(PointServices(app="a", deploy_id=1, targets=((7300, a_old.port),)))
        switch.handle(PointServices(app="b", deploy_id=2, targets=((7301, b_old.port),)))
        assert [pointed(reports.get_nowait()) for _ in range(2)] == [("a", 1), ("b", 2)]

        nft.apply(f"delete element ip {switch.table.name} {nft.MAP} {{ 7300 }}", NFT)
        b_moves = PointServices(
            app="b", deploy_id=4, targets=((7301, b_new.port),), previous=((7301, b_old.port),)
        )
        switch.inbox.put(b_moves)
        switch.handle(
            PointServices(
                app="a", deploy_id=3, targets=((7300, a_new.port),), previous=((7300, a_old.port),)
            )
        )
        assert switch.inbox.empty()  # b's command went into the same transaction
        assert sorted(pointed(reports.get_nowait()) for _ in range(2)) == [("a", 3), ("b", 4)]
        assert (ask(address, 7300), ask(address, 7301)) == (b"a2", b"b2")
        assert switch.table.read(NFT) == {7300: a_new.port, 7301: b_new.port}
        assert "was changed by someone else" in caplog.text
    finally:
        switch.on_stop()
    assert not switch.table.exists(NFT)


def test_a_table_deleted_behind_keters_back_is_made_again_with_every_address(
    running: Running, listeners: list[NamingListener], caplog: pytest.LogCaptureFixture
) -> None:
    """`nft flush ruleset` (the nftables service restarting) deletes keter's table with
    every stable address: keter hears the kernel announce it and makes it again."""
    address = running.next().address
    one, two = listen(listeners, b"one"), listen(listeners, b"two")
    running.switch.tell(PointServices(app="a", deploy_id=1, targets=((7400, one.port),)))
    running.switch.tell(PointServices(app="b", deploy_id=2, targets=((7401, two.port),)))
    assert {pointed(running.next()) for _ in range(2)} == {("a", 1), ("b", 2)}

    for _ in range(2):  # and again: the table made again is heard like the first
        nft.apply(running.switch.table.delete_script(), NFT)
        wait_for(
            lambda: (
                running.switch.table.exists(NFT)
                and running.switch.table.read(NFT) == {7400: one.port, 7401: two.port}
            ),
            5,
            "the table made again",
        )
        assert (ask(address, 7400), ask(address, 7401)) == (b"one", b"two")
    assert caplog.text.count("was deleted by someone else") == 2
    # keter's own changes are heard too, and change nothing.
    running.switch.tell(PointServices(app="c", deploy_id=3, targets=((7402, one.port),)))
    assert pointed(running.next()) == ("c", 3)
    assert caplog.text.count("was deleted by someone else") == 2


def test_a_drain_is_reported_when_the_last_connection_ends(
    running: Running, listeners: list[NamingListener]
) -> None:
    running.next()
    old = listen(listeners, b"old")
    held = socket.create_connection(("127.0.0.1", old.port), timeout=2)
    held.recv(10)
    running.switch.tell(WatchDrain(app="a", deploy_id=5, ports=(old.port,), seconds=30))
    with pytest.raises(queue.Empty):
        running.next(timeout=0.3)
    held.close()
    assert running.next() == Drained(app="a", deploy_id=5)
    # Past ``seconds`` the component just stops looking: the supervisor's timer decides.
    held = socket.create_connection(("127.0.0.1", old.port), timeout=2)
    running.switch.tell(WatchDrain(app="a", deploy_id=6, ports=(old.port,), seconds=0.1))
    with pytest.raises(queue.Empty):
        running.next(timeout=0.5)
    held.close()


def test_slow_connection_dumps_take_at_most_their_share_of_a_core(
    running: Running, listeners: list[NamingListener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dump that costs 40 ms of CPU (a host whose connection table holds tens of
    thousands of entries) is made less often: polling takes at most POLL_SHARE of a core,
    not the 44% that a look every POLL (50 ms) would take."""
    running.next()
    real = sockdiag.connections
    spent: list[float] = []

    def slow(low: int, high: int):
        began = time.thread_time()
        while time.thread_time() - began < 0.04:
            pass
        spent.append(time.thread_time() - began)
        return real(low, high)

    monkeypatch.setattr(sockdiag, "connections", slow)
    old = listen(listeners, b"old")
    held = socket.create_connection(("127.0.0.1", old.port), timeout=2)
    held.recv(10)
    began = time.monotonic()
    running.switch.tell(WatchDrain(app="a", deploy_id=7, ports=(old.port,), seconds=30))
    wait_for(lambda: len(spent) >= 8, 10, "eight looks")
    share = sum(spent[:8]) / (time.monotonic() - began)
    assert share <= switch_actor.POLL_SHARE * 1.25, share
    held.close()
    assert running.next() == Drained(app="a", deploy_id=7)


def test_the_poll_waits_longer_only_when_a_look_was_slow() -> None:
    assert switch_actor.poll_delay(0.05, 0.0003) == 0.05
    assert switch_actor.poll_delay(0.01, 0.01) == pytest.approx(0.04)  # 10 ms of every 50
    assert switch_actor.poll_delay(0.05, 0.04) == pytest.approx(0.16)


def test_the_reload_mode_when_chosen_or_when_nft_is_missing(tmp_path: Path) -> None:
    chosen = Running(tmp_path / "chosen", kernel=False)
    missing = Running(tmp_path / "missing", nft_program=str(tmp_path / "no-such-nft"))
    try:
        ready = chosen.next()
        assert (ready.mode, ready.address) == (SwitchMode.RELOAD, None)
        assert "switch: reload" in ready.reason
        ready = missing.next()
        assert ready.mode is SwitchMode.RELOAD and "no-such-nft" in ready.reason
        for run in (chosen, missing):
            assert not run.switch.table.exists(NFT)
            # Commands for the kernel fail plainly; drains are still watched.
            run.switch.tell(PointServices(app="a", deploy_id=1, targets=((7300, 1),)))
            assert isinstance(run.next(), PointFailed)
            run.switch.tell(WatchDrain(app="a", deploy_id=2, ports=(1,), seconds=5))
            assert run.next() == Drained(app="a", deploy_id=2)
    finally:
        chosen.stop()
        missing.stop()


def test_a_kernel_without_conntrack_timeout_policies_still_gets_the_kernel_mode(
    tmp_path: Path, listeners: list[NamingListener], caplog: pytest.LogCaptureFixture
) -> None:
    # An nft that refuses timeout policies, as one built without their kernel support does.
    refusing = tmp_path / "nft"
    refusing.write_text(
        "#!/bin/sh\nscript=$(cat)\n"
        'case "$script" in *"ct timeout"*) echo "Error: no policies" >&2; exit 1;; esac\n'
        f'printf "%s\\n" "$script" | exec {NFT} "$@"\n'
    )
    refusing.chmod(0o755)
    run = Running(tmp_path, nft_program=str(refusing))
    try:
        assert run.next().mode is SwitchMode.KERNEL
        assert "stay in conntrack for the kernel's default time" in caplog.text
        one = listen(listeners, b"one")
        run.switch.tell(PointServices(app="a", deploy_id=1, targets=((7300, one.port),)))
        assert isinstance(run.next(), ServicesPointed)
        assert ask(run.switch.table.address, 7300) == b"one"
    finally:
        run.stop()
    assert not run.switch.table.exists(NFT)


# -- traffic statistics of apps the kernel switches ---------------------------------------------


def test_records_that_say_no_version_get_the_version_serving_when_made(tmp_path: Path) -> None:
    """nginx's config does not change on a kernel switch, so its records of such an app say
    "-"; the stats component names the version by the time each began serving."""
    config = KeterConfig(root=tmp_path / "root")
    stats = StatsCollector(config)
    stats.on_start()
    stats.handle(VersionServing(app="hello", version="aaaaaaaaaaaa", since=1000.0))
    stats.handle(VersionServing(app="hello", version="bbbbbbbbbbbb", since=2000.0))
    with stats.spool_path.open("ab") as spool:
        for at, version in ((1500.0, "-"), (2500.0, "-"), (2600.0, "cccccccccccc"), (10.0, "-")):
            spool.write(spool_line("hello", version, at=at) + b"\n")
    stats._read(time.monotonic() + 5)
    stats.on_stop()
    access = (config.log_dir / "access-hello.log").read_text().splitlines()
    assert sorted(line.rsplit(" ", 1)[1] for line in access) == [
        "-",  # older than anything known
        "aaaaaaaaaaaa",
        "bbbbbbbbbbbb",
        "cccccccccccc",  # a version nginx named itself stays
    ]
