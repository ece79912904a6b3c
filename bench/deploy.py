"""Benchmark 1: how long a deploy takes beyond the app's own start, and unpack speed.

* Deploy overhead: from the rename of a new bundle into incoming/ until the new
  version answers through nginx, minus the app's own start (exec until its port
  accepts, measured by hand between the deploys). A small bundle and a big one
  (incompressible padding). Each deploy starts from a quiet keter: the previous
  old version has been stopped and its folder removed.
* Unpack speed: ``keter.incoming.unpack.safe_unpack`` against ``tar xzf`` on the same
  big bundle, alternating, page cache flushed to disk before each.
* Many at once: N new apps renamed in together, until the last one answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from harness import Row, Settings, app_start_times, keter_stack, median, ms, spread

from keter.incoming.unpack import safe_unpack

NAME = "deploy"
SMALL_TARGET = 0.250
UNPACK_TARGET = 0.8  # keter's speed as a fraction of tar's
MANY_TARGET = 1.0


def run(settings: Settings) -> list[Row]:
    reps = settings.pick(9, 3)
    big_mb = settings.pick(100, 20)
    many = 50
    rows: list[Row] = []
    with keter_stack(settings, "deploy") as stack:
        # Small bundle: a fresh bundle (new VERSION) for each deploy.
        stack.deploy({"small": stack.bundle("small", "v0")})
        deploys, starts = [], []
        for rep in range(1, reps + 1):
            bundle = stack.bundle("small", f"v{rep}")
            stack.settle(1)
            deploys.append(stack.deploy({"small": bundle}))
            starts += app_start_times(settings.workdir, 1)
        overhead = median(deploys) - median(starts)
        rows.append(
            Row(
                "deploy: overhead, small bundle",
                f"{ms(overhead)} (deploy {spread(deploys)} minus app start {ms(median(starts))})",
                "Keter 2.3.5: 3.0 s",
                f"< {ms(SMALL_TARGET)}",
                overhead < SMALL_TARGET,
            )
        )
        stack.remove(["small"])
        stack.settle(0)

        # Big bundle: the same file dropped again each time; the answer's folder
        # tells the new deploy from the old.
        big = stack.bundle("big", "v1", pad_bytes=big_mb * 10**6)
        size_mb = big.stat().st_size / 10**6
        stack.deploy({"big": big})
        big_deploys, big_starts = [], []
        for _ in range(settings.pick(5, 2)):
            stack.settle(1)
            big_deploys.append(stack.deploy({"big": big}))
            big_starts += app_start_times(settings.workdir, 1)
        big_overhead = median(big_deploys) - median(big_starts)
        rows.append(
            Row(
                f"deploy: overhead, {size_mb:.0f} MB bundle",
                f"{ms(big_overhead)} (deploy {spread(big_deploys)} "
                f"minus app start {ms(median(big_starts))})",
                "Keter 2.3.5: 3.0 s for a tiny app",
                "(none)",
                None,
            )
        )
        stack.remove(["big"])
        stack.settle(0)

        # Many new apps at once.
        many_times = []
        for rep in range(settings.pick(3, 2)):
            apps = [f"m{i:02d}" for i in range(many)]
            bundles = {app: stack.bundle(app, f"r{rep}") for app in apps}
            many_times.append(stack.deploy(bundles))
            stack.remove(apps)
            stack.settle(0)
        rows.append(
            Row(
                f"deploy: {many} bundles at once, all answering",
                spread(many_times),
                "Keter 2.3.5: 3.8 s",
                f"< {ms(MANY_TARGET)}",
                median(many_times) < MANY_TARGET,
            )
        )

    rows.append(_unpack_speed(settings, big, size_mb, settings.pick(5, 3)))
    return rows


def _unpack_speed(settings: Settings, bundle: os.PathLike, size_mb: float, reps: int) -> Row:
    """safe_unpack and ``tar xzf`` in turns on the same file; speed as a fraction of tar's."""
    work = settings.workdir / "unpack"
    work.mkdir(exist_ok=True)
    ours, tars = [], []
    for rep in range(reps):
        # Alternate which goes first so neither always finds the other's dirty pages.
        order = [_time_keter, _time_tar] if rep % 2 == 0 else [_time_tar, _time_keter]
        for measure in order:
            dest = work / "out"
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()  # the previous run's writes must not land inside this one's timing
            seconds = measure(bundle, dest)
            (ours if measure is _time_keter else tars).append(seconds)
    shutil.rmtree(work, ignore_errors=True)
    ratio = median(tars) / median(ours)
    return Row(
        f"deploy: unpack speed, {size_mb:.0f} MB bundle",
        f"{ratio:.2f}x tar's speed (safe_unpack {spread(ours)})",
        f"tar xzf {spread(tars)}",
        f">= {UNPACK_TARGET:.2f}x",
        ratio >= UNPACK_TARGET,
    )


def _time_keter(bundle: os.PathLike, dest: os.PathLike) -> float:
    began = time.monotonic()
    safe_unpack(bundle, dest, max_bytes=2**31, max_members=100_000)
    return time.monotonic() - began


def _time_tar(bundle: os.PathLike, dest: os.PathLike) -> float:
    os.mkdir(dest)  # safe_unpack creates its folder itself; tar needs one
    began = time.monotonic()
    subprocess.run(["tar", "xzf", str(bundle), "-C", str(dest)], check=True, timeout=300)
    return time.monotonic() - began
