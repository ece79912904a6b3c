"""A bundle refused for a host another app claims deploys by itself once that host is
free (keter.supervisor.conflicts), driven with scripted messages and fake components.

The end-to-end cases (a renamed bundle, a host moved between apps) are in
tests/test_deploy.py.
"""

from __future__ import annotations

from dataclasses import replace

from support.supervisor import Rig, webapp

from keter.bundle.model import PostgresServer
from keter.messages import (
    ApplyNginx,
    BundleArrived,
    BundleRemoved,
    FailureKind,
    NginxApplied,
    Outcome,
    ProcessFailed,
    ScanCompleted,
    ServeLastServed,
    StartProcess,
    UnpackBundle,
)

EXITED = FailureKind.EXITED


def refused(rig: Rig, app: str, *hosts: str) -> None:
    """``app`` arrives claiming ``hosts`` and is refused for one another app claims."""
    unpack = rig.arrive(app)
    rig.unpacked(unpack, on(rig, app, *hosts))
    [done] = rig.finished()
    assert (done.app, done.outcome, done.kind) == (app, Outcome.FAILED, FailureKind.CONFLICT)


def on(rig: Rig, app: str, *hosts: str):
    config = webapp(rig.tmp, hosts[0])
    return replace(config, app=app, webapps=(replace(config.webapps[0], hosts=hosts),))


def serve(rig: Rig, app: str, *hosts: str) -> None:
    rig.deploy(app, on(rig, app, *hosts))
    rig.finished()


def remove(rig: Rig, app: str) -> None:
    """``app``'s bundle goes; nginx no longer routes it (its hosts are released then)."""
    rig.send(BundleRemoved(app=app))
    apply = rig.nginx.one(ApplyNginx)
    rig.send(NginxApplied(generation=apply.generation))


def offered(rig: Rig) -> list[str]:
    return [unpack.app for unpack in rig.unpacker.take(UnpackBundle)]


def test_a_renamed_bundle_deploys_once_the_old_name_is_removed(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    refused(rig, "b", "x.test")  # a.keter renamed b.keter: b arrived first
    assert rig.sup.apps["b"].next is None
    remove(rig, "a")
    [unpack] = rig.unpacker.take(UnpackBundle)
    assert (unpack.app, unpack.bundle) == ("b", rig.tmp / "b.keter")
    rig.unpacked(unpack, on(rig, "b", "x.test"))
    rig.healthy(rig.monitor.one(StartProcess))
    rig.nginx_ok()
    assert [(f.app, f.outcome) for f in rig.finished()] == [("b", Outcome.SERVING)]


def test_a_host_let_go_by_a_new_version_goes_to_the_bundle_waiting_for_it(rig: Rig) -> None:
    serve(rig, "c", "y.test")
    refused(rig, "d", "y.test")
    unpack = rig.arrive("c")
    rig.unpacked(unpack, on(rig, "c", "z.test"))
    assert offered(rig) == []  # c's old version still serves y.test
    rig.healthy(rig.monitor.one(StartProcess))
    rig.nginx_ok()
    assert offered(rig) == ["d"]  # c's new version serves without y.test


def test_a_waiting_bundle_replaced_meanwhile_is_not_offered_again(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    refused(rig, "b", "x.test")
    serve(rig, "b", "w.test")  # the operator gave b a host of its own
    remove(rig, "a")
    assert offered(rig) == []
    assert not rig.sup._host_waits and not rig.sup._host_waiters


def test_a_waiting_bundle_removed_meanwhile_is_forgotten(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    refused(rig, "b", "x.test")
    rig.send(BundleRemoved(app="b"))
    assert "b" not in rig.sup.apps
    assert not rig.sup._host_waits and not rig.sup._host_waiters
    remove(rig, "a")
    assert offered(rig) == []


def test_two_bundles_waiting_for_one_host_first_come_first_served(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    refused(rig, "b", "x.test")
    refused(rig, "c", "x.test")
    remove(rig, "a")
    unpack_b, unpack_c = rig.unpacker.take(UnpackBundle)
    assert (unpack_b.app, unpack_c.app) == ("b", "c")
    rig.unpacked(unpack_b, on(rig, "b", "x.test"))
    rig.unpacked(unpack_c, on(rig, "c", "x.test"))
    [done] = rig.finished()
    assert done.app == "c" and done.reason == "host x.test is already served by app b"
    rig.healthy(rig.monitor.one(StartProcess))
    rig.nginx_ok()
    assert [(f.app, f.outcome) for f in rig.finished()] == [("b", Outcome.SERVING)]
    remove(rig, "b")
    assert offered(rig) == ["c"]  # c waited on b in turn


def test_a_bundle_waiting_on_several_hosts_waits_for_all(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    serve(rig, "c", "y.test")
    refused(rig, "d", "x.test", "y.test")
    remove(rig, "a")
    assert offered(rig) == []  # c still claims y.test
    remove(rig, "c")
    assert offered(rig) == ["d"]


def test_a_bundle_refused_for_more_than_a_host_does_not_wait(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    server = PostgresServer(host="db.example.com", port=5432)
    unpack = rig.arrive("b")
    rig.unpacked(unpack, replace(on(rig, "b", "x.test"), postgres=True, postgres_server=server))
    [done] = rig.finished()
    assert done.kind is FailureKind.CONFLICT  # said first, as before
    remove(rig, "a")
    assert offered(rig) == []  # its config must change anyway


def test_a_failed_deploy_lets_go_of_the_hosts_it_claimed(rig: Rig) -> None:
    serve(rig, "a", "x.test")
    unpack = rig.arrive("a")
    rig.unpacked(unpack, on(rig, "a", "x.test", "q.test"))  # a's next claims q.test
    refused(rig, "b", "q.test")
    start = rig.monitor.one(StartProcess)
    failed = ProcessFailed(app="a", deploy_id=start.deploy_id, reason="exited", kind=EXITED)
    rig.send(failed)
    assert offered(rig) == ["b"]


def test_after_a_restart_the_loser_of_a_host_waits_like_any_other(rig: Rig) -> None:
    """At start every bundle deploys afresh; two claiming one host: the first unpacked
    serves, the other waits for it and is offered again (no longer "at start")."""
    for app in ("a", "b"):
        path = rig.tmp / f"{app}.keter"
        rig.send(BundleArrived(app=app, path=path, mtime_ns=1, size=1, at_start=True))
    rig.send(ScanCompleted())
    unpack_a, unpack_b = rig.unpacker.take(UnpackBundle)
    rig.unpacked(unpack_a, on(rig, "a", "x.test"))
    rig.unpacked(unpack_b, on(rig, "b", "x.test"))
    assert rig.status.one(ServeLastServed).app == "b"  # as before: b served before keter started
    rig.healthy(rig.monitor.one(StartProcess))
    rig.nginx_ok()
    rig.finished()
    remove(rig, "a")
    assert offered(rig) == ["b"]
    assert rig.sup.apps["b"].next.at_start is False
