"""Helpers shared by the tests: waiting on conditions, never on the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s.

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
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}{detail}"
            )
        time.sleep(interval)  # polling interval of the test itself, not a wait for an outcome
        interval = min(interval * 1.5, 0.2)


def keter_sample(name: str) -> Path:
    """One of Keter's own sample files from shared/keter-fixtures (beside the checkout).

    The checkout and shared/ sit side by side both here and in CI; the result may not
    exist, so tests skip on ``.exists()``.
    """
    checkout = Path(__file__).resolve().parent.parent
    for shared in (checkout.parent / "shared", Path("/work/shared")):
        if (shared / "keter-fixtures" / name).exists():
            return shared / "keter-fixtures" / name
    return checkout.parent / "shared" / "keter-fixtures" / name
