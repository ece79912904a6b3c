"""What keter's bounded writers (a backup's dump, a restore's SQL) may write together.

They must leave ``DISK_RESERVE`` free on ROOT's disk. Each writer's file size is
bounded by RLIMIT_FSIZE: past it the writer gets SIGXFSZ and its job fails alone.
Jobs of different apps run side by side, so one bound each of "all that is free"
let N writers fill the disk together. Instead, whenever a writer starts or ends,
what is free above the reserve is shared out again: each writer may grow by an
equal part of it beyond the size its file has now, so together they never take
more. A writer alone may use all of it, as before; one that ends gives its part
back to those still writing. Bounds handed out once and kept would have let the
first writer hold all the space and stopped every writer started beside it at
its first byte.

Bounds are set on the running writer, on its soft limit alone. Without
CAP_SYS_RESOURCE (keter's root may lack it, in a container) ``prlimit(2)`` may
change only a process of its own user, and a hard limit never goes up again: a
writer run as another user (the app's tools user) is bounded by util-linux
``prlimit --pid`` run as that user. The writers, PostgreSQL's own programs run as
a user no app process can take over, do not raise their soft limit. A writer's
first bound is set just after it is spawned: the bound is on the file's size, not
on what it writes from then on, so what it wrote before (nothing, but for a start
that takes milliseconds to exec twice and connect) counts against it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Past it the writer gets SIGXFSZ and the job fails alone; unbounded, a restore's SQL
# (about 1000 times its dump for compressible data) had filled the disk every app
# shares. A share of the disk instead would fail every backup (and so every deploy)
# of a large disk kept nearly full.
DISK_RESERVE = 256 * 1024 * 1024
PRLIMIT = shutil.which("prlimit", path="/usr/bin:/bin")  # util-linux


def disk_free(folder: Path) -> int:
    """Bytes free on ``folder``'s file system for an unprivileged writer."""
    disk = os.statvfs(folder)
    return disk.f_bavail * disk.f_frsize


@dataclass(eq=False)
class _Writer:
    app: str
    pid: int
    fd: int  # the file it writes
    uid: int  # who it runs as
    gid: int
    others: int = 0  # the most writers that shared the disk with it


class DiskShare:
    """The writers running now and their bounds (one owner thread: not thread-safe)."""

    def __init__(self, folder: Path, reserve: int = DISK_RESERVE) -> None:
        self.folder = Path(folder)
        self.reserve = reserve
        self._writers: dict[object, _Writer] = {}

    def add(self, key: object, app: str, pid: int, fd: int, uid: int, gid: int) -> None:
        """Bound ``app``'s process ``pid`` (run as ``uid``:``gid``), writing the file
        ``fd``, and those beside it."""
        self._writers[key] = _Writer(app=app, pid=pid, fd=fd, uid=uid, gid=gid)
        self._share()

    def remove(self, key: object) -> int:
        """``key``'s writer ended: give its part back; how many wrote beside it at most."""
        writer = self._writers.pop(key, None)
        if writer is None:
            return 0
        self._share()
        return writer.others

    def _share(self) -> None:
        if not self._writers:
            return
        spare = max(0, disk_free(self.folder) - self.reserve)
        part = spare // len(self._writers)
        for writer in self._writers.values():
            writer.others = max(writer.others, len(self._writers) - 1)
            try:
                _bound(writer, os.fstat(writer.fd).st_size + part)
            except (OSError, subprocess.SubprocessError) as exc:
                # Unbounded, it must not write on: its job fails (killed), the others go on.
                log.error(
                    "%s: cannot bound its backup writer (pid %d): %s", writer.app, writer.pid, exc
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(writer.pid, signal.SIGKILL)


def _bound(writer: _Writer, size: int) -> None:
    try:
        with contextlib.suppress(ProcessLookupError):  # its end is on its way to the owner
            hard = resource.prlimit(writer.pid, resource.RLIMIT_FSIZE)[1]
            if hard != resource.RLIM_INFINITY:
                size = min(size, hard)
            resource.prlimit(writer.pid, resource.RLIMIT_FSIZE, (size, hard))
        return
    except PermissionError:
        if PRLIMIT is None or writer.uid == os.getuid():
            raise
    done = subprocess.run(
        [PRLIMIT, f"--pid={writer.pid}", f"--fsize={size}:"],
        user=writer.uid,
        group=writer.gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0 and _alive(writer.pid):
        raise PermissionError(f"prlimit --pid {writer.pid}: {done.stderr.strip()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
