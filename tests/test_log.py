"""keter's own log setup (keter.log): what reaches the operator's journal."""

import io
import logging

from keter.log import setup_logging


def test_watchdogs_error_at_its_own_stop_is_dropped_and_other_errors_are_not() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        setup_logging(stream=out)
        setup_logging(stream=out)  # set up twice (the tests do): still one filter
        inotify = logging.getLogger("watchdog.observers.inotify")
        assert len(inotify.filters) == 1
        inotify.error("InotifyEmitter.queue_events() called when the thread is inactive")
        inotify.error("inotify watch limit reached")
        logging.getLogger("keter").error("keter: something else")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    text = out.getvalue()
    assert "thread is inactive" not in text
    assert "inotify watch limit reached" in text and "keter: something else" in text
