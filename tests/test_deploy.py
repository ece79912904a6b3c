"""The deploy pipeline end to end: a real keter daemon, real nginx, real apps, real inotify."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, failures
from support.net import Load, body, served
from support.wait import wait_for

# -- deploy --------------------------------------------------------------------------------


def test_bundle_is_served_through_nginx_with_port_and_approot(keter, private_nginx, tmp_path):
    keter.drop(make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1")))
    served(private_nginx, "hello.test", "v1")

    env = json.loads(body(private_nginx, "hello.test", "/env"))
    low, high = keter.settings["port-range"]
    assert low <= int(env["PORT"]) <= high
    assert env["APPROOT"] == f"http://hello.test:{private_nginx.port}"
    assert env["VERSION"] == "v1"
    assert env["PATH"].startswith("/usr/local/sbin")
    # Nothing of keter's own environment leaks into the app's.
    assert not any(name.startswith("PYTEST") for name in env)
    # The app runs in its unpacked bundle.
    [app] = app_processes(keter)
    assert Path(app.cwd()).parent == keter.root / "temp"
    # keter logs the switch just after nginx confirms it.
    log = wait_for(lambda: "now serving" in keter.log() and keter.log(), 5, "the switch log line")
    for event in ["bundle seen", "unpacked", "started pid", "is healthy"]:
        assert re.search(rf"hello: .*{event}", log), event


def test_a_root_with_a_space_and_letters_beyond_ascii_deploys(
    keter_factory, private_nginx, tmp_path
):
    # keter started, then every deploy failed: nginx refused the access spool's path.
    keter = keter_factory(name="apps été 1")
    keter.drop(make_bundle(tmp_path / "sp.keter", config=webapp_config("sp.test", "v1")))
    served(private_nginx, "sp.test", "v1")
    assert not failures(keter, "sp")


def test_unknown_host_gets_a_404_from_nginx(keter, private_nginx, tmp_path):
    keter.drop(make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1")))
    served(private_nginx, "hello.test", "v1")
    status, _, data = private_nginx.request("other.test")
    assert status == 404
    assert b"v1" not in data


def test_global_and_bundle_env_reach_the_app(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(env={"SHARED": "global", "OVERRIDDEN": "global"})
    config = webapp_config("env.test", "v1", env={"OVERRIDDEN": "bundle"})
    keter.drop(make_bundle(tmp_path / "envapp.keter", config=config))
    served(private_nginx, "env.test", "v1")
    env = json.loads(body(private_nginx, "env.test", "/env"))
    assert env["SHARED"] == "global"
    assert env["OVERRIDDEN"] == "bundle"


# -- zero downtime -------------------------------------------------------------------------


def test_ten_redeploys_under_load_lose_no_request(keter, private_nginx, tmp_path):
    bundle = tmp_path / "zdt.keter"
    keter.drop(make_bundle(bundle, config=webapp_config("zdt.test", "v0")))
    served(private_nginx, "zdt.test", "v0")

    load = Load(private_nginx.port, "zdt.test")
    threads = load.run()
    try:
        for version in range(1, 11):
            keter.drop(make_bundle(bundle, config=webapp_config("zdt.test", f"v{version}")))
            served(private_nginx, "zdt.test", f"v{version}")
        # Keep the load on until the last old version has been stopped.
        wait_for(lambda: len(app_processes(keter)) == 1, 15, "old versions to stop")
        before = load.requests
        wait_for(lambda: load.requests > before + 50, 10, "more requests after the last stop")
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(15)
    assert load.errors == []
    assert load.requests > 500
    assert b"v10\n" in load.bodies
    assert failures(keter, "zdt") == []
    assert len(re.findall(r"zdt: deploy #\d+ now serving", keter.log())) == 11


# -- noticing bundles ----------------------------------------------------------------------


def test_slow_in_place_copy_deploys_exactly_once(keter, private_nginx, tmp_path):
    source = make_bundle(
        tmp_path / "slow.keter",
        config=webapp_config("slow.test", "v1"),
        files={"padding.bin": os.urandom(200_000)},  # incompressible, so the copy has many chunks
    )
    data = source.read_bytes()
    chunk = len(data) // 5 + 1
    with open(keter.incoming / "slow.keter", "wb") as out:
        for start in range(0, len(data), chunk):
            out.write(data[start : start + chunk])
            out.flush()
            # A slow network copy: pauses longer than the watcher's quiet period.
            time.sleep(0.4)
    served(private_nginx, "slow.test", "v1")
    assert keter.log().count("slow: bundle seen") == 1
    assert failures(keter, "slow") == []
    assert "ERROR" not in keter.log()


def test_rename_in_and_touch_each_deploy_exactly_once(keter, private_nginx, tmp_path):
    target = keter.drop(make_bundle(tmp_path / "ren.keter", config=webapp_config("ren.test", "v1")))
    served(private_nginx, "ren.test", "v1")
    wait_for(lambda: "ren: deploy #1 now serving" in keter.log(), 5)
    assert keter.log().count("ren: bundle seen") == 1

    # Users touch a bundle to restart its app.
    [first] = app_processes(keter)
    os.utime(target)
    wait_for(lambda: "now serving" in keter.log().split("ren: bundle seen")[-1], 15, "redeploy")
    wait_for(lambda: not first.is_running(), 10, "the first process to stop")
    assert keter.log().count("ren: bundle seen") == 2
    served(private_nginx, "ren.test", "v1")


def test_a_newer_bundle_supersedes_a_deploy_in_flight(keter, private_nginx, tmp_path):
    bundle = tmp_path / "sup.keter"
    keter.drop(make_bundle(bundle, config=webapp_config("sup.test", "v1")))
    served(private_nginx, "sup.test", "v1")
    # v2 never answers, so its deploy stays in flight until v3 replaces it.
    keter.drop(make_bundle(bundle, config=webapp_config("sup.test", "v2", args=["--hang"])))
    wait_for(lambda: "sup: deploy #2 started" in keter.log(), 10, "v2 to start")
    keter.drop(make_bundle(bundle, config=webapp_config("sup.test", "v3")))
    served(private_nginx, "sup.test", "v3")
    assert "sup: deploy #2 abandoned: superseded by a newer bundle" in keter.log()
    assert failures(keter, "sup") == []
    wait_for(lambda: len(app_processes(keter)) == 1, 10, "v1 and v2 to be stopped")


# -- failing new versions ------------------------------------------------------------------


def deploy_then_break(keter, nginx, tmp_path, host: str, **broken) -> None:
    app = host.split(".")[0]
    bundle = tmp_path / f"{app}.keter"
    keter.drop(make_bundle(bundle, config=webapp_config(host, "v1")))
    served(nginx, host, "v1")
    keter.drop(make_bundle(bundle, config=webapp_config(host, "v2", **broken)))
    wait_for(lambda: failures(keter, app), 30, "the failure to be logged")
    assert body(nginx, host) == b"v1\n"


def test_new_version_that_exits_at_start_leaves_the_old_one_serving(keter, private_nginx, tmp_path):
    deploy_then_break(keter, private_nginx, tmp_path, "crash.test", args=["--exit-at-start", "3"])
    [line] = failures(keter, "crash")
    assert "status 3" in line
    assert "fatal: exiting with status 3" in keter.log()  # the app's last words are in the log
    wait_for(lambda: len(app_processes(keter)) == 1, 10, "the failed version to be gone")
    wait_for(lambda: len(list((keter.root / "temp").iterdir())) == 1, 10, "its folder removed")


def test_new_version_that_never_answers_is_abandoned(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"health-check-timeout": 1.5})
    deploy_then_break(keter, private_nginx, tmp_path, "hang.test", args=["--hang"])
    [line] = failures(keter, "hang")
    assert "did not answer" in line
    wait_for(lambda: len(app_processes(keter)) == 1, 10, "the hung version to be stopped")


def test_a_reload_nginx_refuses_fails_the_deploy_at_once_with_nginxs_reason(
    keter_factory, private_nginx, tmp_path
):
    """A listener whose port another program holds passes `nginx -t` but not the
    reload: the deploy fails with nginx's [emerg] line well before the confirmation's
    10 s timeout, and nginx keeps serving what it served."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        listeners = [{"host": "127.0.0.1", "port": p} for p in (private_nginx.port, taken)]
        keter = keter_factory(listeners=listeners)
        status, _, text = private_nginx.request("taken.test")
        began = time.monotonic()
        keter.drop(make_bundle(tmp_path / "taken.keter", config=webapp_config("taken.test", "v1")))
        [line] = wait_for(lambda: failures(keter, "taken"), 30, "the deploy to fail")
        assert time.monotonic() - began < 8
        assert "nginx refused generation" in line
        assert f"127.0.0.1:{taken} failed (98: Address already in use)" in line
        after, _, text_after = private_nginx.request("taken.test")
        assert (after, text_after) == (status, text)  # headers aside: Date moves on


def test_new_version_failing_its_health_path_is_abandoned(keter, private_nginx, tmp_path):
    deploy_then_break(
        keter,
        private_nginx,
        tmp_path,
        "sick.test",
        args=["--fail-path", "/health"],
        **{"health-check-path": "/health"},
    )
    [line] = failures(keter, "sick")
    assert "500" in line


# -- host conflicts ----------------------------------------------------------------------


def now_serving(log: str, app: str, host: str) -> bool:
    """Whether ``log`` says one of ``app``'s deploys began serving ``host``."""
    return bool(re.search(rf"^.*{app}: deploy #\d+ now serving {re.escape(host)}", log, re.M))


def test_a_renamed_bundle_serves_its_host_under_the_new_name(keter, private_nginx, tmp_path):
    """a.keter renamed b.keter: b is refused while a still claims x.test (unless a's
    removal was quicker), then deploys by itself once a is removed."""
    keter.drop(make_bundle(tmp_path / "a.keter", config=webapp_config("x.test", "v1")))
    served(private_nginx, "x.test", "v1")
    os.rename(keter.incoming / "a.keter", keter.incoming / "b.keter")
    wait_for(lambda: now_serving(keter.log(), "b", "x.test"), 30, lambda: keter.log())
    assert "a: removed" in keter.log()
    served(private_nginx, "x.test", "v1")
    assert [line for line in failures(keter, "b") if "x.test" not in line] == []


def test_a_host_moved_between_apps_goes_to_the_app_waiting_for_it(keter, private_nginx, tmp_path):
    """d claims y.test while c serves it (refused), then c's new version lets it go:
    d deploys by itself, no operator needed."""
    keter.drop(make_bundle(tmp_path / "c.keter", config=webapp_config("y.test", "c1")))
    served(private_nginx, "y.test", "c1")
    keter.drop(make_bundle(tmp_path / "d.keter", config=webapp_config("y.test", "d1")))
    [refusal] = wait_for(lambda: failures(keter, "d"), 20, "d to be refused")
    assert "host y.test is already served by app c" in refusal
    keter.drop(make_bundle(tmp_path / "c.keter", config=webapp_config("z.test", "c2")))
    served(private_nginx, "z.test", "c2")
    served(private_nginx, "y.test", "d1", timeout=30)
    assert len(failures(keter, "d")) == 1  # refused once, then deployed


def test_after_a_restart_the_bundle_refused_for_a_host_still_gets_it(
    keter, private_nginx, tmp_path
):
    """Two bundles claim x.test across a keter restart: whichever the new keter deploys
    first serves; the other deploys once that one's bundle is removed."""
    keter.drop(make_bundle(tmp_path / "e.keter", config=webapp_config("x.test", "e1")))
    served(private_nginx, "x.test", "e1")
    keter.drop(make_bundle(tmp_path / "f.keter", config=webapp_config("x.test", "f1")))
    wait_for(lambda: failures(keter, "f"), 20, "f to be refused")
    assert keter.stop() == 0
    keter.start()
    winner = wait_for(
        lambda: next((a for a in "ef" if now_serving(keter.log_since_start(), a, "x.test")), None),
        30,
        "one of e and f to serve x.test",
    )
    loser = "f" if winner == "e" else "e"
    (keter.incoming / f"{winner}.keter").unlink()
    served(private_nginx, "x.test", f"{loser}1", timeout=30)


# -- removal, restart, shutdown ------------------------------------------------------------


def test_removing_the_bundle_stops_the_app_and_frees_its_host(keter, private_nginx, tmp_path):
    target = keter.drop(
        make_bundle(tmp_path / "gone.keter", config=webapp_config("gone.test", "v1"))
    )
    served(private_nginx, "gone.test", "v1")
    [app] = app_processes(keter)
    target.unlink()
    wait_for(lambda: private_nginx.request("gone.test")[0] == 404, 15, "the host to 404")
    wait_for(lambda: not app.is_running(), 10, "the app to stop")
    wait_for(lambda: list((keter.root / "temp").iterdir()) == [], 10, "its folder removed")
    assert "gone: removed" in keter.log()


def test_sigterm_stops_every_app_and_a_restart_brings_them_back(keter, private_nginx, tmp_path):
    for name in ["one", "two"]:
        keter.drop(
            make_bundle(tmp_path / f"{name}.keter", config=webapp_config(f"{name}.test", name))
        )
    for name in ["one", "two"]:
        served(private_nginx, f"{name}.test", name)
    apps = app_processes(keter)
    assert len(apps) == 2

    assert keter.stop() == 0
    _gone, alive = psutil.wait_procs(apps, timeout=0)
    assert alive == []
    assert "keter: stopped" in keter.log()
    # Every component's thread ended: none was left for the exit to abandon.
    assert "threads still run" not in keter.log()

    keter.start()
    for name in ["one", "two"]:
        served(private_nginx, f"{name}.test", name)
    assert len(app_processes(keter)) == 2


def test_a_second_keter_on_the_same_root_is_refused(keter):
    second = keter.__class__(keter.root, keter.settings)
    second.stderr_path = keter.root.parent / "second.log"
    second.start(wait_ready=False)
    assert second.proc.wait(15) == 1
    assert "already running" in second.log()
    assert keter.proc.poll() is None


def test_a_second_keter_on_the_same_nginx_config_file_is_refused(
    keter, keter_factory, private_nginx, tmp_path
):
    # Two ROOTs writing one config file replaced each other's sites in silence: the
    # first keter's app answered 404 while keter said it served.
    keter.drop(make_bundle(tmp_path / "one.keter", config=webapp_config("one.test", "one")))
    served(private_nginx, "one.test", "one")
    second = keter_factory("other", start=False)
    second.start(wait_ready=False)
    assert second.proc.wait(15) == 1
    assert f"another keter (pid {keter.proc.pid} on {keter.root}) writes nginx's" in second.log()
    assert body(private_nginx, "one.test") == b"one\n"  # its first config had none of it
    assert keter.proc.poll() is None


def test_keter_deploy_waits_through_a_restart_of_keter_for_the_verdict(keter_factory, tmp_path):
    # keter restarted (an upgrade) while `keter deploy` waited: "keter is not running"
    # (exit 3), though keter deployed the bundle again at its start and said how it went.
    keter = keter_factory(**{"health-check-timeout": 2})
    config = webapp_config("hello.test", "v1", args=["--never-listen"])
    bundle = make_bundle(tmp_path / "hello.keter", config=config)
    command = ["deploy", "--root", str(keter.root), str(bundle), "--timeout", "60"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "keter", *command], stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: "hello: deploy #1 started" in keter.log(), 20, "the deploy on its way")
    keter.stop()
    keter.start()
    _, err = cli.communicate(timeout=90)
    assert cli.returncode == 1, err  # its verdict: failed, not "keter is not running"
    assert "failed: did not answer" in err


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "cannot read"),
        ('{"a": 1500, "b": 1500}', "a and b share uid 1500"),
        ('{"a": 0}', "a has uid 0"),
        ('{"a": 4294967295}', "a has uid 4294967295"),  # (uid_t)-1: it ran as root
        ('{"a": 1099511627776}', "a has uid 1099511627776"),
        ('{"a": 33}', "a's uid 33 is the system's"),  # www-data: nginx's files
    ],
)
def test_an_app_users_file_keter_cannot_trust_stops_its_start_in_one_line(
    keter_factory, text, said
):
    # An empty file ended the start with a traceback; two apps given one uid, or an app
    # given root's, were taken as they were.
    keter = keter_factory(start=False, **{"run-apps-as-root": False})
    (keter.root / "etc").mkdir(parents=True, exist_ok=True)
    (keter.root / "etc" / "app-users.json").write_text(text)
    keter.start(wait_ready=False)
    assert keter.proc.wait(15) == 1
    assert said in keter.log() and "Traceback" not in keter.log()


# -- bad bundles ---------------------------------------------------------------------------


def test_bad_global_config_is_refused_with_every_problem(keter_factory):
    keter = keter_factory(start=False, **{"port-range": [5000, 10], "helth-check-timeout": 3})
    keter.start(wait_ready=False)
    assert keter.proc.wait(15) == 2
    log = keter.log()
    assert "port-range" in log
    assert "did you mean health-check-timeout" in log
