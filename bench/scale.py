"""Benchmark 5: keter with many apps (issue 16: a thousand on one host).

The curve: for 1, 10, 100 and 1000 apps, each in a fresh keter, the apps
dropped in at once until all answer, and keter's RSS then; plotted (deploy time
and RSS against the number of apps) into bench/scale.png with ``--write``.

Then, in one keter run with N apps (1000; 20 with ``--quick``): its RSS with no
app; N apps dropped in at once until all answer (repeated: removed and dropped
again); keter's RSS and CPU while idle with N apps (after a few seconds that are
reported apart: keter's own after-deploy work is not idleness); one app's
redeploy with N apps running; three rounds of redeploying all N (RSS after
each, once the old versions are gone); an hour of uptime checks (a record per
app every 10 s for the last hour, appended to keter's spool as nginx logs
them) and keter's RSS once it has read them; then all apps but one are removed
and the same redeploy is timed with one app running.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import psutil
from harness import (
    BENCH,
    WORK_PARENT,
    CpuSpent,
    Row,
    Settings,
    Stack,
    cpu_spent,
    keter_stack,
    median,
    ms,
    observe,
    poll,
    rss_mb,
    spread,
)
from support.spool import spool_line

from keter.client import KeterClient

NAME = "scale"
RSS_TARGET_MB = 100
DROP_TARGET = 10.0  # seconds until all N answer
FLAT = 1.05  # "flat": the last round's RSS within 5% of the first's
IDLE_CPU_TARGET = 0.5  # percent of one core
REDEPLOY_RATIO_TARGET = 1.5
ROUNDS = 3
CHECK_EVERY = 10  # seconds between an uptime monitor's requests to each app
CHECK_VERSION = "c0ffee000000"  # the monitor's records' version: theirs alone
CHECK = "GET /health HTTP/1.1"


def run(settings: Settings) -> list[Row]:
    sizes = settings.pick([1, 10, 100], [1, 10])
    curve = [_point(settings, size) for size in sizes]
    n = settings.pick(1000, 20)
    rows, point = _at_scale(settings, n)
    curve.append(point)
    rows.insert(
        0,
        Row(
            "scale: apps dropped at once, all answering; keter's RSS then",
            "; ".join(f"{k} apps: {ms(took)}, {rss:.1f} MB" for k, took, rss in curve),
            "Keter 2.3.5: 3.8 s for 50",
            "(the curve; plotted in bench/scale.png)",
            None,
        ),
    )
    if settings.plot:
        _plot(curve, BENCH / "scale.png")
    return rows


def _point(settings: Settings, n: int) -> tuple[int, float, float]:
    """(n, seconds until n apps dropped at once all answer, keter's RSS in MB then)."""
    apps = [f"c{i:04d}" for i in range(n)]
    with keter_stack(settings, f"{NAME}-{n}", **{"port-range": _ports(n)}) as stack:
        took = stack.deploy({app: stack.bundle(app, "c") for app in apps}, timeout=300)
        stack.settle(n, timeout=300)
        return n, took, rss_mb(stack.pid)


def _ports(n: int) -> list[int]:
    """A port range with room for every app twice (old and new versions) and some."""
    low = random.randrange(10, 20) * 1000
    return [low, low + 3 * n + 99]


def _plot(curve: list[tuple[int, float, float]], path: Path) -> None:
    """Deploy time and RSS against the number of apps (needs the bench extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [n for n, _, _ in curve]
    figure, time_axis = plt.subplots(figsize=(7, 4.2), dpi=100)
    time_axis.plot(counts, [took for _, took, _ in curve], "o-", color="tab:blue")
    time_axis.set_xscale("log")
    time_axis.set_xlabel("apps dropped into incoming/ at once")
    time_axis.set_ylabel("seconds until all answer", color="tab:blue")
    time_axis.axhline(DROP_TARGET, color="tab:blue", linestyle=":", linewidth=1)
    rss_axis = time_axis.twinx()
    rss_axis.plot(counts, [rss for _, _, rss in curve], "s--", color="tab:red")
    rss_axis.set_ylabel("keter's RSS (MB)", color="tab:red")
    rss_axis.axhline(RSS_TARGET_MB, color="tab:red", linestyle=":", linewidth=1)
    rss_axis.set_ylim(0, max(RSS_TARGET_MB, *(rss for _, _, rss in curve)) * 1.1)
    time_axis.set_title("keter with many apps (dotted: the targets at 1000)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _at_scale(settings: Settings, n: int) -> tuple[list[Row], tuple[int, float, float]]:
    idle = settings.pick(30, 5)
    reps = settings.pick(5, 3)
    apps = [f"s{i:04d}" for i in range(n)]
    with keter_stack(settings, NAME, **{"port-range": _ports(n)}) as stack:
        empty = observe(stack.pid, settings.pick(5, 2))

        drops: list[float] = []
        spent: list[CpuSpent] = []  # what each drop cost the machine, and keter
        for attempt in range(settings.pick(3, 2)):
            if attempt:
                stack.remove(apps)
                stack.settle(0, timeout=120)
            bundles = {app: stack.bundle(app, f"d{attempt}") for app in apps}
            before = cpu_spent(stack.pid)
            drops.append(stack.deploy(bundles, timeout=300))
            spent.append(cpu_spent(stack.pid).since(before))
            stack.settle(n, timeout=300)
        point = (n, median(drops), rss_mb(stack.pid))

        # What keter still does right after the last deploy (e.g. the status component
        # recording the versions just deployed) is shown apart from the idle window.
        after = observe(stack.pid, settings.pick(5, 2))
        loaded = observe(stack.pid, idle)
        with_n = _redeploys(stack, apps[0], reps, n)

        round_rss, round_times = [], []
        for r in range(1, ROUNDS + 1):
            bundles = {app: stack.bundle(app, f"round{r}") for app in apps}
            round_times.append(stack.deploy(bundles, timeout=300))
            stack.settle(n, timeout=300)
            round_rss.append(rss_mb(stack.pid))

        before_checks = rss_mb(stack.pid)
        checks, checks_read = _an_hour_of_checks(stack, apps)
        after_checks = rss_mb(stack.pid)

        stack.remove(apps[1:])
        stack.settle(1, timeout=300)
        with_1 = _redeploys(stack, apps[0], reps, 1)

    mb = 2**20
    rss_n = max(loaded.rss_max / mb, *round_rss)
    ratio = median(with_n) / median(with_1)
    rounds = " -> ".join(f"{rss:.1f}" for rss in round_rss)
    machine = median(s.machine for s in spent)
    own, children = median(s.process for s in spent), median(s.children for s in spent)
    rows = [
        Row(
            f"scale: {n} apps dropped at once, all answering",
            f"{spread(drops)}; CPU meanwhile (medians): machine {machine:.1f} s, keter "
            f"{own:.1f} s (its unpacking worker's included) and its finished children (nginx -t) "
            f"{children:.1f} s, "
            f"the rest ({machine - own - children:.1f} s) the apps' own starts, nginx and the "
            "bench's client",
            "Keter 2.3.5: 3.8 s for 50",
            f"< {ms(DROP_TARGET)}",
            median(drops) < DROP_TARGET,
        ),
        Row(
            f"scale: keter RSS with {n} apps (its unpacking worker's own pages included)",
            f"{rss_n:.1f} MB (no apps: {empty.rss_max / mb:.1f} MB)",
            "Keter 2.3.5: 28 MB with none, 37-45 MB with 50",
            f"< {RSS_TARGET_MB} MB",
            rss_n < RSS_TARGET_MB,
        ),
        Row(
            f"scale: keter RSS after {ROUNDS} rounds of redeploying all {n}",
            f"{rounds} MB (a round takes {spread(round_times)})",
            "Keter 2.3.5: grows across rounds",
            f"flat (last within {FLAT - 1:.0%} of first)",
            round_rss[-1] <= FLAT * round_rss[0],
        ),
        Row(
            f"scale: keter RSS with {n} apps and an hour of uptime checks",
            f"{after_checks:.1f} MB after {checks:,} records (each app asked every "
            f"{CHECK_EVERY} s for the last hour, appended to keter's spool as nginx logs them; "
            f"all read in {checks_read:.1f} s)",
            f"the same keter just before: {before_checks:.1f} MB",
            f"< {RSS_TARGET_MB} MB",
            after_checks < RSS_TARGET_MB,
        ),
        Row(
            f"scale: keter idle CPU with {n} apps, {idle} s",
            f"{loaded.cpu_percent:.2f}% of a core",
            f"no apps: {empty.cpu_percent:.2f}%; the {after.seconds:.0f} s right after the "
            f"last deploy, before this window: {after.cpu_percent:.2f}%",
            f"< {IDLE_CPU_TARGET}%",
            loaded.cpu_percent < IDLE_CPU_TARGET,
        ),
        Row(
            f"scale: one redeploy with {n} apps running",
            f"{spread(with_n)} = {ratio:.2f}x",
            f"with 1 app: {spread(with_1)}",
            f"<= {REDEPLOY_RATIO_TARGET}x",
            ratio <= REDEPLOY_RATIO_TARGET,
        ),
    ]
    return rows, point


def _check(app: str, at: float) -> bytes:
    """The spool line of one monitor's check of ``app`` at ``at``."""
    line = spool_line(app, CHECK_VERSION, at=at, sent=2, upstream="0.002", request=CHECK)
    return line + b"\n"


def _an_hour_of_checks(stack: Stack, apps: list[str]) -> tuple[int, float]:
    """Append to keter's spool what nginx logs when a monitor asks every app every
    ``CHECK_EVERY`` seconds for an hour, and wait until keter has read it all and its
    statistics settled (10-second slots joined their minutes): (records, seconds taken).

    The records carry a version of their own, so the wait counts them and no others.
    """
    spool = stack.keter.root / "run" / "access.spool"
    now = time.time()
    times = [now - 3600 + CHECK_EVERY / 2 + k * CHECK_EVERY for k in range(3600 // CHECK_EVERY)]
    client = KeterClient(stack.keter.root)
    started = time.monotonic()
    with spool.open("ab") as out:  # O_APPEND, whole lines per write: as nginx writes
        for at in times:
            out.write(b"".join(_check(app, at) for app in apps))
    last = apps[-1]  # its records are the spool's last lines

    def read() -> bool:
        versions = client.stats(last)["versions"]
        hour = [v["windows"][-1]["requests"] for v in versions if v["version"] == CHECK_VERSION]
        return hour == [len(times)]

    _, seen = poll(read, 120, "keter to read an hour of uptime checks", interval=0.2)
    # The next prune (every second) joins the old 10-second slots into minutes.
    observe(stack.pid, 3)
    return len(times) * len(apps), seen - started


def _redeploys(stack: Stack, app: str, reps: int, running: int) -> list[float]:
    """Time ``reps`` redeploys of ``app``, each from a quiet keter."""
    times = []
    for rep in range(reps):
        bundle = stack.bundle(app, f"x{running}-{rep}")
        stack.settle(running, timeout=300)
        times.append(stack.deploy({app: bundle}))
    return times


def quick(apps: int, idle: float, rounds: int, keep: bool = False) -> None:
    """``python bench/scale.py --apps N``: the scale figures for N apps, printed as measured.

    A quick look for whoever changes the process monitor; the suite's table
    comes from ``run``. The work folder (keter's log among it) goes unless ``keep``.
    """
    workdir = Path(tempfile.mkdtemp(prefix="keter-scale-", dir=WORK_PARENT))
    settings = Settings(quick=False, workdir=workdir)
    try:
        _quick(settings, apps, idle, rounds)
    finally:
        if keep:
            print(f"kept {settings.workdir}", flush=True)
        else:
            shutil.rmtree(settings.workdir, ignore_errors=True)


def _quick(settings: Settings, apps: int, idle: float, rounds: int) -> None:
    names = [f"s{i:04d}" for i in range(apps)]
    ports = random.randrange(10, 25) * 1000
    with keter_stack(settings, NAME, **{"port-range": [ports, ports + 3 * apps + 99]}) as stack:
        print(f"no apps: RSS {rss_mb(stack.pid):.1f} MB", flush=True)
        for r in range(rounds):
            bundles = {app: stack.bundle(app, f"r{r}") for app in names}
            own = time.process_time()
            took = stack.deploy(bundles, timeout=600)
            own = time.process_time() - own
            stack.settle(apps, timeout=600)
            print(
                f"round {r}: {apps} apps answering after {took:.2f} s; "
                f"RSS {rss_mb(stack.pid):.1f} MB; the bench's own CPU meanwhile {own:.2f} s",
                flush=True,
            )
        usage = observe(stack.pid, idle)
        print(
            f"idle {idle:g} s with {apps} apps: {usage.cpu_percent:.2f}% of a core, "
            f"RSS max {usage.rss_max / 2**20:.1f} MB",
            flush=True,
        )
        print(f"threads: {psutil.Process(stack.pid).num_threads()}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=quick.__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=100)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    options = parser.parse_args()
    quick(options.apps, options.idle, options.rounds, options.keep)
