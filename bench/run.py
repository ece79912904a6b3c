"""Run keter's benchmarks and print one table: ``python bench/run.py [--quick] [--only NAME]``.

Each benchmark starts its own private nginx and keter daemon under a fresh
work folder on 127.0.0.1, and pairs every speed figure with its reference
measured in the same run. ``--write`` also saves the table as Markdown to
bench/results.md. A failing benchmark is reported in the table and the run
goes on; the exit status says whether everything ran and every target was met.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import crash
import deploy
import downtime
import proxy
import scale
import spawn
import stats
from harness import BENCH, WORK_PARENT, Row, Settings

BENCHMARKS = {
    module.NAME: module for module in (deploy, downtime, proxy, crash, scale, stats, spawn)
}
# Hard ceilings on the whole run (the suite is sized for about a third of each).
LIMIT = {False: 25 * 60, True: 5 * 60}
COLUMNS = ("benchmark", "figure", "reference", "target", "met?")


class OutOfTime(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="repeatable")
    parser.add_argument(
        "--write", action="store_true", help="also write bench/results.md and bench/*.png"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (keter reloads nginx and runs apps; like tests/run)")
        return 2

    names = args.only or list(BENCHMARKS)
    # Outside /tmp, as a production ROOT is: its apps get the private /tmp a ROOT in /tmp
    # cannot give them (keter.processes.private), and their starts cost what they do there.
    workdir = Path(tempfile.mkdtemp(prefix="keter-bench-", dir=WORK_PARENT))
    settings = Settings(quick=args.quick, workdir=workdir, plot=args.write)

    def out_of_time(_signum, _frame):
        raise OutOfTime(f"the run took longer than {LIMIT[args.quick]} s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(LIMIT[args.quick])
    began, load_before = time.monotonic(), os.getloadavg()[0]
    rows: list[Row] = []
    broken = False
    try:
        for name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                rows += BENCHMARKS[name].run(settings)
            except OutOfTime:
                raise
            except Exception as exc:
                broken = True
                traceback.print_exc()
                rows.append(Row(name, f"did not finish: {exc}", "", "", False))
            print(f"bench: {name} took {time.monotonic() - started:.0f} s", file=sys.stderr)
    except OutOfTime as exc:
        broken = True
        rows.append(Row("(run)", f"stopped: {exc}", "", "", False))
    finally:
        signal.alarm(0)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - began
    header = machine(args.quick, elapsed, (load_before, os.getloadavg()[0]))
    print()
    print(header)
    print()
    print(text_table(rows))
    if args.write:
        (BENCH / "results.md").write_text(f"{header}\n\n{markdown_table(rows)}\n")
    missed = any(row.met is False for row in rows)
    return 1 if broken or missed else 0


def machine(quick: bool, elapsed: float, load: tuple[float, float]) -> str:
    """One line saying what the figures were measured on, and how busy the machine was."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr
    wrk = subprocess.run(["/usr/bin/wrk", "--version"], capture_output=True, text=True).stdout
    return (
        f"{'Quick (smoke) run' if quick else 'Run'} of {datetime.date.today()}, "
        f"{elapsed:.0f} s: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {nginx.strip().removeprefix('nginx version: ')}, "
        f"wrk {wrk.split()[1] if wrk.split()[1:] else '?'}; "
        f"load average {load[0]:.1f} before, {load[1]:.1f} after"
    )


def _cells(row: Row) -> tuple[str, ...]:
    met = {True: "yes", False: "NO", None: "-"}[row.met]
    return (row.benchmark, row.figure, row.reference or "-", row.target or "-", met)


def text_table(rows: list[Row]) -> str:
    lines = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in out)


def markdown_table(rows: list[Row]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join(
        [line(COLUMNS), line(tuple("---" for _ in COLUMNS)), *(line(_cells(r)) for r in rows)]
    )


if __name__ == "__main__":
    sys.exit(main())
