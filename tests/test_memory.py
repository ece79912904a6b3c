"""keter.daemon.fix_mmap_threshold: freed large buffers go back to the system.

Each case runs in a fresh interpreter (the setting is for the process's life):
a 1 MiB buffer is freed first (glibc would raise its threshold to that size),
then 64 more are made, with smaller buffers kept alive in between so the
heap's top stays in use, and freed. What the process still holds is measured.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, psutil
if sys.argv[1] == "fixed":
    from keter.daemon import fix_mmap_threshold
    assert fix_mmap_threshold()
rss = lambda: psutil.Process().memory_info().rss
first = bytes(1 << 20)
del first
big, small = [], []
before = rss()
for _ in range(64):
    big.append(bytearray(1 << 20))
    small.append(bytearray(200_000))
del big
print((rss() - before) / 2**20)
"""


def held_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_freed_large_buffers_are_returned_once_the_threshold_is_fixed() -> None:
    alive = 64 * 200_000 / 2**20  # the small buffers, still in use
    assert held_mb("fixed") < alive + 8
    assert held_mb("default") > alive + 32  # what glibc keeps on its own
