"""The supervisor's decisions, driven with scripted messages and fake components.

No threads, no processes, no nginx: every component is a ``FakeComponent`` that
records what it is told, and each test plays the components' replies. The
end-to-end tests (test_deploy.py and friends) show the same flows for real.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from support.supervisor import (
    SWITCH_ADDRESS,
    Rig,
    assert_kept_serving,
    fake_components,
    make_rig,
    static_only,
    webapp,
)

from keter.bundle import Background, BundleConfig
from keter.bundle.model import PostgresServer
from keter.config import KeterConfig
from keter.deploys import TRANSITIONS, Deploy, IllegalTransition, Stage
from keter.messages import (
    AppChanged,
    AppEvent,
    AppGone,
    ApplyNginx,
    AppState,
    BundleArrived,
    BundleIgnored,
    BundleRemoved,
    BundleUnpacked,
    Component,
    ComponentFailed,
    DatabaseFailed,
    DatabaseReady,
    DbInfo,
    DeployFinished,
    Drained,
    EventKind,
    FailureKind,
    GrantPorts,
    MoveProcess,
    NginxApplied,
    NginxFailed,
    Outcome,
    PointFailed,
    PointServices,
    ProcessFailed,
    ProcessPortTaken,
    ProcessState,
    ProcessStateChanged,
    ProcessStopped,
    ProvisionDatabase,
    ProxyApp,
    ReleaseServices,
    RemoveFolder,
    RevokePorts,
    RollBack,
    RollBackDone,
    ScanCompleted,
    ServicesPointed,
    ShutdownRequested,
    SiteRefused,
    StartProcess,
    StopProcess,
    SwitchMode,
    SwitchReady,
    UnpackBundle,
    UnpackFailed,
    VersionUnhealthy,
    WatchDrain,
    WatchVersion,
)
from keter.processes.ports import NoFreePort
from keter.supervisor import RESTART_LIMIT, Supervisor
from keter.supervisor.starting import MOVE_RETRY_MAX

# -- the table ---------------------------------------------------------------------------


def test_every_stage_is_reachable_and_ends() -> None:
    reachable, frontier = {Stage.UNPACKING}, [Stage.UNPACKING]
    while frontier:
        stage = frontier.pop()
        for old, new in TRANSITIONS:
            if old is stage and new not in reachable:
                reachable.add(new)
                frontier.append(new)
    assert reachable == set(Stage)
    assert not any(old is Stage.ENDED for old, _ in TRANSITIONS)
    assert all(TRANSITIONS.values())


def test_a_move_outside_the_table_is_refused(tmp_path) -> None:
    deploy = Deploy(id=1, app="a", bundle=tmp_path, bundle_mtime=0, folder=tmp_path)
    with pytest.raises(IllegalTransition):
        deploy.move(Stage.SERVING)
    assert deploy.stage is Stage.UNPACKING


# -- start-up ----------------------------------------------------------------------------


def test_nothing_deploys_before_nginx_took_the_first_config(tmp_path) -> None:
    """... and before the switch component said which mode it runs in."""
    config = KeterConfig(root=tmp_path / "root")
    parts, components = fake_components(switch=True, status=False)
    sup = Supervisor(config, components)
    sup.start()
    assert parts[Component.WATCHER].started == 0
    assert all(
        parts[c].started == 1
        for c in Component
        if c not in (Component.WATCHER, Component.STATUS, Component.STATS, Component.ACME)
    )
    first = parts[Component.NGINX].one(ApplyNginx)
    assert first.sites == ()
    sup.dispatch(NginxApplied(generation=first.generation))
    assert parts[Component.WATCHER].started == 0
    sup.dispatch(SwitchReady(mode=SwitchMode.KERNEL, address="127.9.9.9"))
    assert parts[Component.WATCHER].started == 1
    assert sup.switch_mode is SwitchMode.KERNEL


def test_a_restarted_keter_redeploys_what_incoming_holds(rig: Rig) -> None:
    """After a restart the watcher reports every bundle present; each deploys afresh."""
    unpacks = [rig.arrive(app) for app in ("a", "b")]
    rig.send(ScanCompleted())
    for unpack in unpacks:
        rig.unpacked(unpack, webapp(rig.tmp, f"{unpack.app}.test"))
    for start in rig.monitor.take(StartProcess):
        rig.healthy(start)
    rig.nginx_ok()  # a's switch
    rig.nginx_ok()  # b's, batched behind it
    assert [(f.app, f.outcome) for f in rig.finished()] == [
        ("a", Outcome.SERVING),
        ("b", Outcome.SERVING),
    ]


# -- the happy path --------------------------------------------------------------------------


def test_a_deploy_walks_every_stage_to_serving(rig: Rig) -> None:
    unpack = rig.arrive("a")
    assert unpack.dest == rig.sup.config.temp_dir / f"a-{unpack.deploy_id}"
    deploy = rig.sup.apps["a"].next
    assert deploy.stage is Stage.UNPACKING
    assert rig.snapshot("a").state is AppState.DEPLOYING

    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    assert deploy.stage is Stage.STARTING
    assert start.spec.env["PORT"] == str(start.spec.port)
    assert start.spec.health.host == "a.test"

    rig.healthy(start)
    assert deploy.stage is Stage.SWITCHING
    apply = rig.nginx.one(ApplyNginx)
    [site] = apply.sites
    assert site.routes[0].action == ProxyApp(port=start.spec.port)

    rig.send(NginxApplied(generation=apply.generation))
    assert deploy.stage is Stage.SERVING
    assert rig.sup.apps["a"].serving is deploy
    [done] = rig.finished()
    assert (done.outcome, done.kind, done.app) == (Outcome.SERVING, None, "a")
    assert rig.snapshot("a").state is AppState.RUNNING


def test_a_redeploy_retires_the_old_version_after_the_drain(rig: Rig) -> None:
    first = rig.deploy("a", webapp(rig.tmp), sha="11" * 32)
    second = rig.deploy("a", webapp(rig.tmp), sha="22" * 32)
    assert second.spec.port != first.spec.port
    old = rig.sup.owners[first.deploy_id]
    assert old.stage is Stage.DRAINING
    assert rig.monitor.take(StopProcess) == []  # not before drain-seconds (no switch to ask)
    rig.drain_over()
    [stop] = rig.monitor.take(StopProcess)
    assert (stop.deploy_id, stop.delay) == (first.deploy_id, 0)
    assert old.stage is Stage.RETIRING
    rig.stopped(stop)
    assert old.stage is Stage.ENDED
    assert rig.unpacker.one(RemoveFolder).path == old.folder
    assert first.spec.port not in rig.sup.ports  # released for later deploys


def test_a_database_deploy_provisions_before_starting(rig: Rig) -> None:
    unpack = rig.arrive("a")
    config = replace(webapp(rig.tmp), postgres=True)
    rig.unpacked(unpack, config)
    provision = rig.postgres.one(ProvisionDatabase)
    assert rig.monitor.take(StartProcess) == []
    db = DbInfo(name="a_x", user="a_x", password="secret", host="localhost", port=5432)
    rig.send(DatabaseReady(app="a", deploy_id=provision.deploy_id, db=db))
    start = rig.monitor.one(StartProcess)
    assert start.spec.env["PGDATABASE"] == "a_x"


def test_workers_start_once_the_version_serves_and_stop_with_it(rig: Rig) -> None:
    worker = Background(exec=rig.tmp / "bin/worker", restart_count=1)
    config = replace(webapp(rig.tmp), backgrounds=(worker,))
    unpack = rig.arrive("a")
    rig.unpacked(unpack, config)
    start = rig.monitor.one(StartProcess)
    rig.healthy(start)
    assert rig.monitor.take(StartProcess) == []  # not before it serves
    rig.nginx_ok()
    worker = rig.monitor.one(StartProcess)
    assert worker.spec.port is None and "PORT" not in worker.spec.env
    # Both run in the deploy's folder, as the app's user, into the app's log.
    config = rig.sup.config
    for spec in (start.spec, worker.spec):
        assert (spec.cwd, spec.log_path) == (unpack.dest, config.log_dir / "app-a.log")
        assert (spec.user, spec.data_dir) == (config.setuid, config.data_dir / "a")
    assert (start.spec.health is not None, worker.spec.health) == (True, None)

    # Crashing more often than restart-count stops it for good; the web app serves on.
    for _ in range(2):
        rig.send(
            ProcessStateChanged(app="a", deploy_id=worker.deploy_id, state=ProcessState.BACKOFF)
        )
    [stop] = rig.monitor.take(StopProcess)
    assert stop.deploy_id == worker.deploy_id
    rig.stopped(stop)
    assert rig.sup.apps["a"].serving.workers == {}
    # Its crashes are the app's restarts (a worker crash-looping showed 0).
    assert rig.sup.apps["a"].snapshot().restarts == 2


@pytest.mark.parametrize("kernel_mode", [False, True], ids=["reload", "kernel"])
def test_a_bundle_without_a_web_app_switches_through_nginx_at_once(
    tmp_path: Path, kernel_mode: bool
) -> None:
    rig = make_rig(tmp_path, kernel=kernel_mode)
    unpack = rig.arrive("docs")
    rig.unpacked(unpack, static_only(unpack.dest / "public"))
    assert rig.monitor.take(StartProcess) == []
    if rig.switch is not None:
        assert rig.switch.take(PointServices) == []  # no stable address: nothing to lead
    rig.nginx_ok()
    assert rig.sup.apps["docs"].serving.stage is Stage.SERVING


# -- superseding -------------------------------------------------------------------------------


def test_a_newer_bundle_supersedes_one_still_unpacking(rig: Rig) -> None:
    first = rig.arrive("a")
    second = rig.arrive("a")
    [done] = rig.finished()
    assert done.outcome is Outcome.SUPERSEDED
    # The late reply about the first is stale: its folder goes, nothing starts.
    rig.unpacked(first, webapp(rig.tmp))
    assert rig.unpacker.one(RemoveFolder).path == first.dest
    assert rig.monitor.take(StartProcess) == []
    rig.unpacked(second, webapp(rig.tmp))
    assert rig.monitor.one(StartProcess).deploy_id == second.deploy_id


def test_a_newer_bundle_supersedes_one_still_starting(rig: Rig) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    rig.arrive("a")
    [stop] = rig.monitor.take(StopProcess)
    assert (stop.deploy_id, stop.delay) == (start.deploy_id, 0)
    # Its late health report changes nothing.
    rig.healthy(start)
    assert rig.nginx.take(ApplyNginx) == []
    rig.stopped(stop)
    assert rig.unpacker.one(RemoveFolder).path == unpack.dest


def test_a_newer_bundle_waits_for_a_switch_in_flight(rig: Rig) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    rig.healthy(rig.monitor.one(StartProcess))
    apply = rig.nginx.one(ApplyNginx)
    rig.send(BundleArrived(app="a", path=rig.tmp / "a.keter", mtime_ns=2, size=1))
    assert rig.unpacker.take(UnpackBundle) == []  # nginx may route to it already
    rig.send(NginxApplied(generation=apply.generation))
    assert rig.sup.apps["a"].serving.id == unpack.deploy_id
    assert rig.unpacker.one(UnpackBundle).app == "a"  # now the waiting one begins


# -- removal ---------------------------------------------------------------------------------


def test_removing_a_bundle_unroutes_then_stops_the_app(rig: Rig) -> None:
    start = rig.deploy("a", webapp(rig.tmp))
    rig.send(BundleRemoved(app="a"))
    apply = rig.nginx.one(ApplyNginx)
    assert apply.sites == ()
    assert rig.monitor.take(StopProcess) == []  # nginx first
    rig.send(NginxApplied(generation=apply.generation))
    rig.drain_over()
    [stop] = rig.monitor.take(StopProcess)
    assert stop.deploy_id == start.deploy_id
    rig.stopped(stop)
    assert "a" not in rig.sup.apps
    assert any(isinstance(m, AppGone) and m.app == "a" for m in rig.status.told)


def test_removal_mid_switch_happens_after_the_switch(rig: Rig) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    rig.healthy(start)
    apply = rig.nginx.one(ApplyNginx)
    rig.send(BundleRemoved(app="a"))
    rig.send(NginxApplied(generation=apply.generation))
    # The switch finished; the removal is a new generation without the app.
    removal = rig.nginx.one(ApplyNginx)
    assert removal.sites == ()
    rig.send(NginxApplied(generation=removal.generation))
    rig.drain_over()
    [stop] = rig.monitor.take(StopProcess)
    rig.stopped(stop)
    assert "a" not in rig.sup.apps


def test_a_bundle_back_while_its_app_is_removed_deploys_once_the_removal_is_done(
    rig: Rig,
) -> None:
    """Removed, then copied in again before nginx took the removal: the new bundle waits
    for the removal to finish, then deploys like a first one (it is never abandoned)."""
    old = rig.deploy("a", webapp(rig.tmp))
    rig.send(BundleRemoved(app="a"))
    removal = rig.nginx.one(ApplyNginx)
    rig.send(BundleArrived(app="a", path=rig.tmp / "a.keter", mtime_ns=2, size=100))
    assert rig.unpacker.take(UnpackBundle) == []  # the removal first
    rig.send(NginxApplied(generation=removal.generation))
    unpack = rig.unpacker.one(UnpackBundle)
    rig.drain_over()
    [stop] = rig.monitor.take(StopProcess)
    assert stop.deploy_id == old.deploy_id
    rig.stopped(stop)
    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    rig.healthy(start)
    rig.nginx_ok()
    assert rig.sup.apps["a"].serving is not None
    assert rig.sup.apps["a"].serving.id == unpack.deploy_id


def test_removal_while_starting_abandons_the_deploy(rig: Rig) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    rig.send(BundleRemoved(app="a"))
    [done] = rig.finished()
    assert done.outcome is Outcome.SUPERSEDED
    [stop] = rig.monitor.take(StopProcess)
    assert stop.deploy_id == start.deploy_id
    rig.stopped(stop)
    assert "a" not in rig.sup.apps


# -- failure at every stage ------------------------------------------------------------------


def assert_failed(rig: Rig, serving: StartProcess, kind: FailureKind) -> DeployFinished:
    """The deploy on its way failed (``kind``); the ``serving`` version serves on."""
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, kind)
    assert rig.sup.apps["a"].next is None
    assert_kept_serving(rig, serving)
    return done


def test_failure_while_unpacking(rig: Rig, serving: StartProcess) -> None:
    unpack = rig.arrive("a")
    rig.send(UnpackFailed(app="a", deploy_id=unpack.deploy_id, reason="not gzip"))
    assert assert_failed(rig, serving, FailureKind.UNPACK).reason == "not gzip"
    assert rig.unpacker.take(RemoveFolder) == []  # the unpacker removed it itself


def test_a_bundle_removed_before_it_was_read_is_no_failed_deploy(
    rig: Rig, serving: StartProcess
) -> None:
    unpack = rig.arrive("a")
    rig.send(UnpackFailed(app="a", deploy_id=unpack.deploy_id, reason="cannot open", gone=True))
    [done] = rig.finished()
    assert (done.outcome, done.reason) == (Outcome.SUPERSEDED, "its bundle was removed")
    assert_kept_serving(rig, serving)


def test_a_deploys_end_is_told_after_its_apps_next_deploy_shows(rig: Rig) -> None:
    # Told first, a client woken by "superseded" read the app with nothing on its way
    # yet, and `keter db restore` failed a restore whose newer version went on to serve.
    rig.deploy("a", webapp(rig.tmp))
    rig.status.take()
    rig.arrive("a")
    rig.arrive("a")  # a newer bundle: the one unpacking is superseded
    told = [m for m in rig.status.take() if isinstance(m, (AppChanged, DeployFinished))]
    [ended] = [i for i, m in enumerate(told) if isinstance(m, DeployFinished)]
    assert told[ended].outcome is Outcome.SUPERSEDED
    assert [m.snapshot.deploying for m in told[:ended]] == [""]  # the newer one, not read yet


def test_a_file_the_watcher_refused_is_a_line_of_its_apps_history(rig: Rig) -> None:
    rig.send(BundleIgnored(filename="x.keter", reason="x.keter: refused: it is a FIFO"))
    [done] = rig.finished()
    assert (done.app, done.outcome, done.kind) == ("x", Outcome.FAILED, FailureKind.UNPACK)
    assert "x" not in rig.sup.apps  # nothing deploys, nothing else changes
    rig.send(BundleIgnored(filename="bad name!.keter", reason="not an app name"))
    assert rig.finished() == []


def test_failure_of_the_config_checks(rig: Rig, serving: StartProcess) -> None:
    rig.deploy("b", webapp(rig.tmp, "b.test"))
    rig.finished()
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp, "b.test"))  # b's host
    done = assert_failed(rig, serving, FailureKind.CONFLICT)
    assert "already served by app b" in done.reason
    assert rig.unpacker.one(RemoveFolder).path == unpack.dest


def test_a_database_server_keter_cannot_provision_on_refuses_the_bundle(
    rig: Rig, serving: StartProcess
) -> None:
    unpack = rig.arrive("a")
    server = PostgresServer(host="db.example.com", port=5432)
    config = replace(webapp(rig.tmp), postgres=True, postgres_server=server)
    rig.unpacked(unpack, config)
    done = assert_failed(rig, serving, FailureKind.CONFIG)
    assert "db.example.com" in done.reason and "admin-dsn" in done.reason
    assert rig.postgres.take(ProvisionDatabase) == []


def test_failure_while_provisioning(rig: Rig, serving: StartProcess) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, replace(webapp(rig.tmp), postgres=True))
    provision = rig.postgres.one(ProvisionDatabase)
    rig.send(DatabaseFailed(app="a", deploy_id=provision.deploy_id, reason="server down"))
    assert_failed(rig, serving, FailureKind.DATABASE)
    assert rig.unpacker.one(RemoveFolder).path == unpack.dest


def test_failure_while_starting(rig: Rig, serving: StartProcess) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    rig.send(
        ProcessFailed(
            app="a",
            deploy_id=start.deploy_id,
            reason="did not answer",
            kind=FailureKind.HEALTH_CHECK,
        )
    )
    assert_failed(rig, serving, FailureKind.HEALTH_CHECK)
    # The monitor stops a failed start itself; its ProcessStopped ends the deploy.
    rig.send(ProcessStopped(app="a", deploy_id=start.deploy_id))
    assert rig.unpacker.one(RemoveFolder).path == unpack.dest
    assert start.deploy_id not in rig.sup.owners


def test_failure_while_switching(rig: Rig, serving: StartProcess) -> None:
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    start = rig.monitor.one(StartProcess)
    rig.healthy(start)
    apply = rig.nginx.one(ApplyNginx)
    rig.send(NginxFailed(generation=apply.generation, reason="nginx -t failed"))
    app = rig.sup.apps["a"]
    [done] = rig.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.NGINX)
    assert app.serving.id == serving.deploy_id
    [stop] = rig.monitor.take(StopProcess)
    assert stop.deploy_id == start.deploy_id


def test_a_refused_site_fails_only_its_own_deploy(rig: Rig, serving: StartProcess) -> None:
    """Two deploys ride on one generation; nginx refuses one site; the other switches."""
    unpack_a = rig.arrive("a")
    rig.unpacked(unpack_a, webapp(rig.tmp))
    start_a = rig.monitor.one(StartProcess)
    unpack_b = rig.arrive("b")
    rig.unpacked(unpack_b, webapp(rig.tmp, "b.test"))
    start_b = rig.monitor.one(StartProcess)
    rig.healthy(start_a)
    first = rig.nginx.one(ApplyNginx)  # a's switch
    rig.healthy(start_b)  # b's switch waits for the generation in flight
    assert rig.nginx.take(ApplyNginx) == []
    rig.send(
        NginxApplied(
            generation=first.generation, refused=(SiteRefused(app="a", reason="bad cert"),)
        )
    )
    [done] = rig.finished()
    assert (done.app, done.outcome, done.kind) == ("a", Outcome.FAILED, FailureKind.NGINX)
    assert "bad cert" in done.reason
    assert rig.sup.apps["a"].serving.id == serving.deploy_id
    second = rig.nginx.one(ApplyNginx)  # b, batched after
    rig.send(NginxApplied(generation=second.generation))
    [done] = rig.finished()
    assert (done.app, done.outcome) == ("b", Outcome.SERVING)


def test_a_late_nginx_reply_leaves_the_generation_in_flight_alone(rig: Rig) -> None:
    """A reply about a generation that is no longer in flight (the writer failed on
    its way there, and the supervisor gave that generation up) finishes nothing and
    does not let a second generation go out beside the one in flight."""
    unpack_a = rig.arrive("a")
    rig.unpacked(unpack_a, webapp(rig.tmp))
    start_a = rig.monitor.one(StartProcess)
    rig.healthy(start_a)
    given_up = rig.nginx.one(ApplyNginx)  # a's switch
    rig.send(ComponentFailed(component=Component.NGINX, error="OSError: boom"))
    [done] = rig.finished()
    assert (done.app, done.outcome, done.kind) == ("a", Outcome.FAILED, FailureKind.NGINX)
    unpack_b = rig.arrive("b")
    rig.unpacked(unpack_b, webapp(rig.tmp, "b.test"))
    start_b = rig.monitor.one(StartProcess)
    rig.healthy(start_b)
    in_flight = rig.nginx.one(ApplyNginx)  # b's switch
    rig.send(NginxApplied(generation=given_up.generation))  # the restarted writer, late
    assert rig.finished() == []
    unpack_c = rig.arrive("c")
    rig.unpacked(unpack_c, webapp(rig.tmp, "c.test"))
    start_c = rig.monitor.one(StartProcess)
    rig.healthy(start_c)
    assert rig.nginx.take(ApplyNginx) == []  # c waits for b's generation
    rig.send(NginxApplied(generation=in_flight.generation))
    [done] = rig.finished()
    assert (done.app, done.outcome) == ("b", Outcome.SERVING)
    rig.nginx_ok()  # c's, batched after
    [done] = rig.finished()
    assert (done.app, done.outcome) == ("c", Outcome.SERVING)


def test_no_free_port_fails_the_deploy(rig: Rig, serving: StartProcess) -> None:
    pool = rig.sup.ports
    for _ in range(pool.high - pool.low + 1):
        try:
            pool.allocate()
        except Exception:
            break
    unpack = rig.arrive("a")
    rig.unpacked(unpack, webapp(rig.tmp))
    assert_failed(rig, serving, FailureKind.PORTS)


# -- failures of keter itself -----------------------------------------------------------------


def test_a_component_failure_fails_its_deploy_and_restarts_the_component(
    rig: Rig, serving: StartProcess
) -> None:
    unpack = rig.arrive("a")
    rig.send(
        ComponentFailed(
            component=Component.UNPACKER,
            error="TypeError: boom",
            message="UnpackBundle",
            app="a",
            deploy_id=unpack.deploy_id,
        )
    )
    done = assert_failed(rig, serving, FailureKind.INTERNAL)
    assert "internal error in unpacker" in done.reason
    assert rig.unpacker.restarted == 0  # after a backoff, not at once
    rig.clock.now += 1
    for timer in rig.sup.due_timers():
        rig.send(timer)
    assert rig.unpacker.restarted == 1
    assert rig.sup.exit_code is None


def test_a_component_failing_again_and_again_stops_keter(rig: Rig) -> None:
    for _ in range(RESTART_LIMIT + 1):
        rig.send(ComponentFailed(component=Component.NGINX, error="OSError: boom"))
    assert rig.sup.exit_code == 1


def test_a_bug_in_the_supervisor_fails_only_that_deploy(rig: Rig, serving: StartProcess) -> None:
    unpack = rig.arrive("a")
    broken = BundleUnpacked(
        app="a",
        deploy_id=unpack.deploy_id,
        folder=unpack.dest,
        config=None,  # what no unpacker sends: the handler raises
        sha256="",
    )
    rig.send(broken)
    assert_failed(rig, serving, FailureKind.INTERNAL)
    assert rig.sup.exit_code is None
    rig.deploy("b", webapp(rig.tmp, "b.test"))  # keter goes on
    assert rig.sup.apps["b"].serving is not None


def test_shutdown_sets_the_exit_code(rig: Rig) -> None:
    rig.send(ShutdownRequested(signal_name="SIGTERM"))
    assert rig.sup.exit_code == 0


# -- watched rollout (keter.stats watches, the supervisor decides) ---------------------------


@pytest.fixture
def watched(tmp_path: Path) -> Rig:
    """Version 11.. served, then 22.. replaced it and is watched by the stats component."""
    rig = make_rig(tmp_path, kernel=False, stats=True)
    rig.deploy("a", webapp(rig.tmp), sha="11" * 32)
    assert rig.stats.take(WatchVersion) == []  # a first version has nothing to go back to
    rig.deploy("a", webapp(rig.tmp), sha="22" * 32)
    rig.finished()
    return rig


def test_a_watched_version_that_made_things_worse_rolls_back_once(watched: Rig) -> None:
    watch = watched.stats.one(WatchVersion)
    assert (watch.version, watch.previous) == ("22" * 6, "11" * 6)
    assert watch.seconds == watched.sup.config.watch_seconds
    unhealthy = VersionUnhealthy(app="a", version="22" * 6, reason="5xx 50% of 40 requests")
    watched.send(unhealthy)
    order = watched.status.one(RollBack)
    assert (order.sha256, order.version) == ("11" * 32, "22" * 6)
    assert watched.finished() == []  # recorded once the archived version is put back
    watched.send(RollBackDone(app="a", version=order.version, reason=order.reason))
    [done] = watched.finished()
    assert (done.outcome, done.sha256, done.reason) == (
        Outcome.ROLLED_BACK,
        "22" * 32,
        unhealthy.reason,
    )
    serving = watched.sup.apps["a"].serving
    assert serving.sha256 == "22" * 32 and serving.outcome is Outcome.SERVING  # until replaced
    watched.send(unhealthy)  # once only
    assert watched.finished() == [] and watched.status.take(RollBack) == []


def test_a_rollback_that_could_not_take_place_is_not_recorded_as_one(watched: Rig) -> None:
    # Its predecessor was no longer archived (archive-keep: 1 prunes it at the switch):
    # history said "rolled-back" and the bad version went on serving.
    watched.send(VersionUnhealthy(app="a", version="22" * 6, reason="5xx 50% of 40 requests"))
    order = watched.status.one(RollBack)
    failure = "cannot put 111111111111 back: not archived"
    watched.send(RollBackDone(app="a", version=order.version, reason=order.reason, failure=failure))
    assert watched.finished() == []
    [event] = [e for e in watched.status.take(AppEvent) if e.kind is EventKind.NO_ROLLBACK]
    assert event.text.endswith("and stays: " + failure)
    assert watched.sup.apps["a"].serving.sha256 == "22" * 32


def test_a_version_restarted_in_its_watch_stays_under_it_and_goes_back_to_the_one_before(
    watched: Rig,
) -> None:
    """A restart (keter env set, keter restart) of the watched version was watched anew
    against itself: its "rollback" redeployed it, again and again, and 11.. never came
    back."""
    watched.stats.one(WatchVersion)
    until = watched.sup.apps["a"].serving.watch_until
    watched.clock.now += 5
    watched.deploy("a", webapp(watched.tmp), sha="22" * 32)  # the same bundle again
    assert watched.stats.take(WatchVersion) == []  # its watch goes on
    again = watched.sup.apps["a"].serving
    assert (again.rollback_to, again.watch_until) == ("11" * 32, until)
    watched.send(VersionUnhealthy(app="a", version="22" * 6, reason="5xx 50% of 40 requests"))
    assert watched.status.one(RollBack).sha256 == "11" * 32


def test_a_verdict_come_during_a_deploy_that_then_fails_rolls_back(watched: Rig) -> None:
    # It was dropped while a deploy was on its way, and said only once: that deploy
    # failed, the bad version served on, and nothing ever rolled it back.
    watched.stats.one(WatchVersion)
    unpack = watched.arrive("a")
    watched.send(VersionUnhealthy(app="a", version="22" * 6, reason="5xx 50% of 40 requests"))
    assert watched.status.take(RollBack) == []  # the deploy on its way may replace it
    watched.send(UnpackFailed(app="a", deploy_id=unpack.deploy_id, reason="not gzip"))
    assert watched.status.one(RollBack).sha256 == "11" * 32


def test_a_verdict_held_for_a_deploy_that_replaces_the_version_changes_nothing(
    watched: Rig,
) -> None:
    watched.stats.one(WatchVersion)
    watched.clock.now += 1
    watched.arrive("a")
    watched.send(VersionUnhealthy(app="a", version="22" * 6, reason="5xx 50% of 40 requests"))
    watched.deploy("a", webapp(watched.tmp), sha="33" * 32)
    assert watched.status.take(RollBack) == []


def test_a_first_version_restarted_is_not_watched_against_itself(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, kernel=False, stats=True)
    rig.deploy("a", webapp(rig.tmp), sha="11" * 32)
    rig.deploy("a", webapp(rig.tmp), sha="11" * 32)
    assert rig.stats.take(WatchVersion) == []
    assert rig.sup.apps["a"].serving.rollback_to is None
    rig.send(VersionUnhealthy(app="a", version="11" * 6, reason="5xx 20% of 69 requests"))
    assert rig.status.take(RollBack) == []


def test_a_rollback_is_recorded_even_once_the_version_put_back_serves(watched: Rig) -> None:
    # The status component answers after its copy into incoming/; the watcher may see
    # the copy first, and that version may deploy before the answer is handled.
    watched.send(VersionUnhealthy(app="a", version="22" * 6, reason="5xx 50% of 40 requests"))
    order = watched.status.one(RollBack)
    assert order.replaces == "22" * 32
    watched.deploy("a", webapp(watched.tmp), sha="11" * 32)
    [back] = watched.finished()
    assert (back.outcome, back.sha256) == (Outcome.SERVING, "11" * 32)
    watched.send(RollBackDone(app="a", version=order.version, reason=order.reason))
    [done] = watched.finished()
    assert (done.outcome, done.sha256, done.reason) == (
        Outcome.ROLLED_BACK,
        "22" * 32,
        order.reason,
    )


def test_a_verdict_after_the_watch_or_for_another_version_changes_nothing(watched: Rig) -> None:
    watched.send(VersionUnhealthy(app="a", version="11" * 6, reason="old news"))
    watched.clock.now += watched.sup.config.watch_seconds + 60
    watched.send(VersionUnhealthy(app="a", version="22" * 6, reason="too late"))
    assert watched.finished() == [] and watched.status.take(RollBack) == []


def test_a_watched_version_that_crash_loops_rolls_back(watched: Rig) -> None:
    process_id = watched.sup.apps["a"].serving.id  # its web app's process (the first)
    for _ in range(3):
        for state in (ProcessState.RUNNING, ProcessState.BACKOFF):
            failed = state is ProcessState.BACKOFF  # it ended: the monitor backs off
            changed = ProcessStateChanged(app="a", deploy_id=process_id, state=state, failed=failed)
            watched.send(changed)
    order = watched.status.one(RollBack)
    assert order.sha256 == "11" * 32 and "crashed 3 times" in order.reason
    watched.send(RollBackDone(app="a", version=order.version, reason=order.reason))
    [done] = watched.finished()
    assert done.outcome is Outcome.ROLLED_BACK and "crashed 3 times" in done.reason


def test_a_process_moved_off_a_taken_port_did_not_crash(watched: Rig) -> None:
    """keter stopping a process to move it off a port a stranger took is no crash of
    the version's: counted as one, it rolled a watched version back as a crash loop."""
    process_id = watched.sup.apps["a"].serving.id
    for _ in range(3):
        moved = ProcessStateChanged(
            app="a",
            deploy_id=process_id,
            state=ProcessState.BACKOFF,
            detail="port 20001 taken by pid 99; waiting for another",
        )
        watched.send(moved)
    assert watched.status.take(RollBack) == []
    assert watched.sup.apps["a"].snapshot().restarts == 0


def test_restarts_that_cannot_start_count_as_crashes(watched: Rig) -> None:
    """A version that deleted its own program: its restarts fail to start, BACKOFF to
    BACKOFF. Not counted, it stayed down (nginx's 502) for good, showing 1 restart."""
    process_id = watched.sup.apps["a"].serving.id
    for detail in ("exited with status 3", "cannot run bin/app", "cannot run bin/app"):
        failed = ProcessStateChanged(
            app="a", deploy_id=process_id, state=ProcessState.BACKOFF, detail=detail, failed=True
        )
        watched.send(failed)
    assert "crashed 3 times" in watched.status.one(RollBack).reason
    assert watched.sup.apps["a"].snapshot().restarts == 3


# -- kernel mode (keter.switch): stable addresses instead of nginx reloads -------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Rig:
    """A supervisor whose switch component runs in kernel mode."""
    return make_rig(tmp_path, kernel=True)


def point(rig: Rig) -> PointServices:
    """Play the switch: the stable ports lead to the deploy, confirmed."""
    assert rig.switch is not None
    command = rig.switch.one(PointServices)
    rig.send(ServicesPointed(app=command.app, deploy_id=command.deploy_id))
    return command


def kernel_deploy(rig: Rig, config: BundleConfig, sha: str = "ab" * 32) -> StartProcess:
    """A first deploy in kernel mode: stable port pointed, then one nginx generation."""
    unpack = rig.arrive(config.app)
    rig.unpacked(unpack, config, sha)
    start = rig.monitor.one(StartProcess)
    rig.healthy(start)
    point(rig)
    rig.nginx_ok()
    return start


def test_a_first_deploy_points_a_stable_address_then_routes_it(kernel: Rig) -> None:
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp))
    start = kernel.monitor.one(StartProcess)
    kernel.healthy(start)
    deploy = kernel.sup.apps["a"].next
    assert deploy.stage is Stage.POINTING
    assert kernel.nginx.take(ApplyNginx) == []  # nothing routes it before the kernel leads to it
    command = kernel.switch.one(PointServices)
    [(stable, port)] = command.targets
    assert port == start.spec.port and command.previous == ()

    kernel.send(ServicesPointed(app="a", deploy_id=command.deploy_id))
    assert deploy.stage is Stage.SWITCHING
    apply = kernel.nginx.one(ApplyNginx)
    [site] = apply.sites
    assert site.routes[0].action == ProxyApp(port=stable, host=SWITCH_ADDRESS)
    kernel.send(NginxApplied(generation=apply.generation))
    assert deploy.stage is Stage.SERVING
    [done] = kernel.finished()
    assert done.outcome is Outcome.SERVING


def test_a_redeploy_with_the_same_routes_never_touches_nginx(kernel: Rig) -> None:
    first = kernel_deploy(kernel, webapp(kernel.tmp), sha="11" * 32)
    stable = kernel.sup.apps["a"].serving.services
    kernel.finished()

    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="22" * 32)
    second = kernel.monitor.one(StartProcess)
    kernel.healthy(second)
    command = kernel.switch.one(PointServices)
    assert command.targets == ((stable[0], second.spec.port),)
    # The report waits until nginx can no longer send new requests to these.
    assert command.previous == ((stable[0], first.spec.port),)
    assert kernel.sup.apps["a"].serving.id == first.deploy_id  # until the switch is confirmed
    kernel.send(ServicesPointed(app="a", deploy_id=command.deploy_id))

    app = kernel.sup.apps["a"]
    assert app.serving.id == second.deploy_id and app.serving.services == stable
    assert [f.outcome for f in kernel.finished()] == [Outcome.SERVING]
    assert kernel.nginx.take(ApplyNginx) == []  # no generation at all

    # The old version drains: stopped as soon as its port holds no connection.
    old = kernel.sup.owners[first.deploy_id]
    assert old.stage is Stage.DRAINING
    watch = kernel.switch.one(WatchDrain)
    assert (watch.deploy_id, watch.ports) == (first.deploy_id, (first.spec.port,))
    assert kernel.monitor.take(StopProcess) == []
    kernel.send(Drained(app="a", deploy_id=first.deploy_id))
    [stop] = kernel.monitor.take(StopProcess)
    assert (stop.deploy_id, stop.delay) == (first.deploy_id, 0)
    kernel.drain_over()  # the ceiling's timer is harmless now
    assert kernel.monitor.take(StopProcess) == []
    kernel.stopped(stop)
    assert old.stage is Stage.ENDED
    assert kernel.switch.take(ReleaseServices) == []  # the new version uses them


def test_a_drain_ends_at_drain_seconds_when_connections_stay(kernel: Rig) -> None:
    first = kernel_deploy(kernel, webapp(kernel.tmp), sha="11" * 32)
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="22" * 32)
    kernel.healthy(kernel.monitor.one(StartProcess))
    point(kernel)
    assert kernel.monitor.take(StopProcess) == []
    kernel.drain_over()
    [stop] = kernel.monitor.take(StopProcess)
    assert stop.deploy_id == first.deploy_id
    kernel.send(Drained(app="a", deploy_id=first.deploy_id))  # late: changes nothing
    assert kernel.monitor.take(StopProcess) == []


def test_changed_routes_get_new_stable_addresses_and_an_nginx_generation(kernel: Rig) -> None:
    kernel_deploy(kernel, webapp(kernel.tmp), sha="11" * 32)
    [old_stable] = kernel.sup.apps["a"].serving.services
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp, time_bound=5.0))  # a route changes
    kernel.healthy(kernel.monitor.one(StartProcess))
    command = point(kernel)
    [(new_stable, _)] = command.targets
    assert new_stable != old_stable and command.previous == ()
    apply = kernel.nginx.one(ApplyNginx)
    [site] = apply.sites
    assert site.routes[0].action.port == new_stable
    kernel.send(NginxApplied(generation=apply.generation))
    assert kernel.sup.apps["a"].serving.services == (new_stable,)
    kernel.drain_over()
    kernel.stopped(*kernel.monitor.take(StopProcess))
    release = kernel.switch.one(ReleaseServices)
    assert release.ports == (old_stable,)
    assert old_stable not in kernel.sup.stable_ports


def test_a_failed_kernel_switch_fails_only_the_new_version(kernel: Rig) -> None:
    first = kernel_deploy(kernel, webapp(kernel.tmp), sha="11" * 32)
    kernel.finished()
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="22" * 32)
    second = kernel.monitor.one(StartProcess)
    kernel.healthy(second)
    command = kernel.switch.one(PointServices)
    kernel.send(PointFailed(app="a", deploy_id=command.deploy_id, reason="did not reach it"))
    [done] = kernel.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.SWITCH)
    app = kernel.sup.apps["a"]
    assert app.serving.id == first.deploy_id and app.serving.stage is Stage.SERVING
    [stop] = kernel.monitor.take(StopProcess)
    assert stop.deploy_id == second.deploy_id
    kernel.stopped(stop)
    assert kernel.switch.take(ReleaseServices) == []  # the serving version keeps them


def test_a_switch_component_failure_leads_the_addresses_back(kernel: Rig) -> None:
    first = kernel_deploy(kernel, webapp(kernel.tmp), sha="11" * 32)
    kernel.finished()
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="22" * 32)
    kernel.healthy(kernel.monitor.one(StartProcess))
    command = kernel.switch.one(PointServices)
    kernel.send(
        ComponentFailed(
            component=Component.SWITCH,
            error="OSError: boom",
            message="PointServices",
            app="a",
            deploy_id=command.deploy_id,
        )
    )
    [done] = kernel.finished()
    assert (done.outcome, done.kind) == (Outcome.FAILED, FailureKind.INTERNAL)
    # The kernel may have changed already: the stable port leads to the serving version.
    restore = kernel.switch.one(PointServices)
    assert restore.targets == ((command.targets[0][0], first.spec.port),)
    kernel.send(ServicesPointed(app="a", deploy_id=restore.deploy_id))  # changes nothing
    assert kernel.sup.apps["a"].serving.id == first.deploy_id


def test_a_newer_bundle_waits_for_a_kernel_switch_in_flight(kernel: Rig) -> None:
    kernel_deploy(kernel, webapp(kernel.tmp), sha="11" * 32)
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="22" * 32)
    kernel.healthy(kernel.monitor.one(StartProcess))
    command = kernel.switch.one(PointServices)
    kernel.send(BundleArrived(app="a", path=kernel.tmp / "a.keter", mtime_ns=3, size=1))
    assert kernel.unpacker.take(UnpackBundle) == []
    kernel.send(ServicesPointed(app="a", deploy_id=command.deploy_id))
    assert kernel.sup.apps["a"].serving.id == command.deploy_id
    assert kernel.unpacker.one(UnpackBundle).app == "a"


def test_removing_an_app_removes_its_stable_address(kernel: Rig) -> None:
    start = kernel_deploy(kernel, webapp(kernel.tmp))
    [stable] = kernel.sup.apps["a"].serving.services
    kernel.send(BundleRemoved(app="a"))
    assert kernel.nginx_ok().sites == ()
    kernel.switch.one(WatchDrain)
    kernel.send(Drained(app="a", deploy_id=start.deploy_id))
    kernel.stopped(*kernel.monitor.take(StopProcess))
    assert kernel.switch.one(ReleaseServices).ports == (stable,)
    assert "a" not in kernel.sup.apps and stable not in kernel.sup.stable_ports


def test_a_crash_restart_changes_neither_nginx_nor_the_kernel(kernel: Rig) -> None:
    start = kernel_deploy(kernel, webapp(kernel.tmp))
    for state in (ProcessState.BACKOFF, ProcessState.STARTING, ProcessState.RUNNING):
        failed = state is ProcessState.BACKOFF  # it crashed
        changed = ProcessStateChanged(
            app="a", deploy_id=start.deploy_id, state=state, pid=99, failed=failed
        )
        kernel.send(changed)
    assert kernel.nginx.take(ApplyNginx) == []
    assert kernel.switch.take(PointServices) == []
    assert kernel.snapshot("a").restarts == 1


def test_an_app_moved_off_a_stolen_port_is_led_there_by_the_kernel(kernel: Rig) -> None:
    start = kernel_deploy(kernel, webapp(kernel.tmp))
    [stable] = kernel.sup.apps["a"].serving.services
    kernel.send(ProcessPortTaken(app="a", deploy_id=start.deploy_id, port=start.spec.port))
    move = kernel.monitor.one(MoveProcess)
    assert move.spec.port != start.spec.port
    # At once the stable port leads nowhere (a reset, never the stranger) ...
    assert kernel.switch.one(ReleaseServices).ports == (stable,)
    assert kernel.nginx.take(ApplyNginx) == []  # nginx routes to the stable port regardless
    kernel.send(
        ProcessStateChanged(app="a", deploy_id=start.deploy_id, state=ProcessState.STARTING)
    )
    assert kernel.switch.take(PointServices) == []
    # ... and to the new port once the app answers there.
    kernel.send(ProcessStateChanged(app="a", deploy_id=start.deploy_id, state=ProcessState.RUNNING))
    command = kernel.switch.one(PointServices)
    assert command.targets == ((stable, move.spec.port),)
    kernel.send(ServicesPointed(app="a", deploy_id=command.deploy_id))
    assert kernel.sup.apps["a"].serving.id == start.deploy_id  # nothing else changes
    assert stable in kernel.sup.stable_ports


def test_an_app_whose_port_is_stolen_with_no_port_free_leads_nowhere_and_moves_later(
    kernel: Rig,
) -> None:
    """Every port of the range is taken (a squatter outside keter's guard): the stable port
    stops leading to the stranger at once, and keter looks for a port again, on a timer,
    until one comes back to the pool; then the app moves as usual."""
    start = kernel_deploy(kernel, webapp(kernel.tmp))
    [stable] = kernel.sup.apps["a"].serving.services
    taken = []
    with contextlib.suppress(NoFreePort):
        while True:
            taken.append(kernel.sup.ports.allocate())
    stranger = socket.create_server(("127.0.0.1", start.spec.port))  # held to the end
    kernel.send(ProcessPortTaken(app="a", deploy_id=start.deploy_id, port=start.spec.port))
    assert kernel.monitor.take(MoveProcess) == []
    assert kernel.switch.one(ReleaseServices).ports == (stable,)  # never to the stranger
    for _ in range(3):  # still none free: it keeps looking; the stable port stays released
        kernel.clock.now += MOVE_RETRY_MAX
        for timer in kernel.sup.due_timers():
            kernel.send(timer)
        assert kernel.monitor.take(MoveProcess) == []
        assert kernel.switch.take(ReleaseServices) == []
    kernel.sup.ports.release(taken[0])  # an app ended
    kernel.clock.now += MOVE_RETRY_MAX
    for timer in kernel.sup.due_timers():
        kernel.send(timer)
    move = kernel.monitor.one(MoveProcess)
    assert move.spec.port == taken[0]
    kernel.send(ProcessStateChanged(app="a", deploy_id=start.deploy_id, state=ProcessState.RUNNING))
    assert kernel.switch.one(PointServices).targets == ((stable, taken[0]),)
    assert kernel.sup.next_timer() is None  # no retry left behind
    stranger.close()


def test_an_app_whose_port_is_stolen_with_no_port_free_goes_back_once_the_stranger_lets_go(
    kernel: Rig,
) -> None:
    """The pool counts the stolen port the app's: once the stranger closes it, only the app
    can have it back (it had waited for another port for good)."""
    start = kernel_deploy(kernel, webapp(kernel.tmp))
    [stable] = kernel.sup.apps["a"].serving.services
    with contextlib.suppress(NoFreePort):
        while True:
            kernel.sup.ports.allocate()
    with socket.create_server(("127.0.0.1", start.spec.port)):
        kernel.send(ProcessPortTaken(app="a", deploy_id=start.deploy_id, port=start.spec.port))
        kernel.clock.now += MOVE_RETRY_MAX
        for timer in kernel.sup.due_timers():
            kernel.send(timer)
        assert kernel.monitor.take(MoveProcess) == []
    kernel.clock.now += MOVE_RETRY_MAX
    for timer in kernel.sup.due_timers():
        kernel.send(timer)
    assert kernel.monitor.one(MoveProcess).spec.port == start.spec.port
    assert kernel.switch.take(RevokePorts) == []  # its own port all along
    kernel.send(ProcessStateChanged(app="a", deploy_id=start.deploy_id, state=ProcessState.RUNNING))
    assert kernel.switch.one(PointServices).targets == ((stable, start.spec.port),)


def proxied_ports(apply: ApplyNginx) -> set[int]:
    return {r.action.port for s in apply.sites for r in s.routes if isinstance(r.action, ProxyApp)}


def test_in_the_reload_mode_a_stolen_port_with_no_port_free_is_routed_nowhere_until_a_move(
    rig: Rig,
) -> None:
    start = rig.deploy("a", webapp(rig.tmp))
    taken = []
    with contextlib.suppress(NoFreePort):
        while True:
            taken.append(rig.sup.ports.allocate())
    with socket.create_server(("127.0.0.1", start.spec.port)):  # the stranger
        rig.send(ProcessPortTaken(app="a", deploy_id=start.deploy_id, port=start.spec.port))
        assert rig.monitor.take(MoveProcess) == []
        assert proxied_ports(rig.nginx_ok()) == set()  # nginx no longer sends it there
        rig.sup.ports.release(taken[0])
        rig.clock.now += MOVE_RETRY_MAX
        for timer in rig.sup.due_timers():
            rig.send(timer)
        assert rig.monitor.one(MoveProcess).spec.port == taken[0]
        assert proxied_ports(rig.nginx_ok()) == {taken[0]}


def test_an_apps_ports_are_granted_to_it_until_its_processes_are_gone(kernel: Rig) -> None:
    """The switch's isolation set (keter.switch.nft) follows the ports keter hands out:
    granted before the first process starts, moved with a stolen port, revoked once
    nothing of the version runs."""
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="11" * 32)
    first = kernel.monitor.one(StartProcess)
    assert kernel.switch.one(GrantPorts) == GrantPorts(app="a", ports=(first.spec.port,))
    kernel.healthy(first)
    point(kernel)
    kernel.nginx_ok()
    # A stranger took the port: the app's grant moves with it.
    kernel.send(ProcessPortTaken(app="a", deploy_id=first.deploy_id, port=first.spec.port))
    moved = kernel.monitor.one(MoveProcess).spec.port
    assert kernel.switch.one(RevokePorts) == RevokePorts(app="a", ports=(first.spec.port,))
    assert kernel.switch.one(GrantPorts) == GrantPorts(app="a", ports=(moved,))
    kernel.send(ProcessStateChanged(app="a", deploy_id=first.deploy_id, state=ProcessState.RUNNING))
    point(kernel)
    # A redeploy: the new version's port is granted; the old one's revoked once it stopped.
    unpack = kernel.arrive("a")
    kernel.unpacked(unpack, webapp(kernel.tmp), sha="22" * 32)
    second = kernel.monitor.one(StartProcess)
    assert kernel.switch.one(GrantPorts).ports == (second.spec.port,)
    kernel.healthy(second)
    point(kernel)
    kernel.drain_over()
    assert kernel.switch.take(RevokePorts) == []  # the old version still runs
    kernel.stopped(*kernel.monitor.take(StopProcess))
    assert kernel.switch.one(RevokePorts) == RevokePorts(app="a", ports=(moved,))
    assert kernel.switch.take(GrantPorts) == []
