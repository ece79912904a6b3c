"""The supervisor's release decisions (keter.release), thread-free with fake components.

BACKING_UP and RELEASING between provisioning and starting; a failed backup or
release fails only that deploy; a running release is finished, never cut
short, by a newer bundle or the bundle's removal; operators' database requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from support.supervisor import Rig, assert_kept_serving, make_rig, webapp

from keter.bundle import BundleConfig, Release
from keter.deploys import Stage
from keter.messages import (
    BackupDatabase,
    BackupFailed,
    BackupInfo,
    BackupKind,
    BackupTaken,
    BundleArrived,
    BundleRemoved,
    Component,
    ComponentFailed,
    DatabaseReady,
    DatabaseRequest,
    DbAction,
    DbInfo,
    FailureKind,
    Outcome,
    PointServices,
    ProvisionDatabase,
    RemoveFolder,
    RequestRefused,
    RestoreDatabase,
    RunFinished,
    RunOnce,
    ServicesPointed,
    StartProcess,
    StopProcess,
    UnpackBundle,
)

DB = DbInfo(name="a_db", user="a_db", password="s3cret", host="127.0.0.1", port=5432)
SHA = "cd" * 32


def released(rig: Rig, *, postgres: bool = False, timeout: float = 5.0) -> BundleConfig:
    release = Release(exec=rig.tmp / "bin/migrate", args=("up",), timeout=timeout)
    return dataclasses.replace(webapp(rig.tmp, release=release), postgres=postgres)


def to_backup(rig: Rig, config: BundleConfig | None = None, sha: str = SHA) -> BackupDatabase:
    """Play a deploy of ``config`` (default: a release and a database) up to its backup."""
    unpack = rig.arrive("a")
    rig.unpacked(unpack, config or released(rig, postgres=True), sha)
    provision = rig.postgres.one(ProvisionDatabase)
    rig.send(DatabaseReady(app="a", deploy_id=provision.deploy_id, db=DB))
    return rig.backups.one(BackupDatabase)


def to_release(rig: Rig, config: BundleConfig, sha: str = SHA) -> RunOnce:
    """Play a deploy of ``config`` up to its release (with its backup if it has a database)."""
    if config.postgres:
        rig.send(taken(to_backup(rig, config, sha)))
    else:
        rig.unpacked(rig.arrive("a"), config, sha)
    return rig.monitor.one(RunOnce)


def taken(backup: BackupDatabase) -> BackupTaken:
    info = BackupInfo(
        app=backup.app,
        name=f"20250101T000000.000000Z-release-{backup.version}.dump",
        kind=backup.kind,
        version=backup.version,
        at=0.0,
        size=10,
    )
    return BackupTaken(app=backup.app, deploy_id=backup.deploy_id, backup=info)


def finished(run: RunOnce, returncode: int | None = 0, **fields) -> RunFinished:
    reason = f"exited with status {returncode}" if returncode is not None else "cannot run it"
    return RunFinished(
        app=run.app,
        deploy_id=run.deploy_id,
        returncode=returncode,
        reason=fields.pop("reason", reason),
        **fields,
    )


# -- the stages ---------------------------------------------------------------------------


def test_the_release_runs_before_any_web_app_starts(rig: Rig) -> None:
    settings = rig.sup.config.etc_dir / "env" / "a.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"API_KEY": "k-123"}))
    unpack = rig.arrive("a")
    rig.unpacked(unpack, released(rig), SHA)
    deploy = rig.sup.apps["a"].next
    assert deploy.stage is Stage.RELEASING
    run = rig.monitor.one(RunOnce)
    assert rig.monitor.take(StartProcess) == []
    assert run.spec.command == (str(rig.tmp / "bin/migrate"), "up")
    assert run.timeout == 5.0
    assert run.spec.cwd == deploy.folder
    assert run.spec.log_path == rig.sup.config.log_dir / "app-a.log"
    assert run.spec.port is None and run.spec.health is None
    # Exactly the web app's environment: its reserved port, its settings, its data folder.
    assert run.spec.env["API_KEY"] == "k-123"
    assert run.spec.env["KETER_DATA_DIR"] == str(rig.sup.config.data_dir / "a")
    assert run.spec.data_dir == rig.sup.config.data_dir / "a"

    rig.send(finished(run))
    start = rig.monitor.one(StartProcess)
    assert deploy.stage is Stage.STARTING
    assert start.spec.env == run.spec.env
    assert start.spec.port == int(run.spec.env["PORT"])
    rig.healthy(start)
    rig.nginx_ok()
    [done] = rig.finished()
    assert done.outcome is Outcome.SERVING


def test_a_database_is_backed_up_before_the_release(rig: Rig) -> None:
    backup = to_backup(rig)
    deploy = rig.sup.apps["a"].next
    assert deploy.stage is Stage.BACKING_UP
    assert (backup.kind, backup.version, backup.db, backup.deploy_id) == (
        BackupKind.RELEASE,
        SHA[:12],
        DB,
        deploy.id,
    )
    assert backup.user == rig.sup.config.setuid
    assert rig.monitor.take(RunOnce) == []  # not before the backup is written

    rig.send(taken(backup))
    assert deploy.stage is Stage.RELEASING
    assert deploy.backup.endswith(f"-release-{SHA[:12]}.dump")
    run = rig.monitor.one(RunOnce)
    assert run.spec.env["PGDATABASE"] == "a_db" and run.spec.env["PGPASSWORD"] == "s3cret"
    rig.send(finished(run))
    assert rig.monitor.one(StartProcess).spec.env["PGDATABASE"] == "a_db"


def test_without_a_release_nothing_is_backed_up(rig: Rig) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, dataclasses.replace(webapp(rig.tmp), postgres=True))
    provision = rig.postgres.one(ProvisionDatabase)
    rig.send(DatabaseReady(app="a", deploy_id=provision.deploy_id, db=DB))
    assert rig.backups.take() == []
    assert rig.monitor.take(RunOnce) == []
    rig.monitor.one(StartProcess)


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "fields", "words"),
    [
        (1, {}, "exited with status 1"),
        (-15, {"timed_out": True, "reason": "did not finish within 2s"}, "did not finish"),
        (None, {"reason": "cannot run bin/migrate: No such file"}, "cannot run"),
    ],
)
def test_a_failed_release_fails_the_deploy_and_nothing_switches(
    rig: Rig, serving: StartProcess, returncode, fields, words
) -> None:
    run = to_release(rig, released(rig))
    deploy = rig.sup.owners[run.deploy_id]
    held = deploy.ports_held
    tail = ("migrating", "ERROR: relation exists")
    rig.send(finished(run, returncode, output_tail=tail, **fields))
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.RELEASE)
    assert done.reason.startswith("release ") and "bin/migrate" in done.reason
    assert words in done.reason
    assert "ERROR: relation exists" in done.reason  # keter deploy prints the reason
    assert rig.monitor.take(StartProcess) == []
    assert rig.nginx.take() == []
    assert deploy.stage is Stage.ENDED
    assert rig.unpacker.one(RemoveFolder).path == deploy.folder
    assert not any(port in rig.sup.ports for port in held)  # released
    assert_kept_serving(rig, serving)


def test_a_failed_backup_fails_the_deploy_before_the_release(
    rig: Rig, serving: StartProcess
) -> None:
    backup = to_backup(rig)
    rig.send(BackupFailed(app="a", deploy_id=backup.deploy_id, reason="pg_dump exited 1"))
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.BACKUP)
    assert "pg_dump exited 1" in done.reason
    assert rig.monitor.take(RunOnce) == []
    assert_kept_serving(rig, serving)


def test_a_failed_backup_may_be_allowed(rig: Rig) -> None:
    rig.sup.config = dataclasses.replace(rig.sup.config, backup_required=False)
    backup = to_backup(rig)
    rig.send(BackupFailed(app="a", deploy_id=backup.deploy_id, reason="disk full"))
    assert rig.monitor.one(RunOnce).app == "a"


def test_bad_settings_fail_the_deploy(rig: Rig, serving: StartProcess) -> None:
    settings = rig.sup.config.etc_dir / "env" / "a.json"
    settings.parent.mkdir(parents=True)
    settings.write_text('{"SECRET": "hunter2", broken')
    unpack = rig.arrive("a")
    rig.unpacked(unpack, released(rig))
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.CONFIG)
    assert "is not JSON" in done.reason and "hunter2" not in done.reason
    assert "delete it and set the app's settings again" in done.reason  # the way out
    assert_kept_serving(rig, serving)


def test_database_settings_stored_before_the_app_had_one_are_named_as_overridden(
    rig: Rig, caplog
) -> None:
    """keter env refuses them for an app with a database; stored before it had one, they
    were overridden without a word and still listed as if they applied."""
    settings = rig.sup.config.etc_dir / "env" / "a.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"DATABASE_URL": "postgresql://elsewhere/db", "A": "1"}))
    with caplog.at_level(logging.WARNING, logger="keter.supervisor"):
        to_backup(rig)
    said = "a: keter env DATABASE_URL: overridden by the app's database (postgres: true)"
    assert any(record.getMessage().startswith(said) for record in caplog.records)
    assert "elsewhere" not in caplog.text


def test_keter_failing_during_a_release_stops_it(rig: Rig, serving: StartProcess) -> None:
    run = to_release(rig, released(rig))
    deploy = rig.sup.owners[run.deploy_id]
    failed = ComponentFailed(
        component=Component.PROCESSES, error="OSError: boom", app="a", deploy_id=run.deploy_id
    )
    rig.send(failed)
    assert run.deploy_id in [s.deploy_id for s in rig.monitor.take(StopProcess)]
    assert deploy.stage is Stage.RETIRING
    rig.send(finished(run, -15, reason="stopped on request (killed by SIGTERM)"))
    assert deploy.stage is Stage.ENDED
    assert rig.unpacker.one(RemoveFolder).path == deploy.folder
    [done] = rig.finished()
    assert done.kind is FailureKind.INTERNAL
    assert_kept_serving(rig, serving)


# -- what waits for a running release --------------------------------------------------------


def test_a_newer_bundle_waits_for_the_running_release(rig: Rig, serving: StartProcess) -> None:
    run = to_release(rig, released(rig))
    deploy = rig.sup.owners[run.deploy_id]
    rig.send(BundleArrived(app="a", path=rig.tmp / "a.keter", mtime_ns=2, size=1))
    rig.send(BundleArrived(app="a", path=rig.tmp / "a.keter", mtime_ns=3, size=1))
    assert rig.unpacker.take(UnpackBundle) == []  # the release is never cut short
    assert rig.monitor.take(StopProcess) == []
    assert rig.finished() == []

    rig.send(finished(run))
    # Its version is dropped without starting; the latest bundle deploys, release and all.
    assert rig.monitor.take(StartProcess) == []
    [done] = rig.finished()
    assert done.outcome is Outcome.SUPERSEDED
    assert deploy.stage is Stage.ENDED
    [unpack] = rig.unpacker.take(UnpackBundle)
    rig.unpacked(unpack, released(rig), "ef" * 32)
    assert rig.monitor.one(RunOnce).deploy_id != run.deploy_id
    assert_kept_serving(rig, serving)


def test_a_newer_bundle_after_a_failed_release_deploys(rig: Rig, serving: StartProcess) -> None:
    run = to_release(rig, released(rig))
    rig.send(BundleArrived(app="a", path=rig.tmp / "a.keter", mtime_ns=2, size=1))
    rig.send(finished(run, 1))
    [done] = rig.finished()
    assert done.outcome is Outcome.FAILED
    assert rig.unpacker.one(UnpackBundle).app == "a"


def test_a_newer_bundle_stops_a_backup_at_once(rig: Rig, serving: StartProcess) -> None:
    backup = to_backup(rig)
    assert backup.serving == "11" * 6  # its newest release backup is never pruned
    rig.send(BundleArrived(app="a", path=rig.tmp / "a.keter", mtime_ns=2, size=1))
    [done] = rig.finished()
    assert done.outcome is Outcome.SUPERSEDED  # a dump changes nothing: no need to wait
    newer = rig.unpacker.one(UnpackBundle)
    rig.send(taken(backup))  # the late reply is recognised as stale
    assert rig.monitor.take(RunOnce) == []
    assert rig.sup.apps["a"].next.id == newer.deploy_id


def test_removing_the_bundle_waits_for_the_running_release(rig: Rig, serving: StartProcess) -> None:
    run = to_release(rig, released(rig))
    rig.send(BundleRemoved(app="a"))
    assert rig.nginx.take() == [] and rig.monitor.take(StopProcess) == []
    rig.send(finished(run))
    assert rig.monitor.take(StartProcess) == []
    removal = rig.nginx_ok()
    assert removal.sites == ()
    rig.drain_over()
    [stop] = rig.monitor.take(StopProcess)
    assert stop.deploy_id == serving.deploy_id
    rig.stopped(stop)
    assert "a" not in rig.sup.apps


def test_in_kernel_mode_the_release_runs_before_the_stable_address_is_pointed(tmp_path) -> None:
    kernel = make_rig(tmp_path, kernel=True)
    first = to_release(kernel, released(kernel))
    kernel.send(finished(first))
    kernel.healthy(kernel.monitor.one(StartProcess))
    command = kernel.switch.one(PointServices)
    kernel.send(ServicesPointed(app="a", deploy_id=command.deploy_id))
    kernel.nginx_ok()
    assert kernel.sup.apps["a"].serving.id == command.deploy_id

    # The next version: nothing is pointed at it before its release has finished.
    run = to_release(kernel, released(kernel), "ef" * 32)
    kernel.send(BundleArrived(app="a", path=kernel.tmp / "a.keter", mtime_ns=5, size=1))
    assert kernel.switch.take(PointServices) == [] and kernel.unpacker.take(UnpackBundle) == []
    kernel.send(finished(run, 2))
    [done] = [d for d in kernel.finished() if d.outcome is Outcome.FAILED]
    assert done.kind is FailureKind.RELEASE
    assert kernel.switch.take(PointServices) == []
    assert kernel.unpacker.one(UnpackBundle).app == "a"  # the waiting bundle deploys now
    assert kernel.sup.apps["a"].serving.id == command.deploy_id


# -- operators' database requests ----------------------------------------------------------


def refusal(request: DatabaseRequest) -> RequestRefused:
    with pytest.raises(RequestRefused) as caught:
        request.reply.result(timeout=0)
    return caught.value


def test_database_requests_are_checked_then_handed_to_backups(rig: Rig) -> None:
    unknown = DatabaseRequest(action=DbAction.BACKUP, app="nope")
    rig.send(unknown)
    assert refusal(unknown).status == 404

    rig.deploy("b", webapp(rig.tmp, "b.test"))
    no_db = DatabaseRequest(action=DbAction.BACKUP, app="b")
    rig.send(no_db)
    assert refusal(no_db).status == 409 and "no database" in refusal(no_db).message

    run = to_release(rig, released(rig, postgres=True))
    rig.send(finished(run))
    rig.healthy(rig.monitor.one(StartProcess))
    rig.nginx_ok()
    backup = DatabaseRequest(action=DbAction.BACKUP, app="a")
    rig.send(backup)
    told = rig.backups.one(BackupDatabase)
    assert (told.kind, told.deploy_id, told.version, told.db) == (
        BackupKind.MANUAL,
        None,
        SHA[:12],
        DB,
    )
    assert told.reply is backup.reply

    restore = DatabaseRequest(action=DbAction.RESTORE, app="a", backup="x.dump")
    rig.send(restore)
    told = rig.backups.one(RestoreDatabase)
    assert (told.backup, told.version, told.reply) == ("x.dump", SHA[:12], restore.reply)

    # No restore while a deploy is under way: its backup and release would race it.
    to_release(rig, released(rig, postgres=True), "ef" * 32)
    busy = DatabaseRequest(action=DbAction.RESTORE, app="a")
    rig.send(busy)
    assert refusal(busy).status == 409 and "under way" in refusal(busy).message
    assert rig.backups.take(RestoreDatabase) == []
