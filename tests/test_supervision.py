"""Supervision through a real keter: crashes, crash loops, stubborn apps, keter's own death,
unprivileged apps, log caps, and what systemd sees."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, is_unpacking_worker, status_api
from support.net import body, served
from support.wait import wait_for

ROOT_DIR = Path(__file__).resolve().parent.parent


def app_env(nginx, host: str) -> dict:
    return json.loads(body(nginx, host, "/env"))


def group_of(pid: int) -> list[psutil.Process]:
    """Every live process in ``pid``'s process group (zombies count as gone)."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- crashes -------------------------------------------------------------------------------


def test_killed_app_is_restarted_on_the_same_port(keter, private_nginx, tmp_path):
    keter.drop(make_bundle(tmp_path / "kill.keter", config=webapp_config("kill.test", "v1")))
    served(private_nginx, "kill.test", "v1")
    port = app_env(private_nginx, "kill.test")["PORT"]
    [first] = app_processes(keter)

    first.kill()
    wait_for(lambda: [p for p in app_processes(keter) if p.pid != first.pid], 5, "a new process")
    served(private_nginx, "kill.test", "v1", timeout=5)
    assert app_env(private_nginx, "kill.test")["PORT"] == port
    # keter's own log says why the app died, without opening the app's log.
    assert re.search(r"kill: .*(SIGKILL|signal 9)", keter.log())


def kernel_thread_names(pid: int) -> set[str]:
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            names.add((task / "comm").read_text().strip())
    return names


def test_the_kernel_knows_each_keter_thread_by_its_name(keter, private_nginx, tmp_path):
    # top -H and ps -L show which part of keter spends its CPU, not "python" each.
    keter.drop(make_bundle(tmp_path / "named.keter", config=webapp_config("named.test", "v1")))
    served(private_nginx, "named.test", "v1")
    expected = {
        "keter-watcher",
        "keter-watchdog",
        "keter-inotify",
        "keter-unpacker",
        "keter-processes",
        "keter-output",
        "keter-spawn_0",
        "keter-probes",
        "keter-nginx",
        "keter-status",
        "keter-status-ht",  # keter-status-http, cut to the kernel's 15 bytes
    }
    wait_for(lambda: kernel_thread_names(keter.proc.pid) >= expected, 10, "every thread named")
    # The process itself, and its unpacking worker, for ps, top and pidof.
    assert psutil.Process(keter.proc.pid).name() == "keter"
    [worker] = [p for p in psutil.Process(keter.proc.pid).children() if is_unpacking_worker(p)]
    assert worker.name() == "keter-unpack"


def test_crash_loop_backs_off_cheaply_and_a_good_bundle_replaces_it_at_once(
    keter, private_nginx, tmp_path
):
    bundle = tmp_path / "loop.keter"
    # Up for a second each time: long enough for its first switch to be confirmed (at
    # 0.2 s its first crash could fall into it, and the deploy failed instead of looping).
    config = webapp_config("loop.test", "v1", args=["--exit-after", "1"])
    keter.drop(make_bundle(bundle, config=config))
    delays = wait_for(
        lambda: (
            (d := re.findall(r"loop: .*restarting in ([\d.]+)s", keter.log())) and len(d) >= 4 and d
        ),
        30,
        "four crash-loop restarts",
    )
    delays = [float(d) for d in delays]
    assert delays[3] > delays[0] * 2, delays  # exponential backoff, not a fixed interval

    # While it loops, keter itself stays nearly idle (the apps' own start cost is not keter's).
    me = psutil.Process(keter.proc.pid)
    before = me.cpu_times()
    wait_for(
        lambda: len(re.findall(r"loop: .*restarting in", keter.log())) >= 6, 30, "more crashes"
    )
    after = me.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 1.0, f"keter used {used:.2f}s of CPU during two crash-loop restarts"

    # A good bundle deploys at once; it does not wait out the loop's backoff.
    keter.drop(make_bundle(bundle, config=webapp_config("loop.test", "v2")))
    served(private_nginx, "loop.test", "v2", timeout=10)


# -- stopping ------------------------------------------------------------------------------


def test_removal_leaves_nothing_of_an_app_that_ignores_term_and_forks(
    keter, private_nginx, tmp_path
):
    args = ["--ignore-term", "--grandchildren", "2", "--grandchildren-ignore-term"]
    target = keter.drop(
        make_bundle(tmp_path / "stub.keter", config=webapp_config("stub.test", "v1", args=args))
    )
    served(private_nginx, "stub.test", "v1")
    [leader] = [p for p in app_processes(keter) if p.ppid() == keter.proc.pid]
    group = group_of(leader.pid)
    assert len(group) == 3  # the app and its two grandchildren

    target.unlink()
    wait_for(lambda: not any(alive(p) for p in group), 15, "the whole group to be killed")
    assert group_of(leader.pid) == []


def test_keter_killed_with_sigkill_leaves_no_app_behind_after_restart(
    keter, private_nginx, tmp_path
):
    for name in ["a", "b"]:
        keter.drop(
            make_bundle(tmp_path / f"{name}.keter", config=webapp_config(f"{name}.test", name))
        )
    for name in ["a", "b"]:
        served(private_nginx, f"{name}.test", name)
    old_apps = app_processes(keter)
    assert len(old_apps) == 2

    keter.kill()
    assert all(alive(p) for p in old_apps)  # orphaned, still holding their ports

    keter.start()
    for name in ["a", "b"]:
        served(private_nginx, f"{name}.test", name)
    assert not any(alive(p) for p in old_apps)
    assert len(app_processes(keter)) == 2
    assert "ERROR" not in keter.log_since_start()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_refused_redeploy_and_a_restart_do_not_take_the_app_down(
    keter, private_nginx, tmp_path, how
):
    good = make_bundle(tmp_path / "v1.keter", config=webapp_config("up.test", "v1"))
    keter.drop(good, name="up.keter")
    served(private_nginx, "up.test", "v1")
    # Archived once keter's verdict is in (nginx may answer just before): a bundle
    # replaced before then is not the one that served, and is not archived.
    archived = keter.root / "archive" / "up"
    wait_for(lambda: list(archived.glob("*.keter")), 10, "v1 to be archived")
    bad = webapp_config("up.test", "v2", args=["--exit-at-start", "3"])
    keter.drop(make_bundle(tmp_path / "v2.keter", config=bad), name="up.keter")
    wait_for(lambda: re.search(r"up: deploy #\d+ failed", keter.log()), 20, "v2 to fail")
    served(private_nginx, "up.test", "v1")  # the one serving is never touched

    # A reboot, an upgrade, an OOM kill: the version that served is gone with keter, and
    # the bundle in incoming/ still fails. The archived version that served comes back.
    keter.stop() if how == "sigterm" else keter.kill()
    keter.start()
    served(private_nginx, "up.test", "v1")
    log = keter.log_since_start()
    assert "up: the bundle in incoming/ failed at keter's start; version" in log
    assert (keter.incoming / "up.keter").read_bytes() == good.read_bytes()
    # Once only: a first deploy that fails is not followed by anything of the kind.
    keter.drop(make_bundle(tmp_path / "new.keter", config=bad), name="new.keter")
    wait_for(lambda: re.search(r"new: deploy #\d+ failed", keter.log()), 20, "new to fail")
    assert "new: the bundle in incoming/ failed" not in keter.log()


# -- running apps unprivileged -------------------------------------------------------------


@pytest.fixture
def open_root():
    """A ROOT that an unprivileged user can traverse (pytest's tmp dirs are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="keter-setuid-"))
    os.chmod(base, 0o755)
    yield base / "root"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_setuid_runs_apps_as_that_user_without_access_to_keters_secrets(
    keter_factory, private_nginx, tmp_path, open_root
):
    nobody = pwd.getpwnam("nobody")
    keter = keter_factory(root=open_root, setuid="nobody")
    secrets = open_root / "etc" / "postgres.yaml"
    secrets.write_text("app: {pass: secret}\n")
    os.chmod(secrets, 0o600)
    # The tests' interpreter may live under /root; the app needs one it can run.
    bundle = make_bundle(
        tmp_path / "unpriv.keter",
        config=webapp_config("unpriv.test", "v1"),
        interpreter="/usr/bin/python3",
    )
    keter.drop(bundle)
    served(private_nginx, "unpriv.test", "v1")

    ids = json.loads(body(private_nginx, "unpriv.test", "/whoami"))
    assert ids["uid"] == nobody.pw_uid
    assert ids["gid"] == nobody.pw_gid
    assert 0 not in ids["groups"]
    assert set(ids["groups"]) == set(os.getgrouplist("nobody", nobody.pw_gid))
    answer = body(private_nginx, "unpriv.test", f"/can-read?{secrets}")
    assert answer.startswith(b"no:"), answer
    assert app_env(private_nginx, "unpriv.test")["HOME"] == nobody.pw_dir


# -- logs ----------------------------------------------------------------------------------


def test_app_output_is_capped_on_disk(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"log-max-bytes": 200_000, "log-backups": 2})
    config = webapp_config("loud.test", "v1", args=["--spam-mb", "5"])
    keter.drop(make_bundle(tmp_path / "loud.keter", config=config))
    served(private_nginx, "loud.test", "v1")
    logs = keter.root / "log"
    wait_for(lambda: b"DONE" in (logs / "app-loud.log").read_bytes(), 20, "the spam to end")
    files = sorted(logs.glob("app-loud.log*"))
    assert [f.name for f in files] == ["app-loud.log", "app-loud.log.1", "app-loud.log.2"]
    assert sum(f.stat().st_size for f in files) <= 3 * 200_000 + 2_000
    # Every line carries its own timestamp.
    first = (logs / "app-loud.log").read_text().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first), first


# -- systemd and the journal ---------------------------------------------------------------


def test_ready_is_notified_after_the_initial_scan(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(start=False)
    keter.incoming.mkdir(parents=True)
    make_bundle(keter.incoming / "early.keter", config=webapp_config("early.test", "v1"))
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        keter.start(wait_ready=False, env={"NOTIFY_SOCKET": address})
        message = sock.recv(4096).decode()
    assert message == "READY=1"
    # A bundle this young may still be being written: its completeness check follows
    # READY (which never waits for one), then it is picked up.
    wait_for(lambda: "early: bundle seen" in keter.log(), 10, "the bundle to be picked up")


@pytest.mark.parametrize("address", ["/nonexistent/notify", "@keter-test-nobody-listens"])
def test_a_notify_socket_nobody_listens_on_is_one_warning(keter_factory, tmp_path, address):
    # keter logged CRITICAL "internal error handling ScanCompleted" with a traceback.
    keter = keter_factory(start=False)
    keter.start(env={"NOTIFY_SOCKET": address})
    status_api(keter)  # keter runs on and answers
    log = keter.log_since_start()
    assert log.count("cannot notify systemd") == 1, log
    assert "internal error" not in log and "Traceback" not in log


def test_journal_lines_carry_priorities_and_no_timestamp(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(start=False)
    keter.start(env={"JOURNAL_STREAM": "8:12345"})
    (keter.incoming / "junk.keter").write_bytes(b"not a bundle")
    wait_for(lambda: "junk: deploy" in keter.log(), 10, "the refusal")
    lines = keter.log().splitlines()
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines[:3]
    assert any(line.startswith("<6>keter: initial scan done") for line in lines)
    assert any(line.startswith("<3>junk: deploy #1 failed") for line in lines)


def test_sighup_rescans_incoming(keter, private_nginx, tmp_path):
    keter.drop(make_bundle(tmp_path / "hup.keter", config=webapp_config("hup.test", "v1")))
    served(private_nginx, "hup.test", "v1")
    keter.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "rescanning" in keter.log(), 10, "the rescan")
    # An unchanged bundle is not deployed again.
    assert keter.log().count("hup: bundle seen") == 1


def test_the_units_sandbox_allows_the_setgid_folders_keter_makes(keter, private_nginx, tmp_path):
    # RestrictSUIDSGID=yes refuses the setgid bit on folders as well as on files, and
    # the folders keter keeps beside nginx's config are setgid (files nginx reads take
    # their group): under the shipped unit every deploy failed.
    keter.drop(make_bundle(tmp_path / "sg.keter", config=webapp_config("sg.test", "v1")))
    served(private_nginx, "sg.test", "v1")
    config_file = Path(keter.settings["nginx"]["config-file"])
    folders = [config_file.parent / f".{config_file.name}.d"]
    assert folders and all(p.stat().st_mode & stat.S_ISGID for p in folders)
    directives = (ROOT_DIR / "keter.service").read_text().splitlines()
    assert not [line for line in directives if line.startswith("RestrictSUIDSGID=")]


def test_sighup_says_whether_the_config_has_changed(keter):
    # keter reads keter-config.yaml at start only: an edit was silently ignored, and one
    # the next start would refuse was found out at that start.
    config = keter.root / "etc" / "keter-config.yaml"

    def hup_says(line: str) -> None:
        before = keter.log().count(line)
        keter.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: keter.log().count(line) == before + 1, 10, line)

    hup_says(f"keter: {config} unchanged")
    keter.settings["stop-timeout"] = 4
    keter.write_config()
    hup_says(f"keter: {config} changed: restart keter to apply it")
    config.chmod(0o666)  # what the next start refuses too, though the text is the same
    hup_says(
        f"keter: {config} is writable by others (mode 666): they could change what keter "
        "runs as root; the next start would refuse it"
    )
    config.chmod(0o644)
    config.write_text(config.read_text() + "stop-timout: 3\n")
    hup_says(
        f"keter: {config} is now invalid: stop-timout: unknown key (did you mean "
        "stop-timeout?); the next start would refuse it"
    )
    assert "ERROR" in next(line for line in keter.log().splitlines() if "now invalid" in line)
    status_api(keter)  # keter runs on with the config it started with


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT_DIR / "keter.service").read_text()
    assert "Type=notify" in unit and "ExecReload=" in unit and "KillMode=mixed" in unit
    # The apps' processes are the unit's tasks, each app bounded by its own limit.
    assert "\nTasksMax=infinity\n" in unit
    # The shipped unit runs what examples/setup-debian.sh installs, on /opt/keter.
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == "ExecStart=/usr/local/bin/keter /opt/keter"
    # verify checks that ExecStart's program exists, and nothing outside the checkout may
    # be needed: verify a copy that runs this checkout's entry point (the venv's keter).
    keter_bin = Path(sysconfig.get_path("scripts")) / "keter"
    assert os.access(keter_bin, os.X_OK), f"{keter_bin}: the package is not installed"
    copy = tmp_path / "keter.service"
    copy.write_text(unit.replace(exec_start, f"ExecStart={keter_bin} /opt/keter"))
    changed = set(copy.read_text().splitlines()) ^ set(unit.splitlines())
    assert changed == {
        exec_start,
        f"ExecStart={keter_bin} /opt/keter",
    }  # every other line as shipped
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    problems = [line for line in result.stderr.splitlines() if "keter.service" in line]
    assert result.returncode == 0 and problems == [], result.stderr
