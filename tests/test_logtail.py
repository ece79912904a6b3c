"""Reading app logs (keter/logtail.py): the last lines, and following a log across rotations
with real files rotated by keter's own AppLog."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from support.wait import wait_for

from keter.logtail import LogFollower, tail_lines
from keter.processes.applog import AppLog


def follow(follower: LogFollower) -> tuple[list[str], threading.Thread]:
    """Collect ``follower.lines()`` on a thread: (the list it grows, the thread)."""
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follower.lines()))
    reader.start()
    return seen, reader


# -- the last lines, and following -------------------------------------------------------------


@given(st.lists(st.text(alphabet="ab\n", max_size=5), max_size=8), st.integers(0, 6))
def test_tail_lines_matches_splitlines(chunks: list[str], count: int):
    data = "".join(chunks)
    path = Path(f"/tmp/keter-tail-{os.getpid()}.txt")
    path.write_text(data)
    try:
        expected = data.split("\n")
        if expected[-1] == "":
            expected.pop()
        assert tail_lines(path, count) == (expected[-count:] if count else [])
    finally:
        path.unlink()


def test_tail_of_a_large_file_reads_only_its_end(tmp_path):
    path = tmp_path / "big.log"
    path.write_bytes(b"x" * 10_000_000 + b"\nlast\n")
    assert tail_lines(path, 1) == ["last"]


def test_follower_sees_every_line_across_rotations(tmp_path):
    path = tmp_path / "app-hello.log"
    # Enough backups that nothing is deleted while the follower falls behind.
    applog = AppLog(path, max_bytes=400, backups=10)
    applog.write_line(b"before 0")
    applog.write_line(b"before 1")
    seen: list[str] = []
    with LogFollower(path, backlog=1) as follower:
        reader = threading.Thread(target=lambda: seen.extend(follower.lines()))
        reader.start()
        for i in range(60):  # about 40 bytes a line: a rotation every ten lines, written at once
            applog.write_line(f"line {i}".encode())
        wait_for(lambda: seen and seen[-1].endswith("line 59"), 10, "the last line")
        follower.stop()
        reader.join(5)
    applog.close()
    assert (tmp_path / "app-hello.log.2").exists()  # it did rotate, more than once
    assert [line.split(" ", 1)[1] for line in seen] == ["before 1"] + [
        f"line {i}" for i in range(60)
    ]


def test_follower_of_a_truncated_file_starts_again(tmp_path):
    path = tmp_path / "app.log"
    path.write_text("old line\n")
    seen: list[str] = []
    with LogFollower(path) as follower:
        reader = threading.Thread(target=lambda: seen.extend(follower.lines()))
        reader.start()
        path.write_text("new\n")  # truncates in place
        wait_for(lambda: seen == ["new"], 10, "the line after truncation")
        follower.stop()
        reader.join(5)


def test_follower_never_skips_a_file_when_logs_rotate_fast(tmp_path):
    """About 350 rotations, several at a time between two looks of the follower."""
    path = tmp_path / "app-busy.log"
    applog = AppLog(path, max_bytes=200, backups=8)  # about five lines a file
    written = 0
    with LogFollower(path) as follower:
        seen, reader = follow(follower)
        for burst in range(100):
            # One to six rotations at once; then the follower catches up, so it never falls
            # behind by more than the backups (a deleted file's lines are gone for good).
            for _ in range(5 * (1 + burst % 6)):
                applog.write_line(f"line {written}".encode())
                written += 1
            last = f"line {written - 1}"
            wait_for(lambda last=last: seen and seen[-1].endswith(last), 10, last)
        follower.stop()
        reader.join(5)
    applog.close()
    assert path.with_name("app-busy.log.8").exists()  # it rotated, and the oldest went
    numbers = [int(line.rsplit(" ", 1)[1]) for line in seen]
    assert numbers == list(range(written)), sorted(set(range(written)) - set(numbers))[:20]


def test_follower_reads_every_backup_past_a_gap(tmp_path):
    """While a rotation renames files (or after an operator deleted one backup) there is a
    gap in the numbers; the files beyond it are still read, oldest first."""
    path = tmp_path / "app.log"
    path.write_text("a1\n")
    with LogFollower(path, backlog=1) as follower:
        seen, reader = follow(follower)
        wait_for(lambda: seen == ["a1"], 10, "the first line")
        # Mid-rotation: ours went on to app.log.3, app.log.1 is not there yet.
        os.rename(path, path.with_name("app.log.3"))
        path.with_name("app.log.2").write_text("b1\nb2\n")
        path.write_text("c1\n")
        wait_for(lambda: seen[-1:] == ["c1"], 10, "the current file")
        follower.stop()
        reader.join(5)
    assert seen == ["a1", "b1", "b2", "c1"]
