"""Benchmark 3: requests/s through keter's generated nginx config.

Three targets, all on 127.0.0.1, measured in turns in the same run:

* keter: an nginx whose ``http {}`` holds exactly what ``keter.nginx.render``
  writes for one Site, proxying (as keter does in kernel mode) to a stable
  address that a private nftables table leads to the backend (keter.switch):
  the kernel's NAT and nginx's short-lived pool to the app are both measured;
* keter with a long pool: the same config with nginx's default pool lifetime
  (``keepalive_time 1h``, ``keepalive_timeout 60s``) instead of keter's 50 ms
  bound, which tells what that bound costs apart from the rest;
* hand-written: an nginx with a minimal proxy and an upstream keep-alive pool;
* hand-written with headers: the same, plus the forwarding headers keter must
  send (Host, X-Real-IP, X-Forwarded-For, X-Forwarded-Proto, WebSocket upgrade),
  which tells what those headers cost apart from the rest of keter's config;
* direct: the backend itself, a further nginx returning a fixed body (fast, so
  that the proxy is what is measured).

Every nginx has the same main config and worker count. wrk uses 2 threads and
64 connections, with keep-alive clients and with ``Connection: close`` clients.
Beside req/s, each run's CPU per request (the proxy's and the backend's nginx
workers, from /proc) is reported: unlike req/s it hardly moves when other work
shares the machine's cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from harness import NGINX, Row, Settings, fetch, free_port, median, poll, port_accepts, run_wrk

from keter.messages import ProxyApp, Route, Site
from keter.nginx import render
from keter.switch import Table, nft

NAME = "proxy"
HOST = "bench.example.com"
BODY = "a fixed body from the backend\n"
TARGET = 0.95  # keter's req/s as a fraction of the hand-written proxy's
CONNECTIONS = 64

_MAIN = """\
{user}worker_processes {workers};
daemon off;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {base}/temp;
    proxy_temp_path {base}/temp;
    fastcgi_temp_path {base}/temp;
    uwsgi_temp_path {base}/temp;
    scgi_temp_path {base}/temp;
    include {base}/site.conf;
}}
"""

_BACKEND = """\
server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    default_type text/plain;
    location / {{
        return 200 "{body}";
    }}
}}
"""

_HAND_WRITTEN = """\
upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 64;
}}
server {{
    listen 127.0.0.1:{port};
    location / {{
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }}
}}
"""

_HAND_WRITTEN_HEADERS = """\
map $http_upgrade $upgrade_or_keepalive {{
    default upgrade;
    "" "";
}}
upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 64;
}}
server {{
    listen 127.0.0.1:{port};
    location / {{
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $upgrade_or_keepalive;
    }}
}}
"""


@dataclass(frozen=True)
class _Listener:
    host: str
    port: int


class _Nginx:
    """An nginx with the shared main config and ``site`` in its ``http {}``."""

    def __init__(self, base: Path, port: int, workers: int, site: str) -> None:
        self.base, self.port = base, port
        (base / "temp").mkdir(parents=True, exist_ok=True)
        (base / "site.conf").write_text(site)
        # A root master's workers would run as nobody and not reach the private temp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (base / "nginx.conf").write_text(_MAIN.format(user=user, workers=workers, base=base))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [NGINX, "-p", str(self.base), "-e", str(self.base / "error.log")]
        self.proc = subprocess.Popen(
            [*command, "-c", str(self.base / "nginx.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = self.proc
        poll(lambda: proc.poll() is not None or port_accepts(self.port), 10, "nginx to listen")
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.base / 'error.log').read_text()}")

    def cpu(self) -> float:
        """CPU seconds its workers have used so far."""
        assert self.proc is not None
        used = 0.0
        for worker in psutil.Process(self.proc.pid).children():
            times = worker.cpu_times()
            used += times.user + times.system
        return used

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: master and workers
        self.proc.wait(10)


@contextlib.contextmanager
def _running(*servers: _Nginx) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


def run(settings: Settings) -> list[Row]:
    reps = settings.pick(5, 3)
    seconds = settings.pick(2, 1)
    rows = []
    for workers in settings.pick([1, 2], [1]):
        base = settings.workdir / f"proxy-{workers}"
        backend_port, keter_port, hand_port = free_port(), free_port(), free_port()
        headers_port, long_port = free_port(), free_port()
        table, action = _stable_address(base, backend_port)
        sites = [Site(app="bench", routes=(Route(hosts=(HOST,), action=action),))]
        keter_site = render(sites, [_Listener("127.0.0.1", keter_port)], generation=1)
        long_site = _long_pool(render(sites, [_Listener("127.0.0.1", long_port)], generation=1))
        servers = {
            "backend": _Nginx(
                base / "backend",
                backend_port,
                workers,
                _BACKEND.format(port=backend_port, body=BODY.replace("\n", "\\n")),
            ),
            "keter": _Nginx(base / "keter", keter_port, workers, keter_site),
            "long": _Nginx(base / "long", long_port, workers, long_site),
            "hand": _Nginx(
                base / "hand",
                hand_port,
                workers,
                _HAND_WRITTEN.format(backend=backend_port, port=hand_port),
            ),
            "headers": _Nginx(
                base / "headers",
                headers_port,
                workers,
                _HAND_WRITTEN_HEADERS.format(backend=backend_port, port=headers_port),
            ),
        }
        ports = {
            "keter": keter_port,
            "long": long_port,
            "hand": hand_port,
            "headers": headers_port,
            "direct": backend_port,
        }
        try:
            with _running(*servers.values()):
                for name, port in ports.items():
                    reply = fetch(port, HOST)
                    if reply != (200, BODY.encode()):
                        raise RuntimeError(f"{name} on port {port} answered {reply!r}")
                for close in (False, True):
                    rps, cpu = _measure(servers, ports, reps, seconds, close)
                    rows.append(_row(workers, close, rps, cpu, kernel=table is not None))
        finally:
            if table is not None:
                nft.apply(table.delete_script(), nft.find_nft() or "nft")
    return rows


def _stable_address(base: Path, backend: int) -> tuple[Table | None, ProxyApp]:
    """A stable address led to ``backend`` by an nftables table of the bench's own, as
    keter's kernel mode has it; without nft, the backend itself (the reload mode)."""
    program = nft.find_nft()
    if program is None:
        return None, ProxyApp(port=backend)
    table = Table.for_root(base / "keter-root")
    stable = 8080
    nft.apply(table.create_script(), program)
    writer = table.writer()
    try:
        writer.change(*table.changes({}, {stable: backend}))
    finally:
        writer.close()
    return table, ProxyApp(port=stable, host=table.address)


def _long_pool(site: str) -> str:
    """keter's config with nginx's default pool lifetime instead of keter's bound."""
    site, aged = re.subn(r"keepalive_time \S+;", "keepalive_time 1h;", site)
    site, idled = re.subn(r"keepalive_timeout \S+;", "keepalive_timeout 60s;", site)
    if (aged, idled) != (1, 1):
        raise RuntimeError("keter's app upstream has no keepalive_time/keepalive_timeout")
    return site


def _measure(
    servers: dict[str, _Nginx], ports: dict[str, int], reps: int, seconds: int, close: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """req/s of each target, ``reps`` times, and its CPU per request (µs, the proxy's and
    the backend's nginx workers together; the backend alone for direct).

    keter and hand-written run back to back, in alternating order, so each pair
    sees the same background load (the machine may be shared); keter with a long
    pool, the hand-written proxy with headers and direct follow.
    """
    rps: dict[str, list[float]] = {name: [] for name in ports}
    cpu: dict[str, list[float]] = {name: [] for name in ports}
    backend = servers["backend"]
    for rep in range(reps):
        pair = ["keter", "hand"] if rep % 2 == 0 else ["hand", "keter"]
        for name in [*pair, "long", "headers", "direct"]:
            proxy = servers[name] if name != "direct" else None
            before = backend.cpu() + (proxy.cpu() if proxy else 0.0)
            result = run_wrk(
                ports[name], HOST, seconds=seconds, connections=CONNECTIONS, close=close
            )
            used = backend.cpu() + (proxy.cpu() if proxy else 0.0) - before
            if result.non2xx:
                raise RuntimeError(f"{name}: {result.non2xx} error responses under load")
            rps[name].append(result.rps)
            cpu[name].append(used / max(result.requests, 1) * 1e6)
    return rps, cpu


def _row(
    workers: int,
    close: bool,
    rps: dict[str, list[float]],
    cpu: dict[str, list[float]],
    *,
    kernel: bool,
) -> Row:
    # The median of the per-pair ratios: robust against load that drifts between pairs.
    ratio = median(k / h for k, h in zip(rps["keter"], rps["hand"], strict=True))
    long_ratio = median(k / h for k, h in zip(rps["long"], rps["hand"], strict=True))
    keter, hand, direct = (median(rps[name]) for name in ("keter", "hand", "direct"))
    headers = median(rps["headers"])
    us = {name: median(values) for name, values in cpu.items()}
    clients = "Connection: close" if close else "keep-alive"
    original = "12.8k" if close else "17k"
    hand_ref = "22-24k" if close else ("47k" if workers == 1 else "67k")
    return Row(
        f"proxy: {clients} clients, {workers} worker{'s' if workers > 1 else ''}",
        f"keter's config{' via its stable address' if kernel else ''} {keter:,.0f} req/s "
        f"= {ratio:.0%} of hand-written (n={len(rps['keter'])}); nginx CPU per request "
        f"{us['keter']:.1f} µs vs {us['hand']:.1f} µs",
        f"hand-written {hand:,.0f}, hand-written with keter's headers {headers:,.0f} "
        f"({us['headers']:.1f} µs), keter's config with nginx's default pool lifetime "
        f"{long_ratio:.0%} ({us['long']:.1f} µs), direct {direct:,.0f} req/s "
        f"(issue's machine: hand-written {hand_ref}, Keter 2.3.5 {original})",
        f">= {TARGET:.0%} of hand-written",
        ratio >= TARGET,
    )
