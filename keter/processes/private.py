"""Each app process's own ``/tmp``, ``/var/tmp``, ``/dev/shm`` and System V IPC.

The machine's ``/tmp``, ``/dev/shm`` and IPC objects are shared by every user: an app
could read what another left there with a careless mode, pre-create the names another
will use, and leave files, shared memory segments and semaphores behind for good
(tmpfs memory, not freed when the app's processes die, and outside its ``memory``
limit once its cgroup is gone). As systemd's ``PrivateTmp``, ``PrivateIPC`` and
``RemoveIPC`` do for a service, every start of an app process (a web app, a worker, a
release command) gets:

* a mount namespace and an IPC namespace of its own (util-linux ``unshare``, as root,
  first in the exec chain, ``keter.processes.spawn``): SysV shared memory, semaphores,
  message queues and POSIX message queues live and die with its processes;
* ``/tmp`` and ``/var/tmp``: folders of its own, ``ROOT/run/tmp/APP-ID/{tmp,var-tmp}``,
  owned by the app's user, mode 0700, bind-mounted (``nosuid,nodev``). They are kept
  across the restarts of that process and deleted once it has stopped for good
  (``retire``, then ``remove_swept`` in ``keter.processes.reaper``), and at keter's
  next start for those a killed keter, or a stop that could not wait, left (``sweep``);
* ``/dev/shm``: a fresh tmpfs, as big as the process's ``memory`` limit (else the
  kernel's default, half of RAM), gone with the namespace when its last process ends.
  Its pages are charged to the app's cgroup like any memory of the app;
* ``/dev/mqueue``, where the machine has it mounted: one of its own IPC namespace.

A target that holds a folder apps need (``ROOT`` itself, say ``/tmp/keter`` while
trying keter out, or a PostgreSQL socket folder in ``/tmp``) is left the machine's: a
mount over it would hide them. Then, and where the kernel refuses the namespaces
(keter not root, a container without ``CAP_SYS_ADMIN``), the process gets its folder
as ``TMPDIR`` instead (unless its environment names one), and keter says so once at
start. Whatever the mode, the exec chain sets ``umask 077``, and once the last process
of an app with its own uid is gone keter removes every IPC object of that uid left
in keter's namespace (``remove_ipc``, systemd's ``RemoveIPC``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import subprocess
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from keter.appdata import remove_tree
from keter.fsutil import make_folder
from keter.processes.programs import IPCRM, MOUNT, SETPRIV, UNSHARE

log = logging.getLogger(__name__)

FOLDER_MODE = 0o711  # ROOT/run/tmp and APP-ID: the app crosses them to its TMPDIR
TMP_MODE = 0o700
TMP_TARGETS = ("/tmp", "/var/tmp")
SHM = "/dev/shm"
MQUEUE = "/dev/mqueue"
_OLD = ".old-"  # ROOT/run/tmp/.old-APP-ID-XXXXXXXX: renamed away, being deleted


@dataclass(frozen=True)
class PrivateStart:
    """What one start needs of ``Private``: the process's name (``APP-ID``: its folders)
    and its memory limit (the size of its /dev/shm; None: the kernel's default)."""

    private: Private
    name: str
    memory: int | None = None


@dataclass(frozen=True)
class Folders:
    """One app process's ``/tmp`` and ``/var/tmp`` on the machine's disk."""

    tmp: Path
    var_tmp: Path


def under(path: str | Path, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, links resolved."""
    resolved, top = os.path.realpath(path), os.path.realpath(folder)
    return resolved == top or resolved.startswith(top.rstrip("/") + "/")


class Private:
    """Where the private folders live (``base``, ``ROOT/run/tmp``) and how a process
    gets them, decided once at start (``check``)."""

    def __init__(self, base: Path, needed: Iterable[str | Path] = ()) -> None:
        """``needed``: folders apps must keep reaching by their paths (ROOT, a database
        socket folder): a target holding one is not mounted over."""
        self.base = Path(base)
        self.needed = tuple(needed)
        self.namespaces = False  # decided by check()
        self.tmp = False  # /tmp and /var/tmp are mounted
        self.shm = False  # /dev/shm is a fresh tmpfs
        self.mqueue = False  # /dev/mqueue is the IPC namespace's own

    @property
    def machine_ipc(self) -> bool:
        """Whether app processes can leave IPC objects in keter's namespace: without
        namespaces, or with the machine's /dev/shm (``remove_ipc`` is their end)."""
        return not (self.namespaces and self.shm)

    def check(self) -> None:
        """Once at start: whether the kernel gives app processes their namespaces, and
        which targets they get; said in one line (a WARNING if some fall back)."""
        self.base.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        os.chmod(self.base, FOLDER_MODE)
        why = self._unavailable()
        self.namespaces = why is None
        hiding = {t: [p for p in self.needed if under(p, t)] for t in (*TMP_TARGETS, SHM)}
        # /tmp and /var/tmp together: an app sees both its own, or both the machine's.
        self.tmp = self.namespaces and not any(hiding[t] for t in TMP_TARGETS)
        self.shm = self.namespaces and not hiding[SHM] and os.path.isdir(SHM)
        self.mqueue = self.namespaces and os.path.ismount(MQUEUE)
        if not self.namespaces:
            log.warning(
                "processes: no private /tmp, /dev/shm or IPC for apps (%s): they share the "
                "machine's; each app process gets a TMPDIR of its own and umask 077, and "
                "an app's IPC objects are removed when its last process stops",
                why,
            )
            return
        if self.tmp and self.shm:
            log.info(
                "processes: every app process gets /tmp, /var/tmp and /dev/shm of its own and "
                "private IPC (mount and IPC namespaces); they go when it stops"
            )
            return
        kept = ([] if self.tmp else list(TMP_TARGETS)) + ([] if self.shm else [SHM])
        hidden = sorted({str(p) for t in kept for p in hiding[t]})
        log.warning(
            "processes: apps keep the machine's %s (%s lies there, which a private one would "
            "hide); each app process gets private IPC%s%s",
            " and ".join(kept),
            ", ".join(hidden) or "it is missing",
            ", /dev/shm of its own" if self.shm else "",
            ", a TMPDIR of its own" if not self.tmp else "",
        )

    def _unavailable(self) -> str | None:
        """Why app processes cannot get their namespaces here, or None: tries what a start
        does, a tmpfs mounted in namespaces of its own, which end with it."""
        if os.geteuid() != 0:
            return "keter does not run as root"
        if UNSHARE is None or MOUNT is None:
            return "util-linux unshare or mount is missing"
        command = [*self.prefix(), MOUNT, "-n", "-t", "tmpfs", "-o", "size=1m"]
        command += ["--", "keter-check", str(self.base)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=10, check=False, env={}
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare: {exc}"
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[0]
            return said[:200]
        return None

    # -- a start ----------------------------------------------------------------------

    def prefix(self) -> list[str]:
        """What the exec chain starts with: ``unshare`` into new mount and IPC namespaces,
        whose mounts nobody else sees (private propagation both ways)."""
        assert UNSHARE is not None
        return [UNSHARE, "--mount", "--ipc", "--propagation", "private", "--"]

    def folders(self, name: str) -> Folders:
        """The folders of the process keter knows as ``name`` (``APP-ID``)."""
        return Folders(tmp=self.base / name / "tmp", var_tmp=self.base / name / "var-tmp")

    def prepare(self, name: str, uid: int, gid: int) -> Folders:
        """Make the process's folders if missing: ``APP-ID`` root's (the app cannot
        replace what is mounted from it), ``tmp`` and ``var-tmp`` the app's, 0700.
        Raises OSError."""
        folders = self.folders(name)
        parent = folders.tmp.parent
        info = make_folder(parent, FOLDER_MODE)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != FOLDER_MODE:
            os.chown(parent, os.getuid(), os.getgid(), follow_symlinks=False)
            os.chmod(parent, FOLDER_MODE)
        for folder in (folders.tmp, folders.var_tmp):
            info = make_folder(folder, TMP_MODE)
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.chown(folder, uid, gid, follow_symlinks=False)
            os.chmod(folder, TMP_MODE)
        return folders

    def mounts(self, folders: Folders, memory: int | None) -> list[str]:
        """The chain's mounts, four arguments each (type, options, source, target)."""
        found: list[str] = []
        if self.tmp:
            found += ["none", "bind,nosuid,nodev", str(folders.tmp), "/tmp"]
            found += ["none", "bind,nosuid,nodev", str(folders.var_tmp), "/var/tmp"]
        if self.shm:
            size = f"size={memory}," if memory is not None else ""
            found += ["tmpfs", f"{size}mode=1777,nosuid,nodev", "keter-shm", SHM]
        if self.mqueue:
            found += ["mqueue", "nosuid,nodev,noexec", "keter-mqueue", MQUEUE]
        return found

    def environment(self, folders: Folders, env: dict[str, str]) -> dict[str, str]:
        """``env`` with ``TMPDIR``, its own folder, where ``/tmp`` is the machine's."""
        if self.tmp or "TMPDIR" in env:
            return env
        return {**env, "TMPDIR": str(folders.tmp)}

    # -- the end ----------------------------------------------------------------------

    def retire(self, name: str) -> Path | None:
        """The process stopped for good: its folders are renamed away at once (a start of
        the same name meanwhile gets new ones), and returned for ``remove_swept``, which
        may take long (an app's tree of any size). None: it had none, or the rename
        failed (said; the next start's ``sweep`` takes them)."""
        folder = self.base / name
        doomed = folder.with_name(f"{_OLD}{name}-{secrets.token_hex(4)}")
        try:
            os.rename(folder, doomed)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("processes: cannot rename %s away: %s", folder, exc.strerror or exc)
            return None
        return doomed

    def sweep(self) -> list[Path]:
        """At start, before any app runs: what a previous keter left is renamed away at
        once (new starts get fresh folders) and returned for ``remove_swept``."""
        swept = []
        for name in _listdir(self.base):
            if name.startswith(_OLD):
                swept.append(self.base / name)
                continue
            doomed = self.base / f"{_OLD}{name}-{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.base / name, doomed)
                swept.append(doomed)
        return swept

    @staticmethod
    def remove_swept(swept: list[Path]) -> None:
        """Delete what ``sweep`` or ``retire`` renamed away, links inside never followed."""
        for folder in swept:
            try:
                if folder.is_dir() and not folder.is_symlink():
                    remove_tree(folder)
                else:
                    folder.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("processes: cannot remove %s: %s", folder, exc.strerror or exc)


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


# -- RemoveIPC ------------------------------------------------------------------------

SYSV = (("/proc/sysvipc/shm", "shmid", "-m"), ("/proc/sysvipc/sem", "semid", "-s"))
SYSV += (("/proc/sysvipc/msg", "msqid", "-q"),)


def running_uids() -> set[int]:
    """The real uids of every live process on the machine. Not zombies: they hold no
    shared memory and have undone their semaphores, and a forking app's orphans wait as
    zombies for a PID 1 that may reap them late (or, in a container, never): counted,
    they kept their app's objects for good."""
    found = set()
    for process in psutil.process_iter(["uids", "status", "num_threads"]):
        with contextlib.suppress(psutil.Error, AttributeError, TypeError):
            info = process.info
            # A process whose main thread ended while others run shows as a zombie too.
            if info["status"] != psutil.STATUS_ZOMBIE or info["num_threads"] > 1:
                found.add(info["uids"].real)
    return found


def sysv_objects(uids: Collection[int]) -> list[tuple[str, str]]:
    """(ipcrm option, id) of every System V object in keter's IPC namespace that one of
    ``uids`` owns or created."""
    return [obj for objects in _sysv_by_uid(uids).values() for obj in objects]


def _sysv_by_uid(uids: Collection[int]) -> dict[int, list[tuple[str, str]]]:
    """``sysv_objects`` by the uid that may remove them (its owner, else its creator)."""
    wanted = {str(uid) for uid in uids}
    found: dict[int, list[tuple[str, str]]] = {}
    for path, key, option in SYSV:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        if not lines:
            continue
        header = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(header, line.split(), strict=False))
            if key not in row:
                continue
            for field in ("uid", "cuid"):
                if row.get(field) in wanted:
                    found.setdefault(int(row[field]), []).append((option, row[key]))
                    break
    return found


def remove_ipc(uids: Collection[int]) -> int:
    """Remove every IPC object of ``uids`` in keter's namespace, as systemd's RemoveIPC:
    System V shared memory, semaphores and message queues, and what they own in
    ``/dev/shm`` and ``/dev/mqueue``. Returns how many went.

    A uid some process still runs as is left alone: its objects are in use (another
    keter on the machine may hand out the same uids from the same range)."""
    uids = set(uids) - running_uids()
    if not uids:
        return 0
    removed = 0
    for uid, objects in _sysv_by_uid(uids).items():
        if IPCRM is None:
            break
        # As their owner, which may remove them: root may not without CAP_SYS_ADMIN (a
        # container). One ipcrm for all of them; one gone meanwhile fails alone.
        command = [IPCRM, *(arg for option, ident in objects for arg in (option, ident))]
        if SETPRIV is not None and os.geteuid() == 0:
            command = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
        subprocess.run(command, capture_output=True, check=False, timeout=30, env={})
        left = set(sysv_objects({uid}))
        removed += sum(1 for obj in objects if obj not in left)
    for folder in (SHM, MQUEUE):
        for name in _listdir(Path(folder)):
            path = Path(folder) / name
            try:
                info = os.lstat(path)
                if info.st_uid not in uids:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    remove_tree(path)
                else:
                    os.unlink(path)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("processes: cannot remove %s: %s", path, exc.strerror or exc)
    return removed
