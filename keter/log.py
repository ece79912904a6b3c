"""keter's own log: one line per event on stderr, friendly to journald.

Under systemd (JOURNAL_STREAM is set) each line starts with a syslog priority
prefix such as ``<3>`` so ``journalctl -p err`` works, and carries no timestamp
because the journal adds its own. Run by hand, lines get a timestamp instead.

Log lines quote text keter does not control (app output, bundle names and
values, exception messages). So that no app can forge a line of keter's log,
every message is made ONE physical line: line breaks, control characters and
escape sequences in it are shown escaped (``\\n``, ``\\x1b``, see
``keter.names.log_text``), and it is capped well below journald's line limit
(a longer line would be split, and its continuation would start with text
keter did not write). Only a traceback spans several lines, each escaped and
each with keter's own prefix.
"""

from __future__ import annotations

import logging
import os
import sys

from keter.names import cut_text, log_text

MESSAGE_LIMIT = 16 * 1024  # characters; journald's LineMax is 48 KiB

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as one printable line: non-printable characters escaped, capped.

    Printable characters (backslashes included) are kept as they are, so text
    that was already made safe with ``log_text`` is not escaped twice.
    """
    text = cut_text(text, limit)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else log_text(char) for char in text)


class SafeFormatter(logging.Formatter):
    """The message on one escaped line; a traceback's lines escaped one by one."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        lines = [self.formatMessage(record)]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        extras = [record.exc_text, record.stack_info and self.formatStack(record.stack_info)]
        for extra in extras:
            if extra:
                # Split on "\n" only: any other line break inside is escaped, not obeyed.
                lines.extend(one_line(line) for line in extra.split("\n"))
        return "\n".join(lines)


class JournalFormatter(SafeFormatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        # Every physical line gets the prefix so a traceback keeps its priority.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup_logging(level: int = logging.INFO, *, stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            SafeFormatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # watchdog logs every inotify event at debug; keep keter's own lines readable.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    inotify = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(each, WatchdogStopRace) for each in inotify.filters):
        inotify.addFilter(WatchdogStopRace())


class WatchdogStopRace(logging.Filter):
    """Drops the ERROR watchdog (7.x) logs when an inotify event arrives while keter
    stops its observer ("InotifyEmitter.queue_events() called when the thread is
    inactive"): the event is dropped, as it should be at that moment, and an operator
    reading `journalctl -p err` would look for a fault that is not there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()
