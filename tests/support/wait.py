"""Waiting on a condition with a deadline, never on the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, what: str | Callable[[], str] = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s.

    ``what`` names the wait in the failure; a callable is asked then (to show a log).

    Returns the truthy value so a test can wait for and use a result in one step.
    Exceptions from the predicate count as "not yet" until the deadline.
    """
    deadline = time.monotonic() + timeout
    interval = 0.01
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not ready yet
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            what = what() if callable(what) else what
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}{detail}"
            )
        time.sleep(interval)  # polling interval of the test itself, not a wait for an outcome
        interval = min(interval * 1.5, 0.2)
