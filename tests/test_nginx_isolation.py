"""One app's site is that app's alone (issue 10.4), against a real private nginx.

- nginx reads only keter's own copies of the files a site names (or the
  operator's shared certificates): a bundle's file that goes away later, or
  one that is a FIFO or not a certificate at all, cannot break nginx;
- a reverse proxy to a host name that stops resolving breaks nothing;
- a site that fails (rendering, its files, or its part of ``nginx -t``) is
  refused alone: every other site of the same generation is applied, and an
  app whose new site fails keeps its previous one;
- a site broken from outside keter is withdrawn alone at the next apply;
- whatever happens, ``nginx -t`` on the live config passes (a stateful test).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from support.bundles import make_bundle, webapp_config
from support.faults import error_records
from support.net import Backend, body, free_port, https_get, served
from support.nginx import PrivateNginx
from support.tls import make_certificate
from support.wait import wait_for

from keter.config import Listener as KeterListener
from keter.messages import (
    ApplyNginx,
    NginxApplied,
    NginxFailed,
    ProxyApp,
    ProxyRemote,
    Route,
    Site,
    TlsFiles,
)
from keter.nginx import NginxWriter, ProxyOptions, fetch_generation


@dataclass(frozen=True)
class Listener:
    host: str
    port: int


class Writers:
    """Starts NginxWriters on one private nginx, applies generations, stops them all."""

    def __init__(self, nginx: PrivateNginx) -> None:
        self.nginx = nginx
        self.reports: queue.Queue = queue.Queue()
        self.generation = 0
        self.started: list[NginxWriter] = []
        self.tls = None  # a TLS listener, once with_tls() made one

    def start(
        self,
        *,
        options: ProxyOptions | None = None,
        test_command: list[str] | None = None,
        reload_command: list[str] | None = None,
        tested_first: bool = False,
    ) -> NginxWriter:
        """A writer as keter runs it, with nginx's error log, where refused reloads show;
        ``tested_first``: without it, so every apply runs the test command first."""
        listeners = [Listener("127.0.0.1", self.nginx.port)]
        if self.tls is not None:
            listeners.append(self.tls)
        writer = NginxWriter(
            listeners=listeners,
            config_file=self.nginx.config_file,
            test_command=test_command or self.nginx.test_command,
            reload_command=reload_command or self.nginx.reload_command,
            report_to=self.reports,
            options=options,
            error_log=None if tested_first else self.nginx.error_log,
        )
        writer.start()
        self.started.append(writer)
        return writer

    def with_tls(self, folder: Path) -> tuple[Path, Path]:
        certificate, key = make_certificate(folder, "listener", "default.test")
        self.tls = KeterListener("127.0.0.1", free_port(), certificate=certificate, key=key)
        return certificate, key

    def apply(self, writer: NginxWriter, *sites: Site) -> NginxApplied:
        """The next generation; returns the reply once nginx serves only it."""
        self.generation += 1
        writer.tell(ApplyNginx(generation=self.generation, sites=sites))
        reply = self.reports.get(timeout=30)
        assert isinstance(reply, NginxApplied), reply
        assert reply.generation == self.generation
        self.nginx.wait_generation(self.generation)
        return reply

    def nginx_t_passes(self) -> bool:
        return subprocess.run(self.nginx.test_command, capture_output=True).returncode == 0

    def stop(self, writer: NginxWriter) -> None:
        writer.stop()
        writer.join(timeout=15)
        assert not writer.is_alive()

    def stop_all(self) -> None:
        for writer in self.started:
            if writer.is_alive():
                self.stop(writer)


@pytest.fixture
def writers(private_nginx: PrivateNginx) -> Iterator[Writers]:
    each = Writers(private_nginx)
    yield each
    each.stop_all()


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    pair = {name: Backend(name) for name in ("first", "second")}
    yield pair
    for backend in pair.values():
        backend.close()


def web(app: str, backend: Backend, tls: TlsFiles | None = None, host: str | None = None) -> Site:
    route = Route(hosts=(host or f"{app}.test",), action=ProxyApp(port=backend.port), tls=tls)
    return Site(app=app, routes=(route,))


def good_and_bad(tmp_path: Path, backends: dict[str, Backend]) -> tuple[Site, Site]:
    """a with its own certificate and key, and b whose key is a's: nginx refuses b's site,
    as it reloads and in nginx -t alike (the writers need a TLS listener: ``with_tls``)."""
    certs = {app: make_certificate(tmp_path / "certs", app, f"{app}.test") for app in "ab"}
    good = web("a", backends["first"], TlsFiles(certificate=certs["a"][0], key=certs["a"][1]))
    bad = web("b", backends["second"], TlsFiles(certificate=certs["b"][0], key=certs["a"][1]))
    return good, bad


def answer(nginx: PrivateNginx, host: str) -> str | int:
    """The backend's name for ``host`` through nginx, or the status if it is not 200."""
    status, _, body = nginx.request(host)
    if status != 200:
        return status
    return json.loads(body)["name"]


def refused(reply: NginxApplied) -> dict[str, str]:
    return {each.app: each.reason for each in reply.refused}


def refusal_lines(caplog: pytest.LogCaptureFixture, app: str) -> list[str]:
    """The writer's lines about ``app``'s site (warnings: the supervisor's line is the error)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"nginx: {app}:")
    ]


class _Hostile:
    """An app that holds every request it gets without answering, or, for ``/big``,
    answers 64 MiB at once; counts the requests that reach it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reached = 0
        self.sent_all = False  # a whole big answer went out
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            request = conn.recv(4096)
            self.reached += 1
            self.held.append(conn)
            if request.startswith(b"GET /big"):
                threading.Thread(target=self._big, args=(conn,), daemon=True).start()

    def _big(self, conn: socket.socket) -> None:
        size = 64 << 20
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + bytes(size))
        except OSError:
            return
        self.sent_all = True

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def _hold(port: int, host: str, path: str) -> socket.socket:
    """A client that sends one request and reads nothing."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return client


def test_one_apps_held_requests_and_unread_answers_stay_its_own(
    writers: Writers, backends: dict[str, Backend], private_nginx: PrivateNginx
) -> None:
    """Requests an app holds open took a connection of nginx's each, until nginx had none
    for any app (about 511 with 1024 worker_connections); an answer its client did not
    read was spooled to nginx's temp folder, up to 1 GiB a request."""
    hostile = _Hostile()
    writer = writers.start(options=ProxyOptions(app_max_connections=8))
    clients = []
    try:
        writers.apply(
            writer,
            web("good", backends["first"]),
            Site(
                app="evil",
                routes=(Route(hosts=("evil.test",), action=ProxyApp(port=hostile.port)),),
            ),
        )
        clients = [_hold(private_nginx.port, "evil.test", "/big") for _ in range(2)]
        temp = private_nginx.base / "temp" / "proxy"

        def spooled() -> int:
            return sum(f.stat().st_size for f in temp.rglob("*") if f.is_file())

        # nginx takes in what fits its buffers, then the rest waits for the client.
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: spooled() or hostile.sent_all, 3, "nginx to take the answers in")

        clients += [_hold(private_nginx.port, "evil.test", "/hold") for _ in range(30)]
        wait_for(lambda: hostile.reached >= 8, 10, "nginx to pass the app its share")
        refused = _hold(private_nginx.port, "evil.test", "/past-its-share")
        refused.settimeout(10)
        assert refused.recv(64).startswith(b"HTTP/1.1 502")
        clients.append(refused)
        assert hostile.reached == 8
        assert answer(private_nginx, "good.test") == "first"
    finally:
        for client in clients:
            client.close()
        hostile.close()


# -- nginx reads keter's own copies --------------------------------------------------------


def test_a_refused_site_is_found_when_the_reload_command_itself_refuses_the_config(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    # The first apply (keter does not know nginx's master yet) and a reload command of the
    # operator's own run a command, which reads the config and refuses it before nginx
    # hears of it: that was the whole apply failed, every app's deploy with it.
    writers.with_tls(tmp_path / "listener")
    good, bad = good_and_bad(tmp_path, backends)
    writer = writers.start()
    assert set(refused(writers.apply(writer, good, bad))) == {"b"}  # its first apply
    writers.stop(writer)

    wrapper = tmp_path / "reload"
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(private_nginx.reload_command)}\n")
    wrapper.chmod(0o755)
    writer = writers.start(reload_command=[str(wrapper)])
    assert writers.apply(writer, good).refused == ()
    reply = writers.apply(writer, good, bad, web("c", backends["second"]))
    assert set(refused(reply)) == {"b"}
    assert answer(private_nginx, "c.test") == "second"


def test_an_apply_that_fails_after_its_untested_reload_brings_nginx_back(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    # An unrelated [emerg] as nginx reloads sends the apply to nginx -t; when that fails
    # too (no site named: out of descriptors, a hung test), nginx, which took the untested
    # config meanwhile, kept serving a generation keter had reported as failed.
    armed = tmp_path / "armed"
    emerg = "2026/12/01 12:00:00 [emerg] 1#1: open() a log nginx needs no more failed"
    reload = tmp_path / "reload"
    log = private_nginx.error_log
    reload.write_text(
        f"#!/bin/sh\nif [ -e {armed} ]; then rm {armed}; echo '{emerg}' >> {log}; fi\n"
        f"exec {' '.join(private_nginx.reload_command)}\n"
    )
    test = tmp_path / "nginx-t"
    test.write_text(
        f"#!/bin/sh\n[ -e {tmp_path}/broken ] && echo 'nginx: [emerg] socketpair() failed'"
        ' && exit 1\nexec "$@"\n'
    )
    for script in (reload, test):
        script.chmod(0o755)
    writer = writers.start(
        reload_command=[str(reload)], test_command=[str(test), *private_nginx.test_command]
    )
    writers.apply(writer, web("a", backends["first"]))
    armed.touch()
    (tmp_path / "broken").touch()
    writer.tell(
        ApplyNginx(generation=2, sites=(web("a", backends["first"]), web("b", backends["second"])))
    )
    reply = writers.reports.get(timeout=60)
    # keter may see nginx serve 2 before it sees the [emerg] (then it was taken, and said
    # so); what must never be is a failure reported while nginx serves 2.
    assert isinstance(reply, (NginxApplied, NginxFailed)), reply
    served = 2 if isinstance(reply, NginxApplied) else 1
    private_nginx.wait_generation(served)  # what keter reported, disk and nginx alike
    assert f"# generation {served}\n" in private_nginx.config_file.read_text()


def test_an_apply_queued_as_keter_stops_never_reaches_nginx(
    private_nginx: PrivateNginx, writers: Writers, backends
) -> None:
    # It was sent to nginx untested, then the previous file put back: nginx served a
    # generation on disk nowhere and reported failed.
    writer = writers.start()
    writers.apply(writer, web("a", backends["first"]))
    # Two gates make the race happen every time (without them the test passed without
    # its fix): the apply reaches nginx only once the stop has begun, and the old file
    # is put back only once nginx had time to read the new one, had it been told.
    take, restore = writer._take, writer._restore
    writer._take = lambda generation: writer._stopping.wait(10) and take(generation)

    def restore_once_nginx_could_read() -> str:
        deadline = time.monotonic() + 3
        while fetch_generation("127.0.0.1", private_nginx.port) != "2":
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return restore()

    writer._restore = restore_once_nginx_could_read
    writer.tell(
        ApplyNginx(generation=2, sites=(web("a", backends["first"]), web("b", backends["second"])))
    )
    writers.stop(writer)
    reply = writers.reports.get(timeout=10)
    assert not isinstance(reply, NginxApplied), reply
    private_nginx.wait_settled()  # had nginx been told, its newest workers would serve 2
    assert {fetch_generation("127.0.0.1", private_nginx.port) for _ in range(5)} == {"1"}
    assert "# generation 1\n" in private_nginx.config_file.read_text()


def _silent_log_writer(writers: Writers, tmp_path: Path) -> NginxWriter:
    """A writer told of an error log nginx never writes (nginx.conf sends its errors
    elsewhere, or the file is a link to /dev/stderr as in nginx's Docker image)."""
    silent = tmp_path / "error.log"
    silent.symlink_to("/dev/null")
    writer = NginxWriter(
        listeners=[Listener("127.0.0.1", writers.nginx.port), writers.tls],
        config_file=writers.nginx.config_file,
        test_command=writers.nginx.test_command,
        reload_command=writers.nginx.reload_command,
        report_to=writers.reports,
        error_log=silent,
        confirm_timeout=2,
    )
    writer.start()
    writers.started.append(writer)
    return writer


def test_a_refused_site_is_found_when_nginx_says_nothing_where_keter_reads(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path, caplog
) -> None:
    # Only a refusal keter sees sends it to nginx -t: this one failed every app's apply.
    writers.with_tls(tmp_path / "listener")
    writer = _silent_log_writer(writers, tmp_path)
    good, bad = good_and_bad(tmp_path, backends)
    assert writers.apply(writer, good).refused == ()
    reply = writers.apply(writer, good, bad, web("c", backends["second"]))
    assert set(refused(reply)) == {"b"}
    assert answer(private_nginx, "c.test") == "second"
    assert "every apply is tested before its reload from now on" in caplog.text
    began = time.monotonic()  # tested first now: no wait for a confirmation that never comes
    writers.apply(writer, good, bad, web("c", backends["first"]))
    assert time.monotonic() - began < 2
    assert answer(private_nginx, "c.test") == "first"


def test_keter_stopped_while_nginx_has_not_taken_an_untested_config_leaves_one_that_passes(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    # The file nginx's next start (a reboot) reads must pass nginx -t: an untested one
    # with a site nginx refuses had stayed on disk.
    writers.with_tls(tmp_path / "listener")
    writer = _silent_log_writer(writers, tmp_path)
    good, bad = good_and_bad(tmp_path, backends)
    assert writers.apply(writer, good).refused == ()
    writer.tell(ApplyNginx(generation=writers.generation + 1, sites=(good, bad)))
    wait_for(
        lambda: "# generation 2" in private_nginx.config_file.read_text(),
        10,
        "the untested config to be written",
    )
    writers.stop(writer)
    assert "stopped" in writers.reports.get(timeout=5).reason
    assert writers.nginx_t_passes(), private_nginx.config_file.read_text()[-800:]


def test_a_site_nginx_fails_on_without_naming_its_file_is_found_by_halving(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    """nginx -t fails on one site of sixteen with an error that names no file (as
    "could not build server_names_hash" does): the writer finds the site by halving,
    in a handful of tests rather than one per site, and applies the other fifteen."""
    runs = tmp_path / "runs"
    script = tmp_path / "nginx-t"
    # nginx's own test, but failing while the config includes poison's site.
    script.write_text(
        "#!/bin/sh\n"
        f"echo >> {runs}\n"
        f"sites=$(sed -n 's/^include \"\\(.*\\)\";$/\\1/p' {private_nginx.config_file})\n"
        "if grep -qs poison.test $sites; then\n"
        "    echo 'nginx: [emerg] could not build server_names_hash' >&2; exit 1\n"
        "fi\n"
        'exec "$@"\n'
    )
    script.chmod(0o755)
    poisoned = [str(script), *private_nginx.test_command]
    # The test command fails where nginx itself would not: only a tested apply sees it.
    writer = writers.start(test_command=poisoned, tested_first=True)
    apps = [f"a{i:02d}" for i in range(15)] + ["poison"]
    reply = writers.apply(writer, *(web(app, backends["first"]) for app in apps))
    assert set(refused(reply)) == {"poison"}
    assert "could not build server_names_hash" in refused(reply)["poison"]
    for app in apps[:-1]:
        assert answer(private_nginx, f"{app}.test") == "first"
    assert answer(private_nginx, "poison.test") == 404
    # All sixteen, none, halving to one of sixteen (4), the fifteen: 7 (one per site: 17).
    assert len(runs.read_text().splitlines()) <= 8


def test_certificate_copies_outlive_the_files_a_bundle_named(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    writers.with_tls(tmp_path / "listener")
    writer = writers.start()
    # The bundle's certificate lies in its version's folder, deleted after the next switch.
    version = tmp_path / "temp" / "web-1"
    own, own_key = make_certificate(version, "own", "web.test")
    middle, _ = make_certificate(version, "middle", "ca.test")
    site = web("web", backends["first"], TlsFiles(certificate=own, key=own_key, chain=(middle,)))
    assert writers.apply(writer, site).refused == ()
    trusted = shutil.copy(own, tmp_path / "trusted.crt")
    assert https_get(writers.tls.port, "web.test", trusted)[0] == 200

    shutil.rmtree(version)
    # Another app's deploy: nginx -t rereads every file, and each one is still there.
    reply = writers.apply(writer, site, web("other", backends["second"]))
    assert reply.refused == ()
    assert writers.nginx_t_passes()
    assert https_get(writers.tls.port, "web.test", trusted)[0] == 200
    assert answer(private_nginx, "other.test") == "second"
    # Every file the config names is keter's own copy.
    support = private_nginx.base / ".keter.conf.d"
    config = private_nginx.served_config()
    named = [line.split('"')[1] for line in config.splitlines() if "ssl_certificate" in line]
    assert named and all(Path(path).is_relative_to(support) for path in named)


@pytest.mark.parametrize("kind", ["fifo", "folder", "not-a-certificate", "too-big", "missing"])
def test_a_certificate_that_is_no_certificate_is_refused_alone(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path, kind: str
) -> None:
    writers.with_tls(tmp_path / "listener")
    writer = writers.start()
    certificate, key = make_certificate(tmp_path / "certs", "evil", "evil.test")
    bad = tmp_path / "bad"
    if kind == "fifo":
        os.mkfifo(bad)  # opening it for reading would block forever
    elif kind == "folder":
        bad.mkdir()
    elif kind == "not-a-certificate":
        bad.write_text("root:$6$secret:19000:0:99999:7:::\n")
    elif kind == "too-big":
        bad.write_bytes(certificate.read_bytes() * (2 + (1 << 20) // certificate.stat().st_size))
    tls = TlsFiles(certificate=bad, key=key)
    reply = writers.apply(
        writer, web("evil", backends["first"], tls), web("good", backends["second"])
    )
    assert set(refused(reply)) == {"evil"}
    assert str(bad) in refused(reply)["evil"]
    assert answer(private_nginx, "good.test") == "second"
    assert answer(private_nginx, "evil.test") == 404
    assert writers.nginx_t_passes()
    support = private_nginx.base / ".keter.conf.d"
    copied = b"".join(p.read_bytes() for p in support.rglob("*") if p.is_file())
    assert b"secret" not in copied


def test_shared_certificates_are_named_in_place(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    writers.with_tls(tmp_path / "listener")
    shared = tmp_path / "letsencrypt" / "live"
    writer = writers.start(options=ProxyOptions(shared_certificates=shared))
    own, own_key = make_certificate(shared / "web.test", "fullchain", "web.test")
    site = web("web", backends["first"], TlsFiles(certificate=own, key=own_key))
    assert writers.apply(writer, site).refused == ()
    assert f'ssl_certificate "{own}";' in private_nginx.served_config()
    assert https_get(writers.tls.port, "web.test", own)[0] == 200


# -- host names resolved per request ----------------------------------------------------------


def test_a_reverse_proxy_name_that_stops_resolving_breaks_nothing(
    private_nginx: PrivateNginx, private_dns, writers: Writers, backends
) -> None:
    writer = writers.start(options=ProxyOptions(resolver=(private_dns.resolver,)))
    private_dns.add("backend.test")
    remote = Route(
        hosts=("p.test",), action=ProxyRemote(host="backend.test", port=backends["first"].port)
    )
    proxy = Site(app="p", routes=(remote,))
    never = Route(hosts=("n.test",), action=ProxyRemote(host="never.test", port=80))
    # A name that never resolved deploys too: nginx asks only when a request comes.
    reply = writers.apply(writer, proxy, Site(app="n", routes=(never,)))
    assert reply.refused == ()
    assert answer(private_nginx, "p.test") == "first"
    assert answer(private_nginx, "n.test") == 502

    private_dns.remove("backend.test")
    assert writers.nginx_t_passes()
    reply = writers.apply(
        writer, proxy, Site(app="n", routes=(never,)), web("w", backends["second"])
    )
    assert reply.refused == ()
    assert answer(private_nginx, "w.test") == "second"


def test_a_reverse_proxy_name_needs_a_resolver(
    private_nginx: PrivateNginx, writers: Writers, backends
) -> None:
    writer = writers.start(options=ProxyOptions(resolver=()))
    remote = Route(hosts=("p.test",), action=ProxyRemote(host="backend.test", port=80))
    local = Route(
        hosts=("l.test",), action=ProxyRemote(host="localhost", port=backends["first"].port)
    )
    reply = writers.apply(writer, Site(app="p", routes=(remote,)), Site(app="l", routes=(local,)))
    assert set(refused(reply)) == {"p"}
    assert "resolver" in refused(reply)["p"]
    # localhost is this machine, not a DNS question.
    assert answer(private_nginx, "l.test") == "first"


# -- a failing site is refused alone ----------------------------------------------------------


def test_nginx_t_runs_only_when_nginx_refuses_a_reload(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    # nginx checks the config as it reloads: testing it first read it once more on every
    # apply (0.2 s of CPU with 1000 sites). It is tested only to find a site nginx refused.
    runs = tmp_path / "runs"
    script = tmp_path / "test-command"
    test = " ".join(private_nginx.test_command)
    script.write_text(f"#!/bin/sh\necho run >> {runs}\nexec {test}\n")
    script.chmod(0o755)
    writers.with_tls(tmp_path / "listener")
    writer = writers.start(test_command=[str(script)])
    good, bad = good_and_bad(tmp_path, backends)
    assert writers.apply(writer, good).refused == ()
    assert writers.apply(writer, good, web("c", backends["second"])).refused == ()
    assert not runs.exists()
    # b's key is not its certificate's: nginx refuses the reload, the test finds b.
    reply = writers.apply(writer, good, bad, web("c", backends["second"]))
    assert set(refused(reply)) == {"b"}
    assert runs.exists()
    assert answer(private_nginx, "a.test") == "first"
    assert answer(private_nginx, "c.test") == "second"


def test_a_failing_site_in_a_batch_is_refused_alone(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path, caplog
) -> None:
    writers.with_tls(tmp_path / "listener")
    writer = writers.start()
    certs = {app: make_certificate(tmp_path / "certs", app, f"{app}.test") for app in "abcd"}

    def own(app: str, key_of: str | None = None) -> TlsFiles:
        return TlsFiles(certificate=certs[app][0], key=certs[key_of or app][1])

    first, second = backends["first"], backends["second"]
    assert writers.apply(writer, web("a", first, own("a")), web("b", first, own("b"))).refused == ()

    # In one generation: a's new site has a key that does not match its certificate
    # (nginx -t fails on it), d is new with the same fault, c is new and fine, b is unchanged.
    reply = writers.apply(
        writer,
        web("a", second, own("a", key_of="b")),
        web("b", first, own("b")),
        web("c", second, own("c")),
        web("d", second, own("d", key_of="a")),
    )
    assert set(refused(reply)) == {"a", "d"}
    assert "nginx -t failed" in refused(reply)["a"]
    assert answer(private_nginx, "a.test") == "first"  # its previous site stays
    assert answer(private_nginx, "b.test") == "first"
    assert answer(private_nginx, "c.test") == "second"
    assert answer(private_nginx, "d.test") == 404
    assert len(refusal_lines(caplog, "a")) == 1 and len(refusal_lines(caplog, "d")) == 1
    assert writers.nginx_t_passes()


def test_a_host_another_app_serves_is_refused_to_the_newcomer(
    private_nginx: PrivateNginx, writers: Writers, backends
) -> None:
    writer = writers.start()
    first, second = backends["first"], backends["second"]
    writers.apply(writer, web("owner", first))
    reply = writers.apply(writer, web("owner", first), web("thief", second, host="owner.test"))
    assert set(refused(reply)) == {"thief"}
    assert "owner.test already belongs to owner" in refused(reply)["thief"]
    assert answer(private_nginx, "owner.test") == "first"


@pytest.mark.parametrize("what", ["site-file", "key-copy"])
def test_a_site_broken_from_outside_is_withdrawn_alone(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path, caplog, what: str
) -> None:
    writers.with_tls(tmp_path / "listener")
    writer = writers.start()
    certs = {app: make_certificate(tmp_path / "certs", app, f"{app}.test") for app in "abc"}
    first, second = backends["first"], backends["second"]

    def site(app: str, backend: Backend) -> Site:
        return web(app, backend, TlsFiles(certificate=certs[app][0], key=certs[app][1]))

    writers.apply(writer, site("a", first), site("b", first), site("c", first))
    served_b = writer.live["b"]
    if what == "site-file":
        served_b.file.write_text("this is not nginx;\n")
    else:
        served_b.local.site.routes[0].tls.key.write_text("gone\n")

    # Any apply finds it: here c's redeploy.
    reply = writers.apply(writer, site("a", first), site("b", first), site("c", second))
    assert set(refused(reply)) == {"b"}
    [line] = refusal_lines(caplog, "b")
    assert "site refused, the app is not served" in line
    assert answer(private_nginx, "a.test") == "first"
    assert answer(private_nginx, "b.test") == 404
    assert answer(private_nginx, "c.test") == "second"
    assert writers.nginx_t_passes()

    # The others stay deployable; the withdrawn site is not retried as it was...
    reply = writers.apply(writer, site("a", second), site("b", first), site("c", second))
    assert reply.refused == ()
    assert answer(private_nginx, "a.test") == "second"
    assert len(refusal_lines(caplog, "b")) == 1
    # ...but a new deploy of it is.
    reply = writers.apply(writer, site("a", second), site("b", second), site("c", second))
    assert reply.refused == ()
    assert answer(private_nginx, "b.test") == "second"


def test_a_restarted_writer_removes_what_the_earlier_one_left(
    private_nginx: PrivateNginx, writers: Writers, backends
) -> None:
    first = writers.start()
    writers.apply(first, web("a", backends["first"]), web("b", backends["second"]))
    writers.stop(first)
    apps = private_nginx.base / ".keter.conf.d" / "apps"
    assert sorted(p.name for p in apps.iterdir()) == ["keter_a", "keter_b"]
    second = writers.start()
    writers.apply(second, web("a", backends["second"]))
    assert sorted(p.name for p in apps.iterdir()) == ["keter_a"]
    assert answer(private_nginx, "a.test") == "second"
    assert answer(private_nginx, "b.test") == 404


# -- the invariant: nginx -t passes after anything -------------------------------------------------

APPS = ("a", "b", "c")
GOOD, MISMATCHED_KEY, MISSING_FILE = "good", "mismatched-key", "missing-file"


def test_nginx_t_passes_after_any_sequence_of_deploys_removals_failures_and_restarts(
    private_nginx: PrivateNginx, writers: Writers, backends, tmp_path: Path
) -> None:
    writers.with_tls(tmp_path / "listener")
    certs = {app: make_certificate(tmp_path / "certs", app, f"{app}.test") for app in APPS}

    deploys = itertools.count()

    def make_site(app: str, kind: str, backend: str) -> Site:
        certificate, key = certs[app]
        if kind == MISMATCHED_KEY:
            key = certs[APPS[(APPS.index(app) + 1) % len(APPS)]][1]
        elif kind == MISSING_FILE:
            certificate = tmp_path / "no-such.crt"
        [route] = web(app, backends[backend], TlsFiles(certificate=certificate, key=key)).routes
        # Every deploy's site differs from the last, as a new version's port would.
        tagged = Route(hosts=route.hosts, action=route.action, tls=route.tls,
                       headers=(("X-Deploy", str(next(deploys))),))  # fmt: skip
        return Site(app=app, routes=(tagged,))

    class Keter(RuleBasedStateMachine):
        """What the supervisor asks for, and what nginx must then serve."""

        def __init__(self) -> None:
            super().__init__()
            self.writer = writers.start()
            self.desired: dict[str, Site] = {}  # the serving version's site, per app
            self.expected: dict[str, str] = {}  # the backend each served app answers with
            self.reply = writers.apply(self.writer)

        def apply(self) -> NginxApplied:
            self.reply = writers.apply(self.writer, *self.desired.values())
            return self.reply

        @rule(app=st.sampled_from(APPS), backend=st.sampled_from(["first", "second"]))
        def deploy(self, app: str, backend: str) -> None:
            self.desired[app] = make_site(app, GOOD, backend)
            assert refused(self.apply()) == {}
            self.expected[app] = backend

        @rule(app=st.sampled_from(APPS), kind=st.sampled_from([MISMATCHED_KEY, MISSING_FILE]))
        def deploy_a_bad_site(self, app: str, kind: str) -> None:
            previous = self.desired.get(app)
            self.desired[app] = make_site(app, kind, "second")
            assert set(refused(self.apply())) == {app}
            # The supervisor fails the deploy and keeps asking for the previous site.
            if previous is None:
                del self.desired[app]
            else:
                self.desired[app] = previous

        @rule(app=st.sampled_from(APPS))
        def remove(self, app: str) -> None:
            self.desired.pop(app, None)
            self.expected.pop(app, None)
            assert refused(self.apply()) == {}

        @rule(app=st.sampled_from(APPS), what=st.sampled_from(["site-file", "key-copy"]))
        def break_from_outside(self, app: str, what: str) -> None:
            served = self.writer.live.get(app)
            if served is None:
                return
            if what == "site-file":
                served.file.write_text("}\n")
            else:
                served.local.site.routes[0].tls.key.write_bytes(b"")
            assert set(refused(self.apply())) == {app}
            self.expected.pop(app)

        @rule()
        def restart(self) -> None:
            writers.stop(self.writer)
            self.writer = writers.start()
            assert self.apply().refused == ()
            # A fresh writer copies every site's files from their sources again.
            self.expected = {app: answer_of(site) for app, site in self.desired.items()}

        @invariant()
        def nginx_serves_what_it_should(self) -> None:
            assert writers.nginx_t_passes()
            port = private_nginx.port
            assert fetch_generation("127.0.0.1", port) == str(writers.generation)
            for app in APPS:
                assert answer(private_nginx, f"{app}.test") == self.expected.get(app, 404)

        def teardown(self) -> None:
            writers.stop(self.writer)

    def answer_of(site: Site) -> str:
        port = site.routes[0].action.port
        return next(name for name, backend in backends.items() if backend.port == port)

    run_state_machine_as_test(
        Keter, settings=settings(max_examples=6, stateful_step_count=10, deadline=None)
    )


# -- the same against the daemon: issue 10's test (d) ---------------------------------------------


def test_keter_withdraws_a_site_broken_from_outside_and_keeps_the_others_deployable(
    keter, private_nginx: PrivateNginx, tmp_path: Path
) -> None:
    for app in "abc":
        keter.drop(
            make_bundle(tmp_path / f"{app}.keter", config=webapp_config(f"{app}.test", "v1"))
        )
    for app in "abc":
        served(private_nginx, f"{app}.test", "v1")
    [site_file] = (private_nginx.base / ".keter.conf.d" / "apps" / "keter_b").glob("*.conf")
    site_file.write_text("this is not nginx;\n")  # from outside keter

    offset = len(keter.log())
    # Any nginx apply finds it: here a new app's (a redeploy may not reload nginx).
    keter.drop(make_bundle(tmp_path / "d.keter", config=webapp_config("d.test", "v1")))
    served(private_nginx, "d.test", "v1")
    assert private_nginx.request("b.test")[0] == 404
    assert body(private_nginx, "a.test") == body(private_nginx, "c.test") == b"v1\n"
    # nginx serves d as soon as it reloads; keter logs the withdrawal once its
    # supervisor has the writer's reply, a moment later.
    wait_for(lambda: error_records(keter.log()[offset:]), 10, "the withdrawal's line")
    [line] = error_records(keter.log()[offset:])
    assert line.startswith("b: nginx withdrew its site: nginx -t failed:")
    assert str(site_file) in line
    assert subprocess.run(private_nginx.test_command, capture_output=True).returncode == 0

    # Every app stays deployable, b too.
    keter.drop(make_bundle(tmp_path / "c.keter", config=webapp_config("c.test", "v2")))
    served(private_nginx, "c.test", "v2")
    keter.drop(make_bundle(tmp_path / "b.keter", config=webapp_config("b.test", "v2")))
    served(private_nginx, "b.test", "v2")
    assert body(private_nginx, "a.test") == b"v1\n"
