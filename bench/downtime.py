"""Benchmark 2: redeploys under load lose nothing and barely move the latency.

wrk (2 threads, 32 connections) runs through nginx for the whole of N
back-to-back redeploys of one app, until the last old version has been
stopped; then the same wrk runs again for as long with nothing happening
(steady state). Repeated; failures are summed over all runs, latencies are
medians of the runs. Once with keep-alive clients, once with clients that
send ``Connection: close``. The redeploys keep the app's routes, so keter
switches them in the kernel (keter.switch) without reloading nginx; a reload
would make nginx's old workers close their idle keep-alive connections, and a
client that had just sent a request on one would get a reset (wrk counts it as
a read error; keter lost about 0.2% of keep-alive requests that way before).
"""

from __future__ import annotations

import itertools
import time

from harness import (
    Row,
    Settings,
    Stack,
    WrkInBackground,
    WrkResult,
    host_of,
    keter_stack,
    median,
    ms,
    run_wrk,
)

NAME = "downtime"
APP = "zd"
LOAD = {"threads": 2, "connections": 32}
P99_TARGET = 2.0  # during deploys, at most this many times the steady p99
_versions = itertools.count(1)  # every bundle gets a VERSION of its own


def run(settings: Settings) -> list[Row]:
    runs = settings.pick(3, 1)
    redeploys = settings.pick(20, 5)
    rows = []
    with keter_stack(settings, NAME) as stack:
        stack.deploy({APP: stack.bundle(APP, "v0")})
        for close in (False, True):
            during, steady = _runs(stack, runs, redeploys, close)
            rows.append(_failures_row(during, steady, runs, redeploys, close))
            if not close:
                rows.append(_latency_row(during, steady))
    return rows


def _runs(
    stack: Stack, runs: int, redeploys: int, close: bool
) -> tuple[list[WrkResult], list[WrkResult]]:
    """wrk during back-to-back redeploys, then as long in steady state; ``runs`` times."""
    port, host = stack.nginx.port, host_of(APP)
    during: list[WrkResult] = []
    steady: list[WrkResult] = []
    for _ in range(runs):
        stack.settle(1)
        bundles = [stack.bundle(APP, f"v{next(_versions)}") for _ in range(redeploys)]
        load = WrkInBackground(port, host, close=close, **LOAD)
        try:
            began = time.monotonic()
            for bundle in bundles:
                stack.deploy({APP: bundle})
            stack.settle(1)  # keep the load on until the last old version is gone
            seconds = time.monotonic() - began
            during.append(load.stop())
        finally:
            load.kill()
        steady.append(run_wrk(port, host, seconds=max(1, round(seconds)), close=close, **LOAD))
    return during, steady


def _failures_row(
    during: list[WrkResult], steady: list[WrkResult], runs: int, redeploys: int, close: bool
) -> Row:
    failed = sum(r.failed for r in during)
    clients = "Connection: close" if close else "keep-alive"
    return Row(
        f"zero downtime: failed requests, {runs}x{redeploys} redeploys, {clients} clients",
        f"{failed} of {sum(r.requests for r in during):,} "
        f"({sum(r.non2xx for r in during)} non-2xx, "
        f"{sum(r.socket_errors for r in during)} socket errors)",
        f"Keter 2.3.5: 0 of ~966,000 over 10 redeploys; steady runs here: "
        f"{sum(r.failed for r in steady)} of {sum(r.requests for r in steady):,}",
        "0 failed",
        failed == 0,
    )


def _latency_row(during: list[WrkResult], steady: list[WrkResult]) -> Row:
    p50, p99 = median(r.p50 for r in during), median(r.p99 for r in during)
    steady_p50, steady_p99 = median(r.p50 for r in steady), median(r.p99 for r in steady)
    return Row(
        "zero downtime: latency during redeploys, keep-alive clients",
        f"p50 {ms(p50)}, p99 {ms(p99)} ({median(r.rps for r in during):,.0f} req/s)",
        f"steady: p50 {ms(steady_p50)}, p99 {ms(steady_p99)} "
        f"({median(r.rps for r in steady):,.0f} req/s)",
        f"p99 <= {P99_TARGET:g}x steady",
        p99 <= P99_TARGET * steady_p99,
    )
