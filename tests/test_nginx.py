"""The nginx renderer (pure) and the nginx writer against a real private nginx."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nginx_server import PrivateNginx, free_port
from support import wait_for

from keter.messages import ApplyNginx, NginxApplied, NginxFailed, Site, Stop
from keter.nginx import STATUS_HOST, NginxWriter, fetch_generation, render, upstream_name


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
    assert "server 127.0.0.1:4001;" in body
    assert re.search(r"keepalive \d+;", body)
    assert "keepalive_requests" in body
    assert "keepalive_timeout" in body
    assert "proxy_pass http://keter_blog;" in text


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


def test_one_server_per_site_per_listener() -> None:
    listeners = [Listener("127.0.0.1", 8080), Listener("10.0.0.1", 80)]
    sites = [site("blog", "blog.example.com", "*.blog.example.com"), site("shop", "shop.io")]
    blocks = [b for b in server_blocks(render(sites, listeners, 1)) if "proxy_pass" in b]
    assert len(blocks) == 4
    listens = sorted(re.search(r"listen (\S+);", b).group(1) for b in blocks)
    assert listens == ["10.0.0.1:80", "10.0.0.1:80", "127.0.0.1:8080", "127.0.0.1:8080"]
    blog = [b for b in blocks if "keter_blog" in b]
    assert all("server_name *.blog.example.com blog.example.com;" in b for b in blog)


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
     "a_b.com", "-a.com", "a..com", "*", "a.*.com", "a.com*", "**.a.com", "é.com"],
)  # fmt: skip
def test_hostile_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        render([site("blog", host)], LOCAL, 1)


@pytest.mark.parametrize("app", ["a;b", "x{", "evil\n", "a b", "a/b", "", "$app", "ü"])
def test_hostile_app_is_refused(app: str) -> None:
    with pytest.raises(ValueError, match="invalid app"):
        render([site(app, "ok.com")], LOCAL, 1)


@given(st.text(max_size=30))
def test_render_never_emits_unsafe_host(host: str) -> None:
    try:
        text = render([site("blog", host)], LOCAL, 1)
    except ValueError:
        return
    assert re.fullmatch(r"[a-z0-9.*-]+", host)
    assert f"server_name {host};" in text


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


class Backend:
    """A tiny HTTP/1.1 app that answers with its name and what it was sent."""

    def __init__(self, name: str) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = json.dumps(
                    {
                        "name": owner.name,
                        "peer_port": self.client_address[1],
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.name = name
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # A short poll interval only makes shutdown() at teardown quick.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        listeners=listeners or [Listener("127.0.0.1", nginx.port)],
        config_file=nginx.config_file,
        test_command=nginx.test_command,
        reload_command=nginx.reload_command,
        report_to=reports,
        **extra,
    )


@pytest.fixture
def writer(private_nginx: PrivateNginx, reports: queue.Queue) -> Iterator[NginxWriter]:
    actor = make_writer(private_nginx, reports)
    actor.start()
    yield actor
    actor.stop()
    actor.join(timeout=15)
    assert not actor.is_alive()


def apply(writer: NginxWriter, reports: queue.Queue, generation: int, *sites: Site) -> object:
    writer.tell(ApplyNginx(generation=generation, sites=sites))
    return reports.get(timeout=15)


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
    wait_for(lambda: fetch_generation("127.0.0.1", port) == "5", 10, "generation 5 on port")
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
    writer.start()
    try:
        assert apply(writer, reports, 1, site("blog", "blog.test", port=first.port)) == (
            NginxApplied(generation=1)
        )
        before = private_nginx.config_file.read_bytes()
    finally:
        writer.stop()
        writer.join(timeout=15)

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = [
            Listener("127.0.0.1", private_nginx.port),
            Listener("127.0.0.1", squatter.getsockname()[1]),
        ]
        blocked = make_writer(
            private_nginx,
            reports,
            listeners=taken,
            confirm_timeout=0.5,
            error_log=private_nginx.error_log,
        )
        blocked.start()
        try:
            failed = apply(blocked, reports, 2, site("blog", "blog.test", port=second.port))
        finally:
            blocked.stop()
            blocked.join(timeout=15)

    assert isinstance(failed, NginxFailed), failed
    assert failed.generation == 2
    assert "kept the previous configuration" in failed.reason
    assert "Address already in use" in failed.reason
    assert private_nginx.config_file.read_bytes() == before
    assert app_name(private_nginx, "blog.test") == "first"
    assert fetch_generation("127.0.0.1", private_nginx.port) == "1"


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
    writer.start()
    try:
        failed = apply(writer, reports, 1)
    finally:
        writer.stop()
        writer.join(timeout=15)
    assert isinstance(failed, NginxFailed)
    assert "reload failed" in failed.reason
    assert "no-such-signal" in failed.reason
    assert private_nginx.config_file.read_bytes() == before


def test_invalid_site_is_refused_and_writer_keeps_running(
    private_nginx: PrivateNginx, writer: NginxWriter, reports: queue.Queue, backends
) -> None:
    before = private_nginx.config_file.read_bytes()
    failed = apply(writer, reports, 1, site("blog", "evil.test;"))
    assert isinstance(failed, NginxFailed)
    assert "invalid host 'evil.test;'" in failed.reason
    assert private_nginx.config_file.read_bytes() == before
    assert apply(writer, reports, 2, site("blog", "blog.test", port=backends[0].port)) == (
        NginxApplied(generation=2)
    )


def test_queued_applies_coalesce_to_the_latest(
    private_nginx: PrivateNginx, reports: queue.Queue, backends
) -> None:
    first, second = backends
    writer = make_writer(private_nginx, reports)
    # Queued before the thread runs, so the first handle() finds the rest waiting.
    writer.tell(ApplyNginx(generation=1, sites=(site("blog", "blog.test", port=first.port),)))
    writer.tell(ApplyNginx(generation=2, sites=(site("blog", "blog.test", port=first.port),)))
    writer.tell(ApplyNginx(generation=3, sites=(site("blog", "blog.test", port=second.port),)))
    writer.tell(Stop())
    writer.tell(ApplyNginx(generation=4, sites=()))  # after Stop: never handled
    writer.start()
    writer.join(timeout=15)
    assert not writer.is_alive()

    assert reports.get_nowait() == NginxApplied(generation=3)
    assert reports.empty()
    private_nginx.wait_generation(3)
    assert app_name(private_nginx, "blog.test") == "second"
    assert "# generation 3" in private_nginx.config_file.read_text()


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
