"""The status component: its API, history, archive, metrics and request checks.

Most tests run the real StatusServer actor on its own (its socket, its TCP
listener, its files under tmp_path) and feed it the messages the supervisor
sends; the last ones run it inside a real keter daemon with a private nginx.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import grp
import hashlib
import http.client
import io
import itertools
import json
import logging
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support.bundles import make_bundle, webapp_config
from support.daemon import status_api
from support.net import free_port
from support.wait import wait_for

from keter import archive as archive_module
from keter import envstore
from keter.archive import BundleArchive
from keter.client import ApiError, KeterClient
from keter.config import KeterConfig, Listener
from keter.messages import (
    AppChanged,
    AppEvent,
    AppGone,
    AppSnapshot,
    AppState,
    DeployFinished,
    EventKind,
    FailureKind,
    Outcome,
    RollBack,
    ServeLastServed,
)
from keter.status import StatusServer, appops, component, handler, redeploy, servers
from keter.status.checks import RequestChecks
from keter.status.errors import ApiError as StatusApiError
from keter.status.views import MAX_LOG_ANSWER, app_urls

# -- helpers ---------------------------------------------------------------------------------


def snapshot(app: str = "hello", **fields) -> AppSnapshot:
    values = {
        "state": "running",
        "version": "0123456789ab",
        "bundle_mtime": 1_700_000_000.0,
        "hosts": (f"{app}.test",),
        "port": 4001,
        "pid": os.getpid(),
        "started_at": time.time() - 125,
        "restarts": 0,
        "database": None,
    }
    values.update(fields)
    values["state"] = AppState(values["state"])
    return AppSnapshot(app=app, **values)


def finished(app: str = "hello", outcome: str = "serving", sha256: str = "", **fields):
    sha256 = sha256 or hashlib.sha256(app.encode()).hexdigest()
    values = {
        "version": sha256[:12],
        "bundle_mtime": 1_700_000_000.0,
        "reason": "",
        "duration": 0.8,
        "at": time.time(),
    }
    values.update(fields)
    return DeployFinished(app=app, sha256=sha256, outcome=Outcome(outcome), **values)


class Running:
    """A started StatusServer with a client for its socket and its TCP address."""

    def __init__(self, config: KeterConfig) -> None:
        self.config = config
        self.reports: queue.Queue = queue.Queue()
        self.server = StatusServer(config, report_to=self.reports)
        self._markers = itertools.count()
        self.server.start()
        assert self.server.listening.wait(10), "the status component did not start"
        self.client = KeterClient(config.root)

    def tell_and_wait(self, *messages: object) -> None:
        """Send messages and wait until the actor has handled them all."""
        for message in messages:
            self.server.tell(message)
        marker = f"marker {next(self._markers)}"
        self.server.tell(AppEvent(app="-", kind=EventKind.RESTART, text=marker, at=0))
        wait_for(
            lambda: any(e["text"] == marker for e in self.client.status()["events"]),
            5,
            "the actor to catch up",
        )

    def api_token(self) -> str:
        return (self.config.etc_dir / "status-token").read_text().strip()

    def stop(self) -> None:
        if self.server.is_alive():
            self.server.stop()
            self.server.join(10)

    def http(
        self,
        method: str,
        path: str,
        headers: dict | None = None,
        body: bytes = b"",
        *,
        login: bool = True,
    ):
        """A request on TCP, with the API token unless ``login`` is False or one is given."""
        host, port = self.server.tcp_address
        headers = dict(headers or {})
        if login:
            headers.setdefault("Authorization", f"Bearer {self.api_token()}")
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@pytest.fixture
def make_status(tmp_path):
    started: list[Running] = []

    def make(**settings) -> Running:
        root = tmp_path / "root"
        for folder in ("incoming", "etc", "log", "run"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        settings.setdefault("status_listen", ("127.0.0.1", free_port()))
        running = Running(KeterConfig(root=root, **settings))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()
    assert all(not r.server.is_alive() for r in started)
    assert all(r.reports.empty() for r in started), "the status component reported a failure"


def drop_bundle(config: KeterConfig, app: str, data: bytes) -> str:
    (config.incoming_dir / f"{app}.keter").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# -- the API ---------------------------------------------------------------------------------


def test_apps_appear_change_and_go(make_status):
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot(database="hello_db")))
    [app] = status.client.status()["apps"]
    assert app["name"] == "hello"
    assert app["state"] == "running"
    assert app["version"] == "0123456789ab"
    assert app["hosts"] == ["hello.test"]
    assert app["urls"] == ["http://hello.test/"]  # the default listener is port 80
    assert app["database"] == "hello_db"
    assert 124 <= app["uptime"] < 200
    assert "password" not in json.dumps(app)

    status.tell_and_wait(AppChanged(snapshot=snapshot(state="backoff", pid=None, restarts=1)))
    [app] = status.client.status()["apps"]
    assert (app["state"], app["uptime"], app["restarts"]) == ("backoff", None, 1)

    status.tell_and_wait(AppGone(app="hello"))
    assert status.client.status()["apps"] == []
    with pytest.raises(ApiError) as info:
        status.client.app("hello")
    assert info.value.status == 404


def test_events_feed_is_newest_first_and_names_deploys(make_status):
    status = make_status()
    status.tell_and_wait(
        AppEvent(app="hello", kind=EventKind.CRASH, text="exited with status 3", at=time.time()),
        finished(outcome="failed", reason="did not answer on port 4001 within 1s"),
    )
    events = [e for e in status.client.status()["events"] if e["app"] != "-"]
    assert [e["kind"] for e in events] == ["deploy-failed", "crash"]
    assert "did not answer" in events[0]["text"]


def test_a_deploys_event_kind_is_deploy_and_its_outcome() -> None:
    # The dashboard and the API's clients read these spellings; they were once built
    # from the outcome ad hoc, now each is an EventKind member.
    for outcome in Outcome:
        assert EventKind.deploy(outcome) == f"deploy-{outcome}"


def test_app_urls(tmp_path):
    on_8080 = KeterConfig(root=tmp_path, listeners=(Listener("*", 8080),))
    assert app_urls(("a.test", "*.b.test", "c.*.test"), on_8080) == ["http://a.test:8080/"]
    assert app_urls(("a.test",), KeterConfig(root=tmp_path)) == ["http://a.test/"]


def test_history_is_kept_bounded_and_survives_a_restart(make_status):
    status = make_status()
    status.tell_and_wait(
        AppChanged(snapshot=snapshot()),
        finished(outcome="failed", reason="boom", duration=1.25),
        finished(outcome="serving"),
    )
    view = status.client.app("hello")
    assert [h["outcome"] for h in view["history"]] == ["serving", "failed"]  # newest first
    assert view["history"][1]["reason"] == "boom"
    assert view["history"][1]["duration"] == 1.25
    assert view["last_deploy"]["outcome"] == "serving"
    path = status.config.etc_dir / "history.json"
    wait_for(path.exists, 5, "the history file")  # written soon after, not at each deploy
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    status.stop()

    again = make_status()
    view = again.client.app("hello")  # not running any more, but remembered
    assert view["state"] == "removed"
    assert [h["seq"] for h in view["history"]] == [2, 1]
    again.tell_and_wait(finished(outcome="serving"))
    assert again.client.app("hello")["history"][0]["seq"] == 3  # numbers never repeat


def test_a_deploy_alone_is_on_disk_before_its_verdict_is_heard(make_status, monkeypatch):
    # The file was written 0.2 s after each deploy: keter killed right after a deploy's
    # "now serving" (keter deploy had printed it) lost its line of history.
    monkeypatch.setattr(component, "HISTORY_SAVE_DELAY", 60.0)
    status = make_status()
    path = status.config.etc_dir / "history.json"
    status.server.tell(finished(outcome="serving"))
    status.client.history_after("hello", 0, wait=5)
    assert json.loads(path.read_text())  # written before the entry could be read
    status.tell_and_wait(finished(outcome="failed", reason="boom"))
    assert "boom" not in path.read_text()  # one of a burst: written with the next save


def test_history_request_waits_for_the_next_entry(make_status):
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    seq = status.client.status()["history_seq"]
    assert status.client.history_after("hello", seq, wait=0) == []
    timer = threading.Timer(0.2, status.server.tell, [finished(outcome="serving")])
    timer.start()
    began = time.monotonic()
    [entry] = status.client.history_after("hello", seq, wait=20)
    assert entry["outcome"] == "serving"
    assert time.monotonic() - began < 10  # answered by the entry, not by the time limit


def test_log_lines(make_status):
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    assert status.client.log("hello", 5) == []  # no log file yet
    log_file = status.config.log_dir / "app-hello.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(2000)))
    assert status.client.log("hello", 3) == ["line 1997", "line 1998", "line 1999"]
    assert len(status.client.log("hello", 5000)) == 1000  # capped
    with pytest.raises(ApiError):
        status.client.log("..", 5)


def test_log_lines_answer_is_bounded_in_bytes_whatever_the_characters(make_status):
    # JSON writes an emoji in 12 bytes: 200 lines of 5,000 were 10 MB an answer, asked for
    # each second by the dashboard's app page.
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    log_file = status.config.log_dir / "app-hello.log"
    log_file.write_text("".join(f"{i} " + "\U0001f600" * 5000 + "\n" for i in range(250)))
    here = "{}:{}".format(*status.server.tcp_address)
    code, _, body = status.http("GET", "/api/apps/hello/log?n=200", {"Host": here})
    assert code == 200
    assert len(body) <= MAX_LOG_ANSWER + 1000
    lines = json.loads(body)["lines"]
    assert 5 < len(lines) < 200
    assert lines[-1].startswith("249 ")  # the newest are the ones kept


# -- archive, restart, rollback ----------------------------------------------------------------


def test_served_bundles_are_archived_and_the_oldest_dropped(make_status):
    status = make_status(archive_keep=2)
    shas = []
    for n in range(3):
        sha = drop_bundle(status.config, "hello", f"bundle {n}".encode())
        shas.append(sha)
        status.tell_and_wait(finished(sha256=sha, at=1_700_000_000 + n))
    archive = status.config.archive_dir / "hello"
    assert sorted(p.name for p in archive.iterdir()) == sorted(f"{s}.keter" for s in shas[1:])
    assert stat.S_IMODE(status.config.archive_dir.stat().st_mode) == 0o700
    assert [a["sha256"] for a in status.client.app("hello")["archive"]] == shas[:0:-1]


def test_a_bundle_replaced_since_its_deploy_is_not_archived(make_status, caplog):
    status = make_status()
    drop_bundle(status.config, "hello", b"the newer bundle")
    with caplog.at_level(logging.WARNING):
        status.tell_and_wait(finished(sha256=hashlib.sha256(b"what was deployed").hexdigest()))
    assert not (status.config.archive_dir / "hello").exists() or not any(
        (status.config.archive_dir / "hello").iterdir()
    )
    assert "hello: version" in caplog.text and "has changed since" in caplog.text


def test_a_file_larger_than_any_bundle_is_neither_archived_nor_hashed(make_status, caplog):
    """A bundle in incoming/ extended by a hole (`truncate -s 20G`: no disk used) was
    copied into archive/, its zeros written out onto ROOT's disk, and restart hashed it
    whole in the status thread, every status request waiting."""
    status = make_status(max_unpacked_bytes=1 << 20, max_members=10)  # about 4 MB at most
    bundle = status.config.incoming_dir / "hello.keter"
    bundle.write_bytes(b"v1")
    os.truncate(bundle, 64 << 20)
    with open(bundle, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    with caplog.at_level(logging.WARNING):
        status.tell_and_wait(AppChanged(snapshot=snapshot()), finished(sha256=sha))
    assert list(status.config.archive_dir.glob("hello/*")) == []
    assert "hello.keter is 67108864 bytes now, larger than any bundle keter unpacks" in caplog.text
    with pytest.raises(ApiError) as info:
        status.client.restart("hello")
    assert info.value.status == 409 and "larger than any bundle keter unpacks" in str(info.value)


def test_a_copy_longer_than_its_bound_stops_there_and_leaves_nothing(tmp_path):
    # A bundle growing while the archive copies it is copied no further than any bundle.
    with pytest.raises(archive_module.ArchiveError, match="more than 5 bytes"):
        archive_module.copy_hashed(io.BytesIO(b"123456"), tmp_path, "x.keter", max_bytes=5)
    assert list(tmp_path.iterdir()) == []


def test_restart_touches_the_bundle(make_status):
    status = make_status()
    sha = drop_bundle(status.config, "hello", b"v1")
    bundle = status.config.incoming_dir / "hello.keter"
    os.utime(bundle, (1_000_000, 1_000_000))
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    result = status.client.restart("hello")
    assert result["sha256"] == sha
    assert bundle.stat().st_mtime > 1_000_000
    with pytest.raises(ApiError) as info:
        status.client.restart("nobody")
    assert info.value.status == 404


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_bundle_swapped_for_a_fifo_or_a_link_is_neither_restarted_nor_archived(
    make_status, tmp_path, kind
):
    """Whoever may write incoming/ (root, the status group) chooses what lies there. A
    FIFO held the status component for good: restart and archiving opened it and waited
    for a writer, and every status request after that timed out. A link had root hash
    the file it names, answer its sha256 and touch it."""
    status = make_status()
    secret = tmp_path / "secret.keter"
    secret.write_bytes(b"v1")
    secret.chmod(0o600)
    os.utime(secret, (1_000_000, 1_000_000))
    bundle = status.config.incoming_dir / "hello.keter"
    if kind == "fifo":
        os.mkfifo(bundle)
    else:
        bundle.symlink_to(secret)
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    with pytest.raises(ApiError) as info:
        status.client.restart("hello")
    assert info.value.status == 409 and "hello.keter is no bundle" in str(info.value)
    # The deploy that read v1 before the swap reaches serving: nothing to archive now.
    status.tell_and_wait(finished(sha256=hashlib.sha256(b"v1").hexdigest()))
    assert not list(status.config.archive_dir.glob("hello/*"))
    assert secret.stat().st_mtime == 1_000_000
    assert status.client.status()["apps"]


def test_settings_stored_whose_restart_is_refused_are_said_to_be_stored(make_status):
    """The app's bundle left incoming/ (it is being removed): the settings were stored but
    the answer was the restart's 409, so the operator was told nothing had changed."""
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))  # serving, no bundle in incoming/
    result = status.client.env_change("hello", {"MODE": "fast"}, [], restart=True)
    assert result["set"] == ["MODE"] and result["restart"] is None
    assert "no bundle in incoming/" in result["restart_error"]
    assert envstore.load(status.config.etc_dir, "hello") == {"MODE": "fast"}


def test_rollback_copies_the_previous_version_into_incoming(make_status):
    status = make_status()
    old = drop_bundle(status.config, "hello", b"v1")
    status.tell_and_wait(finished(sha256=old, at=1_700_000_000))
    new = drop_bundle(status.config, "hello", b"v2")
    status.tell_and_wait(
        finished(sha256=new, at=1_700_000_100), AppChanged(snapshot=snapshot(version=new[:12]))
    )
    result = status.client.rollback("hello")
    assert (result["sha256"], result["version"]) == (old, old[:12])
    assert (status.config.incoming_dir / "hello.keter").read_bytes() == b"v1"
    assert [p.name for p in status.config.incoming_dir.iterdir()] == ["hello.keter"]

    status.client.rollback("hello", new[:6])  # a named version, by a prefix
    assert (status.config.incoming_dir / "hello.keter").read_bytes() == b"v2"
    with pytest.raises(ApiError) as info:
        status.client.rollback("hello", "ffffffff")
    assert info.value.status == 404 or "not archived" in str(info.value)


def test_rollback_needs_an_earlier_version(make_status):
    status = make_status()
    sha = drop_bundle(status.config, "hello", b"v1")
    status.tell_and_wait(finished(sha256=sha), AppChanged(snapshot=snapshot(version=sha[:12])))
    with pytest.raises(ApiError) as info:
        status.client.rollback("hello")
    assert info.value.status == 409
    assert "no earlier version" in str(info.value)


@pytest.mark.parametrize("meanwhile", ["nothing", "removed", "replaced", "removed as it copies"])
def test_an_automatic_rollback_puts_back_only_over_the_version_it_rolls_back(
    make_status, monkeypatch, meanwhile
):
    # The supervisor orders it as a watched version fails; by the time it is carried
    # out the operator may have removed the bundle (the removed app came back) or
    # uploaded a newer one (replaced by the old version).
    status = make_status()
    v1 = drop_bundle(status.config, "hello", b"v1")
    status.tell_and_wait(finished(sha256=v1))
    v2 = drop_bundle(status.config, "hello", b"v2")
    status.tell_and_wait(finished(sha256=v2))
    bundle = status.config.incoming_dir / "hello.keter"
    if meanwhile == "removed":
        bundle.unlink()
    elif meanwhile == "replaced":
        drop_bundle(status.config, "hello", b"v3")
    elif meanwhile == "removed as it copies":
        write = archive_module._write_hashed

        def write_then_remove(*args, **kwargs):
            digest = write(*args, **kwargs)
            bundle.unlink()
            return digest

        monkeypatch.setattr(archive_module, "_write_hashed", write_then_remove)
    order = RollBack(app="hello", version=v2[:12], sha256=v1, reason="5xx", replaces=v2)
    status.tell_and_wait(order)
    done = status.reports.get(timeout=5)
    assert (done.app, done.version) == ("hello", v2[:12])
    if meanwhile == "nothing":
        assert done.failure is None
        assert bundle.read_bytes() == b"v1"
        return
    assert (
        done.failure
        == f"cannot put {v1[:12]} back: incoming/hello.keter was removed or replaced meanwhile"
    )
    assert [p.name for p in status.config.incoming_dir.iterdir()] == (
        ["hello.keter"] if meanwhile == "replaced" else []
    )
    if meanwhile == "replaced":
        assert bundle.read_bytes() == b"v3"


@pytest.mark.parametrize("known", ["by its hash", "by its mtime"])
@pytest.mark.parametrize("meanwhile", ["nothing", "replaced"])
def test_the_version_that_served_last_goes_back_only_over_the_bundle_that_failed(
    make_status, known, meanwhile
):
    # At keter's start the bundle in incoming/ failed and nothing serves: the archived
    # version goes back in its place, but not over a fix the operator uploaded since.
    status = make_status()
    v1 = drop_bundle(status.config, "hello", b"v1")
    status.tell_and_wait(finished(sha256=v1))
    bad = drop_bundle(status.config, "hello", b"v2, failing")
    bundle = status.config.incoming_dir / "hello.keter"
    failed_mtime = bundle.stat().st_mtime_ns / 1e9
    if meanwhile == "replaced":
        drop_bundle(status.config, "hello", b"v3, the fix")
        os.utime(bundle, ns=(0, 1_000_000_000))  # another mtime, whatever the clock
    order = ServeLastServed(
        app="hello", failed_sha256=bad if known == "by its hash" else "", failed_mtime=failed_mtime
    )
    status.tell_and_wait(order)
    assert bundle.read_bytes() == (b"v1" if meanwhile == "nothing" else b"v3, the fix")


def test_a_damaged_archive_is_never_deployed(tmp_path):
    archive = BundleArchive(tmp_path / "archive", keep=3)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "hello.keter").write_bytes(b"v1")
    stored = archive.store("hello", incoming / "hello.keter", hashlib.sha256(b"v1").hexdigest(), 1)
    stored.path.write_bytes(b"tampered")
    (incoming / "hello.keter").write_bytes(b"v2")
    with pytest.raises(Exception, match="damaged"):
        archive.restore("hello", stored, incoming)
    assert (incoming / "hello.keter").read_bytes() == b"v2"
    assert [p.name for p in incoming.iterdir()] == ["hello.keter"]


def test_an_archived_copy_left_short_is_made_again_and_syncs_are_batched(tmp_path):
    """store leaves the disk to ``sync`` (the status timer); a copy a power cut left
    empty or short is copied again when its version is archived once more."""
    archive = BundleArchive(tmp_path / "archive", keep=3)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "hello.keter").write_bytes(b"v1")
    sha = hashlib.sha256(b"v1").hexdigest()
    stored = archive.store("hello", incoming / "hello.keter", sha, 1)
    assert stored.path.read_bytes() == b"v1"
    archive.sync()
    stored.path.write_bytes(b"")  # what an unsynced copy may be after a power cut
    again = archive.store("hello", incoming / "hello.keter", sha, 2)
    assert again.path.read_bytes() == b"v1"
    archive.sync()
    archive.sync()  # nothing left to sync is fine too


# -- request checks ----------------------------------------------------------------------------


def test_writes_need_the_token_and_the_same_origin(make_status):
    status = make_status()
    drop_bundle(status.config, "hello", b"v1")
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    host, port = status.server.tcp_address
    here = f"{host}:{port}"
    token = status.server.token
    path = "/api/apps/hello/restart"

    code, _, body = status.http("POST", path, {"Host": here})
    assert code == 403 and b"X-Keter-Token" in body
    code, _, _ = status.http("POST", path, {"Host": here, "X-Keter-Token": "guess"})
    assert code == 403
    evil = {"Host": here, "X-Keter-Token": token, "Origin": "http://evil.example"}
    assert status.http("POST", path, evil)[0] == 403
    cross = {"Host": here, "X-Keter-Token": token, "Sec-Fetch-Site": "cross-site"}
    assert status.http("POST", path, cross)[0] == 403
    good = {"Host": here, "X-Keter-Token": token, "Origin": f"http://{here}"}
    assert status.http("POST", path, good)[0] == 202
    # A page that rebinds its own name to 127.0.0.1 reads nothing.
    assert status.http("GET", "/api/token", {"Host": f"evil.example:{port}"})[0] == 421
    for odd in ("[::1]evil.example", f"[::1]:{port}x", "[::1", "[::1]:"):
        assert status.http("GET", "/api/status", {"Host": odd})[0] == 421, odd
    assert status.http("GET", "/api/status", {"Host": f"[::1]:{port}"})[0] == 200
    assert status.http("GET", "/api/status", {"Host": here})[0] == 200
    assert status.http("GET", path, {"Host": here})[0] == 405


def test_a_rebinding_page_gets_nothing(make_status):
    """A page on evil.example whose name now points at keter: foreign Host, its own Origin.

    Even with a valid login and the write token (which such a page cannot have),
    nothing is read and nothing changes.
    """
    status = make_status(dashboard_users=(("ops", "pw"),))
    bundle = status.config.incoming_dir / "hello.keter"
    drop_bundle(status.config, "hello", b"v1")
    os.utime(bundle, (1_000_000, 1_000_000))
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    port = status.server.tcp_address[1]
    evil = {
        "Host": f"evil.example:{port}",
        "Origin": f"http://evil.example:{port}",
        "Sec-Fetch-Site": "same-origin",
        "Authorization": basic("ops", "pw"),
        "X-Keter-Token": status.server.token,
    }
    for method, path in [
        ("GET", "/"),
        ("GET", "/api/token"),
        ("GET", "/api/status"),
        ("GET", "/api/apps/hello/log"),
        ("GET", "/metrics"),
        ("POST", "/api/apps/hello/restart"),
    ]:
        code, _, body = status.http(method, path, evil)
        assert code == 421, path
        assert b"hello" not in body and status.server.token.encode() not in body
    assert bundle.stat().st_mtime == 1_000_000  # not restarted


def test_the_api_token_file_is_kept_and_shared_with_the_status_group(make_status):
    status = make_status(status_group="daemon")
    etc = status.config.etc_dir
    path = etc / "status-token"
    token = status.api_token()
    daemon_gid = grp.getgrnam("daemon").gr_gid
    assert len(token) >= 32
    assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o640, daemon_gid)
    assert (stat.S_IMODE(etc.stat().st_mode), etc.stat().st_gid) == (0o710, daemon_gid)
    here = "{}:{}".format(*status.server.tcp_address)
    assert status.http("GET", "/api/status", {"Host": here})[0] == 200
    status.stop()

    again = make_status(status_group="daemon")
    assert again.api_token() == token  # scripts keep working across restarts
    again.stop()

    path.write_text("short\n")
    path.chmod(0o644)
    third = make_status()
    assert third.api_token() not in (token, "short")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    third.stop()

    path.unlink()
    elsewhere = etc.parent / "elsewhere"
    elsewhere.write_text("x" * 40 + "\n")
    path.symlink_to(elsewhere)  # never followed: replaced by a file of keter's
    fourth = make_status()
    assert not path.is_symlink() and fourth.api_token() != "x" * 40
    assert elsewhere.read_text() == "x" * 40 + "\n"


@given(st.text(max_size=80))
def test_a_login_header_is_accepted_only_when_exactly_right(header: str):
    config = KeterConfig(root=Path("/nonexistent"), dashboard_users=(("ops", "pw"),))
    checks = RequestChecks(config)
    checks.api_token = "t" * 43
    accepted = {basic("ops", "pw"), "Bearer " + "t" * 43}

    def normalized(text: str) -> str:
        scheme, _, rest = " ".join(text.split()).partition(" ")
        return f"{scheme.lower()} {rest}"

    try:
        checks.check_login(header)
    except StatusApiError as exc:
        assert exc.status == 401
        assert exc.headers["WWW-Authenticate"].startswith("Basic ")
    else:  # nothing but the right credentials gets in
        assert normalized(header) in {normalized(a) for a in accepted}
    for good in accepted:
        checks.check_login(good)


def test_pages_carry_the_token_and_strict_headers(make_status):
    status = make_status()
    here = "{}:{}".format(*status.server.tcp_address)
    code, headers, body = status.http("GET", "/", {"Host": here})
    assert code == 200
    assert f'content="{status.server.token}"' in body.decode()
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    for path in ("/app/hello", "/static/dashboard.js", "/static/style.css"):
        assert status.http("GET", path, {"Host": here})[0] == 200, path
    assert status.http("GET", "/static/../status.py", {"Host": here})[0] == 404
    assert status.http("GET", "/nothing", {"Host": here})[0] == 404


def test_socket_is_0660_for_root_or_the_status_group(make_status):
    stale = make_status().config.root / "run" / "keter.sock"
    assert stat.S_ISSOCK(stale.stat().st_mode)
    status = make_status(status_group="daemon")  # the first one's socket is replaced
    info = status.server.socket_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("daemon").gr_gid
    status.stop()
    assert not status.server.socket_path.exists()


# -- metrics -----------------------------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_deploys_restarts_and_health_check_failures(make_status):
    status = make_status()
    status.tell_and_wait(
        AppChanged(snapshot=snapshot()),
        finished(outcome="serving", duration=0.4),
        finished(
            outcome="failed",
            reason="did not answer on port 4002 within 1s (last: HTTP 500)",
            kind=FailureKind.HEALTH_CHECK,
        ),
        finished(
            outcome="failed",
            reason="exited with status 3 before answering",
            kind=FailureKind.EXITED,
        ),
        finished(outcome="superseded", reason="superseded by a newer bundle"),
        AppChanged(snapshot=snapshot(state="backoff", restarts=1)),
        AppChanged(snapshot=snapshot(state="running", restarts=2)),
        AppChanged(snapshot=snapshot(app="other", state="failed", version=None)),
    )
    here = "{}:{}".format(*status.server.tcp_address)
    code, headers, body = status.http("GET", "/metrics", {"Host": here})
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    samples = metric_samples(body.decode())
    assert samples[("keter_app_up", (("app", "hello"),))] == 1
    assert samples[("keter_app_up", (("app", "other"),))] == 0
    for outcome, count in [("serving", 1), ("failed", 2), ("superseded", 1)]:
        key = ("keter_deploys_total", (("app", "hello"), ("outcome", outcome)))
        assert samples[key] == count
    assert samples[("keter_deploy_duration_seconds_count", ())] == 1
    assert samples[("keter_deploy_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("keter_restarts_total", (("app", "hello"),))] == 2
    assert samples[("keter_health_check_failures_total", (("app", "hello"),))] == 1

    status.tell_and_wait(AppGone(app="other"), AppGone(app="hello"))
    _, _, body = status.http("GET", "/metrics", {"Host": here})
    assert ("keter_app_up", (("app", "other"),)) not in metric_samples(body.decode())
    # A gone app's series all go: the series stay as many as the apps.
    assert not [key for key in metric_samples(body.decode()) if ("app", "hello") in key[1]]


def test_refused_files_under_names_no_app_has_make_no_series_of_their_own(make_status):
    # 1,500 junk files dropped and deleted were 3,000 series in every scrape until keter
    # stopped; a refused upload of an app that runs is still that app's failed deploy.
    status = make_status()
    junk = [
        finished(app=f"junk{i}", outcome="failed", reason="not gzip", kind=FailureKind.UNPACK)
        for i in range(50)
    ]
    status.tell_and_wait(
        AppChanged(snapshot=snapshot()),
        *junk,
        *junk,  # a name the history knows has no app either
        finished(outcome="failed", reason="not gzip", kind=FailureKind.UNPACK),
    )
    here = "{}:{}".format(*status.server.tcp_address)
    _, _, body = status.http("GET", "/metrics", {"Host": here})
    samples = metric_samples(body.decode())
    assert not [key for key in samples if ("app", "junk0") in key[1]]
    assert samples[("keter_refused_bundles_total", ())] == 100
    assert samples[("keter_deploys_total", (("app", "hello"), ("outcome", "failed")))] == 1
    assert len(status.server.board.history.entries("junk0")) == 2  # the history keeps them


# -- inside a real keter -----------------------------------------------------------------------


def test_a_real_keter_reports_its_apps_and_keeps_history_across_restarts(
    keter, private_nginx, tmp_path
):
    client = status_api(keter)
    bundle = make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1"))
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    keter.drop(bundle)
    app = wait_for(
        lambda: next((a for a in client.status()["apps"] if a["state"] == "running"), None),
        20,
        "hello to run",
    )
    assert app["name"] == "hello" and app["version"] == sha[:12]
    assert app["urls"] == [f"http://hello.test:{private_nginx.port}/"]
    low, high = keter.settings["port-range"]
    assert low <= app["port"] <= high
    assert [p.pid for p in keter.children() if p.pid == app["pid"]]
    [entry] = client.app("hello")["history"]
    assert (entry["outcome"], entry["sha256"]) == ("serving", sha)
    assert (keter.root / "archive" / "hello" / f"{sha}.keter").read_bytes() == bundle.read_bytes()
    metrics = metric_samples(client.text("/metrics"))
    assert metrics[("keter_app_up", (("app", "hello"),))] == 1

    assert keter.stop() == 0
    assert not (keter.root / "run" / "keter.sock").exists()
    keter.start()
    client = status_api(keter)
    # Before the app is back, its history is there; then the redeploy adds to it.
    history = wait_for(
        lambda: len(client.app("hello")["history"]) == 2 and client.app("hello")["history"],
        20,
        "the redeploy after the restart",
    )
    assert [h["seq"] for h in history] == [2, 1]
    assert history[1]["sha256"] == sha


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def tcp_get(port: int, path: str, headers: dict) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_status_api_on_tcp_needs_a_login_and_a_host_it_knows(keter_factory, tmp_path):
    """Issue 11.6, of record: 401 without credentials, 421 for a foreign Host on 0.0.0.0."""
    port = free_port()
    keter = keter_factory(
        **{
            "status-listen": f"0.0.0.0:{port}",
            "dashboard-users": {"ops": "pa55word"},
            "status-hosts": ["keter.lan"],
        }
    )
    client = status_api(keter)  # the CLI's socket needs no login
    keter.drop(make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1")))
    wait_for(lambda: client.status()["apps"], 20, "hello to show")
    here = {"Host": f"127.0.0.1:{port}"}
    for path in ("/", "/api/status", "/api/token", "/metrics", "/static/dashboard.js"):
        code, headers, body = tcp_get(port, path, here)
        assert code == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic ")
        assert b"hello" not in body
    assert tcp_get(port, "/api/status", {**here, "Authorization": basic("ops", "wrong")})[0] == 401
    assert tcp_get(port, "/api/status", {**here, "Authorization": "Bearer " + "x" * 43})[0] == 401

    login = {"Authorization": basic("ops", "pa55word")}
    code, _, body = tcp_get(port, "/api/status", {**here, **login})
    assert code == 200 and json.loads(body)["apps"][0]["name"] == "hello"
    token = (keter.root / "etc" / "status-token").read_text().strip()
    assert tcp_get(port, "/metrics", {**here, "Authorization": f"Bearer {token}"})[0] == 200
    listed = {"Host": f"keter.lan:{port}", "Authorization": basic("ops", "pa55word")}
    assert tcp_get(port, "/api/status", listed)[0] == 200

    # Listening on every address, only the names the operator listed are answered.
    for foreign in ("evil.example", f"evil.example:{port}", "192.0.2.1", "keter.lan.evil.example"):
        code, _, body = tcp_get(
            port, "/api/status", {"Host": foreign, "Authorization": basic("ops", "pa55word")}
        )
        assert code == 421, foreign
        assert b"hello" not in body
    assert tcp_get(port, "/api/status", {"Host": f"evil.example:{port}"})[0] == 421


def test_a_non_loopback_status_listener_without_users_stops_keter_at_start(keter_factory):
    keter = keter_factory(start=False, **{"status-listen": f"0.0.0.0:{free_port()}"})
    keter.start(wait_ready=False)
    assert keter.proc.wait(20) == 2
    assert "status-listen: 0.0.0.0 is not a loopback address" in keter.log()
    assert "set dashboard-users" in keter.log()
    assert not (keter.root / "run" / "keter.sock").exists()


def test_a_status_port_another_program_holds_stops_keter_at_start_in_one_line(
    keter_factory, tmp_path
):
    """keter had started every component (and with bundles in incoming/, their apps), then
    the status component failed six times with a traceback each before keter gave up."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        keter = keter_factory(start=False, **{"status-listen": f"127.0.0.1:{port}"})
        keter.incoming.mkdir(parents=True, exist_ok=True)
        make_bundle(keter.incoming / "hello.keter", config=webapp_config("hello.test", "v1"))
        keter.start(wait_ready=False)
        assert keter.proc.wait(20) == 1
    log = keter.log()
    assert f"keter: cannot serve the status API: status-listen 127.0.0.1:{port}" in log
    assert "Traceback" not in log and "CRITICAL" not in log
    assert "hello" not in log  # no app was started
    assert not (keter.root / "run" / "keter.sock").exists()


# -- the dashboard through nginx at dashboard-host -------------------------------------------


def through_nginx(nginx, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Host": "dash.test", "Connection": "close"}
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    connection = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_dashboard_host_is_served_by_nginx_behind_basic_auth(
    keter_factory, private_nginx, tmp_path
):
    keter = keter_factory(
        **{
            "status-listen": f"127.0.0.1:{free_port()}",
            "dashboard-host": "dash.test",
            "dashboard-users": {"admin": "s3cret"},
        }
    )
    keter.drop(make_bundle(tmp_path / "shown.keter", config=webapp_config("shown.test", "v1")))
    wait_for(
        lambda: through_nginx(private_nginx, "/", ("admin", "s3cret"))[0] == 200,
        20,
        "the dashboard through nginx",
    )
    private_nginx.wait_settled()
    status, page = through_nginx(private_nginx, "/", ("admin", "s3cret"))
    assert status == 200 and b"<title>keter</title>" in page
    assert through_nginx(private_nginx, "/")[0] == 401
    assert through_nginx(private_nginx, "/", ("admin", "wrong"))[0] == 401
    wait_for(
        lambda: (
            "shown" in through_nginx(private_nginx, "/api/status", ("admin", "s3cret"))[1].decode()
        ),
        20,
        "the API through nginx to list the app",
    )
    # The password is stored hashed, never as given.
    assert b"s3cret" not in b"".join(
        p.read_bytes() for p in private_nginx.config_file.parent.rglob("*") if p.is_file()
    )

    # No bundle may claim the dashboard's host.
    keter.drop(make_bundle(tmp_path / "squat.keter", config=webapp_config("dash.test", "v1")))
    wait_for(lambda: "squat: deploy #" in keter.log() and "dashboard-host" in keter.log(), 20)
    assert through_nginx(private_nginx, "/", ("admin", "s3cret"))[0] == 200


def test_a_huge_bad_config_leaves_small_traces(keter, tmp_path):
    """Issue 10.5, of record: a 195 KiB config once left a 4 MiB reason in history.json,
    the events feed and the log. Now each keeps a few KiB."""
    client = status_api(keter)
    stanza = "  - {type: webapp, exec: 5, host: 'bad host %d', port: x, env: [1, 2, 3]}\n"
    config = "stanzas:\n" + "".join(stanza % i for i in range(2800))
    assert len(config) > 195 * 1024
    bundle = make_bundle(tmp_path / "big.keter", config=config)
    log_before = len(keter.log())
    keter.drop(bundle)
    [entry] = wait_for(lambda: client.app("big")["history"], 20, "the refusal")
    assert entry["outcome"] == "failed"
    assert len(entry["reason"]) < 2200
    [event] = [e for e in client.status()["events"] if e["app"] == "big"]
    assert len(event["text"]) < 2300
    history = keter.root / "etc" / "history.json"
    wait_for(history.exists, 5, "the history file")  # written soon after the deploy
    assert history.stat().st_size < 8 * 1024
    lines = keter.log()[log_before:].splitlines()
    assert lines and max(len(line) for line in lines) < 8 * 1024  # and keter's own log


# -- clients that do not play by the rules -------------------------------------------------


def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, then read until keter closes the connection."""
    with socket.create_connection(address, timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def test_a_request_head_past_its_bound_is_refused_before_any_login(make_status):
    status = make_status()
    head = b"GET /api/status HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 1000 + b"\r\n"
    # No login, and headers that never end: keter stops reading at 16 KiB.
    answer = raw_exchange(status.server.tcp_address, head * 20)
    assert answer.split(b"\r\n")[0].split(b" ")[1] == b"431", answer[:100]
    assert status.http("GET", "/api/status")[0] == 200


def test_a_client_that_sends_its_request_slowly_is_let_go(make_status, monkeypatch):
    monkeypatch.setattr(handler, "READ_SECONDS", 0.5)
    status = make_status()
    with socket.create_connection(status.server.tcp_address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /api/status HTTP/1.1\r\n")
        # A header byte now and then, each well within a read's timeout: the whole
        # request still has READ_SECONDS.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while not select.select([sock], [], [], 0.1)[0]:
                sock.sendall(b"X")
                assert time.monotonic() - started < 5, "keter kept waiting for the request"
        assert sock.recv(100) == b""  # closed, nothing answered to a request never sent


def closed(sock: socket.socket) -> bool:
    """Whether keter closed this connection (without an answer)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


def hold_every_slot(status, head: bytes) -> list[socket.socket]:
    """As many TCP connections as keter serves at once, each sending ``head`` and no
    more, once each has its thread."""
    process = psutil.Process()
    before = process.num_threads()
    bound = servers.MAX_CONNECTIONS[True]
    held = [socket.create_connection(status.server.tcp_address, timeout=10) for _ in range(bound)]
    for sock in held:
        sock.sendall(head)
    wait_for(lambda: process.num_threads() >= before + bound, 10, "a thread per connection")
    return held


def test_connections_past_the_bound_take_the_slots_of_the_longest_stalled_ones(make_status):
    status = make_status()
    threads = psutil.Process().num_threads()
    held = hold_every_slot(status, b"GET /api/sta")
    extra = []
    try:
        # Each newcomer closes a connection that has waited longer for its head, in the
        # order their threads began waiting (not quite the order they connected).
        for _ in range(20):
            extra.append(socket.create_connection(status.server.tcp_address, timeout=10))
            extra[-1].sendall(b"GET /api/sta")
        wait_for(lambda: sum(map(closed, held)) == 20, 10, "20 held connections closed")
        assert not any(map(closed, extra))
        assert psutil.Process().num_threads() < threads + len(held) + 5
    finally:
        for sock in held + extra:
            sock.close()
    # The slots come back as the held connections end.
    wait_for(lambda: status.http("GET", "/api/status")[0] == 200, 10, "the API again")


SLOW_BODY = (
    b"POST /api/apps/x/restart HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60000\r\n\r\nA"
)


def test_a_connection_closed_to_make_room_is_shut_down_under_the_lock_keep_takes():
    # Shut down after the lock was let go, a connection whose request was let in
    # (keep) in between was cut mid-answer.
    server = servers._Bounded()
    held = []

    class Connection:
        def shutdown(self, how: int) -> None:
            held.append(server._awaiting_lock.locked())

    server.may_close(Connection())
    assert server._close_longest_waiting()
    assert held == [True]
    assert not server._close_longest_waiting()  # it waits no more


@pytest.mark.parametrize("sent", [b"", SLOW_BODY], ids=["nothing", "a body byte by byte"])
def test_clients_that_do_not_log_in_cannot_lock_out_one_that_does(make_status, sent):
    # Anyone who reaches the port, before any login, held every slot with connections
    # that sent nothing (reconnecting as keter let them go), and then with a POST's head
    # and one byte of its body (keter read the body before it checked the login, and
    # such a connection was never closed for another): the CLI, the dashboard and the
    # metrics scraper were closed at once, every time.
    status = make_status()
    held = hold_every_slot(status, sent)
    try:
        for _ in range(3):
            assert status.http("GET", "/api/status")[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_a_restart_answered_busy_is_not_carried_out_later(make_status, monkeypatch):
    # "503 try again", and the queued restart ran once the actor was free all the same:
    # the retry the answer asked for redeployed twice.
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot("first")), AppChanged(snapshot=snapshot()))
    drop_bundle(status.config, "first", b"v1")
    drop_bundle(status.config, "hello", b"v1")
    bundle = status.config.incoming_dir / "hello.keter"
    os.utime(bundle, (1_000_000, 1_000_000))
    monkeypatch.setattr(component, "COMMAND_TIMEOUT", 0.5)
    entered, free = threading.Event(), threading.Event()
    hashing = redeploy.incoming_sha256

    def held(incoming, app, **options):
        if app == "first":
            entered.set()
            free.wait(30)  # the actor busy (a large bundle hashed, a slow disk)
        return hashing(incoming, app, **options)

    monkeypatch.setattr(redeploy, "incoming_sha256", held)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(status.client.restart, "first")
        assert entered.wait(10)
        with pytest.raises(ApiError) as busy:
            status.client.restart("hello")
        assert busy.value.status == 503 and "nothing was done" in str(busy.value)
        free.set()
        assert first.result(timeout=10)["app"] == "first"  # begun: answered, not refused
    status.tell_and_wait()
    assert bundle.stat().st_mtime == 1_000_000


def test_a_refused_request_with_a_large_body_gets_its_refusal(make_status) -> None:
    # A script with a stale token sending its settings was told to shrink its body (413,
    # "larger than 65536 bytes"), when it needed to log in (401) or name keter (421).
    status = make_status()
    body = json.dumps({"set": {"BIG": "x" * 100_000}}).encode()
    stale = {"Authorization": "Bearer stale"}
    code, headers, _ = status.http("POST", "/api/apps/x/env", stale, body, login=False)
    assert code == 401 and "WWW-Authenticate" in headers
    assert status.http("POST", "/api/apps/x/env", {"Host": "evil.example"}, body)[0] == 421
    assert status.http("POST", "/api/apps/x/env", stale, b"{}", login=False)[0] == 401


def test_credentials_that_are_not_ascii_are_refused_not_a_failure(make_status, caplog):
    # base64 of a non-ASCII text raised past the login check: a 500 and a traceback
    # in keter's log at each request, for anyone who reaches the port.
    status = make_status()
    for credentials in ("Basic \xe9\xe9", "Bearer \xe9\xe9", "Basic w6k6w6k="):
        code, headers, _ = status.http("GET", "/api/status", {"Authorization": credentials})
        assert code == 401, credentials
        assert "WWW-Authenticate" in headers
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_body_nested_too_deep_is_not_json_not_a_failure(make_status, caplog):
    # json.loads raised RecursionError: a 500 and a traceback in keter's log at each
    # request, for any API user.
    status = make_status()
    host, port = status.server.tcp_address
    writes = {"Host": f"{host}:{port}", "X-Keter-Token": status.server.token}
    deep = b"[" * 100_000 + b"]" * 100_000
    code, _, body = status.http("POST", "/api/apps/hello/env", writes, deep)
    assert code == 400 and b"not JSON" in body
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_client_that_hangs_up_early_leaves_no_trace_in_keters_output(make_status, capfd):
    status = make_status()
    for _ in range(10):
        with socket.create_connection(status.server.tcp_address, timeout=10) as sock:
            sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert status.http("GET", "/api/status")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_long_poll_whose_client_hung_up_leaves_no_error(make_status, caplog):
    # Its answer's write failed into the handler's catch-all: an ERROR and a traceback
    # for every waiting `keter deploy` cut short with Ctrl-C.
    status = make_status()
    server = next(each for each in status.server.listeners._servers if each.tcp)
    free = server.long_polls._value
    host, port = status.server.tcp_address
    request = (
        f"GET /api/apps/hello/history?after=0&wait=1.5 HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {status.api_token()}\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request.encode())
        wait_for(lambda: server.long_polls._value < free, 5, "the long poll")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: server.long_polls._value == free, 5, "the poll's end")
    assert status.http("GET", "/api/status")[0] == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_burst_of_cli_clients_is_served_not_turned_away(make_status):
    status = make_status()
    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        answers = list(pool.map(lambda _: status.client.status(), range(60)))
    assert all("apps" in answer for answer in answers)


def long_polls_waiting(status) -> int:
    """How many history requests wait for a new entry now."""
    return len(status.server.board.cond._waiters)


def accept_queue(address: tuple[str, int]) -> int:
    """How many connections wait in the queue of the TCP listener at ``address``."""
    host, port = address
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"  # as the kernel shows it
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN: rx_queue is the accept queue
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener at {address}")


def test_a_client_past_every_slot_held_by_long_polls_waits_its_turn_not_closed(
    make_status, monkeypatch
):
    # A newcomer with no connection to close for it was accepted and closed at once:
    # behind 256 long polls (waiting `keter deploy`s) `keter restart` failed, exit 1.
    monkeypatch.setitem(servers.MAX_CONNECTIONS, True, 4)
    monkeypatch.setitem(servers.MAX_LONG_POLLS, True, 4)
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    seq = status.client.status()["history_seq"]
    poll = f"/api/apps/hello/history?after={seq}&wait=20"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        polls = [pool.submit(status.http, "GET", poll) for _ in range(4)]
        wait_for(lambda: long_polls_waiting(status) == 4, 10, "4 long polls holding every slot")
        token = status.api_token()
        with socket.create_connection(status.server.tcp_address, timeout=10) as sock:
            sock.sendall(
                b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                + f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            wait_for(
                lambda: closed(sock) or accept_queue(status.server.tcp_address) == 1,
                10,
                "the newcomer queued",
            )
            assert not closed(sock)
            status.server.tell(finished(outcome="serving"))  # the long polls end
            assert all(poll.result(timeout=10)[0] == 200 for poll in polls)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.split(b" ")[1] == b"200", answer[:80]


def test_long_polls_take_their_share_of_the_slots_and_the_cli_finds_room(make_status, monkeypatch):
    # Long polls could take every slot, each for up to 30 s: `keter restart` waited behind
    # them until its own timeout.
    monkeypatch.setitem(servers.MAX_CONNECTIONS, False, 4)
    monkeypatch.setitem(servers.MAX_LONG_POLLS, False, 2)
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    seq = status.client.status()["history_seq"]
    drop_bundle(status.config, "hello", b"v1")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        polls = [pool.submit(status.client.history_after, "hello", seq, 20) for _ in range(4)]
        # Past their share, two are answered within SHORT_POLL: empty, nothing happened.
        wait_for(lambda: sum(poll.done() for poll in polls) == 2, 10, "two short polls")
        short = [poll for poll in polls if poll.done()]
        assert [poll.result() for poll in short] == [[], []]
        assert long_polls_waiting(status) == 2
        quick = KeterClient(status.config.root, timeout=5)
        assert quick.restart("hello")["version"] == hashlib.sha256(b"v1").hexdigest()[:12]
        status.server.tell(finished(outcome="serving"))
        long = [poll for poll in polls if poll not in short]
        assert [len(poll.result(timeout=10)) for poll in long] == [1, 1]


def test_post_heads_without_their_body_cannot_lock_out_the_cli_on_the_socket(
    make_status, monkeypatch
):
    # On the socket a request was let in once its head was read: a POST's head with
    # Content-Length 1000000 and no body held its slot 15 s, and 256 of them every slot.
    monkeypatch.setitem(servers.MAX_CONNECTIONS, False, 4)
    status = make_status()
    process = psutil.Process()
    before = process.num_threads()
    held = []
    try:
        for _ in range(4):
            held.append(socket.socket(socket.AF_UNIX))
            held[-1].connect(str(status.config.root / "run" / "keter.sock"))
            held[-1].sendall(
                b"POST /api/apps/x/env HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Length: 1000000\r\n\r\n"
            )
        wait_for(lambda: process.num_threads() >= before + 4, 10, "a thread per connection")
        quick = KeterClient(status.config.root, timeout=5)
        for _ in range(3):
            assert "apps" in quick.status()
    finally:
        for sock in held:
            sock.close()


def test_a_request_body_cut_short_is_refused_not_acted_on(make_status):
    # A body shorter than its Content-Length (its client gone, or its connection closed
    # for another) was taken as it came: a prefix that is JSON was acted on.
    status = make_status()
    status.tell_and_wait(AppChanged(snapshot=snapshot()))
    body = b'{"set": {"MODE": "1"}}'
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(status.config.root / "run" / "keter.sock"))
        sock.sendall(
            b"POST /api/apps/hello/env HTTP/1.1\r\nHost: localhost\r\n"
            + f"X-Keter-Token: {status.server.token}\r\n".encode()
            + f"Content-Length: {len(body) + 2}\r\n\r\n".encode()
            + body
        )
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(65536)
    assert answer.split(b" ")[1] == b"400", answer[:80]
    assert envstore.load(status.config.etc_dir, "hello") == {}


@pytest.mark.parametrize("named", ["", 5, ["x.dump"]])
def test_a_restore_names_a_backup_or_none_but_nothing_else(named) -> None:
    # An empty name restored the newest backup: a script's unset variable did it.
    with pytest.raises(StatusApiError) as refused:
        appops.restore(None, "app", {"backup": named})  # type: ignore[arg-type]
    assert refused.value.status == 400
