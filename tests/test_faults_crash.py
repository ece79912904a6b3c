"""Fault suite, part 4: keter SIGKILLed in the middle of a deploy, then restarted.

The deploy of a second version is held at one step, at a point keter itself makes
observable, then keter is killed with SIGKILL (an OOM kill, a crash) and started
again. Each hold uses only what keter already runs or waits for, with nothing
added to keter for tests:

* unpacked: the new version wants a database; keter's admin DSN points at a socket
  the test accepts on and never answers, so keter sits in provisioning;
* started: the new version's executable is a wrapper that waits on a FIFO before
  exec'ing the app, so it has started but cannot answer;
* config written: keter's nginx test-command is a wrapper that waits before
  running ``nginx -t``: the new config is on disk, nginx has not seen it;
* reloaded: the reload-command wrapper waits after ``nginx -s reload``: nginx
  routes to the new version, keter has not confirmed it (for these two the new
  version adds a host: a version with the same routes switches in the kernel,
  without nginx);
* before the old version's SIGTERM: a long drain (a slow request keeps the old
  version busy), killed in the middle of it.

After the restart, whatever the step: the app serves the version in incoming/
(one version, one process group), temp/ holds only that version's folder, every
process of the killed run is gone, and nginx serves exactly the config on disk,
which routes to the running version. Disk-full cases are in test_faults_disk.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import KeterDaemon
from support.faults import NO_JOURNAL, error_records, settled_generation
from support.net import app_port_range, served
from support.processes import alive
from support.wait import wait_for

from keter.nginx import fetch_generation
from keter.switch import Table

APP = Path(__file__).parent / "apps" / "versioned_app.py"

# gate WHEN NAME COMMAND...: runs COMMAND; while GATES/NAME.gate exists it holds,
# before or after COMMAND, until the test writes to GATES/NAME.fifo.
# GATES/NAME.reached (holding the shell's pid) tells the test it is being held.
GATE_SCRIPT = """#!/bin/sh
gates={gates}
when=$1 name=$2
shift 2
hold() {{
    if [ -e "$gates/$name.gate" ]; then
        echo $$ > "$gates/$name.reached"
        read _ < "$gates/$name.fifo"
    fi
}}
if [ "$when" = before ]; then
    hold
    exec "$@"
fi
"$@"
status=$?
hold
exit $status
"""

# The app's executable when the "started" step is held: the gate, then the real app.
APP_WRAPPER = """#!/bin/sh
exec {gates}/gate before app {python} "$(dirname "$0")/real" "$@"
"""


class Gates:
    """Named holds at chosen steps of keter's work (see GATE_SCRIPT)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        os.chmod(folder, 0o755)
        self.script = folder / "gate"
        self.script.write_text(GATE_SCRIPT.format(gates=folder))
        self.script.chmod(0o755)

    def wrap(self, when: str, name: str, command: list[str]) -> list[str]:
        return [str(self.script), when, name, *command]

    def arm(self, name: str) -> None:
        os.mkfifo(self.folder / f"{name}.fifo")
        (self.folder / f"{name}.gate").touch()

    def held(self, name: str) -> int | None:
        """The pid of the shell holding at ``name``, once one does."""
        try:
            return int((self.folder / f"{name}.reached").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def open_all(self) -> None:
        """Disarm every gate and let whoever still waits at one go on."""
        for gate in self.folder.glob("*.gate"):
            gate.unlink()
        for fifo in self.folder.glob("*.fifo"):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody is waiting
                    raise
            else:
                os.close(fd)


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Gates]:
    gates = Gates(tmp_path / "gates")
    yield gates
    gates.open_all()


def gated_bundle(path: Path, gates: Gates, host: str, version: str) -> Path:
    """A bundle whose executable waits at the "app" gate, then runs the real app."""
    wrapper = path.with_suffix(".sh")
    wrapper.write_text(APP_WRAPPER.format(gates=gates.folder, python=sys.executable))
    return make_bundle(
        path,
        config=webapp_config(host, version),
        app_source=wrapper,
        interpreter="/bin/sh",
        files={"bin/real": APP.read_text()},
    )


@contextlib.contextmanager
def silent_server() -> Iterator[socket.socket]:
    """A TCP server that accepts and never answers: a database that hangs."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        yield server


STEPS = ["unpacked", "started", "config-written", "reloaded", "draining"]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_keter_killed_at_each_step_recovers_to_one_clean_version(
    step: str, gates: Gates, keter_factory, private_nginx, private_postgres, tmp_path: Path
) -> None:
    nginx = private_nginx
    stack = contextlib.ExitStack()
    with stack:
        keter: KeterDaemon = keter_factory(start=False, **{"port-range": app_port_range()})
        # "written": the new config is on disk, nginx not yet told (keter reloads first
        # and runs nginx -t only when nginx refuses); "reload": nginx told.
        reload = gates.wrap("after", "reload", list(nginx.reload_command))
        keter.settings["nginx"] = {
            "config-file": str(nginx.config_file),
            "test-command": list(nginx.test_command),
            "reload-command": gates.wrap("before", "written", reload),
            "error-log": str(nginx.error_log),
        }
        keter.settings["drain-seconds"] = 60 if step == "draining" else 1
        if step == "unpacked":
            hanging_db = stack.enter_context(silent_server())
            port = hanging_db.getsockname()[1]
            dsn = f"host=127.0.0.1 port={port} user=x password=y"
            keter.settings["postgres"] = {"admin-dsn": dsn}
        keter.start(env=NO_JOURNAL)
        bundles = tmp_path / "bundles"
        bundles.mkdir()
        bundle = bundles / "crash.keter"
        keter.drop(make_bundle(bundle, config=webapp_config("crash.test", "v1")))
        served(nginx, "crash.test", "v1")
        wait_for(lambda: "crash: deploy #1 now serving" in keter.log(), 10)

        # -- hold the second deploy at the step, then SIGKILL keter --------------------
        if step == "started":
            gates.arm("app")
            gated_bundle(bundle, gates, "crash.test", "v2")
        else:
            extra: dict = {"postgres": True} if step == "unpacked" else {}
            if step in ("config-written", "reloaded"):
                extra["extra-hosts"] = ["crash2.test"]  # new routes: nginx must switch
            make_bundle(bundle, config=webapp_config("crash.test", "v2", **extra))
        if step == "draining":
            slow = stack.enter_context(socket.create_connection(("127.0.0.1", nginx.port)))
            slow.sendall(b"GET /slow?60 HTTP/1.1\r\nHost: crash.test\r\n\r\n")
        if step == "config-written":
            gates.arm("written")
        if step == "reloaded":
            gates.arm("reload")
        keter.drop(bundle)
        match step:
            case "unpacked":
                connection, _ = hanging_db.accept()  # keter asks the database, after unpacking
                stack.enter_context(connection)
                assert "crash: deploy #2 unpacked" in keter.log()
                assert "crash: deploy #2 started" not in keter.log()
            case "started":
                wait_for(lambda: gates.held("app"), 20, "v2 to start")
                assert re.search(r"crash: deploy #2 started pid \d+", keter.log())
            case "config-written":
                wait_for(lambda: gates.held("written"), 20, "the new config to be written")
                assert "crash: deploy #2 is healthy" in keter.log()
                # nginx has not seen it: it still serves an older generation.
                on_disk = re.search(r"^# generation (\d+)$", nginx.config_file.read_text(), re.M)[1]
                assert fetch_generation("127.0.0.1", nginx.port) != on_disk
            case "reloaded":
                wait_for(lambda: gates.held("reload"), 20, "nginx to be reloaded")
                assert "now serving" not in keter.log().split("deploy #2 is healthy")[1]
            case "draining":
                wait_for(lambda: "deploy #1 drains (at most 60.0s)" in keter.log(), 20, "the drain")
        killed_run = keter.children()  # its apps, and the gate it is held at
        # v1 serving, and v2 too once it has been started.
        assert len(app_leaders(keter)) == (1 if step == "unpacked" else 2)
        keter.kill()

        # -- restart, with nothing held and a database that answers ----------------------
        gates.open_all()
        keter.settings["drain-seconds"] = 1
        keter.settings["postgres"] = {"admin-dsn": private_postgres.admin_dsn}
        keter.start(env=NO_JOURNAL)
        # Not just served(): until keter has stopped them, the killed run's apps answer too.
        wait_for(
            lambda: re.search(r"crash: deploy #\d+ now serving", keter.log_since_start()),
            30,
            "the restarted keter to deploy v2",
        )
        served(nginx, "crash.test", "v2")

        # One version, one process group, running from the one folder in temp/.
        wait_for(lambda: len(app_leaders(keter)) == 1, 15, "a single app process group")
        [app] = app_leaders(keter)
        temp = keter.root / "temp"
        assert list(temp.iterdir()) == [Path(app.cwd())]
        # Nothing of the killed run is left: its apps were stopped, not adopted.
        wait_for(
            lambda: not any(alive(p.pid) for p in killed_run), 15, "the killed run's processes"
        )
        # nginx serves the config on disk, and it routes to the running version (through
        # its stable address, which the kernel leads to the version's port).
        port = app_port(app)
        text = nginx.served_config()
        settled_generation(nginx)
        [(address, upstream)] = re.findall(r"server (127\.[\d.]+):(\d+)[ ;]", text)
        table = Table.for_root(keter.root)
        assert address == table.address
        assert table.read() == {int(upstream): port}
        assert error_records(keter.log_since_start()) == []
        if step == "unpacked":
            assert "crash:" in (keter.root / "etc" / "postgres.yaml").read_text()


def app_leaders(keter: KeterDaemon) -> list[psutil.Process]:
    """keter's app processes: each leads a process group of its own and has a PORT
    (nginx -t and the reload command lead groups of their own too, without one)."""
    leaders = []
    for child in keter.children():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            leads = os.getpgid(child.pid) == child.pid and alive(child.pid)
            if leads and "PORT" in child.environ():
                leaders.append(child)
    return leaders


def app_port(app: psutil.Process) -> int:
    return int(app.environ()["PORT"])
