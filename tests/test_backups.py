"""The backups component on its own (keter.backups): how a dump fails, and that nothing
of a failed or killed dump is left behind. The successful paths run against real
PostgreSQL in tests/test_release_deploy.py."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

import keter.backups
from keter.backups import Backups, backup_name, list_backups
from keter.diskshare import DISK_RESERVE
from keter.messages import (
    BackupDatabase,
    BackupFailed,
    BackupKind,
    BackupTaken,
    DbInfo,
    RequestRefused,
    RestoreDatabase,
)


@pytest.fixture
def backups(tmp_path):
    reports: queue.Queue = queue.Queue()
    component = Backups(backups_dir=tmp_path / "backups", keep=2, timeout=1.0, report_to=reports)
    component.start()
    yield component, reports
    component.stop()
    component.join(10)
    assert not component.is_alive()


def db(port: int) -> DbInfo:
    return DbInfo(name="app_db", user="app_db", password="pw", host="127.0.0.1", port=port)


def request(port: int, deploy_id: int = 1) -> BackupDatabase:
    return BackupDatabase(
        app="app",
        deploy_id=deploy_id,
        db=db(port),
        user=None,
        kind=BackupKind.RELEASE,
        version="0123456789ab",
    )


def test_a_dump_that_cannot_connect_fails_with_pg_dumps_reason(backups, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="keter.backups")
    component, reports = backups
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once it is closed
    component.tell(request(port))
    failed = reports.get(timeout=20)
    assert isinstance(failed, BackupFailed) and failed.deploy_id == 1
    assert failed.reason.startswith("pg_dump exited with status 1: ")
    assert "connection" in failed.reason.lower()
    assert list((tmp_path / "backups" / "app").iterdir()) == []  # no half-written file
    # One ERROR for one failure: the supervisor's, which says what it meant for the deploy.
    mine = [r for r in caplog.records if r.name == "keter.backups" and "failed" in r.getMessage()]
    assert [r.levelno for r in mine] == [logging.INFO]


def test_a_dump_that_hangs_is_killed_at_backup_timeout(backups, tmp_path) -> None:
    component, reports = backups
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        component.tell(request(silent.getsockname()[1]))
        failed = reports.get(timeout=20)
    assert isinstance(failed, BackupFailed)
    assert failed.reason.startswith("pg_dump did not finish within 1s")
    assert list((tmp_path / "backups" / "app").iterdir()) == []


def test_a_restore_of_a_backup_that_does_not_exist_is_refused(backups) -> None:
    component, _ = backups
    restore = RestoreDatabase(app="app", db=db(1), user=None, backup="nope.dump", version="x")
    component.tell(restore)
    with pytest.raises(RequestRefused) as refused:
        restore.reply.result(timeout=10)
    assert refused.value.status == 404
    newest = RestoreDatabase(app="app", db=db(1), user=None, backup=None, version="x")
    component.tell(newest)
    with pytest.raises(RequestRefused) as none:
        newest.reply.result(timeout=10)
    assert "has no backup" in none.value.message


def test_a_dump_program_that_exits_0_without_a_dump_takes_no_backup(
    backups, tmp_path, monkeypatch
) -> None:
    # As pg_dump would after a process of the app took it over (ptrace) and made it exit.
    monkeypatch.setattr(keter.backups, "pg_program", lambda name: "/bin/true")
    component, reports = backups
    component.tell(request(1))
    failed = reports.get(timeout=20)
    assert isinstance(failed, BackupFailed)
    assert failed.reason == "pg_dump exited with status 0 but wrote no dump"
    assert list((tmp_path / "backups" / "app").iterdir()) == []


def test_a_failed_job_prunes_too(backups, tmp_path) -> None:
    # Failed restores each left a full safety dump, never pruned until a job succeeded:
    # a hostile app holding a lock made every restore fail, and each retry added one.
    component, reports = backups
    folder = tmp_path / "backups" / "app"
    folder.mkdir(parents=True)
    for n in range(5):
        (folder / backup_name(BackupKind.RESTORE, "0123456789ab", 100 + n)).write_text("x")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    component.tell(request(port))
    assert isinstance(reports.get(timeout=20), BackupFailed)
    assert len(list_backups(tmp_path / "backups", "app")) == 2  # backup-keep


def test_a_dump_that_would_fill_roots_disk_is_stopped(backups, tmp_path, monkeypatch) -> None:
    # A restore's SQL is about 1000 times its dump for compressible data: unbounded, it
    # had filled the disk every app shares. A dump is bounded alike.
    writer = tmp_path / "writer"
    writer.write_text("#!/bin/sh\nexec head -c 8388608 /dev/zero\n")
    writer.chmod(0o755)
    monkeypatch.setattr(keter.backups, "pg_program", lambda name: str(writer))
    small_disk(monkeypatch, tmp_path / "backups", 1 << 20)
    component, reports = backups
    component.tell(request(1))
    failed = reports.get(timeout=20)
    assert isinstance(failed, BackupFailed)
    assert failed.reason == (
        "pg_dump stopped: it would have left less than 256 MiB free on ROOT's disk"
    )
    assert list((tmp_path / "backups" / "app").iterdir()) == []


def small_disk(monkeypatch, folder: Path, spare: int) -> None:
    """``folder``'s disk has ``spare`` bytes above the reserve, less what is written in it."""
    real = os.statvfs

    def statvfs(path):
        if not Path(path).is_relative_to(folder):
            return real(path)
        written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return SimpleNamespace(f_bavail=DISK_RESERVE + spare - written, f_frsize=1)

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_dumps_of_apps_side_by_side_together_leave_the_reserve_free(tmp_path, monkeypatch) -> None:
    # Each dump was bounded by all that was free when it started: dumps of several apps
    # together could fill the disk (three left 0 bytes free and failed with ENOSPC).
    ready = tmp_path / "ready"
    ready.mkdir()
    writer = tmp_path / "writer"
    writer.write_text(
        "#!/bin/sh\n"
        f": > {ready}/$$\n"
        f'while set -- {ready}/*; [ "$#" -lt 3 ]; do :; done  # all three bounded first\n'
        "printf PGDMP; exec head -c 8388603 /dev/zero\n"  # 8 MiB of a dump
    )
    writer.chmod(0o755)
    monkeypatch.setattr(keter.backups, "pg_program", lambda name: str(writer))
    small_disk(monkeypatch, tmp_path / "backups", 12 << 20)  # room for one of them
    reports: queue.Queue = queue.Queue()
    component = Backups(backups_dir=tmp_path / "backups", keep=2, timeout=30, report_to=reports)
    component.start()
    try:
        for app in ("a", "b", "c"):
            component.tell(dataclasses.replace(request(1), app=app))
        ends = [reports.get(timeout=30) for _ in range(3)]
        # Two do not fit: one may be taken with the room the others gave back as they failed.
        taken = [end for end in ends if isinstance(end, BackupTaken)]
        assert len(taken) <= 1, ends
        shared = r"pg_dump stopped: it and [12] other backups? or restores? writing beside it"
        for end in ends:
            if isinstance(end, BackupFailed):
                assert re.fullmatch(
                    shared + r" would have left less than 256 MiB free on ROOT's disk", end.reason
                )
        # What they wrote is given back: one dump alone has all the room there is.
        for end in taken:
            (tmp_path / "backups" / end.app / end.backup.name).unlink()
        (ready / "d").touch()
        (ready / "e").touch()
        component.tell(dataclasses.replace(request(1), app="d"))
        assert isinstance(reports.get(timeout=30), BackupTaken)
    finally:
        component.stop()
        component.join(10)
