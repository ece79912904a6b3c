"""Apps cannot touch each other (issue 11): a user of its own per app, private files,
ports that cannot be stolen, no connection to another app's port.

Against the real daemon as root, with keter's default of one uid and gid per
app: two apps with secrets in their environment. Whatever one tries against
the other, run with its own identity, fails with EACCES or EPERM: reading
the other's /proc/PID/environ, its bundle, its unpacked files and its log,
and signalling its process. The same attempts against its own files succeed,
so the failures are the isolation and not a broken probe.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import os
import pwd
import re
import signal
import socket
import struct
import subprocess
from pathlib import Path

import psutil
import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import app_processes, failures
from support.net import app_port_range, bind_when_free, body, free_port, served
from support.wait import wait_for

from keter.processes.programs import SETPRIV
from keter.switch import Table
from keter.users import DEFAULT_RANGE, NGINX_GROUP, publish_static, secure_folder

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike the tests' own Python

# Run as one app's uid and gid: try everything against another app, print errno names.
ATTACK = r"""
import errno, json, os, signal, sys
pid, bundle, folder, log = sys.argv[1:5]
results = {}
def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("environ", lambda: open(f"/proc/{pid}/environ", "rb").read())
attempt("bundle", lambda: open(bundle, "rb").read())
attempt("listing", lambda: os.listdir(folder))
attempt("unpacked", lambda: open(os.path.join(folder, "config", "keter.yaml"), "rb").read())
attempt("log", lambda: open(log, "rb").read())
attempt("signal", lambda: os.kill(int(pid), signal.SIGTERM if sys.argv[5] == "kill" else 0))
print(json.dumps(results))
"""


def uid_of(pid: int) -> int:
    return psutil.Process(pid).uids().real


def attack(uid: int, target_pid: int, root: Path, app: str, signal_mode: str) -> dict:
    [folder] = (root / "temp").glob(f"{app}-*")
    command = [
        SETPRIV,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        SYSTEM_PYTHON,
        "-c",
        ATTACK,
        str(target_pid),
        str(root / "incoming" / f"{app}.keter"),
        str(folder),
        str(root / "log" / f"app-{app}.log"),
        signal_mode,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
    return json.loads(done.stdout)


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_two_apps_cannot_read_or_signal_each_other(open_base, keter_factory, private_nginx):
    keter = keter_factory(
        root=open_base / "root",
        **{"port-range": app_port_range(), "run-apps-as-root": False},
    )
    for app in ("alpha", "beta"):
        config = webapp_config(f"{app}.test", "v1", env={"SECRET": f"{app}-secret-42"})
        bundle = make_bundle(open_base / f"{app}.keter", config=config, interpreter=SYSTEM_PYTHON)
        keter.drop(bundle)
    pids = {}
    for app in ("alpha", "beta"):
        served(private_nginx, f"{app}.test", "v1")  # they work, as users of their own
        pids[app] = wait_for(
            lambda app=app: [p.pid for p in app_processes(keter) if f"/{app}-" in p.cwd()],
            20,
            f"{app} running",
        )[0]
    # Each app runs as a uid (and gid) of its own, from keter's range, recorded.
    uids = {app: uid_of(pid) for app, pid in pids.items()}
    assert uids["alpha"] != uids["beta"]
    assert all(DEFAULT_RANGE[0] <= uid <= DEFAULT_RANGE[1] for uid in uids.values())
    assert json.loads((keter.root / "etc" / "app-users.json").read_text()) == uids
    assert all(psutil.Process(pid).gids().real == uids[app] for app, pid in pids.items())

    for me, other in (("alpha", "beta"), ("beta", "alpha")):
        stolen = attack(uids[me], pids[other], keter.root, other, "kill")
        assert stolen == {
            "environ": stolen["environ"],
            "bundle": "EACCES",
            "listing": "EACCES",
            "unpacked": "EACCES",
            "log": "EACCES",
            "signal": "EPERM",
        }, stolen
        assert stolen["environ"] in ("EACCES", "EPERM"), stolen
        # The same probe on its own things works: the failures above are the isolation.
        own = attack(uids[me], pids[me], keter.root, me, "probe")
        assert own["environ"] == "ok" and own["unpacked"] == "ok" and own["listing"] == "ok"
        assert own["signal"] == "ok"
        # A bundle and a log belong to keter, not to the app.
        assert own["bundle"] == "EACCES" and own["log"] == "EACCES"
    assert all(psutil.Process(pid).is_running() for pid in pids.values())


def deploy_moving(keter, private_nginx, tmp_path: Path) -> tuple[int, int, int]:
    """The app "moving" deployed and served: its deploy id, pid and port."""
    bundle = make_bundle(tmp_path / "moving.keter", config=webapp_config("moving.test", "v1"))
    keter.drop(bundle)
    served(private_nginx, "moving.test", "v1")
    started = re.search(r"moving: deploy #(\d+) started pid (\d+) on port (\d+)", keter.log())
    assert started
    deploy, pid, port = (int(group) for group in started.groups())
    return deploy, pid, port


def test_a_stranger_on_a_crashed_apps_port_gets_no_traffic(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"port-range": app_port_range()})
    deploy, pid, port = deploy_moving(keter, private_nginx, tmp_path)

    offset = len(keter.log())
    os.kill(pid, signal.SIGKILL)
    stranger = bind_when_free(port)  # before keter restarts the app (its backoff)
    try:
        moved = wait_for(
            lambda: re.search(
                rf"moving: deploy #{deploy} moves from port {port} to (\d+)", keter.log()[offset:]
            ),
            15,
            "the move to another port",
        )
        new_port = int(moved[1])
        [error] = [line for line in keter.log()[offset:].splitlines() if "is held by" in line]
        assert "ERROR" in error
        assert f"moving: port {port} is held by pid {os.getpid()} (user root)" in error, error
        # nginx routes the app to its stable address (keter.switch); the kernel leads
        # that to the new port once the app answers there, without nginx.
        table = Table.for_root(keter.root)
        wait_for(lambda: new_port in table.read().values(), 15, "the kernel to take the port")
        assert port not in table.read().values()
        served(private_nginx, "moving.test", "v1")
        for _ in range(20):
            assert body(private_nginx, "moving.test") == b"v1\n"
        with pytest.raises(BlockingIOError):
            stranger.accept()  # not one request: not even keter's health probe
    finally:
        stranger.close()


def listen_on(port: int) -> socket.socket | None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def test_a_stranger_holding_every_port_gets_no_traffic_and_the_app_moves_once_one_frees(
    keter_factory, private_nginx, tmp_path
):
    """A stranger that is no app of keter's (no bind guard holds it back) holds every free
    port of port-range, and takes a crashed app's port. keter has nowhere to move the app:
    meanwhile its stable address leads nowhere (never to the stranger), and keter looks for
    a port again until one frees; then the app moves there and serves."""
    low, high = app_port_range()
    keter = keter_factory(**{"port-range": [low, high]})
    deploy, pid, port = deploy_moving(keter, private_nginx, tmp_path)
    hoard = [s for p in range(low, high + 1) if p != port and (s := listen_on(p)) is not None]
    offset = len(keter.log())
    os.kill(pid, signal.SIGKILL)
    stranger = bind_when_free(port)  # before keter restarts the app (its backoff)
    try:
        wait_for(
            lambda: f"moving: cannot move deploy #{deploy}" in keter.log()[offset:],
            15,
            lambda: f"keter to find no port: {keter.log()[offset:][-2000:]}",
        )
        # nginx routes to the app's stable address, which leads nowhere now: a 502.
        assert private_nginx.request("moving.test")[0] == 502
        freed = hoard.pop()
        free = freed.getsockname()[1]
        freed.close()
        moved = wait_for(
            lambda: re.search(
                rf"moving: deploy #{deploy} moves from port {port} to (\d+)", keter.log()[offset:]
            ),
            30,
            "keter to try again and move the app",
        )
        assert int(moved[1]) == free
        served(private_nginx, "moving.test", "v1")
        with pytest.raises(BlockingIOError):
            stranger.accept()  # not one request
    finally:
        stranger.close()
        for sock in hoard:
            sock.close()


def test_a_stranger_that_takes_the_port_while_a_restart_starts_gets_no_probe(
    keter_factory, private_nginx, tmp_path
):
    """The restart's health probe asks who listens before it connects: a stranger that
    bound the port after the respawn (the app has not listened yet) is never sent it."""
    keter = keter_factory(**{"port-range": app_port_range()})
    first_run = keter.root / "data" / "late" / "ran"  # the app's own folder: its user writes it
    config = webapp_config("late.test", "v1", args=["--first-run-only", str(first_run)])
    keter.drop(make_bundle(tmp_path / "late.keter", config=config))
    served(private_nginx, "late.test", "v1")
    started = re.search(r"late: deploy #(\d+) started pid (\d+) on port (\d+)", keter.log())
    assert started
    deploy, pid, port = (int(group) for group in started.groups())

    offset = len(keter.log())
    app_log = keter.root / "log" / "app-late.log"
    os.kill(pid, signal.SIGKILL)
    # The restart runs and will never listen; keter probes its port meanwhile.
    wait_for(lambda: "not the first run" in app_log.read_text(errors="replace"), 15, "the restart")
    stranger = bind_when_free(port)
    try:
        first_run.unlink()  # the run after the move listens again
        moved = wait_for(
            lambda: re.search(
                rf"late: deploy #{deploy} moves from port {port} to (\d+)", keter.log()[offset:]
            ),
            15,
            "the move to another port",
        )
        assert f"late: port {port} is held by pid {os.getpid()} (user root)" in keter.log()
        new_port = int(moved[1])
        table = Table.for_root(keter.root)
        wait_for(lambda: new_port in table.read().values(), 15, "the kernel to take the port")
        served(private_nginx, "late.test", "v1")
        with pytest.raises(BlockingIOError):
            stranger.accept()
    finally:
        stranger.close()


def test_a_new_version_whose_port_a_stranger_takes_fails_and_the_old_one_serves(
    keter_factory, private_nginx, tmp_path
):
    """The new version never listens; a stranger binds its port while keter probes it.
    The deploy fails naming the stranger, no probe reaches it, v1 keeps serving."""
    keter = keter_factory(**{"port-range": app_port_range()})
    keter.drop(make_bundle(tmp_path / "taken.keter", config=webapp_config("taken.test", "v1")))
    served(private_nginx, "taken.test", "v1")

    v2 = webapp_config("taken.test", "v2", args=["--never-listen"])
    keter.drop(make_bundle(tmp_path / "taken.keter", config=v2))
    started = wait_for(
        lambda: re.search(r"taken: deploy #2 started pid \d+ on port (\d+)", keter.log()),
        15,
        "v2 to start",
    )
    port = int(started[1])
    stranger = bind_when_free(port)
    try:
        reason = f"port {port} is held by pid {os.getpid()} (user root), not by the app"
        wait_for(lambda: reason in "\n".join(failures(keter, "taken")), 15, "v2 to fail")
        assert f"taken: port {port} is held by pid {os.getpid()}" in keter.log()
        for _ in range(20):
            assert body(private_nginx, "taken.test") == b"v1\n"
        # No probe reaches the stranger, save one whose connect raced its bind in the
        # microseconds after keter's last look (README, "Ports cannot be stolen").
        reached = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                stranger.accept()[0].close()
                reached += 1
        assert reached <= 1
    finally:
        stranger.close()


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_a_bundles_environment_reaches_only_its_app_never_what_runs_as_root(
    open_base, keter_factory, private_nginx
):
    """The loader and libc obey LD_PRELOAD, LD_AUDIT, GCONV_PATH... from the environment.
    Here LD_DEBUG_OUTPUT makes every program that starts with the bundle's environment
    leave a file, owned by whoever it ran as: none may be root (the start's shell and
    setpriv, before they drop to the app's user)."""
    traces = open_base / "traces"
    traces.mkdir(mode=0o1777)
    traces.chmod(0o1777)
    keter = keter_factory(
        root=open_base / "root",
        **{"port-range": app_port_range(), "run-apps-as-root": False},
    )
    odd = 'it\'s "quoted" $HOME `date` \\ \n and a new line'
    env = {"LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": str(traces / "ld"), "ODD": odd}
    config = webapp_config("env.test", "v1", env=env)
    keter.drop(make_bundle(open_base / "env.keter", config=config, interpreter=SYSTEM_PYTHON))
    served(private_nginx, "env.test", "v1")
    [pid] = wait_for(lambda: [p.pid for p in app_processes(keter)], 20, "the app")
    owners = {path.stat().st_uid for path in traces.iterdir()}
    assert owners == {uid_of(pid)}  # the app's processes, and nothing as root
    # The app has its environment, every character as the bundle gave it.
    seen = json.loads(body(private_nginx, "env.test", "/env"))
    assert (seen["ODD"], seen["LD_DEBUG_OUTPUT"]) == (odd, str(traces / "ld"))


# -- the network: an app connects to its own ports, never to another app's -----------------------

# The app that must be reached through nginx alone (basic-auth in front of it): on every
# address, IPv4 and IPv6 ("::"), it notes every request it gets in its data folder.
GUARDED = r"""#!/usr/bin/python3
import http.server, os, signal, socket
if os.environ.get("IGNORE_TERM"):  # stops only at keter's SIGKILL, after stop-timeout
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
seen = os.path.join(os.environ["KETER_DATA_DIR"], "seen")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(seen, "a") as f:
            f.write(f"{self.path} {self.headers.get('X-Forwarded-For')}\n")
        data = b"staff only\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
Server(("::", int(os.environ["PORT"])), Handler).serve_forever()
"""

# Run as an app's uid: one HTTP request to address:port, the answer's status line or errno.
REQUEST = r"""
import errno, socket, sys
address, port, host = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in address else socket.AF_INET
with socket.socket(family) as s:
    s.settimeout(5)
    try:
        s.connect((address, port))
        s.sendall(f"GET /from-another-app HTTP/1.0\r\nHost: {host}\r\n"
                  "X-Forwarded-For: 10.9.8.7\r\n\r\n".encode())
        print(s.recv(1000).decode(errors="replace").splitlines()[0])
    except OSError as exc:
        print(errno.errorcode.get(exc.errno, str(exc.errno)))
"""


def request_as(uid: int, address: str, port: int, host: str = "x.test") -> str:
    as_app = (SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups")
    done = subprocess.run(
        [*as_app, SYSTEM_PYTHON, "-c", REQUEST, address, str(port), host],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def two_apps(
    keter, private_nginx, base: Path, *, stubborn: bool = False
) -> tuple[dict[str, int], dict[str, int]]:
    """alpha (the versioned app) and beta (GUARDED, behind basic-auth; ignoring SIGTERM
    if ``stubborn``), deployed and served: each one's uid and port."""
    config = webapp_config("alpha.test", "v1")
    keter.drop(make_bundle(base / "alpha.keter", config=config, interpreter=SYSTEM_PYTHON))
    guarded = base / "guarded.py"
    guarded.write_text(GUARDED)
    middleware = [{"basic-auth": {"realm": "Staff", "creds": {"jon": "rocks"}}}]
    stanza = {"type": "webapp", "exec": "../bin/app", "host": "beta.test", "middleware": middleware}
    if stubborn:
        stanza["env"] = {"IGNORE_TERM": "1"}
    keter.drop(
        make_bundle(
            base / "beta.keter",
            config={"stanzas": [stanza]},
            app_source=guarded,
            interpreter=SYSTEM_PYTHON,
        )
    )
    served(private_nginx, "alpha.test", "v1")
    wait_for(lambda: private_nginx.request("beta.test")[0] == 401, 20, "beta, guarded")
    return wait_for(lambda: running_apps(keter), 20, "both apps listening")


def running_apps(keter) -> tuple[dict[str, int], dict[str, int]] | None:
    """Each running app's uid and listening port, by app name (None until both listen)."""
    uids, ports = {}, {}
    for process in keter.children():
        try:
            folder, user = process.cwd(), process.uids().real
            listening = [
                c.laddr.port
                for c in process.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            continue
        for app in ("alpha", "beta"):
            if f"/{app}-" in folder and listening:
                uids[app], ports[app] = user, listening[0]
    return (uids, ports) if len(ports) == 2 else None


def seen_by(keter, app: str) -> str:
    path = keter.root / "data" / app / "seen"
    return path.read_text() if path.exists() else ""


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_an_app_cannot_connect_to_another_apps_port(open_base, keter_factory, private_nginx):
    """The adversary's probe: an app finds another's port in /proc/net/tcp and connects
    to it directly, past nginx's basic-auth, with a forged X-Forwarded-For. The kernel
    resets it, on IPv4 and IPv6 loopback and through the stable address alike; the app
    reaches its own port and every app through nginx, and keter's probes go on."""
    status_port = free_port()
    keter = keter_factory(
        root=open_base / "root",
        **{
            "port-range": app_port_range(),
            "run-apps-as-root": False,
            "status-listen": f"127.0.0.1:{status_port}",
        },
    )
    uids, ports = two_apps(keter, private_nginx, open_base)
    table = Table.for_root(keter.root)
    assert table.read_own() == {ports[app]: uids[app] for app in ("alpha", "beta")}
    # Nor keter's status API on TCP: one app held its every connection and kept the
    # operators out. Others (root here) reach it.
    assert request_as(alpha := uids["alpha"], "127.0.0.1", status_port) == "ECONNREFUSED"
    socket.create_connection(("127.0.0.1", status_port), timeout=5).close()
    stable = {port: stable for stable, port in table.read().items()}
    for address, port in (
        ("127.0.0.1", ports["beta"]),
        ("::1", ports["beta"]),
        (table.address, stable[ports["beta"]]),
    ):
        assert request_as(alpha, address, port) == "ECONNREFUSED", (address, port)
    assert "/from-another-app" not in seen_by(keter, "beta")  # beta got no request of alpha's
    # What stays open to alpha: its own port, directly or through its stable address ...
    assert request_as(alpha, "127.0.0.1", ports["alpha"]) == "HTTP/1.0 404 Not Found"
    assert request_as(alpha, table.address, stable[ports["alpha"]]).startswith("HTTP/1.0 404")
    # ... and beta through nginx, which asks for the password.
    assert request_as(alpha, "127.0.0.1", private_nginx.port, "beta.test").endswith(
        "401 Unauthorized"
    )
    # The same requests as beta itself reach beta: the refusals above are the isolation.
    assert request_as(uids["beta"], "::1", ports["beta"]) == "HTTP/1.0 200 OK"
    assert "/from-another-app None" not in seen_by(keter, "beta")
    assert "/from-another-app 10.9.8.7" in seen_by(keter, "beta")
    # keter's probes (root) reached both: they were deployed with the isolation in place.
    assert "apps cannot connect to each other's ports" in keter.log()


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_the_isolation_stays_until_the_last_app_has_stopped(
    open_base, keter_factory, private_nginx
):
    """keter deleted its tables as its stop began, while an app that ignores SIGTERM ran
    on until stop-timeout: every keter restart opened each app's port to the others."""
    keter = keter_factory(
        root=open_base / "root",
        **{"port-range": app_port_range(), "run-apps-as-root": False, "stop-timeout": 6},
    )
    uids, ports = two_apps(keter, private_nginx, open_base, stubborn=True)

    def running(app: str) -> bool:
        for process in keter.children():
            with contextlib.suppress(psutil.Error):  # one that just ended
                # A leader's zombie stays until keter is done with its group: not running.
                alive = process.status() != psutil.STATUS_ZOMBIE
                if alive and process.uids().real == uids[app]:
                    return True
        return False

    keter.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not running("alpha"), 10, "alpha to stop")
    assert running("beta")  # it runs on until keter kills it at stop-timeout
    assert request_as(uids["alpha"], "::1", ports["beta"]) == "ECONNREFUSED"
    assert keter.proc.wait(30) == 0
    assert not Table.for_root(keter.root).exists(family="inet")  # gone once nothing runs


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_an_apps_pair_follows_its_port_through_redeploys_restarts_and_removal(
    open_base, keter_factory, private_nginx
):
    keter = keter_factory(
        root=open_base / "root", **{"port-range": app_port_range(), "run-apps-as-root": False}
    )
    uids, ports = two_apps(keter, private_nginx, open_base)
    table = Table.for_root(keter.root)
    alpha, beta = uids["alpha"], uids["beta"]

    def pairs() -> dict[int, int]:
        found = running_apps(keter)
        return found and {found[1][app]: found[0][app] for app in ("alpha", "beta")}

    # A redeploy: alpha's new port is its own, its old one no longer.
    config = webapp_config("alpha.test", "v2")
    keter.drop(make_bundle(open_base / "alpha.keter", config=config, interpreter=SYSTEM_PYTHON))
    served(private_nginx, "alpha.test", "v2")
    wait_for(
        lambda: (p := pairs()) and ports["alpha"] not in p and table.read_own() == p,
        20,
        "the pair to follow",
    )
    [new] = [port for port, uid in table.read_own().items() if uid == alpha]
    assert request_as(alpha, "127.0.0.1", new) == "HTTP/1.0 404 Not Found"
    assert request_as(beta, "127.0.0.1", new) == "ECONNREFUSED"

    # keter killed and started again: the set is made anew from what runs.
    keter.kill()
    keter.start()
    served(private_nginx, "alpha.test", "v2")
    wait_for(lambda: (p := pairs()) and table.read_own() == p, 20, "the set rebuilt")
    assert set(table.read_own().values()) == {alpha, beta}

    # Removed: alpha's pair goes with it.
    (keter.incoming / "alpha.keter").unlink()
    wait_for(lambda: set(table.read_own().values()) == {beta}, 20, "alpha's pair to go")
    keter.stop()
    assert not table.exists(family="inet")  # a clean stop leaves nothing in the kernel


def test_the_reload_mode_does_not_isolate_apps_and_says_so(open_base, keter_factory, private_nginx):
    # After a kernel-mode keter that was killed: its tables stayed, and their isolation
    # reset an app's connections to its own new port.
    keter = keter_factory(
        root=open_base / "root", **{"port-range": app_port_range(), "run-apps-as-root": False}
    )
    assert Table.for_root(keter.root).exists(family="inet")
    keter.kill()
    keter.settings["switch"] = "reload"
    keter.start()
    uids, ports = two_apps(keter, private_nginx, open_base)
    assert not Table.for_root(keter.root).exists(family="ip")
    assert not Table.for_root(keter.root).exists(family="inet")
    assert request_as(uids["alpha"], "127.0.0.1", ports["beta"]) == "HTTP/1.0 200 OK"
    assert "/from-another-app 10.9.8.7" in seen_by(keter, "beta")
    said = "apps can connect to each other's ports (no nftables isolation)"
    assert keter.log_since_start().count(said) == 1


# Serves its VERSION on PORT, and hands its listening socket (and those it was handed)
# to the next version, which asks every earlier one over an abstract Unix socket.
HANDS_ON = r"""
import array, http.server, os, socket, threading
PORT, VERSION = int(os.environ["PORT"]), os.environ["VERSION"]
held = []
for line in open("/proc/net/unix").read().splitlines()[1:]:
    name = line.split()[-1]
    if name.startswith("@hand-on-") and name != f"@hand-on-{PORT}":
        with socket.socket(socket.AF_UNIX) as elder:
            elder.connect("\0" + name[1:])
            _, ancillary, _, _ = elder.recvmsg(16, socket.CMSG_SPACE(4 * 64))
            for _, _, data in ancillary:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % 4])
                held += [socket.socket(fileno=fd) for fd in fds]

class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(f"{VERSION}\n".encode())

server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Answer)

def hand_on():
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(f"\0hand-on-{PORT}")
        listener.listen()
        while True:
            younger, _ = listener.accept()
            fds = array.array("i", [server.fileno()] + [s.fileno() for s in held])
            younger.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            younger.close()

threading.Thread(target=hand_on, daemon=True).start()
server.serve_forever()
"""


def test_a_port_handed_on_to_the_next_version_goes_back_to_the_pool(
    keter_factory, private_nginx, open_base
):
    # No bind, so no bind guard: each version kept the ports of every one before it,
    # and the pool shrank by a port a deploy until every app's deploys failed.
    keter = keter_factory(
        root=open_base / "root",
        **{"port-range": app_port_range(), "run-apps-as-root": False, "drain-seconds": 0},
    )
    source = open_base / "hands_on.py"
    source.write_text(HANDS_ON)
    ports = []
    for version in ("v1", "v2"):
        config = {"exec": "../bin/app", "host": "hands.test", "env": {"VERSION": version}}
        bundle = make_bundle(
            open_base / "hands.keter", config=config, app_source=source, interpreter=SYSTEM_PYTHON
        )
        keter.drop(bundle)
        served(private_nginx, "hands.test", version)
        ports.append(
            int(re.findall(r"hands: deploy #\d+ started pid \d+ on port (\d+)", keter.log())[-1])
        )
    first = ports[0]
    wait_for(
        lambda: f"closed 1 listening socket(s) on port {first}" in keter.log(),
        20,
        "v1's port closed",
    )
    assert not [p for p in app_processes(keter) if first in listening_ports(p)]
    served(private_nginx, "hands.test", "v2")


def listening_ports(process: psutil.Process) -> set[int]:
    with contextlib.suppress(psutil.Error):
        return {
            c.laddr.port
            for c in process.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
    return set()


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_a_static_root_is_readable_by_nginxs_workers_and_nobody_else(
    open_base, keter_factory, private_nginx
):
    """A bundle is its app's alone (root:APP, 0750/0640); nginx's workers run as a user
    of their own (Debian's www-data), so they answered 403 for every file of a static
    root. Opened to every user, a root behind basic-auth was readable by other apps.
    The tests' nginx runs its workers as root: reading as www-data stands in for them
    (tests/test_nginx_unprivileged.py has nginx do it)."""
    keter = keter_factory(
        root=open_base / "root", **{"port-range": app_port_range(), "run-apps-as-root": False}
    )
    guard = [{"basic-auth": {"realm": "Staff", "creds": {"jon": "rocks"}}}]
    stanza = {"type": "static-files", "root": "../site/public", "host": "own.test"}
    config = {"stanzas": [dict(stanza, middleware=guard)]}
    files = {
        "site/public/payroll.csv": "salary",
        "site/public/sub/page.html": "page",
        "site/secret.txt": "s3cr3t",
    }
    bundle = make_bundle(open_base / "own.keter", config=config, files=files, app_source=None)
    keter.drop(bundle)
    wait_for(lambda: private_nginx.request("own.test", "/payroll.csv")[0] == 401, 20, "the site")
    [top] = keter.root.glob("temp/own-*")
    www_data = pwd.getpwnam("www-data")

    def read_as(uid: int, gid: int, path: Path) -> str:
        who = [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        done = subprocess.run(
            [SETPRIV, *who, "cat", str(path)], capture_output=True, text=True, check=False
        )
        return done.stdout if done.returncode == 0 else "refused"

    nginx = functools.partial(read_as, www_data.pw_uid, www_data.pw_gid)
    nobody = functools.partial(read_as, 65534, 65534)
    assert nginx(top / "site/public/payroll.csv") == "salary"
    assert nginx(top / "site/public/sub/page.html") == "page"
    for path in ("site/public/payroll.csv", "site/secret.txt", "config/keter.yaml"):
        assert nobody(top / path) == "refused", path
    for path in ("site/secret.txt", "config/keter.yaml"):
        assert nginx(top / path) == "refused", path
    assert os.stat(top).st_mode & 0o007 == 0  # nothing for "other" anywhere


def test_publishing_a_static_root_follows_no_link_and_opens_nothing_beside_it(tmp_path) -> None:
    top = tmp_path / "bundle"
    (top / "site" / "public" / "sub").mkdir(parents=True)
    (top / "site" / "public" / "sub" / "a.css").write_text("a")
    (top / "site" / "private.key").write_text("k")
    outside = tmp_path / "outside"
    outside.write_text("o")
    os.chmod(outside, 0o600)
    (top / "site" / "public" / "leak").symlink_to(outside)
    secure_folder(top, os.getgid())
    publish_static(top, [top / "site" / "public"])
    assert [granted(top), granted(top / "site")] == ["--x", "--x"]
    assert [granted(top / "site/public"), granted(top / "site/public/sub")] == ["r-x", "r-x"]
    assert granted(top / "site/public/sub/a.css") == "r--"
    with pytest.raises(OSError):  # no ACL: the app's alone
        os.getxattr(top / "site/private.key", "system.posix_acl_access")
    assert os.stat(outside).st_mode & 0o777 == 0o600  # the link's target is untouched
    assert all(os.lstat(p).st_mode & 0o007 == 0 for p in top.rglob("*") if not p.is_symlink())
    with pytest.raises(ValueError, match="outside"):
        publish_static(top, [tmp_path])


def granted(path: Path) -> str:
    """What the ACL gives nginx's group on ``path`` ("" if no entry)."""
    www_data = grp.getgrnam(NGINX_GROUP).gr_gid
    acl = os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    entries = [struct.unpack_from("<HHI", acl, 4 + 8 * n) for n in range((len(acl) - 4) // 8)]
    return "".join(
        "rwx"[i] if perm & (4 >> i) else "-"
        for tag, perm, ident in entries
        if tag == 0x08 and ident == www_data
        for i in range(3)
    )


@pytest.mark.parametrize(
    "roots", [["public", "public/docs"], ["public/docs", "public"], [".", "public"]]
)
def test_a_static_root_inside_another_leaves_the_outer_one_listable(tmp_path, roots) -> None:
    # An ACL is written whole: the inner root's passage (--x) on its way down replaced the
    # outer root's r-x when handled after it, and the outer root's listing answered 403.
    top = tmp_path / "bundle"
    (top / "public" / "docs").mkdir(parents=True)
    (top / "public" / "docs" / "a.txt").write_text("a")
    secure_folder(top, os.getgid())
    publish_static(top, [top / root for root in roots])
    assert granted(top / min(roots, key=len)) == "r-x"  # the outer root
    assert [granted(top / "public"), granted(top / "public/docs")] == ["r-x", "r-x"]
    assert granted(top / "public/docs/a.txt") == "r--"
