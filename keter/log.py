"""keter's own log: one line per event on stderr, friendly to journald.

Under systemd (JOURNAL_STREAM is set) each line starts with a syslog priority
prefix such as ``<3>`` so ``journalctl -p err`` works, and carries no timestamp
because the journal adds its own. Run by hand, lines get a timestamp instead.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        # Every physical line gets the prefix so a traceback keeps its priority.
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(level: int = logging.INFO, *, stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # watchdog logs every inotify event at debug; keep keter's own lines readable.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
