"""keter.shortrun: a short command bounded in time and output; a hung one killed whole."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from support.wait import wait_for

from keter.shortrun import OUTPUT_KEPT, run_short


def _running(marker: str) -> list[psutil.Process]:
    """The live processes with ``marker`` as an argument (a killed one may take a moment
    to go: it is a zombie until reaped, and not counted)."""
    return [
        process
        for process in psutil.process_iter(["cmdline", "status"])
        if marker in (process.info["cmdline"] or [])
        and process.info["status"] != psutil.STATUS_ZOMBIE
    ]


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
    # SIGKILL is sent to the whole group; the kernel ends each in its own time.
    wait_for(lambda: _running(marker) == [], 5, "the group's processes to end")


def test_children_a_finished_command_left_holding_its_output_are_not_waited_for() -> None:
    # Nor killed: a reload command may start nginx, which forks its way out of the group.
    marker = f"4244.{os.getpid()}"
    began = time.monotonic()
    ran = run_short(["sh", "-c", f"echo done; sleep {marker} & exit 0"], 30)
    try:
        assert (ran.returncode, ran.output) == (0, "done\n")
        assert time.monotonic() - began < 5
        # Its shell may exec sleep a moment later: left alone, it runs on.
        wait_for(lambda: len(_running(marker)) == 1, 5, "the child it left")
    finally:
        for left in _running(marker):
            left.kill()


def test_a_command_that_cannot_start_raises() -> None:
    with pytest.raises(OSError):
        run_short(["/nonexistent/keter-test-command"], 5)
