"""An app cannot forge a line of keter's own log (issue 10, item 6).

A real keter, logging for journald (every line starts with a ``<N>`` priority
prefix that journald obeys), runs apps that print terminal escape sequences,
carriage returns, fake priority prefixes, NUL and Unicode line breaks, a
newline inside one write and a huge line. keter quotes their output when one
crashes and when one fails to start; its real stderr must still be lines that
each start with keter's own prefix, hold only printable characters, and quote
each output line capped.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil
from support.bundles import APPS, make_bundle, member, webapp_config
from support.net import app_port_range
from support.wait import wait_for

from keter.processes.applog import TAIL_LINE_LIMIT
from keter.processes.reader import LINE_COST, MAX_PIPE_BUFFER, OUTPUT_RATE, READ_CHUNK

HOSTILE = (
    "\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\x1b[0m",
    "progress 10%\r<0>FORGED after a carriage return",
    "<0>FORGED at the start of a line",
    "\x00<1>FORGED after a NUL\x85<2>FORGED after NEL\u2028<3>FORGED after LS",
    "one write\n<0>FORGED after a newline in the same write",
    "x" * 20000,
)
# A journal line keter writes: its priority prefix, then printable text only.
JOURNAL_LINE = re.compile(r"<[0-7]>[^<]")


def hostile_app(tmp_path: Path) -> Path:
    """tests/apps/versioned_app.py that first prints HOSTILE, all in one write."""
    source = (APPS / "versioned_app.py").read_text()
    future = "from __future__ import annotations\n"
    text = "\n".join(HOSTILE) + "\n"
    noise = f"import sys\nsys.stdout.write({text!r})\nsys.stdout.flush()\n"
    path = tmp_path / "hostile_app.py"
    path.write_text(source.replace(future, future + noise, 1))
    return path


def test_app_output_cannot_forge_or_garble_keters_journal_lines(
    keter_factory, private_nginx, tmp_path
):
    keter = keter_factory(start=False, **{"port-range": app_port_range()})
    keter.start(env={"JOURNAL_STREAM": "8:4242"})  # log for journald: priority prefixes
    app = hostile_app(tmp_path)
    # Answers keter's health probe and one request of this test, then exits: a crash
    # of a running app (its tail is logged). Exiting after the probe alone would race
    # with the switch's own check of the new version.
    crashing = webapp_config("crashing.test", "v1", args=["--exit-after-requests", "2"])
    keter.drop(make_bundle(tmp_path / "crashing.keter", config=crashing, app_source=app))
    # Exits at once: a failed deploy (the supervisor logs the output it sent).
    failing = webapp_config("failing.test", "v1", args=["--exit-at-start", "3"])
    keter.drop(make_bundle(tmp_path / "failing.keter", config=failing, app_source=app))

    serving = re.compile(r"crashing: deploy #\d+ now serving")
    wait_for(lambda: serving.search(keter.log_since_start()), 20, "crashing to be served")
    assert private_nginx.request("crashing.test")[0] == 200
    failed = re.compile(r"failing: deploy #\d+ failed")
    log = wait_for(
        lambda: (
            (text := keter.log_since_start())
            and "crashing: crashed:" in text
            and failed.search(text)
            and text
        ),
        20,
        "a crash and a failed deploy",
    )
    keter.stop()
    raw = keter.stderr_path.read_bytes()

    lines = raw.decode("utf-8").split("\n")
    assert lines.pop() == ""  # the log ends with a whole line
    for line in lines:
        # Every physical line is keter's: its prefix, then nothing a terminal obeys.
        assert JOURNAL_LINE.match(line), line[:200]
        assert line.isprintable(), ascii(line[:300])
    forged = [line for line in lines if "FORGED" in line]
    assert forged  # the output was quoted ...
    for line in forged:
        # ... only inside keter's lines about the app, never where journald parses.
        assert re.match(r"<\d>(crashing|failing): ", line), line[:200]
    assert max(len(line) for line in lines) < 16 * TAIL_LINE_LIMIT  # 20,000 x's were capped
    crash = next(line for line in lines if "crashing: crashed:" in line)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mRED\\x1b[0m" in crash
    assert "progress 10%\\r<0>FORGED" in crash
    assert "\\x00<1>FORGED after a NUL\\x85<2>FORGED after NEL\\u2028<3>FORGED" in crash
    assert "x" * TAIL_LINE_LIMIT + "... (" in crash
    assert "\x1b" not in log and "\r" not in log


def flooding_app(tmp_path: Path) -> Path:
    """tests/apps/versioned_app.py that first starts ``yes`` on its own stdout, for ever."""
    source = (APPS / "versioned_app.py").read_text()
    future = "from __future__ import annotations\n"
    flood = "import subprocess\nsubprocess.Popen(['yes', 'flood'])\n"
    path = tmp_path / "flooding_app.py"
    path.write_text(source.replace(future, future + flood, 1))
    return path


def flood_costs(keter, app: str, seconds: float) -> tuple[float, float, int]:
    """Over ``seconds`` of an app's flood: (the seconds, keter's CPU seconds meanwhile,
    the bytes its log grew by)."""
    log = keter.root / "log" / f"app-{app}.log"
    process = psutil.Process(keter.proc.pid)
    size, cpu, started = log.stat().st_size, process.cpu_times(), time.monotonic()
    wait_for(lambda: time.monotonic() - started > seconds, seconds + 2)
    elapsed = time.monotonic() - started
    spent = sum(process.cpu_times()[:2]) - sum(cpu[:2])
    return elapsed, spent, log.stat().st_size - size


def test_an_app_flooding_its_output_costs_keter_little_and_waits_itself(
    keter_factory, private_nginx, tmp_path
):
    keter = keter_factory(**{"port-range": app_port_range()})
    app = flooding_app(tmp_path)
    config = webapp_config("flood.test", "v1")
    keter.drop(make_bundle(tmp_path / "flood.keter", config=config, app_source=app))
    wait_for(lambda: "flood: deploy #" in keter.log() and "now serving" in keter.log(), 20)
    wait_for(lambda: "writes output faster than 1024 KiB/s" in keter.log(), 20, "the throttle")
    # yes writes a few hundred MB a second; keter reads it at 1 MiB/s and stays idle.
    # (Read as fast as it came, it took 1.8 s of keter's CPU in 2 s.)
    elapsed, spent, grown = flood_costs(keter, "flood", 2)
    assert spent < 0.5 * elapsed, f"keter spent {spent:.2f} s of CPU in {elapsed:.2f} s"
    # 1 MiB/s of output ("flood\n": a 31-byte line in the log for 6 read) and a pipe's worth.
    assert grown < (elapsed * OUTPUT_RATE + MAX_PIPE_BUFFER) * 31 / 6
    assert private_nginx.request("flood.test")[0] == 200


def test_an_app_flooding_from_many_processes_shares_one_budget_and_pays_for_its_lines(
    keter_factory, private_nginx, tmp_path
):
    """Six background workers of one bundle, each writing empty lines (``yes ""``): each
    run had a budget of its own, and keter's one reader thread, at 1 MiB/s each of
    lines that cost it a time stamp apiece, took a whole core and never throttled."""
    workers = 6
    keter = keter_factory(**{"port-range": app_port_range()})
    stanzas = [dict(webapp_config("lines.test", "v1"), type="webapp")]
    stanzas += [{"type": "background", "exec": "../bin/flood"} for _ in range(workers)]
    flood = member("bin/flood", b'#!/bin/sh\nexec yes ""\n', mode=0o755)
    bundle = make_bundle(tmp_path / "lines.keter", config={"stanzas": stanzas}, members=[flood])
    keter.drop(bundle)
    wait_for(lambda: "lines: deploy #" in keter.log() and "now serving" in keter.log(), 20)
    wait_for(lambda: "writes output faster than 1024 KiB/s" in keter.log(), 20, "the throttle")
    elapsed, spent, grown = flood_costs(keter, "lines", 3)
    assert spent < 0.5 * elapsed, f"keter spent {spent:.2f} s of CPU in {elapsed:.2f} s"
    # One app's rate, its burst's remainder and a chunk each run may read past it.
    bound = (elapsed + 1) * OUTPUT_RATE + workers * READ_CHUNK * (1 + LINE_COST)
    assert grown < bound, f"{grown} bytes written in {elapsed:.2f} s"
    assert private_nginx.request("lines.test")[0] == 200
