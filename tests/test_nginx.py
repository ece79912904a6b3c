"""The nginx renderer (pure) and the nginx writer against a real private nginx."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import queue
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.net import Backend, free_port, get, https_get
from support.nginx import NGINX, PrivateNginx
from support.tls import make_certificate
from support.wait import wait_for

from keter import names
from keter.config import Listener as KeterListener
from keter.messages import (
    ApplyNginx,
    BasicAuth,
    LocalOnly,
    NginxApplied,
    NginxFailed,
    ProxyApp,
    ProxyRemote,
    RedirectRule,
    Route,
    SendRedirect,
    ServeFiles,
    Site,
    TlsFiles,
)
from keter.nginx import (
    STATUS_HOST,
    NginxWriter,
    ProxyOptions,
    fetch_generation,
    render,
    upstream_name,
)
from keter.nginx import writer as writer_module
from keter.nginx.errorlog import ErrorLog
from keter.nginx.render import generation_of


@dataclass(frozen=True)
class Listener:
    host: str
    port: int


LOCAL = [Listener("127.0.0.1", 8080)]


def site(app: str, *hosts: str, port: int = 3000) -> Site:
    return Site(app=app, hosts=hosts, port=port)


def server_blocks(text: str) -> list[str]:
    """The top-level ``server { ... }`` blocks of rendered text."""
    blocks, depth, current = [], 0, None
    for line in text.splitlines():
        if depth == 0 and line.startswith("server {"):
            current = []
        if current is not None:
            current.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and current is not None:
            blocks.append("\n".join(current))
            current = None
    return blocks


# -- render: structure ---------------------------------------------------------------


def test_upstream_per_site_with_keepalive_pool() -> None:
    text = render([site("blog", "blog.example.com", port=4001)], LOCAL, 1)
    upstream = re.search(r"upstream keter_blog \{(.*?)\}", text, re.S)
    assert upstream, text
    body = upstream.group(1)
    assert "server 127.0.0.1:4001 max_conns=256;" in body
    assert re.search(r"keepalive \d+;", body)
    assert "keepalive_requests" in body
    assert "keepalive_timeout" in body
    assert "proxy_pass http://keter_blog;" in text


def test_only_a_stable_address_bounds_the_age_of_pooled_connections() -> None:
    """Behind a stable address the kernel re-points, nginx must retire connections pooled
    to the old version soon after a switch (keter.switch); to the process itself (the
    reload switch) a reload gives nginx new pools, so the age keeps nginx's default.
    Both keep the short idle bound."""
    stable = Site(
        app="a", routes=(Route(hosts=("a.test",), action=ProxyApp(port=8080, host="127.9.8.7")),)
    )
    itself = Site(app="b", routes=(Route(hosts=("b.test",), action=ProxyApp(port=4001)),))
    text = render([stable, itself], LOCAL, 1)
    bodies = dict(re.findall(r"upstream (keter_[ab])\S* \{(.*?)\}", text, re.S))
    assert "server 127.9.8.7:8080 max_conns=256;" in bodies["keter_a"]
    assert "keepalive_time 50ms;" in bodies["keter_a"]
    assert "server 127.0.0.1:4001 max_conns=256;" in bodies["keter_b"]
    assert "keepalive_time 1h;" in bodies["keter_b"]
    for body in bodies.values():
        assert "keepalive_timeout 50ms;" in body


def test_upstream_names_are_safe_and_distinct() -> None:
    apps = ["a.b", "a-b", "a_b", "A.b", "a_2eb", "ab"]
    names = [upstream_name(app) for app in apps]
    assert len(set(names)) == len(apps)
    # nginx compares upstream names case-insensitively: they must differ even then.
    assert len({name.lower() for name in names}) == len(apps)
    assert all(re.fullmatch(r"keter_[a-z0-9_]+", name) for name in names)


def test_proxy_headers_and_timeouts() -> None:
    text = render([site("blog", "blog.example.com")], LOCAL, 1)
    for directive in [
        "proxy_http_version 1.1;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $keter_connection_upgrade;",
        "proxy_connect_timeout 5s;",
        "proxy_read_timeout 300s;",
        "proxy_send_timeout 300s;",
    ]:
        assert directive in text


def test_websocket_map_keeps_upstream_keepalive() -> None:
    text = render([], LOCAL, 1)
    block = re.search(r"map \$http_upgrade \$keter_connection_upgrade \{(.*?)\}", text, re.S)
    assert block, text
    entries = dict(line.split(None, 1) for line in block.group(1).strip().splitlines())
    assert entries["default"] == "upgrade;"
    # Not "close": an empty Connection header is what lets nginx reuse upstream connections.
    assert entries['""'] == '"";'


def test_default_server_answers_404_on_every_listener() -> None:
    listeners = [Listener("127.0.0.1", 8080), Listener("*", 8443)]
    text = render([site("blog", "blog.example.com")], listeners, 1)
    defaults = [block for block in server_blocks(text) if "default_server" in block]
    assert len(defaults) == 2
    assert "listen 127.0.0.1:8080 default_server;" in defaults[0]
    assert "listen 8443 default_server;" in defaults[1]
    for block in defaults:
        assert 'return 404 "no app is deployed at this host\\n";' in block
        assert "proxy_pass" not in block


def test_one_server_per_site_per_listener_and_per_wildcard() -> None:
    listeners = [Listener("127.0.0.1", 8080), Listener("10.0.0.1", 80)]
    sites = [site("blog", "blog.example.com", "www.blog.example.com"), site("shop", "shop.io")]
    blocks = [b for b in server_blocks(render(sites, listeners, 1)) if "proxy_pass" in b]
    assert len(blocks) == 4
    listens = sorted(re.search(r"listen (\S+);", b).group(1) for b in blocks)
    assert listens == ["10.0.0.1:80", "10.0.0.1:80", "127.0.0.1:8080", "127.0.0.1:8080"]
    blog = [b for b in blocks if "keter_blog" in b]
    assert all("server_name blog.example.com www.blog.example.com;" in b for b in blog)
    # A wildcard host gets servers of its own, placed after every exact name.
    sites = [site("blog", "blog.example.com", "*.blog.example.com")]
    text = render(sites, listeners, 1)
    blog = [b for b in server_blocks(text) if "keter_blog" in b]
    assert len(blog) == 4
    wild = [b for b in blog if "server_name ~^[^.]+\\.blog\\.example\\.com$;" in b]
    assert len(wild) == 2
    assert text.index(wild[0]) > max(text.index(b) for b in blog if b not in wild)


@pytest.mark.parametrize(
    ("host", "listen"),
    [
        ("*", "listen 80;"),
        ("0.0.0.0", "listen 0.0.0.0:80;"),
        ("192.168.1.10", "listen 192.168.1.10:80;"),
        ("::", "listen [::]:80;"),
        ("2001:db8:0::1", "listen [2001:db8::1]:80;"),
    ],
)
def test_listener_forms(host: str, listen: str) -> None:
    text = render([site("blog", "blog.example.com")], [Listener(host, 80)], 1)
    assert listen in text


@pytest.mark.parametrize(
    "listener",
    [Listener("localhost", 80), Listener("1.2.3.4;", 80), Listener("*", 0), Listener("*", 70000)],
)
def test_bad_listener_is_refused(listener: Listener) -> None:
    with pytest.raises(ValueError):
        render([], [listener], 1)


def test_duplicate_listeners_get_one_default_server() -> None:
    text = render([], [Listener("*", 80), Listener("*", 80)], 1)
    assert text.count("default_server") == 1


def test_status_server_on_first_listener_only() -> None:
    listeners = [Listener("127.0.0.1", 8080), Listener("*", 8081)]
    text = render([], listeners, 42)
    status = [b for b in server_blocks(text) if STATUS_HOST in b]
    assert len(status) == 1
    block = status[0]
    assert "listen 127.0.0.1:8080;" in block
    assert f"server_name {STATUS_HOST};" in block
    assert 'return 200 "42\\n";' in block
    assert "if ($keter_status_denied)" in block
    geo = re.search(r"geo \$keter_status_denied \{(.*?)\}", text, re.S).group(1)
    assert re.search(r"default\s+1;", geo)
    assert re.search(r"127\.0\.0\.1\s+0;", geo)
    assert re.search(r"::1\s+0;", geo)


def test_header_names_generation_and_warns() -> None:
    text = render([], LOCAL, 7)
    header = text.splitlines()[:2]
    assert "Generated by keter" in header[0]
    assert "overwritten" in header[0]
    assert header[1] == "# generation 7"


@given(st.integers(min_value=0, max_value=2**63))
def test_the_generation_a_main_file_carries_is_read_back(generation: int) -> None:
    assert generation_of(render([], LOCAL, generation).encode()) == generation


@given(st.binary(max_size=60) | st.binary(max_size=6).map(b"x\n# generation %b\n".__mod__))
def test_a_file_not_keters_carries_no_generation(text: bytes) -> None:
    found = generation_of(text)
    assert found is None or b"\n# generation %d\n" % found in text
    assert generation_of(None) is None


def test_output_is_deterministic() -> None:
    a = site("alpha", "b.alpha.com", "a.alpha.com", port=4001)
    b = site("beta", "beta.com", port=4002)
    c = Site(app="alpha", hosts=("a.alpha.com", "b.alpha.com"), port=4001)
    first = render([a, b], LOCAL, 3)
    assert render([b, c], LOCAL, 3) == first
    assert first.index("keter_alpha") < first.index("keter_beta")
    assert "server_name a.alpha.com b.alpha.com;" in first


@pytest.mark.parametrize(
    "host",
    ["a;b", "x{", "evil\n", "evil.com\nserver_name x", "a b", "$host", "", "UPPER.com",
     "_a.com", "a_.com", "_keter-status", "-a.com", "a..com", "*", "*.*", "a.com*",
     "**.a.com", "é.com"],
)  # fmt: skip
def test_hostile_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        render([site("blog", host)], LOCAL, 1)


@pytest.mark.parametrize("app", ["a;b", "x{", "evil\n", "a b", "a/b", "", "$app", "ü"])
def test_hostile_app_is_refused(app: str) -> None:
    with pytest.raises(ValueError, match="invalid app"):
        render([site(app, "ok.com")], LOCAL, 1)


@given(st.text(max_size=30))
@example("*.0")  # a wildcard: the renderer's "*" is one label (a regex), as in Keter
def test_render_never_emits_unsafe_host(host: str) -> None:
    try:
        text = render([site("blog", host)], LOCAL, 1)
    except ValueError:
        return
    assert re.fullmatch(r"[a-z0-9.*_-]+", host)
    assert f"server_name {names.nginx_server_name(host)};" in text


@pytest.mark.parametrize(
    "sites",
    [
        [site("one", "same.com"), site("two", "same.com")],
        [site("one", "a.com"), site("one", "b.com")],
        [site("one")],
        [site("one", "a.com", port=0)],
    ],
    ids=["host-claimed-twice", "app-twice", "no-hosts", "bad-port"],
)
def test_inconsistent_sites_are_refused(sites: list[Site]) -> None:
    with pytest.raises(ValueError):
        render(sites, LOCAL, 1)


def test_rendered_config_passes_nginx_test(private_nginx: PrivateNginx) -> None:
    listeners = [
        Listener("127.0.0.1", private_nginx.port),
        Listener("*", free_port()),
        Listener("::1", free_port()),
    ]
    sites = [
        site("my.app-1", "app.example.com", "*.app.example.com", port=4001),
        site("Other_App", "other.example.org", port=4002),
    ]
    private_nginx.config_file.write_text(render(sites, listeners, 9))
    result = subprocess.run(private_nginx.test_command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- writer against a real nginx ---------------------------------------------------------


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    pair = (Backend("first"), Backend("second"))
    yield pair
    for backend in pair:
        backend.close()


@pytest.fixture
def reports() -> queue.Queue:
    return queue.Queue()


def make_writer(
    nginx: PrivateNginx, reports: queue.Queue, *, listeners: list[Listener] | None = None, **extra
) -> NginxWriter:
    return NginxWriter(
        **{
            "listeners": listeners or [Listener("127.0.0.1", nginx.port)],
            "config_file": nginx.config_file,
            "test_command": nginx.test_command,
            "reload_command": nginx.reload_command,
            "report_to": reports,
            # As keter runs it: with nginx's error log, where a refused reload shows.
            "error_log": nginx.error_log,
            **extra,
        }
    )


@contextlib.contextmanager
def running(actor: NginxWriter) -> Iterator[NginxWriter]:
    """The writer started, then stopped and joined however the block ends."""
    actor.start()
    try:
        yield actor
    finally:
        actor.stop()
        actor.join(timeout=15)


@contextlib.contextmanager
def one_port_taken(nginx: PrivateNginx) -> Iterator[list[Listener]]:
    """nginx's own listener and one on a port another socket holds: a reload nginx refuses."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        yield [Listener("127.0.0.1", nginx.port), Listener("127.0.0.1", squatter.getsockname()[1])]


@pytest.fixture
def writer(private_nginx: PrivateNginx, reports: queue.Queue) -> Iterator[NginxWriter]:
    with running(make_writer(private_nginx, reports)) as actor:
        yield actor
    assert not actor.is_alive()


def apply(writer: NginxWriter, reports: queue.Queue, generation: int, *sites: Site) -> object:
    writer.tell(ApplyNginx(generation=generation, sites=sites))
    return reports.get(timeout=15)


def copy_of(writer: NginxWriter, app: str, index: int = 0) -> Route:
    """A route of ``app`` as nginx serves it: naming keter's copies of its files."""
    return writer.live[app].local.site.routes[index]


def app_name(nginx: PrivateNginx, host: str) -> str:
    status, _, body = nginx.request(host)
    assert status == 200, (status, body)
    return json.loads(body)["name"]


def test_routes_by_host_and_switches_backend(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    first, second = backends
    assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == NginxApplied(
        generation=1
    )
    private_nginx.wait_generation(1)
    assert app_name(private_nginx, "blog.test") == "first"

    status, headers, body = private_nginx.request("nobody.test")
    assert (status, body) == (404, b"no app is deployed at this host\n")
    assert headers["content-type"] == "text/plain"

    assert apply(writer, reports, 2, site("blog", "blog.test", port=second.port)) == NginxApplied(
        generation=2
    )
    private_nginx.wait_generation(2)
    assert app_name(private_nginx, "blog.test") == "second"
    assert private_nginx.config_file.read_text().startswith("# Generated by keter")


def test_proxied_request_headers_keepalive_and_upgrade(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    first, _ = backends
    assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == NginxApplied(
        generation=1
    )
    private_nginx.wait_generation(1)

    replies = [json.loads(private_nginx.request("blog.test")[2]) for _ in range(2)]
    headers = replies[0]["headers"]
    assert headers["host"] == "blog.test"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert "connection" not in headers  # neither "close" nor "upgrade"
    # Both requests rode the same pooled upstream connection.
    assert replies[0]["peer_port"] == replies[1]["peer_port"]

    connection = socket.create_connection(("127.0.0.1", private_nginx.port), timeout=5)
    with connection:
        connection.sendall(
            b"GET / HTTP/1.1\r\nHost: blog.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n"
        )
        reply = b""
        while b'"}}' not in reply:
            chunk = connection.recv(65536)
            assert chunk, reply
            reply += chunk
    upgraded = json.loads(reply.split(b"\r\n\r\n", 1)[1])["headers"]
    assert upgraded["upgrade"] == "websocket"
    assert upgraded["connection"] == "upgrade"


def non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_status_host_answers_local_callers_only(private_nginx: PrivateNginx) -> None:
    outside = non_loopback_ipv4()
    if outside is None:
        pytest.skip("no non-loopback IPv4 address to call from")
    port = free_port()
    private_nginx.config_file.write_text(render([], [Listener("*", port)], 5))
    private_nginx.reload()
    wait_for(
        lambda: fetch_generation("127.0.0.1", port) == "5",
        10,
        lambda: f"generation 5 on port {port}; nginx's log:\n{private_nginx.error_log_text()}",
    )
    status, _, _ = private_nginx.request(STATUS_HOST, "/generation", port=port)
    assert status == 200

    connection = socket.create_connection((outside, port), timeout=5)
    with connection:
        connection.sendall(
            f"GET /generation HTTP/1.1\r\nHost: {STATUS_HOST}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403"), reply


def test_config_test_failure_restores_old_file(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    first, second = backends
    assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == NginxApplied(
        generation=1
    )
    private_nginx.wait_generation(1)
    before = private_nginx.config_file.read_bytes()
    (private_nginx.extra_dir / "broken.conf").write_text("this_is_no_directive on;\n")

    failed = apply(writer, reports, 2, site("blog", "blog.test", port=second.port))
    assert isinstance(failed, NginxFailed)
    assert failed.generation == 2
    assert '[emerg] unknown directive "this_is_no_directive"' in failed.reason
    assert private_nginx.config_file.read_bytes() == before
    assert app_name(private_nginx, "blog.test") == "first"

    # Once the breakage is gone the writer works again.
    (private_nginx.extra_dir / "broken.conf").unlink()
    assert apply(writer, reports, 3, site("blog", "blog.test", port=second.port)) == NginxApplied(
        generation=3
    )


def _wrapped_test(tmp_path: Path, nginx: PrivateNginx, body: str) -> tuple[str, ...]:
    """A test-command that runs ``body`` (sh) once ``tmp_path/bad`` exists, else nginx -t."""
    script = tmp_path / "test-command"
    real = " ".join(nginx.test_command)
    script.write_text(f"#!/bin/sh\nif [ -e {tmp_path}/bad ]; then\n{body}\nfi\nexec {real}\n")
    script.chmod(0o755)
    return (str(script),)


def test_a_test_command_saying_bytes_that_are_no_utf8_fails_the_apply_and_restores(
    private_nginx: PrivateNginx, reports: queue.Queue, backends, tmp_path: Path
) -> None:
    # Decoded strictly, they had crashed the writer mid-apply, leaving a config nginx never
    # tested on disk (the next reload by anyone would have served it).
    first, second = backends
    command = _wrapped_test(
        tmp_path, private_nginx, "printf 'nginx: [emerg] bad \\377\\376 thing\\n' >&2; exit 1"
    )
    # Without nginx's error log every apply is tested before its reload.
    writer = make_writer(private_nginx, reports, test_command=command, error_log=None)
    with running(writer):
        assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == (
            NginxApplied(generation=1)
        )
        private_nginx.wait_generation(1)
        before = private_nginx.config_file.read_bytes()
        (tmp_path / "bad").touch()
        failed = apply(writer, reports, 2, site("blog", "blog.test", port=second.port))
        assert isinstance(failed, NginxFailed), failed
        assert "[emerg] bad \ufffd\ufffd thing" in failed.reason
        assert private_nginx.config_file.read_bytes() == before
        assert writer.is_alive()
        assert reports.empty()  # no component failure reported
        (tmp_path / "bad").unlink()
        assert apply(writer, reports, 3, site("blog", "blog.test", port=second.port)) == (
            NginxApplied(generation=3)
        )


def test_a_hung_test_command_is_killed_with_its_children_and_tried_once(
    private_nginx: PrivateNginx,
    reports: queue.Queue,
    backends,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A wrapper whose nginx -t hangs: subprocess.run killed the wrapper alone and left the
    # rest running, and the apply ran it twice (once more to find a culprit site).
    monkeypatch.setattr(writer_module, "COMMAND_TIMEOUT", 1.0)
    marker = f"4242.{os.getpid()}"
    command = _wrapped_test(tmp_path, private_nginx, f"sleep {marker}")
    # Without nginx's error log every apply is tested before its reload.
    writer = make_writer(private_nginx, reports, test_command=command, error_log=None)
    with running(writer):
        (tmp_path / "bad").touch()
        began = time.monotonic()
        failed = apply(writer, reports, 1, site("blog", "blog.test", port=backends[0].port))
        took = time.monotonic() - began
    assert isinstance(failed, NginxFailed)
    assert "did not finish within 1s" in failed.reason
    assert took < 1.9, took
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
    assert left == []
    assert not private_nginx.config_file.read_text()  # the file nginx runs, put back


def test_config_test_failure_without_old_file_removes_it(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue
) -> None:
    private_nginx.config_file.unlink()
    (private_nginx.extra_dir / "broken.conf").write_text("this_is_no_directive on;\n")
    failed = apply(writer, reports, 1)
    assert isinstance(failed, NginxFailed)
    assert not private_nginx.config_file.exists()


def test_reload_not_taken_is_reported_and_rolled_back(
    private_nginx: PrivateNginx, reports: queue.Queue, backends
) -> None:
    first, second = backends
    writer = make_writer(private_nginx, reports)
    with running(writer):
        assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == (
            NginxApplied(generation=1)
        )
        before = private_nginx.config_file.read_bytes()
    private_nginx.wait_settled()
    workers_before = private_nginx.accepting_workers()

    with (
        one_port_taken(private_nginx) as taken,
        running(make_writer(private_nginx, reports, listeners=taken)) as blocked,
    ):
        failed = apply(blocked, reports, 2, site("blog", "blog.test", port=second.port))

    assert isinstance(failed, NginxFailed), failed
    assert failed.generation == 2
    # Known from nginx's [emerg] line, not from the confirmation's 10 s timeout.
    assert "nginx refused generation 2 and kept the previous configuration" in failed.reason
    assert "Address already in use" in failed.reason
    assert private_nginx.config_file.read_bytes() == before
    assert app_name(private_nginx, "blog.test") == "first"
    assert fetch_generation("127.0.0.1", private_nginx.port) == "1"
    # nginx, which might yet take the refused reload late (a busy machine), was
    # reloaded once more with the restored file: its workers are new, serving 1.
    workers_after = private_nginx.accepting_workers()
    assert workers_after and not workers_after & workers_before


def test_a_refused_reload_is_no_success_when_nginx_serves_the_same_number(
    private_nginx: PrivateNginx, reports: queue.Queue, backends
) -> None:
    # A keter run numbers its generations from 1 again: nginx, refusing the new run's
    # generation 1, answered the earlier run's 1, and the refusal was reported applied
    # (a deploy "now serving" on a 404) after 10 s waiting for workers to retire.
    first, second = backends
    earlier = make_writer(private_nginx, reports)
    with running(earlier):
        assert apply(earlier, reports, 1, site("blog", "blog.test", port=first.port)) == (
            NginxApplied(generation=1)
        )
    private_nginx.wait_settled()
    with (
        one_port_taken(private_nginx) as taken,
        running(make_writer(private_nginx, reports, listeners=taken)) as later,
    ):
        reply = apply(later, reports, 1, site("blog", "blog.test", port=second.port))
    assert isinstance(reply, NginxFailed), reply
    assert "Address already in use" in reply.reason
    assert app_name(private_nginx, "blog.test") == "first"


def test_nginx_refusing_the_config_put_back_while_serving_it_is_back(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends, caplog
) -> None:
    # The operator's own include broken: nginx refuses every reload, the one back to the
    # config it runs too, and serves that config on; keter warned of workers stuck.
    first, second = backends
    assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == (
        NginxApplied(generation=1)
    )
    (private_nginx.extra_dir / "mine.conf").write_text("syntax {\n")
    failed = apply(writer, reports, 2, site("blog", "blog.test", port=second.port))
    assert isinstance(failed, NginxFailed), failed
    assert "did not come back" not in failed.reason
    assert "still accept connections" not in caplog.text
    assert app_name(private_nginx, "blog.test") == "first"
    (private_nginx.extra_dir / "mine.conf").unlink()
    assert apply(writer, reports, 3, site("blog", "blog.test", port=second.port)) == (
        NginxApplied(generation=3)
    )


def test_a_frozen_nginx_is_not_taken_for_an_error_log_that_says_nothing(
    private_nginx: PrivateNginx, reports: queue.Queue, backends, caplog
) -> None:
    # An nginx that did not answer at all (frozen past the confirmation's timeout) was
    # taken for one whose errors go elsewhere: a false warning, and every apply was
    # tested first for the rest of keter's run.
    first, second = backends
    writer = make_writer(private_nginx, reports, confirm_timeout=1.0)
    with running(writer):
        assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == (
            NginxApplied(generation=1)
        )
        master = psutil.Process(private_nginx.pid)
        frozen = [master, *master.children()]
        for process in frozen:
            process.suspend()
        try:
            failed = apply(writer, reports, 2, site("blog", "blog.test", port=second.port))
        finally:
            for process in frozen:
                process.resume()
    assert isinstance(failed, NginxFailed), failed
    assert "says nothing of it" not in caplog.text
    assert writer._error_log_speaks


def test_nginx_in_another_pid_namespace_has_its_reloads_confirmed(
    tmp_path: Path, reports: queue.Queue
) -> None:
    # Its worker names a pid of its own namespace; here that pid is another process (a
    # kernel thread started at boot), judged older than the reload: every apply failed.
    nginx = PrivateNginx(tmp_path / "nginx")
    nginx.start_command = ("unshare", "--pid", "--fork", "--mount-proc", *nginx.start_command)
    nginx.start()
    try:
        [inside] = psutil.Process(nginx.pid).children()  # the master, pid 1 in there
        reload = ("nsenter", "-t", str(inside.pid), "-p", "-m", *nginx.test_command[:-2])
        writer = make_writer(nginx, reports, reload_command=(*reload, "-s", "reload"))
        with running(writer):
            assert apply(writer, reports, 1) == NginxApplied(generation=1)
        # (its old worker, unknown to keter there, may take a question as it retires)
        wait_for(lambda: fetch_generation("127.0.0.1", nginx.port) == "1", 5, "generation 1")
    finally:
        nginx.stop()


def test_nginx_error_log_is_read_from_the_reload_on_without_blocking(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    log.write_text("2026/11/30 12:00:00 [emerg] 1#1: an old refusal\n")
    errors = ErrorLog(log)
    assert not errors.refused()  # only what nginx writes from now on counts
    with log.open("a") as f:
        f.write("2026/11/30 12:00:01 [notice] 1#1: signal 1 (SIGHUP) received\n")
    assert not errors.refused()
    with log.open("a") as f:
        f.write('2026/11/30 12:00:02 [emerg] 1#1: host "\x1b[31mred" ')
    assert not errors.refused()  # a line nginx is still writing
    with log.open("a") as f:
        f.write("...\n")
    refusal = '2026/11/30 12:00:02 [emerg] 1#1: host "\\x1b[31mred" ...'
    assert errors.last_emerg() == refusal
    assert errors.last_emerg() == refusal  # kept
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    assert not ErrorLog(fifo).refused()  # no writer on the FIFO: an open would block
    assert not ErrorLog(None).refused()
    assert not ErrorLog(tmp_path / "missing.log").refused()


@pytest.mark.parametrize("rotation", ["copytruncate", "rename"])
@pytest.mark.parametrize("history", [50, 1])
def test_an_emerg_after_the_log_was_rotated_is_read(
    tmp_path: Path, rotation: str, history: int
) -> None:
    # It was missed: the new file, shorter than where reading had got to, looked empty;
    # or longer by then (a short log cut), and read from the middle of a line.
    log = tmp_path / "error.log"
    log.write_text("2026/11/30 12:00:00 [notice] 1#1: history\n" * history)
    errors = ErrorLog(log)
    if rotation == "copytruncate":
        log.write_text("")
    else:
        log.rename(tmp_path / "error.log.1")
    with log.open("a") as f:
        f.write("2026/11/30 12:00:02 [emerg] 1#1: bind() to 0.0.0.0:80 failed\n")
    assert errors.last_emerg() == "2026/11/30 12:00:02 [emerg] 1#1: bind() to 0.0.0.0:80 failed"


def test_a_clients_emerg_quoted_in_nginxs_error_log_is_no_refused_reload(tmp_path: Path) -> None:
    # nginx quotes a failed request's line: a client chooses that text, nginx's level field
    # alone says whether nginx refused something.
    log = tmp_path / "error.log"
    log.write_text("")
    errors = ErrorLog(log)
    with log.open("a") as f:
        f.write(
            "2026/11/30 12:00:00 [error] 9#9: *3 recv() failed (104: Connection reset by peer) "
            "while reading response header from upstream, client: 127.0.0.1, server: a.test, "
            'request: "GET /[emerg] HTTP/1.1", upstream: "http://127.0.0.1:9/[emerg]"\n'
            '2026/11/30 12:00:01 [error] 9#9: *4 open() "/srv/[emerg] 1#1: x" failed (2: No '
            "such file or directory)\n"
            "[emerg] 1#1: at the start of a line, but without nginx's timestamp\n"
        )
    assert not errors.refused()


def test_reload_command_failure_restores_old_file(
    private_nginx: PrivateNginx, reports: queue.Queue
) -> None:
    before = private_nginx.config_file.read_bytes()
    writer = NginxWriter(
        listeners=[Listener("127.0.0.1", private_nginx.port)],
        config_file=private_nginx.config_file,
        test_command=private_nginx.test_command,
        reload_command=(*private_nginx.reload_command[:-2], "-s", "no-such-signal"),
        report_to=reports,
    )
    with running(writer):
        failed = apply(writer, reports, 1)
    assert isinstance(failed, NginxFailed)
    assert "reload failed" in failed.reason
    assert "no-such-signal" in failed.reason
    assert private_nginx.config_file.read_bytes() == before


@pytest.mark.parametrize(("program", "runs"), [("nginx", 1), ("reload-nginx", 3)])
def test_once_nginxs_master_is_known_the_writer_signals_it_instead_of_running_nginx_s(
    private_nginx: PrivateNginx, reports: queue.Queue, tmp_path: Path, program: str, runs: int
) -> None:
    """`nginx -s reload` reads the whole config just to find the pid file; keter's own
    SIGHUP to the master it learnt does the same. An operator's command always runs."""
    ran = tmp_path / "ran"
    wrapper = tmp_path / "bin" / program
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {ran}\nexec {NGINX} "$@"\n')
    wrapper.chmod(0o755)
    writer = make_writer(private_nginx, reports)
    writer.reload_command = (str(wrapper), *private_nginx.reload_command[1:])
    with running(writer):
        for generation in (1, 2, 3):
            assert apply(writer, reports, generation) == NginxApplied(generation=generation)
            assert fetch_generation("127.0.0.1", private_nginx.port) == str(generation)
    assert len(ran.read_text().splitlines()) == runs


def test_invalid_site_is_refused_alone_and_writer_keeps_running(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    good = site("good", "good.test", port=backends[1].port)
    applied = apply(writer, reports, 1, site("blog", "evil.test;"), good)
    assert isinstance(applied, NginxApplied)
    [refused] = applied.refused
    assert refused.app == "blog"
    assert "invalid host" in refused.reason and "evil.test;" in refused.reason
    assert "evil.test;" not in private_nginx.config_file.read_text()
    private_nginx.wait_generation(1)
    assert app_name(private_nginx, "good.test") == "second"
    applied = apply(writer, reports, 2, site("blog", "blog.test", port=backends[0].port), good)
    assert applied == NginxApplied(generation=2)


def test_stop_cuts_a_pending_confirmation_short(tmp_path: Path, reports: queue.Queue) -> None:
    # Nothing listens on the status port, so confirmation could only time out.
    config = tmp_path / "keter.conf"
    writer = NginxWriter(
        listeners=[Listener("127.0.0.1", free_port())],
        config_file=config,
        test_command=("true",),
        reload_command=("true",),
        report_to=reports,
        confirm_timeout=60,
    )
    writer.start()
    writer.tell(ApplyNginx(generation=1, sites=()))
    wait_for(config.exists, 10, "the config file to be written")
    writer.stop()
    writer.join(timeout=5)
    assert not writer.is_alive()
    failed = reports.get_nowait()
    assert isinstance(failed, NginxFailed)
    assert "stopped" in failed.reason


# -- the full bundle format: rendering -----------------------------------------------------


def route(*hosts: str, action: object, **options: object) -> Route:
    return Route(hosts=hosts, action=action, **options)


def one_block(text: str, host: str, listen: str | None = None) -> str:
    [block] = [
        b
        for b in server_blocks(text)
        if f" {host};" in b.splitlines()[2] and (listen is None or f"listen {listen}" in b)
    ]
    return block


def test_static_route_serves_its_root_with_types_and_no_links() -> None:
    files = Site(app="docs", routes=(route("docs.test", action=ServeFiles(root=Path("/b/pub"))),))
    block = one_block(render([files], LOCAL, 1), "docs.test")
    assert 'root "/b/pub";' in block
    assert "autoindex off;" in block
    assert "disable_symlinks on;" in block
    assert "text/css css;" in block and "application/javascript js mjs;" in block
    assert "proxy_pass" not in block
    listing = Site(
        app="d", routes=(route("d.test", action=ServeFiles(root=Path("/b"), listing=True)),)
    )
    assert "autoindex on;" in render([listing], LOCAL, 1)


def test_redirect_route_tries_exact_paths_before_the_catch_all() -> None:
    rules = (
        RedirectRule(path="/a", url="https://x.test/a?b=$c"),
        RedirectRule(path="/b", host="y.test", secure=True, port=443),
        RedirectRule(host="z.test", port=8080),
        RedirectRule(path="/never", host="y.test"),  # after the catch-all: never reached
    )
    site = Site(app="r", routes=(route("r.test", action=SendRedirect(status=308, rules=rules)),))
    block = one_block(render([site], LOCAL, 1), "r.test")
    assert 'location = /a {\n        return 308 "https://x.test/a?b=${keter_dollar}c";' in block
    assert "location = /b {\n        return 308 https://y.test$request_uri;" in block
    assert "location / {\n        return 308 http://z.test:8080$request_uri;" in block
    assert "/never" not in block
    no_fallback = Site(
        app="r", routes=(route("r.test", action=SendRedirect(status=303, rules=rules[:1])),)
    )
    assert 'return 404 "File not found";' in render([no_fallback], LOCAL, 1)


def test_reverse_proxy_route_has_its_own_upstream_and_host_header() -> None:
    remote = ProxyRemote(host="::1", port=8443, ssl=True, host_header="api.test", timeout=2.5)
    site = Site(app="p", hosts=("app.test",), port=4000, routes=(route("p.test", action=remote),))
    text = render([site], LOCAL, 1)
    upstream = re.search(r"upstream keter_p__r1 \{(.*?)\}", text, re.S).group(1)
    assert "server [::1]:8443 max_conns=256;" in upstream
    block = one_block(text, "p.test")
    assert "proxy_pass https://keter_p__r1;" in block
    assert 'proxy_set_header Host "api.test";' in block
    assert "proxy_ssl_verify on;" in block and "proxy_ssl_name [::1];" in block
    assert "proxy_read_timeout 2500ms;" in block
    preserving = ProxyRemote(host="up.test", port=80)
    site = Site(app="p", routes=(route("p.test", action=preserving),))
    options = ProxyOptions(resolver=("127.0.0.53",))
    assert "proxy_set_header Host $http_host;" in one_block(
        render([site], LOCAL, 1, options), "p.test"
    )


def test_a_reverse_proxy_back_to_nginx_itself_ends_in_a_508_not_a_storm(
    private_nginx: PrivateNginx, reports: queue.Queue, backends
) -> None:
    """A reverse proxy to nginx's own port that keeps the client's Host would send each
    request round again until nginx ran out of connections, failing every app's requests
    meanwhile; keter's token in X-Keter-Hop ends it after HOP_PASSES passes."""
    first, _ = backends
    writer = make_writer(private_nginx, reports, options=ProxyOptions(hop_token="0123abcd"))
    with running(writer):
        itself = ProxyRemote(host="127.0.0.1", port=private_nginx.port)  # Host kept
        alias = ProxyRemote(host="127.0.0.1", port=private_nginx.port, host_header="blog.test")
        sites = (
            Site(app="blog", routes=(route("blog.test", action=ProxyApp(port=first.port)),)),
            Site(app="loop", routes=(route("loop.test", action=itself),)),
            Site(app="alias", routes=(route("alias.test", action=alias),)),
        )
        assert apply(writer, reports, 1, *sites) == NginxApplied(generation=1)
        private_nginx.wait_generation(1)
        for _ in range(20):
            status, _, _ = private_nginx.request("loop.test")
            assert status == 508
            assert app_name(private_nginx, "blog.test") == "first"
        assert "worker_connections are not enough" not in private_nginx.error_log_text()
        # Through a reverse proxy once, then to an app: a chain, not a loop.
        status, _, body = private_nginx.request("alias.test")
        assert status == 200
        assert json.loads(body)["headers"]["x-keter-hop"].strip() == "0123abcd"


def test_tls_listener_serves_every_host_with_its_own_or_the_default_certificate() -> None:
    tls = KeterListener(
        "127.0.0.1", 8443, certificate=Path("/c/default.crt"), key=Path("/c/default.key")
    )
    own = TlsFiles(certificate=Path("/c/own.crt"), key=Path("/c/own.key"))
    site = Site(
        app="a",
        hosts=("plain.test",),
        port=4000,
        routes=(route("own.test", action=ServeFiles(root=Path("/b")), tls=own),),
    )
    text = render([site], [*LOCAL, tls], 1)
    plain_tls = one_block(text, "plain.test", "127.0.0.1:8443")
    assert "listen 127.0.0.1:8443 ssl http2;" in plain_tls
    assert 'ssl_certificate "/c/default.crt";' in plain_tls
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in plain_tls
    own_tls = one_block(text, "own.test", "127.0.0.1:8443")
    assert 'ssl_certificate "/c/own.crt";' in own_tls
    assert 'ssl_certificate_key "/c/own.key";' in own_tls
    assert "ssl" not in one_block(text, "own.test", "127.0.0.1:8080;")
    [default] = [b for b in server_blocks(text) if "8443 ssl http2 default_server" in b]
    assert 'ssl_certificate "/c/default.crt";' in default
    # The status server stays on plain HTTP: keter confirms reloads over it.
    assert "listen 127.0.0.1:8080;" in next(b for b in server_blocks(text) if STATUS_HOST in b)


def test_a_chain_must_be_joined_to_its_certificate_before_rendering() -> None:
    own = TlsFiles(certificate=Path("/c/own.crt"), key=Path("/c/own.key"), chain=(Path("/c/ca"),))
    tls = KeterListener("*", 443, certificate=Path("/c/d.crt"), key=Path("/c/d.key"))
    site = Site(app="a", routes=(route("a.test", action=ProxyApp(port=4000), tls=own),))
    with pytest.raises(ValueError, match="joined"):
        render([site], [*LOCAL, tls], 1)


def test_files_outside_the_allowed_folders_are_refused() -> None:
    own = TlsFiles(certificate=Path("/keter/own.crt"), key=Path("/elsewhere/own.key"))
    tls = KeterListener("*", 443, certificate=Path("/keter/d.crt"), key=Path("/keter/d.key"))
    site = Site(app="a", routes=(route("a.test", action=ProxyApp(port=4000), tls=own),))
    options = ProxyOptions(file_roots=(Path("/keter"), Path("/shared")))
    with pytest.raises(ValueError, match="neither keter's own copy nor a shared certificate"):
        render([site], [*LOCAL, tls], 1, options)
    shared = TlsFiles(certificate=Path("/shared/own.crt"), key=Path("/shared/own.key"))
    site = Site(app="a", routes=(route("a.test", action=ProxyApp(port=4000), tls=shared),))
    assert 'ssl_certificate_key "/shared/own.key";' in render([site], [*LOCAL, tls], 1, options)


def test_requires_secure_redirects_plain_http_only() -> None:
    tls = KeterListener("*", 8443, certificate=Path("/c/d.crt"), key=Path("/c/d.key"))
    site = Site(
        app="a", routes=(route("a.test", action=ProxyApp(port=4000), requires_secure=True),)
    )
    text = render([site], [*LOCAL, tls], 1)
    plain = one_block(text, "a.test", "127.0.0.1:8080;")
    assert "return 301 https://$host:8443$request_uri;" in plain
    assert "proxy_pass" not in plain
    assert "proxy_pass http://keter_a;" in one_block(text, "a.test", "8443 ssl")
    options = ProxyOptions(https_port=443)
    assert "return 301 https://$host$request_uri;" in render([site], [*LOCAL, tls], 1, options)


def test_middleware_becomes_guards_in_every_serving_location() -> None:
    site = Site(
        app="a",
        routes=(
            route(
                "a.test",
                action=ProxyApp(port=4000),
                basic_auth=BasicAuth(realm="Team $A", user_file=Path("/n/a.htpasswd")),
                headers=(("X-Frame-Options", "DENY"), ("X-Price", "$5")),
                local_only=LocalOnly(status=405, text="local only"),
            ),
        ),
    )
    block = one_block(render([site], LOCAL, 1, ProxyOptions(healthcheck_path="/up")), "a.test")
    location = block[block.index("location / {") :]
    assert 'if ($keter_nonlocal) {\n            return 405 "local only";' in location
    assert 'auth_basic "Team ${keter_dollar}A";' in location
    assert 'auth_basic_user_file "/n/a.htpasswd";' in location
    assert 'add_header X-Frame-Options "DENY" always;' in location
    assert 'add_header X-Price "${keter_dollar}5" always;' in location
    # The health check answers before any of them.
    health = block[block.index("location = /up {") : block.index("location / {")]
    assert "auth_basic off;" in health and 'return 200 "OK\\n";' in health


MIB = 1 << 20


@pytest.mark.parametrize(
    ("stanza", "operator", "expected"),
    [
        ((None, None), (10 * MIB, 300.0), ("10485760", "300s")),  # the operator's
        ((MIB, 60.0), (10 * MIB, 300.0), ("1048576", "60s")),  # lowered
        ((2048 * MIB, 3000.0), (10 * MIB, 300.0), ("10485760", "300s")),  # not raised
        ((0, 0.0), (10 * MIB, 300.0), ("10485760", "300s")),  # "none" is no way around it
        ((2048 * MIB, 3000.0), (0, 0.0), ("2147483648", "3000s")),  # the operator has none
        ((0, 0.0), (0, 0.0), ("0", "24d")),
    ],
)
def test_a_stanza_lowers_the_operators_bounds_and_never_raises_them(
    stanza, operator, expected
) -> None:
    """A bundle asking for no bound (client-max-body-size: 0, connection-time-bound: 0) let
    one client spool a body of any size to the disk every app shares, or hold nginx's
    connections for weeks."""
    body, seconds = stanza
    route = Route(
        hosts=("a.test",), action=ProxyApp(port=4001, timeout=seconds), max_body_size=body
    )
    options = ProxyOptions(max_body_size=operator[0], time_bound=operator[1])
    app = one_block(render([Site(app="a", routes=(route,))], LOCAL, 1, options), "a.test")
    assert f"client_max_body_size {expected[0]};" in app
    assert f"proxy_read_timeout {expected[1]};" in app
    assert f"proxy_send_timeout {expected[1]};" in app


def test_an_answer_is_never_spooled_to_disk_and_an_app_has_a_share_of_connections() -> None:
    """nginx's defaults spooled up to 1 GiB of each answer a client did not read to the
    disk every app shares, and let one app's held requests take every connection."""
    text = render([site("a", "a.test")], LOCAL, 1, ProxyOptions(app_max_connections=7))
    assert "proxy_max_temp_file_size 0;" in one_block(text, "a.test")
    assert re.search(r"upstream keter_a\S* \{\s+server 127\.0\.0\.1:\d+ max_conns=7;", text)
    uncapped = render([site("a", "a.test")], LOCAL, 1, ProxyOptions(app_max_connections=0))
    assert "max_conns" not in uncapped
    # A bundle's reverse proxy to an address (a tarpit of its own, say) has the same share.
    remote = Route(hosts=("r.test",), action=ProxyRemote(host="10.1.2.3", port=81))
    text = render([Site(app="r", routes=(remote,))], LOCAL, 1, ProxyOptions(app_max_connections=7))
    assert "server 10.1.2.3:81 max_conns=7;" in text


def test_global_options_render_into_every_server() -> None:
    options = ProxyOptions(
        real_ip_from=("127.0.0.0/8", "10.0.0.0/8"),
        healthcheck_path="/keter-health",
        unknown_host_file=Path("/e/unknown.html"),
        missing_host_file=Path("/e/missing.html"),
        proxy_exception_file=Path("/e/exception.html"),
        time_bound=0,
    )
    text = render([site("a", "a.test")], LOCAL, 1, options)
    app = one_block(text, "a.test")
    [default] = [b for b in server_blocks(text) if "default_server" in b]
    for block in (app, default):
        assert "set_real_ip_from 10.0.0.0/8;" in block
        assert "real_ip_header X-Forwarded-For;" in block
        assert "location = /keter-health {" in block
    assert "geo $realip_remote_addr $keter_status_denied {" in text
    assert "proxy_read_timeout 24d;" in app  # connection-time-bound 0: unbounded
    assert "error_page 502 504 =502 /_keter_proxy_exception;" in app
    assert 'alias "/e/exception.html";' in app
    assert "error_page 404 /_keter_unknown_host;" in default
    assert "error_page 502 /_keter_missing_host;" in default
    assert 'if ($http_host = "") {' in default


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (route("a.test", action=ServeFiles(root=Path("relative"))), "expected an absolute path"),
        (route("a.test", action=ServeFiles(root=Path('/a"b'))), r'in a file path \("\)'),
        (route("a.test", action=ServeFiles(root=Path("/a$b"))), r"in a file path \(\$\)"),
        (route("a.test", action=SendRedirect(status=200, rules=())), "invalid redirect status"),
        (route("a.test", action=SendRedirect(status=301, rules=(RedirectRule(url="/a\nb"),))),
         "expected an absolute URL"),
        (route("a.test", action=SendRedirect(status=301, rules=(RedirectRule(host="a;b"),))),
         "host name contains"),
        (route("a.test", action=SendRedirect(status=301, rules=(
            RedirectRule(path="/a b", host="b"),))), "expected a URL path"),
        (route("a.test", action=ProxyRemote(host="a b", port=80)), "host name contains"),
        (route("a.test", action=ProxyRemote(host="fe80::1%eth0", port=80)), "zone id"),
        (route("a.test", action=ProxyRemote(host="fe80::1%\udcff", port=80)), "zone id"),
        (route("a.test", action=ProxyApp(port=1), headers=(("X A", "v"),)),
         "expected a header name"),
        (route("a.test", action=ProxyApp(port=1), headers=(("X-A", "v\u00e9"),)),
         "expected printable ASCII"),
        (route("a.test", action=ProxyApp(port=1), local_only=LocalOnly(status=1, text="x")),
         "invalid local status"),
        (route("a.test", action=ProxyApp(port=99999)), "expected a port"),
        (route("a.test", action="nothing"), "unknown route action"),
    ],
)  # fmt: skip
def test_hostile_route_values_are_refused(bad: Route, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        render([Site(app="a", routes=(bad,))], LOCAL, 1)


def test_a_host_twice_within_one_app_is_refused() -> None:
    twice = Site(app="a", hosts=("a.test",), port=4000, routes=(
        route("a.test", action=ServeFiles(root=Path("/b"))),))  # fmt: skip
    with pytest.raises(ValueError, match=r"host a\.test appears twice"):
        render([twice], LOCAL, 1)


def test_full_config_passes_nginx_test(private_nginx: PrivateNginx, tmp_path: Path) -> None:
    certificate, key = make_certificate(tmp_path / "certs", "default", "default.test")
    own, own_key = make_certificate(tmp_path / "certs", "own", "own.test")
    page = tmp_path / "sorry.html"
    page.write_text("<p>sorry</p>")
    listeners = [
        Listener("127.0.0.1", private_nginx.port),
        KeterListener("127.0.0.1", free_port(), certificate=certificate, key=key, session=True),
    ]
    sites = [
        Site(
            app="every",
            hosts=("app.test",),
            port=4001,
            routes=(
                route(
                    "files.test",
                    action=ServeFiles(root=tmp_path, listing=True),
                    tls=TlsFiles(certificate=own, key=own_key),
                    basic_auth=BasicAuth(realm="r", user_file=page),
                    headers=(("X-A", "a$b"),),
                    local_only=LocalOnly(status=403, text="no"),
                ),
                route(
                    "go.test",
                    action=SendRedirect(
                        status=303,
                        rules=(
                            RedirectRule(path="/a", url="https://x.test/"),
                            RedirectRule(host="y.test"),
                        ),
                    ),
                    requires_secure=True,
                ),
                route("up.test", action=ProxyRemote(host="127.0.0.1", port=9, ssl=True)),
            ),
        )
    ]
    options = ProxyOptions(
        real_ip_from=("127.0.0.0/8", "::1"),
        healthcheck_path="/keter-health",
        unknown_host_file=page,
        missing_host_file=page,
        proxy_exception_file=page,
        time_bound=0,
    )
    private_nginx.config_file.write_text(render(sites, listeners, 9, options))
    result = subprocess.run(private_nginx.test_command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- the full bundle format: served by a real nginx ------------------------------------------


@pytest.fixture
def writer_for(private_nginx: PrivateNginx, reports: queue.Queue) -> Iterator:
    """Start a writer with extra listeners or options: ``writer_for(*extra, options=...)``."""
    started: list[NginxWriter] = []

    def make(*extra: object, options: ProxyOptions | None = None) -> NginxWriter:
        actor = make_writer(
            private_nginx,
            reports,
            listeners=[Listener("127.0.0.1", private_nginx.port), *extra],
            options=options,
        )
        actor.start()
        started.append(actor)
        return actor

    yield make
    for actor in started:
        actor.stop()
        actor.join(timeout=15)


def serve(nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, *sites: Site) -> None:
    """Apply the next generation and wait until nginx serves only it."""
    generation = getattr(writer, "_test_generation", 0) + 1
    writer._test_generation = generation  # type: ignore[attr-defined]
    assert apply(writer, reports, generation, *sites) == NginxApplied(generation=generation)
    nginx.wait_generation(generation)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """An unpacked bundle with a public/ folder; config/ and a secret lie beside it."""
    folder = tmp_path / "bundle"
    files = {
        "public/index.html": "<h1>home</h1>",
        "public/style.css": "h1 { color: red }",
        "public/app.js": "console.log(1)",
        "public/data.json": "{}",
        "public/logo.png": "\x89PNG",
        "public/blob.bin": "??",
        "public/sub/page.txt": "a page",
        "config/keter.yaml": "password: in-the-config",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (tmp_path / "secret.txt").write_text("outside the bundle")
    return folder


def files_site(root: Path, listing: bool = False, **options: object) -> Site:
    return Site(
        app="files",
        routes=(route("files.test", action=ServeFiles(root=root, listing=listing), **options),),
    )


def test_static_files_have_their_content_types_and_nothing_else_is_reachable(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, bundle: Path
) -> None:
    serve(private_nginx, writer, reports, files_site(bundle / "public"))
    port = private_nginx.port
    expected = {
        "/": ("text/html; charset=utf-8", b"<h1>home</h1>"),
        "/style.css": ("text/css; charset=utf-8", b"h1 { color: red }"),
        "/app.js": ("application/javascript; charset=utf-8", b"console.log(1)"),
        "/data.json": ("application/json; charset=utf-8", b"{}"),
        "/logo.png": ("image/png", b"\xc2\x89PNG"),
        "/blob.bin": ("application/octet-stream", b"??"),
        "/sub/page.txt": ("text/plain; charset=utf-8", b"a page"),
    }
    for path, (content_type, body) in expected.items():
        status, headers, data = get(port, "files.test", path)
        assert (status, headers["content-type"], data) == (200, content_type, body), path
    for path in [
        "/../config/keter.yaml",
        "/%2e%2e/config/keter.yaml",
        "/sub/../../config/keter.yaml",
        "/../../secret.txt",
        "/..%2f..%2fsecret.txt",
    ]:
        status, _, data = get(port, "files.test", path)
        assert status in (400, 404), (path, status)
        assert b"in-the-config" not in data and b"outside the bundle" not in data
    assert get(port, "files.test", "/nope.html")[0] == 404
    # Listing is off: a folder without an index is not shown.
    assert get(port, "files.test", "/sub/")[0] == 403


def test_static_files_listing_on(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, bundle: Path
) -> None:
    serve(private_nginx, writer, reports, files_site(bundle / "public", listing=True))
    status, headers, data = get(private_nginx.port, "files.test", "/sub/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b'<a href="page.txt">page.txt</a>' in data


def test_static_files_refuse_a_link_planted_after_the_check(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, bundle: Path
) -> None:
    (bundle / "public/escape.txt").symlink_to(bundle.parent / "secret.txt")
    serve(private_nginx, writer, reports, files_site(bundle / "public"))
    status, _, data = get(private_nginx.port, "files.test", "/escape.txt")
    assert status == 403 and b"outside the bundle" not in data


def test_redirects_answer_with_their_status_and_location(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue
) -> None:
    rules = (
        RedirectRule(path="/docs", url="https://docs.example.com/start?from=$old"),
        RedirectRule(path="/shop", host="shop.test", secure=True, port=8443),
        RedirectRule(host="new.test"),
    )
    only = (RedirectRule(path="/a", url="/b"),)
    sites = [
        Site(app="old", routes=(route("old.test", action=SendRedirect(status=303, rules=rules)),)),
        Site(app="few", routes=(route("few.test", action=SendRedirect(status=301, rules=only)),)),
    ]
    serve(private_nginx, writer, reports, *sites)
    port = private_nginx.port
    for path, location in [
        ("/docs", "https://docs.example.com/start?from=$old"),
        ("/shop", "https://shop.test:8443/shop"),
        ("/elsewhere?q=1", "http://new.test/elsewhere?q=1"),
    ]:
        status, headers, _ = get(port, "old.test", path)
        assert (status, headers["location"]) == (303, location), path
    status, headers, _ = get(port, "few.test", "/a")
    assert (status, headers["location"]) == (301, "/b")
    status, _, data = get(port, "few.test", "/other")
    assert (status, data) == (404, b"File not found")


def test_reverse_proxy_reaches_a_second_server(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    _, upstream = backends
    keter_host = ProxyRemote(
        host="127.0.0.1", port=upstream.port, host_header=f"127.0.0.1:{upstream.port}"
    )
    preserving = ProxyRemote(host="127.0.0.1", port=upstream.port)
    site = Site(
        app="proxy",
        routes=(route("api.test", action=keter_host), route("keep.test", action=preserving)),
    )
    serve(private_nginx, writer, reports, site)
    status, _, data = get(private_nginx.port, "api.test", "/x")
    reply = json.loads(data)
    assert (status, reply["name"]) == (200, "second")
    assert reply["headers"]["host"] == f"127.0.0.1:{upstream.port}"
    assert reply["headers"]["x-forwarded-for"] == "127.0.0.1"
    reply = json.loads(get(private_nginx.port, "keep.test")[2])
    assert reply["headers"]["host"] == "keep.test"


def test_two_hosts_for_one_webapp(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    first, _ = backends
    serve(private_nginx, writer, reports, site("two", "one.test", "two.test", port=first.port))
    for host in ("one.test", "two.test"):
        reply = json.loads(get(private_nginx.port, host)[2])
        assert (reply["name"], reply["headers"]["host"]) == ("first", host)


def test_https_host_gets_its_own_certificate_and_others_the_listeners(
    private_nginx: PrivateNginx, writer_for, reports: queue.Queue, backends, tmp_path: Path
) -> None:
    first, _ = backends
    default, default_key = make_certificate(tmp_path / "certs", "default", "plain.test")
    own, own_key = make_certificate(tmp_path / "certs", "own", "secure.test")
    tls = KeterListener("127.0.0.1", free_port(), certificate=default, key=default_key)
    writer = writer_for(tls)
    site = Site(
        app="web",
        hosts=("plain.test",),
        port=first.port,
        routes=(
            route(
                "secure.test",
                action=ProxyRemote(host="127.0.0.1", port=first.port),
                tls=TlsFiles(certificate=own, key=own_key),
            ),
        ),
    )
    serve(private_nginx, writer, reports, site)
    status, _, data = https_get(tls.port, "secure.test", own)
    reply = json.loads(data)
    assert (status, reply["name"]) == (200, "first")
    assert reply["headers"]["x-forwarded-proto"] == "https"
    # Without its own certificate a host gets the listener's.
    assert json.loads(https_get(tls.port, "plain.test", default)[2])["name"] == "first"
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(tls.port, "plain.test", own)
    # Plain HTTP keeps working for both.
    assert json.loads(get(private_nginx.port, "secure.test")[2])["name"] == "first"


def test_requires_secure_redirects_plain_http_to_https(
    private_nginx: PrivateNginx, writer_for, reports: queue.Queue, backends, tmp_path: Path
) -> None:
    first, _ = backends
    certificate, key = make_certificate(tmp_path / "certs", "default", "secure.test")
    tls = KeterListener("127.0.0.1", free_port(), certificate=certificate, key=key)
    writer = writer_for(tls)
    secure = route("secure.test", action=ProxyApp(port=first.port), requires_secure=True)
    serve(private_nginx, writer, reports, Site(app="web", routes=(secure,)))
    status, headers, _ = get(private_nginx.port, "secure.test", "/a/b?c=d")
    assert status == 301
    assert headers["location"] == f"https://secure.test:{tls.port}/a/b?c=d"
    status, _, data = https_get(tls.port, "secure.test", certificate, "/a/b?c=d")
    assert (status, json.loads(data)["name"]) == (200, "first")


def test_basic_auth_turns_strangers_away(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, bundle: Path
) -> None:
    auth = BasicAuth(realm="Team", credentials=(("jon", "rocks"), ("bla", "da:da")))
    serve(private_nginx, writer, reports, files_site(bundle / "public", basic_auth=auth))
    port = private_nginx.port
    user_file = copy_of(writer, "files").basic_auth.user_file
    assert user_file.parent == private_nginx.base / ".keter.conf.d" / "apps" / "keter_files"

    def login(user: str, password: str) -> int:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return get(port, "files.test", headers={"Authorization": f"Basic {token}"})[0]

    status, headers, _ = get(port, "files.test")
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Team"'
    assert (login("jon", "rocks"), login("bla", "da:da")) == (200, 200)
    assert (login("jon", "wrong"), login("nobody", "rocks")) == (401, 401)
    # Hashed, and readable by nginx's group only.
    text = user_file.read_text()
    assert "rocks" not in text and re.fullmatch(r"jon:\$6\$\S+\nbla:\$6\$\S+\n", text)
    assert user_file.stat().st_mode & 0o777 == 0o640
    assert user_file.parent.stat().st_mode & 0o7777 == 0o2750


def test_support_files_go_once_no_config_names_them(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, bundle: Path
) -> None:
    auth = BasicAuth(realm="r", credentials=(("jon", "rocks"),))
    serve(private_nginx, writer, reports, files_site(bundle / "public", basic_auth=auth))
    user_file = copy_of(writer, "files").basic_auth.user_file
    first = user_file.read_text()
    other = Site(app="other", routes=(route("other.test", action=ServeFiles(root=bundle)),))
    # A changed site gets new copies; the same password keeps its hash (the same file).
    serve(private_nginx, writer, reports, files_site(bundle, basic_auth=auth), other)
    assert copy_of(writer, "files").basic_auth.user_file == user_file
    assert user_file.read_text() == first
    serve(private_nginx, writer, reports, files_site(bundle / "public"), other)
    assert not user_file.exists()
    folder = user_file.parent
    assert [path.suffix for path in folder.iterdir()] == [".conf"]  # the site file only
    serve(private_nginx, writer, reports, other)
    assert not folder.exists()  # removed with the site
    assert [path.name for path in folder.parent.iterdir()] == ["keter_other"]


def test_headers_and_the_local_guard(
    private_nginx: PrivateNginx, writer_for, reports: queue.Queue, bundle: Path
) -> None:
    outside = non_loopback_ipv4()
    if outside is None:
        pytest.skip("no non-loopback IPv4 address to call from")
    everywhere = Listener("*", free_port())
    writer = writer_for(everywhere)
    site = files_site(
        bundle / "public",
        headers=(("Access-Control-Allow-Origin", "*"), ("X-Price", "$5")),
        local_only=LocalOnly(status=405, text="Keter Rocks"),
    )
    serve(private_nginx, writer, reports, site)
    status, headers, _ = get(everywhere.port, "files.test")
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"
    assert headers["x-price"] == "$5"
    connection = http.client.HTTPConnection(outside, everywhere.port, timeout=5)
    try:
        connection.request("GET", "/", headers={"Host": "files.test"})
        response = connection.getresponse()
        assert (response.status, response.read()) == (405, b"Keter Rocks")
    finally:
        connection.close()


def test_global_options_health_real_ip_and_error_pages(
    private_nginx: PrivateNginx, writer_for, reports: queue.Queue, backends, tmp_path: Path
) -> None:
    first, _ = backends
    pages = {}
    for kind in ("unknown", "missing", "exception"):
        pages[kind] = tmp_path / f"{kind}.html"
        pages[kind].write_text(f"<p>{kind} page</p>")
    options = ProxyOptions(
        real_ip_from=("127.0.0.0/8",),
        healthcheck_path="/keter-health",
        unknown_host_file=pages["unknown"],
        missing_host_file=pages["missing"],
        proxy_exception_file=pages["exception"],
    )
    writer = writer_for(options=options)
    dead_port = free_port()
    sites = [site("web", "web.test", port=first.port), site("dead", "dead.test", port=dead_port)]
    serve(private_nginx, writer, reports, *sites)
    port = private_nginx.port
    for host in ("web.test", "nobody.test"):
        assert get(port, host, "/keter-health")[::2] == (200, b"OK\n")
    reply = json.loads(get(port, "web.test", headers={"X-Forwarded-For": "203.0.113.9"})[2])
    assert reply["headers"]["x-real-ip"] == "203.0.113.9"
    status, headers, data = get(port, "nobody.test")
    assert (status, data) == (404, b"<p>unknown page</p>")
    assert headers["content-type"] == "text/html"
    assert get(port, "dead.test")[::2] == (502, b"<p>exception page</p>")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no Host header at all
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 502") and reply.endswith(b"<p>missing page</p>")


def unquote(token: str) -> str:
    """What nginx's config reader makes of a double-quoted token."""
    assert token[0] == token[-1] == '"'
    out, i = [], 1
    while i < len(token) - 1:
        if token[i] == "\\":
            out.append(token[i + 1])
            i += 2
        else:
            assert token[i] != '"', token  # an unescaped quote would end the string early
            out.append(token[i])
            i += 1
    return "".join(out)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
def test_bundle_text_stays_one_quoted_string(text: str) -> None:
    site = Site(
        app="a",
        routes=(
            route(
                "a.test",
                action=ProxyApp(port=4000),
                headers=(("X-Any", text),),
                local_only=LocalOnly(status=403, text=text),
            ),
        ),
    )
    text_out = render([site], LOCAL, 1)  # server_blocks() would miscount braces in the text
    header = re.search(r'add_header X-Any (".*") always;', text_out).group(1)
    local = re.search(r'return 403 (".*");', text_out).group(1)
    # '$' only ever reaches nginx as the literal-dollar variable, never as a variable of its own.
    expected = text.replace("$", "${keter_dollar}")
    assert unquote(header) == unquote(local) == expected


def test_chain_certificates_are_joined_after_the_certificate(
    private_nginx: PrivateNginx, writer_for, reports: queue.Queue, backends, tmp_path: Path
) -> None:
    first, _ = backends
    default, default_key = make_certificate(tmp_path / "certs", "default", "plain.test")
    own, own_key = make_certificate(tmp_path / "certs", "own", "secure.test")
    middle, _ = make_certificate(tmp_path / "certs", "middle", "ca.test")
    tls = KeterListener(
        "127.0.0.1", free_port(), certificate=default, key=default_key, chain=(middle,)
    )
    writer = writer_for(tls)
    own_tls = TlsFiles(certificate=own, key=own_key, chain=(middle,))
    site = Site(
        app="web",
        routes=(
            route("secure.test", action=ProxyApp(port=first.port), tls=own_tls),
            route("plain.test", action=ProxyRemote(host="127.0.0.1", port=first.port)),
        ),
    )
    serve(private_nginx, writer, reports, site)
    joined = copy_of(writer, "web").tls
    assert joined.certificate.read_bytes() == own.read_bytes() + middle.read_bytes()
    assert joined.key.read_bytes() == own_key.read_bytes()
    assert joined.key.stat().st_mode & 0o777 == 0o600
    served_listener = writer._globals[0][1]
    assert served_listener.certificate.read_bytes() == default.read_bytes() + middle.read_bytes()
    assert served_listener.certificate.parent.name == "global"
    assert https_get(tls.port, "secure.test", own)[0] == 200
    assert https_get(tls.port, "plain.test", default)[0] == 200
