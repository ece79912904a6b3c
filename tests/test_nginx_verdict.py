""" "Now serving" is true for every new connection (issue 16 item 2), against a real nginx.

After a reload nginx's old workers keep accepting for about 100 ms, so one
answer from a new worker does not mean the next connection gets the new
config. The writer reports NginxApplied only once every worker from before the
reload has stopped accepting; a connection made right after the report must
never reach the old version.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.net import Backend
from support.nginx import PrivateNginx

from keter.messages import ApplyNginx, NginxApplied, Site
from keter.nginx import NginxWriter, workers

SWITCHES = 40


@dataclass(frozen=True)
class Listener:
    host: str
    port: int


def keep_asking(nginx: PrivateNginx, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, http.client.HTTPException):
            nginx.request("app.test", timeout=2)


@pytest.fixture
def two_worker_nginx(tmp_path: Path) -> Iterator[PrivateNginx]:
    nginx = PrivateNginx(tmp_path / "nginx", workers=2)
    nginx.start()
    try:
        yield nginx
    finally:
        nginx.stop()


def test_a_fresh_connection_right_after_each_switch_reaches_the_new_version(
    two_worker_nginx: PrivateNginx,
) -> None:
    nginx = two_worker_nginx
    versions = [Backend("v1"), Backend("v2")]
    reports: queue.Queue = queue.Queue()
    writer = NginxWriter(
        listeners=[Listener("127.0.0.1", nginx.port)],
        config_file=nginx.config_file,
        test_command=nginx.test_command,
        reload_command=nginx.reload_command,
        report_to=reports,
    )
    writer.start()
    # Other clients keep nginx's workers busy meanwhile, as on a live host: an idle
    # old worker is not always the one the kernel wakes first.
    stop = threading.Event()
    load = [threading.Thread(target=keep_asking, args=(nginx, stop)) for _ in range(2)]
    for thread in load:
        thread.start()
    try:
        seen = []
        for generation in range(1, SWITCHES + 1):
            version = versions[generation % 2]
            site = Site(app="app", hosts=("app.test",), port=version.port)
            writer.tell(ApplyNginx(generation=generation, sites=(site,)))
            assert reports.get(timeout=30) == NginxApplied(generation=generation)
            # At once, on a fresh connection (nginx.request sends Connection: close).
            status, _, body = nginx.request("app.test")
            seen.append((version.name, status, json.loads(body)["name"] if status == 200 else None))
        wrong = [each for each in seen if each[1:] != (200, each[0])]
        assert wrong == [], f"{len(wrong)} of {SWITCHES} switches: {wrong}"
    finally:
        stop.set()
        for thread in load:
            thread.join(timeout=15)
        writer.stop()
        writer.join(timeout=15)
        for backend in versions:
            backend.close()


def test_a_process_accepts_while_it_holds_a_listening_socket_of_the_master(tmp_path: Path) -> None:
    # This test process plays nginx's master: it holds a listening socket, and a
    # child started with it inherited (a worker) can accept on it until it closes it.
    # Only the master's own ports count: another listening socket it holds (an
    # app's port, in keter's case) is not asked about.
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_server(("127.0.0.1", 0)) as elsewhere,
    ):
        holding = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            pass_fds=(listener.fileno(),),
        )
        without = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                   stdin=subprocess.PIPE)  # fmt: skip
        try:
            ours = workers.listening_sockets(os.getpid(), [listener.getsockname()[1]])
            assert ours == {f"socket:[{os.fstat(listener.fileno()).st_ino}]"}
            both = [listener.getsockname()[1], elsewhere.getsockname()[1]]
            assert len(workers.listening_sockets(os.getpid(), both)) == 2
            assert workers.holds_any(holding.pid, ours)
            assert not workers.holds_any(without.pid, ours)
            assert {holding.pid, without.pid} <= workers.children(os.getpid())
            assert workers.master_of(holding.pid) == os.getpid()
        finally:
            for child in (holding, without):
                child.communicate(b"")
    assert not workers.holds_any(holding.pid, ours)  # gone: not accepting


def test_workers_started_in_the_tick_before_the_reload_count_as_old() -> None:
    # Before its first reload the writer does not know nginx's master, so the
    # workers from before the reload are told apart by their start tick (10 ms);
    # nginx answers within milliseconds of starting, so its first reload often
    # comes in the tick its workers started in. Here this test process plays the
    # master, an "old" child starts just before the reload, a "new" one just after.
    def child(listener: socket.socket) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            pass_fds=(listener.fileno(),),
        )

    with socket.create_server(("127.0.0.1", 0)) as listener:
        old = child(listener)
        retiring = workers.Retiring.before_reload(None, [listener.getsockname()[1]])
        assert not retiring.known
        deadline = time.monotonic() + 1
        while not retiring.in_a_later_tick():  # what the writer waits for, on its stop event
            assert time.monotonic() < deadline
        new = child(listener)  # the reload: workers with the new config
        try:
            retiring.after_reload(new.pid)
            assert retiring.master == os.getpid()
            assert retiring.still_accepting() == [old.pid]
        finally:
            for each in (old, new):
                each.communicate(b"")


def test_uptime_is_read_in_ticks_exactly() -> None:
    # Through a float, "1024.09" seconds came out 102408 ticks: one uptime in twenty.
    assert workers.uptime_ticks("1024.09", 100) == 102409
    assert all(
        workers.uptime_ticks(f"{n // 100}.{n % 100:02d}", 100) == n for n in range(100_000, 200_000)
    )
    assert workers.uptime_ticks("7.5", 250) == 1875
