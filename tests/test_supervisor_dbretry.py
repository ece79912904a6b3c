"""A deploy the database server was unavailable for, with nothing serving its app,
deploys again by itself (keter.supervisor.database), driven with scripted messages
and fake components.

The end to end case (keter restarted while PostgreSQL is down) is in
tests/test_faults_postgres.py.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from support.supervisor import Rig, assert_kept_serving, webapp

from keter.deploys import Stage
from keter.messages import (
    BundleArrived,
    BundleRemoved,
    DatabaseFailed,
    DatabaseReady,
    DbInfo,
    FailureKind,
    Outcome,
    ProvisionDatabase,
    ServeLastServed,
    StartProcess,
    UnpackBundle,
)
from keter.supervisor.database import DB_RETRY_FIRST, DB_RETRY_MAX

DB = DbInfo(name="a_x", user="a_x", password="pw", host="127.0.0.1", port=5432)


def db_config(rig: Rig):
    return replace(webapp(rig.tmp), postgres=True)


def provisioning(rig: Rig, unpack: UnpackBundle) -> ProvisionDatabase:
    rig.unpacked(unpack, db_config(rig))
    return rig.postgres.one(ProvisionDatabase)


def unavailable(rig: Rig, provision: ProvisionDatabase, *, unavailable: bool = True) -> None:
    reason = "database server unavailable for 30s: connection refused"
    rig.send(
        DatabaseFailed(
            app=provision.app,
            deploy_id=provision.deploy_id,
            reason=reason,
            unavailable=unavailable,
        )
    )


def later(rig: Rig, seconds: float) -> None:
    """``seconds`` pass: the timers due by then are sent."""
    rig.clock.now += seconds
    for timer in rig.sup.due_timers():
        rig.send(timer)


def test_a_first_deploy_the_database_server_was_down_for_deploys_again_with_backoff(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keter")
    first = rig.arrive("a")
    unavailable(rig, provisioning(rig, first))
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.DATABASE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "a: database server unavailable and nothing serves the app: its bundle deploys"
        f" again in {DB_RETRY_FIRST:g}s"
    ]

    delay = DB_RETRY_FIRST
    for _ in range(7):  # each failure doubles the wait, up to DB_RETRY_MAX
        later(rig, delay - 0.5)
        assert rig.unpacker.take(UnpackBundle) == []
        later(rig, 0.5)
        again = rig.unpacker.one(UnpackBundle)
        assert again.bundle == first.bundle and again.deploy_id != first.deploy_id
        unavailable(rig, provisioning(rig, again))
        delay = min(delay * 2, DB_RETRY_MAX)
    assert delay == DB_RETRY_MAX
    assert rig.sup.next_timer() == DB_RETRY_MAX

    # The server answers: the app deploys, and a later outage starts from the first delay.
    later(rig, DB_RETRY_MAX)
    provision = provisioning(rig, rig.unpacker.one(UnpackBundle))
    rig.send(DatabaseReady(app="a", deploy_id=provision.deploy_id, db=DB))
    start = rig.monitor.one(StartProcess)
    rig.healthy(start)
    rig.nginx_ok()
    assert rig.sup.apps["a"].serving.id == provision.deploy_id
    rig.send(BundleRemoved(app="a"))
    rig.nginx_ok()
    later(rig, rig.sup.config.drain_seconds)
    rig.stopped(*rig.monitor.take())
    unavailable(rig, provisioning(rig, rig.arrive("a")))
    assert rig.sup.next_timer() == DB_RETRY_FIRST


def test_a_refused_provisioning_is_not_retried(rig: Rig) -> None:
    unavailable(rig, provisioning(rig, rig.arrive("a")), unavailable=False)
    assert [d.outcome for d in rig.finished()] == [Outcome.FAILED]
    assert rig.sup.next_timer() is None


def test_with_a_version_serving_an_unavailable_server_fails_the_deploy_as_before(
    rig: Rig, serving: StartProcess
) -> None:
    # The old version serves on; a new one should not replace it at some later moment
    # nobody chose: the next upload (or keter restart) deploys it.
    unavailable(rig, provisioning(rig, rig.arrive("a")))
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.DATABASE)
    assert_kept_serving(rig, serving)
    assert rig.sup.next_timer() is None


def test_a_newer_bundle_cancels_the_retry(rig: Rig) -> None:
    unavailable(rig, provisioning(rig, rig.arrive("a")))
    newer = rig.arrive("a")
    provision = provisioning(rig, newer)
    later(rig, DB_RETRY_MAX)
    assert rig.unpacker.take(UnpackBundle) == []  # the newer one alone is on its way
    assert rig.sup.apps["a"].next.id == provision.deploy_id


def test_removing_the_bundle_cancels_the_retry(rig: Rig) -> None:
    unavailable(rig, provisioning(rig, rig.arrive("a")))
    rig.send(BundleRemoved(app="a"))
    later(rig, DB_RETRY_MAX)
    assert rig.unpacker.take(UnpackBundle) == []
    assert "a" not in rig.sup.apps


def test_after_a_restart_the_bundle_deploys_again_and_the_last_served_is_asked_for_once(
    rig: Rig,
) -> None:
    path = rig.tmp / "a.keter"
    rig.send(BundleArrived(app="a", path=path, mtime_ns=1, size=100, at_start=True))
    unavailable(rig, provisioning(rig, rig.unpacker.one(UnpackBundle)))
    assert len(rig.status.take(ServeLastServed)) == 1
    later(rig, DB_RETRY_FIRST)
    again = rig.unpacker.one(UnpackBundle)
    assert again.bundle == path
    assert rig.sup.apps["a"].next.at_start is False
    unavailable(rig, provisioning(rig, again))
    assert rig.status.take(ServeLastServed) == []  # once only
    assert rig.sup.apps["a"].next is None
    later(rig, 2 * DB_RETRY_FIRST)
    assert rig.sup.apps["a"].next.stage is Stage.UNPACKING
