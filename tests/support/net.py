"""Talking to servers in tests: free ports, requests through nginx, load, tiny backends."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from support.wait import wait_for

# Ports for what the tests start themselves (nginx, PostgreSQL, pebble, apps handed to a
# process monitor): 30000-32767, above the test kters' app ports and below the kernel's
# ephemeral range (32768-60999). A port the kernel picked (bind to port 0) could be
# taken, before its user binds it, as the local port of any connection made meanwhile
# ("port ... is already in use", seen once); the kernel never picks these.
_OWN_PORTS = range(30_000, 32_768)
_next_own = itertools.count(random.randrange(10_000))


def free_port() -> int:
    """A TCP port that nothing holds on any address right now, from this xdist worker's slice
    of ``_OWN_PORTS`` in turn (a port handed out is not handed out again soon)."""
    workers, worker = _xdist_worker()
    span = len(_OWN_PORTS) // workers
    for _ in range(span):
        port = _OWN_PORTS.start + worker * span + next(_next_own) % span
        if _free_everywhere(port):
            return port
    raise RuntimeError(f"no free port in {_OWN_PORTS} for this worker")


def _free_everywhere(port: int) -> bool:
    """Whether ``port`` is free on every address. A test nginx may listen on ``*:port``,
    which a socket on another address (127.0.0.2, the host's own) keeps from binding even
    when 127.0.0.1:port is free; the reload then fails and the test waits in vain."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 here: the IPv4 wildcard alone
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address: tuple = ("0.0.0.0", port)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families at once
        address = ("::", port)
    with s:
        try:
            s.bind(address)  # no SO_REUSEADDR: a port in TIME_WAIT is skipped
        except OSError:
            return False
    return True


def _xdist_worker() -> tuple[int, int]:
    """(how many pytest-xdist workers run, which one this is): (1, 0) without xdist."""
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    return workers, worker % workers


def listening(port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` (a server the tests
    started is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def bind_when_free(port: int, timeout: float = 10.0) -> socket.socket:
    """Listen on ``port`` the moment it is free, as a stranger racing for it would."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            sock.setblocking(False)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            # Busy on purpose: the point is to win the race against keter's restart.


# App ports for test kters: 10000-29999, below the kernel's ephemeral range.
_APP_PORTS = range(10_000, 30_000)
_RANGE_WIDTH = 200
# Ranges are handed out in turn from a random start, so kters alive at once in one
# worker (a module's shared rig and a test's own) never share one.
_next_slot = itertools.count(random.randrange(1000))


def app_port_range() -> list[int]:
    """A private ``port-range`` for one test keter: [low, high].

    Each pytest-xdist worker has its own slice of the range, so two kters of one suite
    never hand out the same port (keter would then see the other's app on "its" port
    and, rightly, refuse to route to it); another test session on this machine meets
    ours only by chance.
    """
    workers, worker = _xdist_worker()
    span = len(_APP_PORTS) // workers
    slots = span // _RANGE_WIDTH
    low = _APP_PORTS.start + worker * span + (next(_next_slot) % slots) * _RANGE_WIDTH
    return [low, low + _RANGE_WIDTH - 1]


_UIDS = range(1_900_000_000, 1_900_999_000)  # keter's default range, but its last 1000
_UID_WIDTH = 1000
_next_uid_slot = itertools.count(random.randrange(1000))


def app_uid_range() -> list[int]:
    """A private ``app-uid-range`` for one test keter: [low, high].

    Keters on one machine hand out uids from the same default range: two of one suite
    gave their apps the same uid, and one's app counted as the other's still running
    (its IPC objects were kept). Sliced as ``app_port_range`` is.
    """
    workers, worker = _xdist_worker()
    span = len(_UIDS) // workers
    slots = span // _UID_WIDTH
    low = _UIDS.start + worker * span + (next(_next_uid_slot) % slots) * _UID_WIDTH
    return [low, low + _UID_WIDTH - 1]


# -- through a private nginx ----------------------------------------------------------------


def body(nginx, host: str, path: str = "/") -> bytes | None:
    """The body of GET ``path`` for ``host`` through a PrivateNginx, if the status is 200."""
    status, _headers, data = nginx.request(host, path)
    return data if status == 200 else None


def served(nginx, host: str, version: str, timeout: float = 20) -> None:
    """Wait until ``version`` answers and nginx's older workers (old config) stop accepting."""
    expected = f"{version}\n".encode()
    wait_for(lambda: body(nginx, host) == expected, timeout, f"{host} to serve {version}")
    nginx.wait_settled(timeout)
    assert body(nginx, host) == expected


def get(
    port: int, host: str, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET through nginx on 127.0.0.1 with these headers: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def https_get(
    port: int, host: str, cafile: Path, path: str = "/", sni: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET over TLS trusting only ``cafile``, which must name ``sni`` (default ``host``).

    Fails with ssl.SSLCertVerificationError if nginx presents another certificate.
    """
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=sni or host) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        tls.sendall(request.encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


# -- concurrent clients ---------------------------------------------------------------------


@dataclass
class Load:
    """Concurrent clients through nginx; every failure is recorded."""

    port: int
    host: str
    stop: threading.Event = field(default_factory=threading.Event)
    bodies: dict[bytes, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Strict: a reset on a reused keep-alive connection counts as a failure too (wrk
    # counts it; many API clients do not retry it).
    strict: bool = False

    def run(self, clients: int = 6) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._client, args=(i % 2 == 0,), daemon=True)
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _record(self, status: int | None, data: bytes, error: str | None) -> None:
        with self.lock:
            self.requests += 1
            if error is not None:
                self.errors.append(error)
            elif status != 200:
                self.errors.append(f"status {status}: {data[:80]!r}")
            else:
                self.bodies[data] = self.bodies.get(data, 0) + 1

    def _client(self, keep_alive: bool) -> None:
        conn = None
        while not self.stop.is_set():
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                headers = {"Host": self.host}
                if not keep_alive:
                    headers["Connection"] = "close"
                conn.request("GET", "/", headers=headers)
                response = conn.getresponse()
                data = response.read()
                self._record(response.status, data, None)
                if not keep_alive or response.will_close:
                    conn.close()
                    conn = None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                conn = None
                # A server may close an idle keep-alive connection just as a request is sent;
                # clients retry that (RFC 9112 9.3.1). On a fresh connection it is a failure.
                if not reused or self.strict:
                    self._record(None, b"", repr(exc))
            except OSError as exc:
                conn.close()
                conn = None
                self._record(None, b"", repr(exc))


# -- a tiny backend ----------------------------------------------------------------------------


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


class NamingListener:
    """A TCP server that answers each connection with its name and keeps it open (the
    switch looks an open connection up). On 127.0.0.1, or with ``dualstack`` on every
    address, IPv4 and IPv6."""

    def __init__(self, name: str | bytes, *, dualstack: bool = False) -> None:
        self.name = name.encode() if isinstance(name, str) else name
        if dualstack:
            self.sock = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError):
                conn.sendall(self.name)
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
