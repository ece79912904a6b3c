"""keter's stats component alone, reading a spool: ``python bench/stats_reader.py ROOT``.

bench/stats.py runs it beside an nginx that logs to ``ROOT/run/access.spool``
and measures its CPU and memory: what keter spends on statistics. It prints
"ready" once reading, and on SIGTERM reads everything written so far, stops,
and prints the number of records it counted and its CPU seconds as JSON. On
SIGUSR1 it prints how far it is.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from keter.config import KeterConfig
from keter.stats.component import StatsCollector

QUIET = 0.5  # seconds without a new record before the spool counts as read
# The access log rotates at keter's default (10 MiB, 5 backups: ~450,000 lines) and
# the bench logs more: one file this large keeps every line for the count.
LOG_MAX_BYTES = 1 << 30


def main() -> None:
    root = Path(sys.argv[1])
    signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # for sigwait, in every thread
    collector = StatsCollector(KeterConfig(root=root, log_max_bytes=LOG_MAX_BYTES))
    collector.start()
    print("ready", flush=True)
    # SIGUSR1: how far it is (records counted, bytes of the spool not read yet).
    while signal.sigwait(signals) == signal.SIGUSR1:
        pending = collector._spool.pending() if collector._spool is not None else -1
        print(json.dumps({"records": collector.records, "pending": pending}), flush=True)
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < QUIET:  # nginx flushed already; read what is left
        if collector.records != last:
            last, quiet_since = collector.records, time.monotonic()
        time.sleep(0.05)  # a poll of another thread's counter, not a wait for an outcome
    collector.stop()
    collector.join(30)
    cpu = os.times()
    counted = {"records": collector.records, "skipped": collector.skipped}
    print(json.dumps({**counted, "cpu": cpu.user + cpu.system}), flush=True)


if __name__ == "__main__":
    main()
