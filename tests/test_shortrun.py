"""keter.shortrun: a short command bounded in time and output, nothing of it left behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from keter.shortrun import OUTPUT_KEPT, run_short


def _running(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]


def test_the_exit_status_and_output_of_both_streams_come_back() -> None:
    ran = run_short(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert ran.returncode == 3
    assert sorted(ran.output.split()) == ["err", "out"]


def test_bytes_that_are_no_utf8_are_replaced() -> None:
    ran = run_short(["printf", "bad \\377\\376"], 10)
    assert (ran.returncode, ran.output) == (0, "bad \ufffd\ufffd")


def test_endless_output_is_read_and_only_its_start_kept() -> None:
    ran = run_short(["sh", "-c", "head -c 5000000 /dev/zero; exit 1"], 30)
    assert ran.returncode == 1
    assert len(ran.output) == OUTPUT_KEPT


def test_a_hung_command_is_killed_with_its_whole_group_at_the_deadline() -> None:
    marker = f"4243.{os.getpid()}"
    began = time.monotonic()
    ran = run_short(["sh", "-c", f"sleep {marker} & sleep {marker}"], 0.5)
    assert ran.returncode is None
    assert time.monotonic() - began < 5
    assert _running(marker) == []


def test_children_a_finished_command_left_holding_its_output_are_not_waited_for() -> None:
    # Nor killed: a reload command may start nginx, which forks its way out of the group.
    marker = f"4244.{os.getpid()}"
    began = time.monotonic()
    ran = run_short(["sh", "-c", f"echo done; sleep {marker} & exit 0"], 30)
    try:
        assert (ran.returncode, ran.output) == (0, "done\n")
        assert time.monotonic() - began < 5
        assert len(_running(marker)) == 1
    finally:
        for left in _running(marker):
            left.kill()


def test_a_command_that_cannot_start_raises() -> None:
    with pytest.raises(OSError):
        run_short(["/nonexistent/keter-test-command"], 5)
