"""The operator's commands (`keter status|deploy|bundle|logs|stats|rollback|restart`).

Against a real keter daemon with a private nginx they run as their own
processes, the way an operator (or a CI job over ssh) runs them; checks that
need no daemon call ``keter.commands.main`` in the test's process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support.bundles import (
    NOISE,
    NOISE_SHOWN,
    TERMINAL_CONTROL,
    make_bundle,
    noisy_app,
    webapp_config,
)
from support.daemon import app_processes, keter_cli, status_api
from support.iocount import bytes_read
from support.net import Load, served
from support.wait import wait_for

from keter import commands, rootcheck
from keter.cli import COMMANDS, prepare_root, take_lock
from keter.client import NotAnswering
from keter.config import KeterConfig, load_config
from keter.processes.records import Records

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(capsys, root: Path, *args: str) -> tuple[int, str, str]:
    """Run a command in this process: (exit code, stdout, stderr)."""
    command, *rest = args
    code = commands.main([command, "--root", str(root), *rest])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- deploy --------------------------------------------------------------------------------


def test_deploy_waits_for_serving_then_status_and_logs_show_the_app(keter, private_nginx, tmp_path):
    bundle = make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1"))
    result = keter_cli(keter.root, "deploy", str(bundle))
    assert result.returncode == 0, result.stderr
    url = f"http://hello.test:{private_nginx.port}/"
    assert result.stdout == f"hello {sha(bundle)[:12]} serving at {url}\n"
    served(private_nginx, "hello.test", "v1")

    table = keter_cli(keter.root, "status")
    assert table.returncode == 0
    header, row, switch = table.stdout.splitlines()
    assert switch.startswith("switch: ")  # how keter switches versions (keter.switch)
    assert header.split()[:4] == ["APP", "STATE", "VERSION", "HOSTS"]
    assert row.split()[:4] == ["hello", "running", sha(bundle)[:12], "hello.test"]
    assert "serving" in row

    as_json = json.loads(keter_cli(keter.root, "status", "--json").stdout)
    [app] = as_json["apps"]
    assert (app["name"], app["state"], app["last_deploy"]["outcome"]) == (
        "hello",
        "running",
        "serving",
    )

    logs = keter_cli(keter.root, "logs", "hello", "-n", "2")
    assert logs.returncode == 0
    assert len(logs.stdout.splitlines()) == 2
    assert "listening on port" in logs.stdout

    # `ssh server keter deploy - --name hello < hello.keter`
    bundle2 = make_bundle(tmp_path / "v2.keter", config=webapp_config("hello.test", "v2"))
    result = keter_cli(keter.root, "deploy", "-", "--name", "hello", stdin=bundle2.read_bytes())
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello {sha(bundle2)[:12]} serving at {url}\n"
    served(private_nginx, "hello.test", "v2")
    assert sorted(p.name for p in keter.incoming.iterdir()) == ["hello.keter"]


def _status_row(name: str, hosts: list[str]) -> dict:
    return {
        "name": name,
        "state": "running",
        "deploying": None,
        "version": "abc",
        "hosts": hosts,
        "port": 4000,
        "pid": 42,
        "uptime": 5,
        "restarts": 0,
        "traffic": None,
        "last_deploy": None,
    }


def test_an_app_with_many_hosts_keeps_the_status_table_readable() -> None:
    # The column is as wide as its widest cell: 3,000 hosts made every row 200,000 wide.
    many = [f"h{i}.example.test" for i in range(300)]
    table = commands.render_table([_status_row("many", many), _status_row("plain", ["p.test"])], 0)
    _header, wide, plain = table.splitlines()
    assert wide.split()[:4] == ["many", "running", "abc", "h0.example.test,h1.example.test"]
    assert "(+298 more)" in wide
    assert len(plain) < 150, plain


def test_deploy_of_an_app_failing_its_health_check_says_why(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"health-check-timeout": 1.5})
    config = webapp_config(
        "sick.test", "v1", args=["--fail-path", "/health"], **{"health-check-path": "/health"}
    )
    bundle = make_bundle(tmp_path / "sick.keter", config=config)
    result = keter_cli(keter.root, "deploy", str(bundle))
    assert result.returncode == EXIT_FAILED
    assert result.stdout == ""
    assert f"sick {sha(bundle)[:12]} failed: did not answer" in result.stderr
    assert "HTTP 500 on /health" in result.stderr
    # The app's own last words come along.
    assert "last lines of" in result.stderr
    assert re.search(r"\| .*listening on port \d+ version v1", result.stderr)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"exec": "../bin/missing", "host": "a.test"}, "exec"),
        (webapp_config("Not A Host!", "v1"), "host"),
        ("exec: [unclosed", "not valid YAML"),
        ({"host": "a.test"}, "exec"),
    ],
)
def test_a_bundle_keter_would_refuse_never_reaches_incoming(capsys, tmp_path, config, reason):
    root = tmp_path / "root"
    (root / "incoming").mkdir(parents=True)
    source = make_bundle(tmp_path / "bad.keter", config=config)
    code, _, err = cli(capsys, root, "deploy", str(source))
    assert code == EXIT_USAGE
    assert "bad: bundle refused, nothing was deployed" in err
    assert reason in err
    assert list((root / "incoming").iterdir()) == []


def test_a_bundle_is_checked_with_the_running_keters_limits(keter_factory, tmp_path):
    """The local check used keter's defaults, not ROOT/etc/keter-config.yaml's: a bundle
    past the operator's max-unpacked-bytes went into incoming/ (and the reverse)."""
    keter = keter_factory(**{"max-unpacked-bytes": 1 << 20})
    status_api(keter)
    bundle = make_bundle(
        tmp_path / "big.keter",
        config=webapp_config("big.test", "v1"),
        files={"pad.bin": os.urandom(2 << 20)},
    )
    result = keter_cli(keter.root, "deploy", str(bundle))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "big: bundle refused, nothing was deployed" in result.stderr
    assert list(keter.incoming.iterdir()) == []


def test_a_file_that_is_no_bundle_is_refused(capsys, tmp_path):
    root = tmp_path / "root"
    (root / "incoming").mkdir(parents=True)
    junk = tmp_path / "junk.keter"
    junk.write_bytes(b"not a gzip file")
    code, _, err = cli(capsys, root, "deploy", str(junk))
    assert code == EXIT_USAGE
    assert "not a gzip file" in err
    code, _, err = cli(capsys, root, "deploy", str(tmp_path / "junk.tar.gz"))
    assert code == EXIT_USAGE
    assert "must end in .keter" in err
    code, _, err = cli(capsys, root, "deploy", "-")
    assert code == EXIT_USAGE
    assert "--name is required" in err
    assert list((root / "incoming").iterdir()) == []


class _Endless(io.RawIOBase):
    """A stdin that never ends (``keter deploy - < /dev/zero``): ``head``, then zeros."""

    def __init__(self, head: bytes = b"") -> None:
        self.head, self.given = head, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = (self.head + bytes(len(buffer)))[: len(buffer)]
        self.head = self.head[len(data) :]
        buffer[: len(data)] = data
        self.given += len(data)
        return len(data)


@pytest.mark.parametrize(("head", "reason"), [(b"", "not a gzip file"), (b"\x1f\x8b", "larger")])
def test_endless_input_is_refused_early_and_leaves_nothing_behind(
    capsys, monkeypatch, tmp_path, head, reason
):
    """`keter deploy /dev/zero --name x` wrote 2 GB into $TMPDIR in 5 s before any check."""
    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    limits = commands.BundleLimits(max_unpacked_bytes=8 << 20, max_members=100)
    monkeypatch.setattr(commands, "DEFAULT_LIMITS", limits)  # no keter: these; real: 2 GiB
    stdin = _Endless(head)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(stdin)))
    code, _, err = cli(capsys, tmp_path / "root", "deploy", "-", "--name", "hello")
    assert code == EXIT_USAGE and reason in err
    assert stdin.given <= limits.max_bundle_bytes + (2 << 20)
    assert list(spools.iterdir()) == []


def test_a_file_larger_than_any_bundle_is_refused_before_it_is_copied(
    capsys, monkeypatch, tmp_path
):
    """A bundle extended by a hole (`truncate -s 1T`: no disk used) was copied into $TMPDIR
    as far as the limit (gigabytes of zeros written out with the defaults) before the
    refusal."""
    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    limits = commands.BundleLimits(max_unpacked_bytes=8 << 20, max_members=100)
    monkeypatch.setattr(commands, "DEFAULT_LIMITS", limits)  # no keter: these
    bundle = make_bundle(tmp_path / "hello.keter", config=webapp_config("hello.test", "v1"))
    os.truncate(bundle, 1 << 40)
    read_before = bytes_read()
    code, _, err = cli(capsys, tmp_path / "root", "deploy", str(bundle))
    assert code == EXIT_USAGE and "larger than any bundle keter unpacks" in err
    assert bytes_read() - read_before < (1 << 20) and list(spools.iterdir()) == []


@pytest.mark.parametrize("hangup", [signal.SIGHUP, signal.SIGTERM])
def test_a_deploy_hung_up_mid_upload_leaves_nothing_behind(tmp_path, hangup):
    """`ssh server keter deploy - --name hello < bundle` and the connection drops: the
    partial copy in $TMPDIR stayed there."""
    spools = tmp_path / "tmp"
    spools.mkdir()
    upload = subprocess.Popen(
        [sys.executable, "-m", "keter", "deploy", "-", "--name", "hello"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(spools), "KETER_ROOT": str(tmp_path / "root")},
    )
    try:
        upload.stdin.write(b"\x1f\x8b" + bytes(1 << 20))
        upload.stdin.flush()
        wait_for(lambda: list(spools.rglob("*.tmp")), 20, "the upload to be spooled")
        upload.send_signal(hangup)
        assert upload.wait(20) == 128 + hangup
    finally:
        upload.kill()
        upload.wait()
    assert list(spools.iterdir()) == []


# -- rollback and restart ------------------------------------------------------------------


def test_rollback_and_restart_under_load_lose_no_request(keter, private_nginx, tmp_path):
    client = status_api(keter)
    v1 = make_bundle(tmp_path / "v1.keter", config=webapp_config("rb.test", "v1"))
    v2 = make_bundle(tmp_path / "v2.keter", config=webapp_config("rb.test", "v2"))
    for bundle in (v1, v2):
        deployed = keter_cli(keter.root, "deploy", str(bundle), "--name", "rb")
        assert deployed.returncode == 0, deployed.stderr
    wait_for(lambda: len(client.app("rb")["archive"]) == 2, 10, "both versions archived")
    served(private_nginx, "rb.test", "v2")

    load = Load(private_nginx.port, "rb.test")
    threads = load.run()
    try:
        result = keter_cli(keter.root, "rollback", "rb")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"rb {sha(v1)[:12]} serving at ")
        served(private_nginx, "rb.test", "v1")

        before = client.app("rb")["pid"]
        result = keter_cli(keter.root, "restart", "rb")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"rb {sha(v1)[:12]} serving at ")
        assert client.app("rb")["pid"] not in (before, None)  # a new process serves

        # Back to v2, named by a prefix of its version.
        result = keter_cli(keter.root, "rollback", "rb", sha(v2)[:8])
        assert result.returncode == 0, result.stderr
        served(private_nginx, "rb.test", "v2")
        wait_for(lambda: len(app_processes(keter)) == 1, 30, "old versions to stop")
        count = load.requests
        wait_for(lambda: load.requests > count + 50, 10, "more requests after the last stop")
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(15)
    assert load.errors == []
    assert load.bodies.keys() == {b"v1\n", b"v2\n"}
    outcomes = [h["outcome"] for h in client.app("rb")["history"]]
    assert outcomes == ["serving"] * 5


def test_rollback_without_an_earlier_version_is_refused(keter, tmp_path):
    bundle = make_bundle(tmp_path / "one.keter", config=webapp_config("one.test", "v1"))
    deployed = keter_cli(keter.root, "deploy", str(bundle))
    assert deployed.returncode == 0, deployed.stderr
    result = keter_cli(keter.root, "rollback", "one")
    assert result.returncode == EXIT_FAILED
    assert "one has no earlier version archived" in result.stderr
    result = keter_cli(keter.root, "rollback", "one", "abcdef")
    assert result.returncode == EXIT_FAILED
    assert "version abcdef of one is not archived" in result.stderr


# -- logs ----------------------------------------------------------------------------------


def ctrl_c_ends_it() -> None:
    """In a follower about to start: SIGINT as a terminal's Ctrl-C delivers it. A run started
    in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    leaves it ignored: the follower would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_logs_follow_the_app_across_log_rotation(keter_factory, tmp_path):
    # Two lines of app output already exceed this: every restart rotates the log.
    keter = keter_factory(**{"log-max-bytes": 150, "log-backups": 3})
    bundle = make_bundle(tmp_path / "fol.keter", config=webapp_config("fol.test", "v1"))
    deployed = keter_cli(keter.root, "deploy", str(bundle))
    assert deployed.returncode == 0, deployed.stderr

    follower = subprocess.Popen(
        [sys.executable, "-m", "keter", "logs", "fol", "-f", "-n", "1", "--root", str(keter.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_ends_it,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines, 10, "the backlog line")
        assert "listening on port" in lines[0]
        restart = keter_cli(keter.root, "restart", "fol")
        assert restart.returncode == 0, restart.stderr
        pid = status_api(keter).app("fol")["pid"]
        wait_for(lambda: any(f"as pid {pid}" in line for line in lines), 10, "the new process")
        assert (keter.root / "log" / "app-fol.log.1").exists()  # it did rotate
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0
        reader.join(5)


def test_an_app_cannot_reach_the_operators_terminal_through_keter_logs(keter, tmp_path):
    """Issue 10.6, of record: escape sequences from an app are shown escaped, never run."""
    config = webapp_config("noisy.test", "v1")
    bundle = make_bundle(tmp_path / "noisy.keter", config=config, app_source=noisy_app(tmp_path))
    deployed = keter_cli(keter.root, "deploy", str(bundle))
    assert deployed.returncode == 0, deployed.stderr
    assert NOISE.encode() in (keter.root / "log" / "app-noisy.log").read_bytes()  # kept whole

    logs = keter_cli(keter.root, "logs", "noisy", "-n", "5")
    assert logs.returncode == 0
    assert NOISE_SHOWN in logs.stdout
    assert not TERMINAL_CONTROL.search(logs.stdout.replace("\n", ""))

    follower = subprocess.Popen(
        [sys.executable, "-m", "keter", "logs", "noisy", "-f", "--root", str(keter.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=ctrl_c_ends_it,
    )
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: NOISE_SHOWN.encode() in b"".join(out), 10, "the noisy line, escaped")
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0
        reader.join(5)
    assert not TERMINAL_CONTROL.search(b"".join(out).decode().replace("\n", ""))

    # A failed deploy shows the app's last lines: escaped too.
    failing = webapp_config("noisy.test", "v2", args=["--exit-at-start", "3"])
    bundle = make_bundle(tmp_path / "noisy.keter", config=failing, app_source=noisy_app(tmp_path))
    failed = keter_cli(keter.root, "deploy", str(bundle))
    assert failed.returncode == EXIT_FAILED
    assert NOISE_SHOWN in failed.stderr, failed.stderr[-3000:]
    assert not TERMINAL_CONTROL.search(failed.stderr.replace("\n", ""))


# -- errors --------------------------------------------------------------------------------


def test_unknown_apps_are_named(keter):
    status_api(keter)
    for args in (["logs", "nope"], ["restart", "nope"], ["rollback", "nope"]):
        result = keter_cli(keter.root, *args)
        assert result.returncode == EXIT_FAILED, args
        assert result.stderr == "keter: no app named nope\n", args


def test_every_command_says_when_keter_is_not_running(capsys, tmp_path):
    root = tmp_path / "root"
    (root / "incoming").mkdir(parents=True)
    bundle = make_bundle(tmp_path / "ok.keter", config=webapp_config("ok.test", "v1"))
    for args in (["status"], ["logs", "ok"], ["restart", "ok"], ["rollback", "ok"]):
        code, _, err = cli(capsys, root, *args)
        assert code == EXIT_UNAVAILABLE, args
        assert f"keter is not running on {root}" in err, args
    code, _, _ = cli(capsys, root, "deploy", str(bundle))
    assert code == EXIT_UNAVAILABLE
    assert list((root / "incoming").iterdir()) == []  # not copied: nobody would deploy it


def test_a_keter_that_drops_the_connection_unanswered_is_not_answering(capsys, tmp_path):
    # A keter that closes a connection unanswered (stopping; a full one once did) gave
    # "[Errno 32] Broken pipe" or "Connection reset by peer" and exit 1, "the operation
    # failed", which nothing said.
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "run" / "keter.sock"))
    listener.listen()

    def drop_every_connection() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                listener.accept()[0].close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    try:
        for args in (["status"], ["restart", "ok"], ["rollback", "ok"]):
            code, _, err = cli(capsys, root, *args)
            assert code == EXIT_UNAVAILABLE, (args, err)
            assert err == "keter: keter closed the connection without an answer\n", args
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def test_a_user_without_access_to_the_socket_is_told_so(keter):
    status_api(keter)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, run the command, report the exit code
        code = 99
        try:
            sys.stderr = open(write, "w")  # noqa: SIM115 - flushed before os._exit
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = commands.main(["status", "--root", str(keter.root)])
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as stderr:
        message = stderr.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == EXIT_UNAVAILABLE
    assert "permission denied" in message
    assert "status-group" in message


# Run as nobody: what another user (an app, each its own uid) can do with ROOT/run.
_PEEK_AT_RUN = r"""
import errno, json, os, sys
run = sys.argv[1]
seen = {}
for what, act in [
    ("list run", lambda: os.listdir(run)),
    ("open the lock", lambda: os.open(run + "/keter.lock", os.O_RDONLY)),  # then flock it
    ("list the records", lambda: os.listdir(run + "/processes")),
]:
    try:
        act()
        seen[what] = "done"
    except OSError as exc:
        seen[what] = errno.errorcode[exc.errno]
print(json.dumps(seen))
"""


def test_no_other_user_can_lock_keters_lock_or_read_its_records() -> None:
    """An app that could open keter.lock could hold a lock of its own on it from the
    moment keter dies: the next keter would refuse to start ("another keter is already
    running") and never stop the leftovers."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another user")
    base = Path(tempfile.mkdtemp(prefix="keter-run-"))
    try:
        base.chmod(0o755)
        config = KeterConfig(root=base / "root")
        run = config.run_dir
        run.mkdir(parents=True, mode=0o755)  # as an earlier version left them
        (run / "keter.lock").write_text("1\n")
        (run / "keter.lock").chmod(0o644)
        prepare_root(config)
        lock = take_lock(config)
        try:
            Records(run).stop_leftovers(1.0)  # makes the records' folder
            peek = subprocess.run(
                ["/usr/bin/python3", "-c", _PEEK_AT_RUN, str(run)],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            os.close(lock)
    finally:
        shutil.rmtree(base)
    assert json.loads(peek.stdout) == {
        "list run": "EACCES",
        "open the lock": "EACCES",
        "list the records": "EACCES",
    }


def test_every_command_has_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            commands.main([command, "--help"])
        assert info.value.code == 0
        assert f"usage: keter {command}" in capsys.readouterr().out


# -- bundle --------------------------------------------------------------------------------


def app_folder(base: Path, config: str = "exec: ../bin/app\nhost: built.test\n") -> Path:
    (base / "config").mkdir(parents=True)
    (base / "config" / "keter.yaml").write_text(config)
    (base / "bin").mkdir()
    (base / "bin" / "app").write_text("#!/bin/sh\nexec sleep 1000\n")
    os.chmod(base / "bin" / "app", 0o755)
    (base / "static").mkdir()
    (base / "static" / "index.html").write_text("<h1>hi</h1>\n")
    return base


def test_bundle_builds_what_keter_accepts(capsys, tmp_path):
    folder = app_folder(tmp_path / "built")
    output = tmp_path / "out" / "built.keter"
    output.parent.mkdir()
    code, out, err = cli(capsys, tmp_path, "bundle", str(folder), "-o", str(output))
    assert code == 0, err
    assert out == f"wrote {output} (6 entries) for built.test\n"
    assert commands.check_bundle(output, "built", tmp_path / "check") is None
    with tarfile.open(output) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == [
        "bin",
        "bin/app",
        "config",
        "config/keter.yaml",
        "static",
        "static/index.html",
    ]
    assert members["bin/app"].mode & 0o111
    assert {(m.uid, m.uname) for m in members.values()} == {(0, "")}


def test_bundle_refuses_a_folder_keter_would_refuse(capsys, tmp_path):
    broken = app_folder(tmp_path / "broken", config="exec: ../bin/nothing\nhost: b.test\n")
    code, _, err = cli(
        capsys, tmp_path, "bundle", str(broken), "-o", str(tmp_path / "broken.keter")
    )
    assert code == EXIT_USAGE
    assert "exec" in err
    assert not (tmp_path / "broken.keter").exists()

    linked = app_folder(tmp_path / "linked")
    (linked / "static" / "passwd").symlink_to("/etc/passwd")
    code, _, err = cli(
        capsys, tmp_path, "bundle", str(linked), "-o", str(tmp_path / "linked.keter")
    )
    assert code == EXIT_USAGE
    assert "static/passwd is a symlink" in err
    assert not (tmp_path / "linked.keter").exists()

    code, _, err = cli(capsys, tmp_path, "bundle", str(linked), "-o", str(tmp_path / "linked.tgz"))
    assert code == EXIT_USAGE
    assert "must end in .keter" in err
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind


def test_a_refusal_naming_a_hostile_file_is_one_escaped_line(capsys, tmp_path):
    # A folder from an untrusted checkout: its file name set the terminal's title, cleared
    # the screen and forged a success line after a newline.
    folder = app_folder(tmp_path / "hostile")
    name = "\x1b]0;pwned\x07\x1b[2J\rFORGED\nketer: wrote x.keter (3 entries)"
    (folder / "static" / name).symlink_to("/etc/passwd")
    code, _, err = cli(capsys, tmp_path, "bundle", str(folder), "-o", str(tmp_path / "h.keter"))
    assert code == EXIT_USAGE
    assert err.endswith("\n") and err.count("\n") == 1
    assert err.rstrip("\n").isprintable(), err
    assert "\\x1b]0;pwned\\x07" in err and "\\nketer: wrote" in err


# -- which history entry is a command's verdict ------------------------------------------------


class History:
    """A status API that has these entries of app "a" (as history_after gives them), and
    shows app "a" deploying ``deploying`` (None: nothing; "": a version not read yet)."""

    def __init__(self, *entries: dict, deploying: str | None = None) -> None:
        self.entries = [{"seq": seq, **entry} for seq, entry in enumerate(entries, 1)]
        self.deploying = deploying

    def history_after(self, app: str, after: int, wait: float) -> list[dict]:
        return [entry for entry in self.entries if entry["seq"] > after]

    def app(self, name: str) -> dict:
        return {"name": name, "deploying": self.deploying}


def ended(outcome: str, sha256: str, began: float, at: float = 100.0) -> dict:
    return {"outcome": outcome, "sha256": sha256, "at": at, "duration": at - began}


OURS, OTHER = "a" * 64, "b" * 64


@pytest.mark.parametrize(
    ("entries", "deploying", "expected"),
    [
        # The bundle that was unpacking when ours came: superseded, with no sha256 yet.
        ([ended("superseded", "", 40.0), ended("serving", OURS, 51.0)], OURS[:12], 1),
        # The same version's deploy under way when `keter restart` touched it again.
        ([ended("superseded", OURS, 45.0), ended("serving", OURS, 52.0)], OURS[:12], 1),
        # Ours superseded by the same bundle copied again, not read yet: followed.
        ([ended("superseded", OURS, 51.0), ended("serving", OURS, 52.0)], "", 1),
        # Ours superseded by another version: that is the verdict, at once.
        ([ended("superseded", OURS, 51.0), ended("serving", OTHER, 52.0)], OTHER[:12], 0),
        # Ours superseded as its bundle was removed: nothing follows; the verdict at once.
        ([ended("superseded", OURS, 51.0)], None, 0),
        # Ours failed before its bundle was read: it cannot name its version.
        ([ended("failed", "", 51.0)], None, 0),
        # Our serving entry, though the wall clock was stepped back meanwhile.
        ([ended("serving", OURS, 49.5)], None, 0),
    ],
    ids=["older-unpacking", "older-same-version", "followed", "replaced", "removed", "unread",
         "clock-stepped-back"],
)  # fmt: skip
def test_a_commands_verdict_is_the_end_of_its_own_deploy(entries, deploying, expected) -> None:
    """`keter deploy` took the end of a deploy that had begun before its own (the bundle
    it superseded, with no sha256 yet) for its verdict, and exited 1 while its version
    served; `keter restart` did the same with the deploy of its own version it replaced."""
    history = History(*entries, deploying=deploying)
    began = time.monotonic()
    verdict = commands.wait_for_verdict(history, "a", 0, OURS, 5.0, since=50.0)
    assert verdict == history.entries[expected]
    assert time.monotonic() - began < 1  # none waits for its timeout


class Flaky(History):
    """History whose first ``failures`` polls fail as a keter too busy to answer does."""

    def __init__(self, *entries: dict, failures: int) -> None:
        super().__init__(*entries)
        self.failures = failures

    def history_after(self, app: str, after: int, wait: float) -> list[dict]:
        if self.failures > 0:
            self.failures -= 1
            raise NotAnswering("keter closed the connection without an answer")
        return super().history_after(app, after, wait)


def test_a_deploy_waiting_for_its_verdict_asks_again_when_a_poll_fails() -> None:
    # One poll that keter dropped (busy) ended `keter deploy` in "failed", exit 1, while
    # its deploy went on to serve.
    history = Flaky(ended("serving", OURS, 51.0), failures=2)
    verdict = commands.wait_for_verdict(history, "a", 0, OURS, 10.0, since=50.0)
    assert verdict == history.entries[0]
    # Failing until the deadline, the failure is the news, not "no verdict in time".
    with pytest.raises(NotAnswering):
        commands.wait_for_verdict(Flaky(failures=10**6), "a", 0, OURS, 1.0, since=50.0)


# -- what keter checks of ROOT before it touches it -------------------------------------------


def run_keter(target: Path | str) -> subprocess.CompletedProcess:
    """``keter TARGET`` that is expected to refuse at once."""
    return subprocess.run(
        [sys.executable, "-m", "keter", str(target)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("folder", ["/", "/etc", "/root", "/usr/local", "/var/lib", "/bin"])
def test_a_system_folder_is_no_root(folder) -> None:
    # `keter /root/keter-config.yaml` made ROOT /: keter made /etc 0700 (every other
    # service broke), /run 0711, and looked for half-written files to remove in both.
    # (/bin is /usr/bin on a merged-/usr system: as it really is.)
    assert rootcheck.problems(Path(folder), Path(folder) / "etc" / "keter-config.yaml") == [
        f"ROOT is {folder}, a system folder: keter would take over its etc/, run/ and log/; "
        "give keter a folder of its own (e.g. /opt/keter)"
    ]


@pytest.mark.parametrize("whose", ["ROOT", "etc/", "log/", "the config file", "a folder above"])
def test_a_root_someone_else_may_change_is_refused_untouched(tmp_path, whose) -> None:
    # Whoever owns ROOT could write a reload-command that keter runs as root.
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    above = tmp_path / "srv"
    root = above / "keter"
    (root / "etc").mkdir(parents=True)
    config_file = root / "etc" / "keter-config.yaml"
    config_file.write_text("stop-timeout: 5\n")
    (root / "log").mkdir()
    changed = {
        "ROOT": root,
        "etc/": root / "etc",
        "log/": root / "log",  # a link planted there led keter's writes of app output
        "the config file": config_file,
    }.get(whose, above)
    if whose == "a folder above":
        changed.chmod(0o777)  # writable by all, not sticky
    else:
        os.chown(changed, 65534, 65534)
    result = run_keter(root)
    assert result.returncode == 2, result.stderr
    assert f"keter: {changed} " in result.stderr and "what keter runs as root" in result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["etc", "log"]  # nothing made


def test_keter_refuses_to_run_as_another_user_than_root() -> None:
    # Checked first (main): as another user, an unreadable config had said "bad
    # configuration" instead.
    assert rootcheck.user_problems(euid=1000) == [
        "keter must run as root: it runs each app as a user of its own and writes "
        "nginx's config and the kernel's rules"
    ]
    assert rootcheck.user_problems(euid=0) == []


def test_a_config_file_reached_through_another_users_folder_is_refused_unread(tmp_path) -> None:
    # ROOT/etc/keter-config.yaml a link to a root-owned file in a folder another user
    # owns: that user could put another file there, naming commands keter runs as root.
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    # Refused unread: read, it would be "bad configuration".
    (theirs / "keter-config.yaml").write_text("stop-timout: 5\n")
    os.chown(theirs, 65534, 65534)
    root = tmp_path / "keter"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "keter-config.yaml").symlink_to(theirs / "keter-config.yaml")
    result = run_keter(root)
    assert result.returncode == 2, result.stderr
    assert f"keter: {theirs} is owned by uid 65534" in result.stderr
    assert "bad configuration" not in result.stderr


def test_keter_runs_on_roots_real_path(tmp_path) -> None:
    # ROOT given through a link: re-pointed while keter runs (by whoever may), it had
    # keter take bundles from, and write as root into, the folder it then led to.
    real = tmp_path / "real"
    (real / "etc").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert load_config(link).root == real
    (real / "etc" / "keter-config.yaml").write_text("stop-timeout: 5\n")
    assert load_config(link).root == real
    assert load_config(link / "etc" / "keter-config.yaml").root == real


@pytest.mark.parametrize("character", [";", "{", '"', "\\", "$"])
def test_a_root_whose_path_nginx_cannot_take_is_refused(tmp_path, character) -> None:
    # Passed, then every static-files deploy failed, blaming the bundle.
    root = tmp_path / f"a{character}b"
    [problem] = rootcheck.problems(root, root / "etc" / "k.yaml")
    assert problem.startswith(f"ROOT {root}: the path has characters nginx cannot take")


@pytest.mark.parametrize("folder", ["incoming", "log", "run"])
def test_a_link_as_one_of_keters_folders_is_refused(tmp_path, folder) -> None:
    # keter made where it led 0700 (a link to /etc: every other service broken) and
    # wrote there as root.
    root = tmp_path / "keter"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (root / folder).symlink_to(elsewhere)
    result = run_keter(root)
    assert result.returncode == 2, result.stderr
    assert f"keter: {root / folder} is not a folder (a link?)" in result.stderr
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755


def test_nginx_config_folder_others_may_change_is_refused(tmp_path) -> None:
    # keter writes beside nginx's config file as root (its support folder, its lock) and
    # removes what it does not know there: a link planted as that folder led it anywhere.
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    theirs = tmp_path / "sites"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    root = tmp_path / "keter"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "keter-config.yaml").write_text(f"nginx: {{config-file: {theirs}/keter}}\n")
    result = run_keter(root)
    assert result.returncode == 2, result.stderr
    assert f"keter: {theirs} is owned by uid 65534" in result.stderr
    assert not (theirs / ".keter.d").exists()


def told(outcome: str, sha256: str) -> dict:
    """An entry as the API tells it, ended after the command began."""
    reason = "its bundle was removed" if outcome == "superseded" else ""
    return {**ended(outcome, sha256, 99.0), "version": sha256[:12], "reason": reason}


class Restoring(History):
    """A status API whose restore of app "a" succeeded and restarts version OURS; once
    the entries are read, each of ``later`` ends a deploy."""

    def __init__(self, *entries: dict, deploying: str | None, later: list[dict]) -> None:
        super().__init__(*entries, deploying=deploying)
        self.later = later

    def restore(self, app: str, backup: str | None, timeout: float) -> dict:
        restored = {"restored": {"name": "b1.dump"}, "safety_backup": {"name": "b0.dump"}}
        return {**restored, "version": OURS[:12], "sha256": OURS, "after": 0}

    def log(self, app: str, lines: int) -> list[str]:
        return []

    def history_after(self, app: str, after: int, wait: float) -> list[dict]:
        told = super().history_after(app, after, wait)
        if not told and self.later:  # the version deploying ends: one more entry
            self.entries.append({"seq": len(self.entries) + 1, **self.later.pop(0)})
        return told


@pytest.mark.parametrize(
    ("entries", "deploying", "code", "said"),
    [
        # The restart superseded by B, B by C: C's end is the verdict (B's was said).
        (
            [told("superseded", OURS), told("superseded", OTHER)],
            "c" * 12,
            0,
            "a newer version came meanwhile",
        ),
        # The bundle removed during the restart: said at once, no newer version claimed.
        ([told("superseded", OURS)], None, 1, "superseded: its bundle was removed"),
    ],
    ids=["two-uploads", "removed"],
)  # fmt: skip
def test_a_restore_follows_newer_versions_to_their_end_but_not_a_removal(
    monkeypatch, capsys, tmp_path, entries, deploying, code, said
) -> None:
    from keter import appcommands

    later = [told("serving", "c" * 64)] if deploying else []
    restoring = Restoring(*entries, deploying=deploying, later=later)
    monkeypatch.setattr(appcommands, "KeterClient", lambda root: restoring)
    began = time.monotonic()
    command = ["db", "restore", "a", "--root", str(tmp_path), "--timeout", "5"]
    assert appcommands.main(command) == code
    assert said in capsys.readouterr().err
    assert time.monotonic() - began < 2  # no timeout waited out


class Busy(History):
    """History whose app view is too busy to answer once; then a deploy of our version
    that was on its way ends, serving."""

    def __init__(self, *entries: dict) -> None:
        super().__init__(*entries)
        self.busy = 2  # twice: past the wait's last look

    def app(self, name: str) -> dict:
        if self.busy:
            self.busy -= 1
            if not self.busy:
                serving = {"seq": len(self.entries) + 1, **ended("serving", OURS, 52.0)}
                self.entries.append(serving)
            raise NotAnswering("keter did not answer within 10s")
        return super().app(name)


def test_a_keter_too_busy_to_say_what_is_on_its_way_is_asked_again() -> None:
    # Its silence was taken for the app gone: "superseded" was the verdict, while the
    # restart of the same version went on to serve.
    history = Busy(ended("superseded", OURS, 51.0))
    verdict = commands.wait_for_verdict(history, "a", 0, OURS, 5.0, since=50.0)
    assert verdict is not None and verdict["outcome"] == "serving"
