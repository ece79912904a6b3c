"""Tests of record for issue 16: switching versions without reloading nginx.

A real keter daemon, a private nginx, real apps and the real kernel: the
daemon's nftables table (named after its ROOT, so tests never share one) leads
each web app's stable address to the version serving now.
"""

from __future__ import annotations

import http.client
import re
import threading
import time

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, keter_cli, status_api
from support.net import Load, served
from support.wait import wait_for

from keter import sockdiag
from keter.nginx import fetch_generation
from keter.switch import Table, nft

NFT = nft.find_nft()
pytestmark = pytest.mark.skipif(NFT is None, reason="needs nft (tests/run installs nftables)")


def generation(nginx) -> str | None:
    return fetch_generation("127.0.0.1", nginx.port)


def workers(nginx) -> set[int]:
    return {worker.pid for worker in psutil.Process(nginx.pid).children()}


def app_ports(keter) -> set[int]:
    """The ports keter's app processes listen on."""
    ports = set()
    for process in app_processes(keter):
        for connection in process.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN:
                ports.add(connection.laddr.port)
    return ports


def table_of(keter) -> Table:
    return Table.for_root(keter.root)


def test_redeploys_under_keep_alive_load_lose_nothing_and_never_reload_nginx(
    keter, private_nginx, tmp_path
):
    bundle = tmp_path / "ka.keter"

    def config(version: str) -> dict:
        return webapp_config("ka.test", version, args=["--keep-alive"])

    keter.drop(make_bundle(bundle, config=config("v0")))
    served(private_nginx, "ka.test", "v0")
    assert "switching versions in the kernel" in keter.log()
    before, nginx_workers = generation(private_nginx), workers(private_nginx)
    [stable] = table_of(keter).read(NFT)

    # Every client keeps its connection to nginx; nginx pools its own to the app. Every
    # failure counts, a reset on a reused connection too.
    load = Load(private_nginx.port, "ka.test", strict=True)
    threads = load.run(clients=8)
    try:
        for version in range(1, 9):
            keter.drop(make_bundle(bundle, config=config(f"v{version}")))
            wait_for(
                lambda v=version: f"v{v}\n".encode() in load.bodies, 20, f"v{version} to answer"
            )
        wait_for(lambda: len(app_processes(keter)) == 1, 15, "old versions to stop")
        seen = load.requests
        wait_for(lambda: load.requests > seen + 50, 10, "requests after the last stop")
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(15)
    assert load.errors == []
    # A real load through every switch, not one request per version.
    assert min(load.bodies.get(f"v{v}\n".encode(), 0) for v in range(9)) >= 10, load.bodies
    # nginx never reloaded: the same generation, the very same worker processes.
    assert generation(private_nginx) == before
    assert workers(private_nginx) == nginx_workers
    # The stable port stayed; it leads to the last version.
    assert table_of(keter).read(NFT) == {stable: next(iter(app_ports(keter)))}
    client = status_api(keter)
    history = wait_for(lambda: (h := client.app("ka")["history"]) and len(h) >= 9 and h, 10)
    assert [entry["outcome"] for entry in history] == ["serving"] * 9


def test_the_old_version_is_stopped_only_after_its_last_connection_ends(
    keter_factory, private_nginx, tmp_path
):
    keter = keter_factory(**{"drain-seconds": 60})  # the ceiling must not decide
    bundle = tmp_path / "slow.keter"
    keter.drop(make_bundle(bundle, config=webapp_config("slow.test", "v1")))
    served(private_nginx, "slow.test", "v1")
    [old] = app_processes(keter)

    answer: dict[str, object] = {}

    def slow_request() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", private_nginx.port, timeout=30)
        connection.request("GET", "/slow?3", headers={"Host": "slow.test"})
        response = connection.getresponse()
        answer["status"], answer["body"] = response.status, response.read()
        answer["at"] = time.monotonic()

    request = threading.Thread(target=slow_request)
    request.start()
    wait_for(lambda: sockdiag.connections(*keter.settings["port-range"]), 5, "the request")
    keter.drop(make_bundle(bundle, config=webapp_config("slow.test", "v2")))
    served(private_nginx, "slow.test", "v2")
    assert old.is_running()  # the slow request is still in the old version
    request.join(30)
    assert answer["status"] == 200 and answer["body"] == b"v1 slow\n"
    wait_for(lambda: not old.is_running(), 10, "the old version to stop")
    stopped = time.monotonic()
    assert stopped - answer["at"] < 5  # right after its last connection, not at the ceiling
    log = keter.log()
    assert re.search(r"slow: deploy #\d+ drains \(at most 60.0s\)", log)


def test_keter_killed_mid_switch_converges_at_restart(keter, private_nginx, tmp_path):
    bundle = tmp_path / "kill.keter"
    keter.drop(make_bundle(bundle, config=webapp_config("kill.test", "v1")))
    served(private_nginx, "kill.test", "v1")
    table = table_of(keter)
    [(stable, first_port)] = table.read(NFT).items()

    # The map changes to v2, then keter dies before it finishes the switch (it is still
    # waiting for nginx's pool to the old version) or stops the old version.
    keter.drop(make_bundle(bundle, config=webapp_config("kill.test", "v2")))
    wait_for(lambda: table.read(NFT)[stable] != first_port, 20, "the map to change")
    leftovers = app_processes(keter)
    keter.kill()
    assert table.read(NFT)  # left behind, pointing at processes keter no longer runs

    keter.start()
    served(private_nginx, "kill.test", "v2")
    wait_for(lambda: len(app_processes(keter)) == 1, 20, "one version to run")
    psutil.wait_procs(leftovers, timeout=10)
    assert not any(process.is_running() for process in leftovers)
    # One rule, leading to the one app process this run started.
    mapping = table.read(NFT)
    assert len(mapping) == 1 and set(mapping.values()) == app_ports(keter)


def test_removing_an_app_removes_its_rules(keter, private_nginx, tmp_path):
    keter.drop(make_bundle(tmp_path / "one.keter", config=webapp_config("one.test", "v1")))
    keter.drop(make_bundle(tmp_path / "two.keter", config=webapp_config("two.test", "v1")))
    served(private_nginx, "one.test", "v1")
    served(private_nginx, "two.test", "v1")
    table = table_of(keter)
    wait_for(lambda: len(table.read(NFT)) == 2, 10, "both apps' rules")
    (keter.incoming / "one.keter").unlink()
    wait_for(lambda: len(app_processes(keter)) == 1, 15, "one to stop")
    mapping = wait_for(lambda: (m := table.read(NFT)) and len(m) == 1 and m, 10, "its rule to go")
    assert set(mapping.values()) == app_ports(keter)
    (keter.incoming / "two.keter").unlink()
    wait_for(lambda: table.read(NFT) == {}, 15, "the last rule to go")
    keter.stop()
    assert not table.exists(NFT)  # a clean stop leaves nothing in the kernel


def test_forced_reload_mode_switches_through_nginx_and_says_so(
    keter_factory, private_nginx, tmp_path
):
    keter = keter_factory(switch="reload")
    bundle = tmp_path / "rl.keter"
    keter.drop(make_bundle(bundle, config=webapp_config("rl.test", "v1")))
    served(private_nginx, "rl.test", "v1")
    before = generation(private_nginx)
    keter.drop(make_bundle(bundle, config=webapp_config("rl.test", "v2")))
    served(private_nginx, "rl.test", "v2")
    assert int(generation(private_nginx)) > int(before)  # the switch was a reload
    assert not table_of(keter).exists(NFT)
    log = keter.log()
    assert log.count("switching versions by reloading nginx") == 1
    assert "switch: reload" in log
    status = keter_cli(keter.root, "status")
    assert "switch: reload" in status.stdout
    assert status_api(keter).status()["keter"]["switch"]["mode"] == "reload"


def test_status_shows_the_kernel_mode(keter, private_nginx, tmp_path):
    keter.drop(make_bundle(tmp_path / "st.keter", config=webapp_config("st.test", "v1")))
    served(private_nginx, "st.test", "v1")
    status = keter_cli(keter.root, "status")
    assert "switch: kernel" in status.stdout
    assert status_api(keter).status()["keter"]["switch"] == {"mode": "kernel", "reason": ""}
