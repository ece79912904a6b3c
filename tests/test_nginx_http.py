"""The HTTP features nginx adds for every site (issue 12), against a real private nginx:
HTTP/2 on TLS, gzip with Vary, HSTS for requires-secure, the rate-limiter middleware
(limit_req, 429), the request body limit (413), unbuffered streaming, autohead and a
WebSocket echo through nginx."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.net import Backend
from support.nginx import PrivateNginx, WriterRig

from keter.bundle import RateAlgorithm, RateIdentifier, RateLimiterConfig, RateZone, Throttle
from keter.messages import ProxyApp, Route, ServeFiles, Site
from keter.nginx import ProxyOptions


class Serving(WriterRig):
    """The writer rig, with requests over its plain and its TLS listener."""

    def request(
        self, host: str, method: str = "GET", body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.nginx.port, timeout=10)
        try:
            names = {key.replace("_", "-"): value for key, value in headers.items()}
            conn.request(method, "/", body=body, headers={"Host": host, **names})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def tls_request(self, host: str) -> tuple[int, dict[str, str]]:
        context = ssl.create_default_context(cafile=str(self.certificate))
        with (
            socket.create_connection(("127.0.0.1", self.tls.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}


@pytest.fixture
def serving(private_nginx: PrivateNginx, tmp_path: Path) -> Iterator:
    made: list[Serving] = []

    def make(options: ProxyOptions | None = None) -> Serving:
        folder = tmp_path / f"certs{len(made)}"
        made.append(Serving(private_nginx, folder, ("web.test", "secure.test"), options))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@pytest.fixture
def backend() -> Iterator[Backend]:
    made = Backend("app")
    yield made
    made.close()


def app(backend: Backend, host: str = "web.test", **route: object) -> Site:
    return Site(
        app="web", routes=(Route(hosts=(host,), action=ProxyApp(port=backend.port), **route),)
    )


def test_tls_listeners_speak_http2(serving, backend: Backend) -> None:
    nginx = serving()
    nginx.apply(app(backend))
    context = ssl.create_default_context(cafile=str(nginx.certificate))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", nginx.tls.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="web.test") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
    # And as curl sees it.
    result = subprocess.run(
        ["curl", "-s", "--http2", "-o", "/dev/null", "-w", "%{http_version}",
         "--cacert", str(nginx.certificate),
         "--resolve", f"web.test:{nginx.tls.port}:127.0.0.1", f"https://web.test:{nginx.tls.port}/"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.stdout == "2", result


def test_text_answers_are_gzipped_with_vary(serving, tmp_path: Path) -> None:
    nginx = serving()
    root = tmp_path / "public"
    root.mkdir()
    page = "<h1>" + "keter " * 200 + "</h1>"
    (root / "index.html").write_text(page)
    (root / "logo.png").write_bytes(os.urandom(2000))
    files = Site(app="files", routes=(Route(hosts=("files.test",), action=ServeFiles(root=root)),))
    nginx.apply(files)
    status, headers, body = nginx.request("files.test", Accept_Encoding="gzip")
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(body).decode() == page
    status, headers, body = nginx.request("files.test")  # a client without gzip
    assert "content-encoding" not in headers and body.decode() == page
    # Turned off, nothing is compressed.
    nginx.stop()
    plain = serving(ProxyOptions(gzip=False))
    plain.apply(files)
    assert "content-encoding" not in plain.request("files.test", Accept_Encoding="gzip")[1]


def test_requires_secure_sends_hsts_over_tls_only(serving, backend: Backend) -> None:
    nginx = serving(ProxyOptions(hsts_max_age=600))
    secure = Route(hosts=("secure.test",), action=ProxyApp(port=backend.port), requires_secure=True,
                   headers=(("X-Own", "1"),))  # fmt: skip
    plain = Route(hosts=("web.test",), action=ProxyApp(port=backend.port))
    nginx.apply(Site(app="web", routes=(secure, plain)))
    status, headers = nginx.tls_request("secure.test")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=600"
    assert headers["x-own"] == "1"  # the route's own headers stay
    assert "strict-transport-security" not in nginx.tls_request("web.test")[1]
    status, headers, _ = nginx.request("secure.test")
    assert status == 301 and "strict-transport-security" not in headers


# An app name of 64 characters (the longest), its "-" and "." escaped to 3 each: keter's
# variables for its keys must still fit nginx's hash of variable names.
@pytest.mark.parametrize("name", ["web", "customer-portal-api", "a-b." * 15 + "long"])
def test_the_rate_limiter_answers_429_past_the_rate(serving, backend: Backend, name) -> None:
    nginx = serving()
    throttle = Throttle(name="ip", limit=3, period=60, algorithm=RateAlgorithm.FIXED_WINDOW,
                        identifier=RateIdentifier.IP)  # fmt: skip
    by_key = Throttle(name="key", limit=2, period=60, algorithm=RateAlgorithm.TOKEN_BUCKET,
                      identifier=RateIdentifier.HEADER, identifier_name="X-Api-Key")  # fmt: skip
    limited = Route(
        hosts=("web.test",),
        action=ProxyApp(port=backend.port),
        rate_limiters=(RateLimiterConfig(throttles=(throttle,)),),
    )
    keyed = Route(
        hosts=("api.test",),
        action=ProxyApp(port=backend.port),
        rate_limiters=(RateLimiterConfig(zone=RateZone.IP, throttles=(by_key,)),),
    )
    nginx.apply(Site(app=name, routes=(limited, keyed)))
    statuses = [nginx.request("web.test")[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    # Counted per API key; a request without the header is not counted (as in Keter).
    assert [nginx.request("api.test", X_Api_Key="a")[0] for _ in range(3)] == [200, 200, 429]
    assert nginx.request("api.test", X_Api_Key="b")[0] == 200
    assert [nginx.request("api.test")[0] for _ in range(4)] == [200] * 4


def test_a_rate_limit_of_one_request_lets_one_through(serving, backend: Backend) -> None:
    """No burst at all (nginx refuses "burst=0", so none is written)."""
    nginx = serving()
    once = Throttle(name="ip", limit=1, period=60, algorithm=RateAlgorithm.FIXED_WINDOW,
                    identifier=RateIdentifier.IP)  # fmt: skip
    nginx.apply(app(backend, rate_limiters=(RateLimiterConfig(throttles=(once,)),)))
    assert [nginx.request("web.test")[0] for _ in range(3)] == [200, 429, 429]


def test_request_bodies_past_the_limit_get_413(serving, backend: Backend) -> None:
    """The operator's limit, which a stanza may lower and never raise."""
    nginx = serving(ProxyOptions(max_body_size=4096))
    small = Route(hosts=("small.test",), action=ProxyApp(port=backend.port), max_body_size=1024)
    big = Route(hosts=("big.test",), action=ProxyApp(port=backend.port), max_body_size=1 << 20)
    web = Route(hosts=("web.test",), action=ProxyApp(port=backend.port))
    nginx.apply(Site(app="web", routes=(web, small, big)))
    # Under the limit the request reaches the app (this one answers POST with 501).
    for host, under, past in [("web.test", 4000, 5000), ("small.test", 1000, 2000)]:
        assert nginx.request(host, "POST", b"x" * under)[0] == 501
        assert nginx.request(host, "POST", b"x" * past)[0] == 413
    assert nginx.request("big.test", "POST", b"x" * 5000)[0] == 413


def test_autohead_sends_a_head_request_to_the_app_as_get(serving, backend: Backend) -> None:
    nginx = serving()
    headed = Route(hosts=("head.test",), action=ProxyApp(port=backend.port), autohead=True)
    nginx.apply(
        Site(
            app="web",
            routes=(headed, Route(hosts=("web.test",), action=ProxyApp(port=backend.port))),
        )
    )
    status, headers, body = nginx.request("head.test", "HEAD")
    assert (status, body) == (200, b"") and headers["content-type"] == "application/json"
    assert nginx.request("web.test", "HEAD")[0] == 501  # this app answers no HEAD itself


# -- streaming and WebSockets -----------------------------------------------------------------


class StreamingApp:
    """Answers /events with one server-sent event, then holds the stream open until told."""

    def __init__(self) -> None:
        self.release = threading.Event()
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                if b"Upgrade" in request or self.server.websocket:  # type: ignore[attr-defined]
                    return
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-cache\r\nConnection: close\r\n\r\ndata: first\n\n"
                )
                self.wfile.flush()
                owner.release.wait(15)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.websocket = False  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_unbuffered_routes_stream_server_sent_events(serving) -> None:
    events = StreamingApp()
    try:
        nginx = serving()
        route = Route(hosts=("sse.test",), action=ProxyApp(port=events.port), buffering=False)
        nginx.apply(Site(app="sse", routes=(route,)))
        with socket.create_connection(("127.0.0.1", nginx.nginx.port), timeout=5) as client:
            client.sendall(b"GET /events HTTP/1.1\r\nHost: sse.test\r\n\r\n")
            received = b""
            while b"data: first" not in received:
                chunk = client.recv(4096)  # the socket's 5 s timeout fails a buffered stream
                assert chunk, received
                received += chunk
        assert not events.release.is_set()  # the app still holds the stream open
    finally:
        events.close()


class WebSocketEcho:
    """A minimal RFC 6455 server: completes the handshake and echoes text frames."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self) -> None:
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                headers = {}
                self.rfile.readline()
                while (line := self.rfile.readline().strip()) != b"":
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                accept = base64.b64encode(
                    hashlib.sha1(headers[b"sec-websocket-key"] + outer.GUID).digest()
                )
                self.wfile.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                while (message := read_frame(self.rfile)) is not None:
                    self.wfile.write(frame(message, mask=False))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def frame(payload: bytes, *, mask: bool) -> bytes:
    """One final text frame (clients mask, servers do not)."""
    head = bytes([0x81])
    size = len(payload)
    bit = 0x80 if mask else 0
    head += bytes([bit | size]) if size < 126 else bytes([bit | 126]) + struct.pack(">H", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(stream) -> bytes | None:
    """One frame's payload; None at a close frame or the end of the stream."""
    head = stream.read(2)
    if len(head) < 2 or head[0] & 0x0F == 0x8:
        return None
    size = head[1] & 0x7F
    if size == 126:
        size = struct.unpack(">H", stream.read(2))[0]
    key = stream.read(4) if head[1] & 0x80 else None
    data = stream.read(size)
    return bytes(b ^ key[i % 4] for i, b in enumerate(data)) if key else data


def test_a_websocket_echoes_through_nginx(serving) -> None:
    echo = WebSocketEcho()
    try:
        nginx = serving()
        nginx.apply(
            Site(app="ws", routes=(Route(hosts=("ws.test",), action=ProxyApp(port=echo.port)),))
        )
        key = base64.b64encode(os.urandom(16))
        with socket.create_connection(("127.0.0.1", nginx.nginx.port), timeout=5) as client:
            client.sendall(
                b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
            )
            stream = client.makefile("rb")
            assert stream.readline().startswith(b"HTTP/1.1 101")
            while stream.readline().strip():
                pass
            for text in (b"hello", b"keter " * 40):
                client.sendall(frame(text, mask=True))
                assert read_frame(stream) == text
    finally:
        echo.close()
