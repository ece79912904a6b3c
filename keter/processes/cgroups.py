"""Containment: every process of a deploy lives in a cgroup of its own (issue 11.3).

keter uses the cgroup v2 ("unified") hierarchy: under systemd, the subtree
``keter.service`` delegates to it (``Delegate=yes``); elsewhere the mounted
unified hierarchy (on Debian with v1 controllers, ``/sys/fs/cgroup/unified``).
keter's apps live under ``keter-ID`` beside keter's own cgroup's processes
(ID tells one keter ROOT from another), one child per deploy: ``d12-NAME``.

A process enters its cgroup BEFORE the app's first instruction: keter spawns
``/bin/sh -c 'echo 0 > PROCS ...; exec "$@"'``, which moves itself (still
root) into the cgroup (and its v1 limit groups, see ``controllers.py``) and
then execs the rest of the chain (limits, dropping privileges, the app).
``preexec_fn`` is unsafe in a threaded
program, and moving the child after the spawn races with an app that forks
at once. Double forks and ``setsid`` stay in the cgroup, so stopping an app
(``cgroup.kill`` after the grace period) and telling when it is gone
(``populated 0`` in ``cgroup.events``) include them.

Without a writable cgroup v2 hierarchy keter falls back to process groups
(``groups.py``) and says so once at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)


def unified_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, or None."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "36 25 0:31 / /sys/fs/cgroup/unified rw,... - cgroup2 cgroup2 rw"
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def own_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """keter's own cgroup v2 path ("0::/system.slice/keter.service" gives that path)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def keter_id(root: Path) -> str:
    """What tells one keter ROOT's cgroups from another's (``keter-ID``)."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]


class Cgroup:
    """One deploy's cgroup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._id: int | None = None
        self._tail = f"/{path.parent.name}/{path.name}".encode()  # see _signal_member

    @property
    def id(self) -> int:
        """The cgroup's id (its folder's inode): how sock_diag names the cgroup a socket
        was made in. 0 if the folder is gone."""
        if self._id is None:
            try:
                self._id = os.stat(self.path).st_ino
            except OSError:
                return 0
        return self._id

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def populated(self) -> bool:
        """Whether any live process is in it (zombies no longer count)."""
        try:
            events = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in events

    def kill(self) -> None:
        """SIGKILL every process in it, forks in flight included (``cgroup.kill``)."""
        try:
            (self.path / "cgroup.kill").write_text("1")
            return
        except FileNotFoundError:
            if not self.path.exists():
                return
        except OSError:
            pass
        # Kernels before 5.14 have no cgroup.kill: kill what is listed, as often as needed.
        for pid in self.pids():
            self._signal_member(pid, signal.SIGKILL)

    def wait_empty(self, timeout: float) -> bool:
        """Block until no process is left, or ``timeout``; for start-up and shutdown only.

        Waits on ``cgroup.events``, which the kernel marks (POLLPRI) on every change.
        """
        deadline = time.monotonic() + timeout
        try:
            fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            while self.populated():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(left * 1000)
            return True
        finally:
            os.close(fd)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process in it (one that forks meanwhile may be missed)."""
        for pid in self.pids():
            self._signal_member(pid, sig)

    def _signal_member(self, pid: int, sig: int) -> None:
        """Signal ``pid`` only if it is still in this cgroup: between reading
        cgroup.procs and the signal it may have exited, been reaped by its parent and
        its number gone to a stranger. The pidfd pins the process first; the check
        after it is of that process (a pid is not reused while its process lives)."""
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            return
        try:
            # "0::/.../keter-ID/dN-APP" (the same path whatever the cgroup namespace).
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                if not any(line.endswith(self._tail) for line in f.read().splitlines()):
                    return
            signal.pidfd_send_signal(pidfd, sig)
        except (ProcessLookupError, OSError):
            return  # ended meanwhile
        finally:
            os.close(pidfd)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs.read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        """Remove the (empty) cgroup; a failure is only logged (it is retried at start)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("processes: cannot remove cgroup %s: %s", self.path, exc)


class Cgroups:
    """keter's subtree of the unified hierarchy: one cgroup per deploy."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def find(cls, root: Path) -> Cgroups | None:
        """keter's subtree for ``root``, created if need be; None without cgroup v2."""
        mount, own = unified_mount(), own_cgroup()
        if mount is None or own is None:
            return None
        base = mount / own.lstrip("/") / f"keter-{keter_id(root)}"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            log.debug("processes: cannot create %s: %s", base, exc)
            return None
        return cls(base)

    def for_deploy(self, app: str, deploy_id: int) -> Cgroup:
        """The deploy's cgroup, created empty (an old one of that name is emptied first)."""
        cgroup = Cgroup(self.base / f"d{int(deploy_id)}-{app}")
        if cgroup.path.exists():
            cgroup.kill()
        else:
            cgroup.path.mkdir(parents=True)  # keter's subtree too, should it be gone
        return cgroup

    def remove(self) -> None:
        """keter is stopping and every deploy's cgroup is gone: remove keter's subtree."""
        with contextlib.suppress(OSError):  # not empty: a later start sweeps it
            self.base.rmdir()

    def leftovers(self) -> list[Cgroup]:
        """Deploy cgroups a previous keter left (it was killed)."""
        try:
            return [Cgroup(p) for p in sorted(self.base.iterdir()) if p.is_dir()]
        except OSError:
            return []
