"""Benchmark 6: what traffic statistics cost (issue 14).

Two nginx instances proxy to the same backend with exactly what
``keter.nginx.render`` writes for one app: one with statistics on (every
request logged to keter's spool), one with them off. keter's stats component
(``bench/stats_reader.py``, the real ``StatsCollector``) reads the spool
during the whole run, as keter would. wrk with 64 keep-alive connections, 2 s
per measurement, pairs alternating which goes first; the figure is the median
of the per-pair ratios. Also: the stats component's CPU per 10,000 requests
(over every request nginx logged), its largest RSS, and whether it counted
every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from harness import BENCH, Row, Settings, fetch, free_port, median, run_wrk
from proxy import _BACKEND, BODY, HOST, _Listener, _Nginx, _running

from keter.messages import Site
from keter.nginx import ProxyOptions, render
from keter.stats import spool

NAME = "stats"
TARGET = 0.95  # req/s with statistics on, as a fraction of statistics off
CONNECTIONS = 64
VERSION = "0123456789ab"


def run(settings: Settings) -> list[Row]:
    reps = settings.pick(7, 3)
    seconds = settings.pick(2, 1)
    base = settings.workdir / NAME
    root = base / "keter"
    for folder in ("run", "log"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    spool.create(spool.spool_path(root))
    backend_port, on_port, off_port = free_port(), free_port(), free_port()
    site = Site(app="bench", hosts=(HOST,), port=backend_port, version=VERSION)
    on = render([site], [_Listener("127.0.0.1", on_port)], 1, _options(root))
    off = render([site], [_Listener("127.0.0.1", off_port)], 1, ProxyOptions())
    assert "access_log" in on and "access_log" not in off
    backend = _BACKEND.format(port=backend_port, body=BODY.replace("\n", "\\n"))
    servers = {
        "backend": _Nginx(base / "backend", backend_port, 1, backend),
        "on": _Nginx(base / "on", on_port, 1, on),
        "off": _Nginx(base / "off", off_port, 1, off),
    }
    ports = {"on": on_port, "off": off_port}
    reader = subprocess.Popen(
        [sys.executable, str(BENCH / "stats_reader.py"), str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        process = psutil.Process(reader.pid)
        with _running(*servers.values()):
            for name, port in ports.items():
                if fetch(port, HOST) != (200, BODY.encode()):
                    raise RuntimeError(f"the {name} proxy does not answer")
            # 1. nginx's own cost: keter's reader paused, the spool only grows.
            process.suspend()
            nginx_only, sent, nginx_cpu = _pairs(servers, ports, reps, seconds)
            # 2. keter's cost: the reader catches up on exactly those requests.
            cpu_before, rss_before = _cpu(process), process.memory_info().rss
            process.resume()
            backlog = poll_until_read(reader)
            cpu_backlog = _cpu(process) - cpu_before
            rss_after = process.memory_info().rss
            # 3. Both at once, as in production (reported; wrk, two nginx and keter share
            # this machine's cores).
            together, sent_live, _ = _pairs(servers, ports, settings.pick(3, 1), seconds)
            _graceful_stop(servers["on"])  # nginx writes its last buffers on the way out
        reader.send_signal(signal.SIGTERM)
        out, _ = reader.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            reader.kill()
        reader.wait(10)
    counted = json.loads(out.strip().splitlines()[-1])
    logged = _logged(root)
    return [
        _throughput_row(nginx_only, nginx_cpu),
        _together_row(together),
        _cost_row(cpu_backlog, backlog, counted, logged, sent + sent_live, (rss_before, rss_after)),
    ]


def _pairs(
    servers: dict[str, _Nginx], ports: dict[str, int], reps: int, seconds: int
) -> tuple[dict[str, list[float]], int, dict[str, list[float]]]:
    """req/s with statistics on and off, in pairs alternating which goes first; the
    requests wrk finished with them on; and nginx's CPU per request (µs, the proxy's and
    the backend's workers: it hardly moves when other work shares the cores)."""
    rps: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    sent = 0
    for rep in range(reps):
        for name in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            before = servers[name].cpu() + servers["backend"].cpu()
            result = run_wrk(ports[name], HOST, seconds=seconds, connections=CONNECTIONS)
            used = servers[name].cpu() + servers["backend"].cpu() - before
            if result.failed:
                raise RuntimeError(f"{name}: {result.failed} failed requests")
            rps[name].append(result.rps)
            cpu[name].append(used / max(result.requests, 1) * 1e6)
            sent += result.requests if name == "on" else 0
    return rps, sent, cpu


def poll_until_read(reader: subprocess.Popen, timeout: float = 120) -> int:
    """Until the reader has read the whole spool; the records it counted by then."""
    assert reader.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader.send_signal(signal.SIGUSR1)
        progress = json.loads(reader.stdout.readline())
        if progress["pending"] == 0:
            return progress["records"]
        time.sleep(0.01)  # a poll with a deadline, not a wait for an outcome
    raise RuntimeError("keter's stats component did not catch up in time")


def _options(root: Path) -> ProxyOptions:
    return ProxyOptions(access_spool=spool.spool_path(root))


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _graceful_stop(server: _Nginx) -> None:
    """SIGQUIT: the workers finish, flush their access-log buffers and exit."""
    if server.proc is None or server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGQUIT)
    server.proc.wait(30)


def _logged(root: Path) -> int:
    """The lines the stats component wrote to the access log: one per request nginx logged."""
    total = 0
    for path in (root / "log").glob("access-bench.log*"):
        with open(path, "rb") as f:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return total


def _ratio(rps: dict[str, list[float]]) -> float:
    return median(a / b for a, b in zip(rps["on"], rps["off"], strict=True))


def _throughput_row(rps: dict[str, list[float]], cpu: dict[str, list[float]]) -> Row:
    ratio = _ratio(rps)
    on, off = median(cpu["on"]), median(cpu["off"])
    return Row(
        "stats: proxy throughput, statistics on",
        f"{median(rps['on']):,.0f} req/s = {ratio:.1%} of statistics off (n={len(rps['on'])}); "
        f"nginx CPU per request {on:.1f} µs vs {off:.1f} µs",
        f"statistics off {median(rps['off']):,.0f} req/s; keep-alive clients, 1 worker; "
        "nginx's cost alone (keter's reading is the next rows)",
        f">= {TARGET:.0%} of off",
        ratio >= TARGET,
    )


def _together_row(rps: dict[str, list[float]]) -> Row:
    return Row(
        "stats: the same, keter reading meanwhile",
        f"{median(rps['on']):,.0f} req/s = {_ratio(rps):.1%} of statistics off "
        f"(n={len(rps['on'])})",
        f"statistics off {median(rps['off']):,.0f} req/s; wrk, both nginx and keter share "
        "this machine's 2 cores",
        "-",
        None,
    )


def _cost_row(
    cpu: float, backlog: int, counted: dict, logged: int, sent: int, rss: tuple[int, int]
) -> Row:
    """wrk counts only the requests it finished: nginx logs at least as many."""
    records = counted["records"]
    per_10k = cpu / backlog * 10_000 if backlog else float("nan")
    return Row(
        "stats: keter's CPU per 10,000 requests",
        f"{per_10k * 1000:.0f} ms CPU per 10,000 requests (the stats component reading "
        f"{backlog:,} at once; RSS {rss[0] / 2**20:.0f} MB before, {rss[1] / 2**20:.0f} MB "
        "after)",
        f"wrk finished {sent:,} requests; access log {logged:,} lines; "
        f"{counted['skipped']} spool lines not keter's",
        "every request counted, one access line each",
        records == logged >= sent > 0 and counted["skipped"] == 0,
    )
