"""How the operator's commands end when something is off: bad arguments, a file they
cannot write, a keter that does not answer or answers in shapes they do not know.

Each ends in one line and the exit code README gives (2 bad usage, 3 keter cannot be
used), never a traceback. The keters here are stand-ins on ROOT/run/keter.sock: one
that accepts and never answers (a stopped keter), one that answers every request with
one fixed body (a keter of another version).
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keter import appcommands, commands
from keter.client import KeterClient
from keter.status import socket_path

EXIT_USAGE, EXIT_UNAVAILABLE = 2, 3
UNKNOWN_ANSWER = (
    "keter: keter answered something this keter command does not understand (another version?)\n"
)


def run(capsys, root: Path, *args: str) -> tuple[int, str]:
    """A command in this process: (exit code, stderr); argparse's exit is a code too."""
    command, *rest = args
    main = appcommands.main if command in ("env", "db", "data") else commands.main
    try:
        code = main([command, "--root", str(root), *rest])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# -- --timeout ------------------------------------------------------------------------------


TIMED = [
    ("deploy", "x.keter"),
    ("rollback", "app"),
    ("restart", "app"),
    ("env", "set", "app", "A=b"),
    ("db", "backup", "app"),
    ("db", "restore", "app"),
]


@pytest.mark.parametrize("args", TIMED, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("timeout", ["inf", "nan", "-1", "0", "1e400", "soon"])
def test_a_timeout_that_is_no_finite_positive_number_is_bad_usage(
    capsys, tmp_path, args, timeout
) -> None:
    # inf, nan and -1 ended rollback and db in a traceback where the socket's timeout is
    # set; deploy --timeout nan waited and said "no verdict within nans".
    code, err = run(capsys, tmp_path, *args, "--timeout", timeout)
    assert code == EXIT_USAGE
    assert "argument --timeout: expected a number of seconds above 0" in err
    assert "Traceback" not in err


# -- keter bundle -o --------------------------------------------------------------------------


def app_folder(base: Path) -> Path:
    (base / "config").mkdir(parents=True)
    (base / "config" / "keter.yaml").write_text("exec: ../bin/app\nhost: built.test\n")
    (base / "bin").mkdir()
    (base / "bin" / "app").write_text("#!/bin/sh\nexec sleep 1000\n")
    os.chmod(base / "bin" / "app", 0o755)
    return base


def test_a_bundle_it_cannot_write_is_one_line(capsys, tmp_path) -> None:
    folder = app_folder(tmp_path / "built")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    (tmp_path / "taken.keter").mkdir()
    cases = {
        tmp_path / "missing" / "built.keter": "No such file or directory",
        tmp_path / "taken.keter": "Is a directory",
    }
    if os.geteuid() != 0:  # root writes into a read-only folder all the same
        cases[read_only / "built.keter"] = "Permission denied"
    for output, reason in cases.items():
        code, err = run(capsys, tmp_path, "bundle", str(folder), "-o", str(output))
        assert code == EXIT_USAGE, err
        assert err == f"keter: cannot write {output}: {reason}\n"
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind


# -- keter env set --stdin ---------------------------------------------------------------------


def test_a_bad_setting_from_stdin_is_said_to_come_from_stdin(capsys, tmp_path, monkeypatch):
    lines = iter(["GOOD=1\n", f"BIG={'x' * 40_000}\n"])
    monkeypatch.setattr("sys.stdin", lines)
    code, err = run(capsys, tmp_path, "env", "set", "app", "--stdin")
    assert code == EXIT_USAGE
    assert err == "keter: stdin: the value of BIG is longer than 32768 bytes\n"
    monkeypatch.setattr("sys.stdin", iter(["no equals sign\n"]))
    code, err = run(capsys, tmp_path, "env", "set", "app", "--stdin")
    assert err == "keter: expected NAME=VALUE, but a word on stdin has no '='\n"
    code, err = run(capsys, tmp_path, "env", "set", "app", "word")
    assert err == "keter: expected NAME=VALUE, but a word on the command line has no '='\n"


# -- keter rollback APP VERSION ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["zzzz", "9b1", "9b1c07-", "x" * 65])
def test_a_version_that_is_no_sha256_prefix_is_bad_usage(capsys, tmp_path, version) -> None:
    # Refused before keter is asked (none runs here): it once went to keter, and its
    # refusal exited 1, the code of a failed deploy.
    code, err = run(capsys, tmp_path, "rollback", "app", version)
    assert code == EXIT_USAGE
    assert err.startswith("keter: ") and "is not a version (4 to 64 hex digits" in err
    assert err.count("\n") == 1


# -- a keter that does not answer ---------------------------------------------------------------


@pytest.fixture
def silent_keter(tmp_path, monkeypatch) -> Iterator[Path]:
    """ROOT whose keter.sock takes connections and never answers (a SIGSTOPped keter),
    and commands that wait 0.3 s for an answer instead of 10."""
    root = tmp_path / "root"
    socket_path(root).parent.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path(root)))
    listener.listen(16)
    monkeypatch.setattr(commands, "KeterClient", functools.partial(KeterClient, timeout=0.3))
    monkeypatch.setattr(appcommands, "KeterClient", functools.partial(KeterClient, timeout=0.3))
    yield root
    listener.close()


@pytest.mark.parametrize(
    "args",
    [("status",), ("certs",), ("restart", "app"), ("rollback", "app"), ("env", "app")],
    ids=lambda a: a[0],
)
def test_a_keter_that_does_not_answer_is_keter_unavailable(capsys, silent_keter, args) -> None:
    # README's exit codes: 1 is a failed deploy or an unknown app; a keter that cannot
    # be used is 3.
    code, err = run(capsys, silent_keter, *args)
    assert code == EXIT_UNAVAILABLE
    assert err == "keter: keter did not answer within 0.3s\n"


# -- a keter of another version -------------------------------------------------------------------


class _Answers(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    body = b"{}"


class _Answer(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_keter(tmp_path) -> Iterator[tuple[Path, _Answers]]:
    """ROOT whose keter answers every request 200 with ``server.body``."""
    root = tmp_path / "root"
    socket_path(root).parent.mkdir(parents=True)
    server = _Answers(str(socket_path(root)), _Answer)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield root, server
    server.shutdown()
    server.server_close()
    thread.join()


COMMANDS = [
    ("status",),
    ("certs",),
    ("stats", "app"),
    ("restart", "app"),
    ("rollback", "app"),
    ("env", "app"),
    ("env", "set", "app", "A=b"),
    ("db", "backups", "app"),
    ("db", "backup", "app"),
    ("db", "restore", "app"),
]
BODIES = [
    b"{}",
    b"[]",
    b"null",
    b'"text"',
    b'{"apps": 5, "now": "x", "names": 5, "backups": [1], "token": "t", "version": []}',
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: b.decode()[:12])
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_an_answer_of_another_shape_is_one_line_and_exit_3(capsys, other_keter, args, body) -> None:
    root, server = other_keter
    server.body = body
    code, err = run(capsys, root, *args)
    assert code == EXIT_UNAVAILABLE, err
    assert err.endswith(UNKNOWN_ANSWER)  # after what it began to do ("app: restarting")
    assert "Traceback" not in err
