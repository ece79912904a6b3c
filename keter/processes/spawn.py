"""Starting an app process: its user and groups, its resource limits, whether
its program can run at all (checked before spawning, so the error is
immediate and clear), and the spawn itself.

Resource limits (``ResourceLimits``): the rlimits of an app process: always
``RLIMIT_NOFILE`` and no core dumps (a crash loop must not fill the disk), and
``RLIMIT_NPROC`` and ``RLIMIT_DATA`` for the limits no cgroup controller
carries out (``keter.processes.controllers`` decides), so an fd hog, a fork
bomb or a memory hog fails inside the app instead of taking the machine down.
They are set by exec'ing the app through util-linux's ``prlimit``, which sets
them on itself and then execs the app: the limits are in place before the
app's first instruction. ``preexec_fn`` would be the obvious tool but is
unsafe in a multi-threaded program, and ``prlimit(2)`` on the child after
spawning races with an app that forks at once. Caveats, from the kernel:
``RLIMIT_NPROC`` counts every process and thread of the app's *user*, and
does not bind root at all; and root may raise its own hard limits. The
rlimits therefore really hold for apps run as an unprivileged user.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import resource
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keter.appdata import prepare_data_dir
from keter.messages import ProcessSpec
from keter.processes.cgroups import Cgroup, enter_command
from keter.processes.forkgate import FORK_GATE

log = logging.getLogger(__name__)

SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PRLIMIT = shutil.which("prlimit", path=SYSTEM_PATH)
SETPRIV = shutil.which("setpriv", path=SYSTEM_PATH)


@dataclass(frozen=True)
class Identity:
    """Who an app process runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups

    @classmethod
    def of_user(cls, name: str) -> Identity:
        """A named user with its groups (initgroups semantics); KeyError if unknown."""
        entry = pwd.getpwnam(name)
        return cls(entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))

    def setpriv_args(self) -> list[str]:
        groups = f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups"
        return [f"--reuid={self.uid}", f"--regid={self.gid}", groups]


@dataclass(frozen=True, kw_only=True)
class ResourceLimits:
    """Limits every app process runs under; None leaves that one as keter's own.

    Soft and hard limits are set alike, so an unprivileged app cannot raise
    them. A value above keter's own hard limit is lowered to it: an app run as
    another user could not be given more anyway.
    """

    nofile: int | None = 65536  # open files per process (an fd hog gets EMFILE)
    nproc: int | None = 4096  # processes and threads of the app's user (a fork bomb gets EAGAIN)
    core: int | None = 0  # core dump bytes: a crash loop must not fill the disk
    data: int | None = None  # bytes of heap and private mappings (a memory hog gets ENOMEM)

    def effective(self) -> dict[str, int]:
        """prlimit's resource names and the values that will be set, capped as documented."""
        wanted = {
            "nofile": (self.nofile, resource.RLIMIT_NOFILE),
            "nproc": (self.nproc, resource.RLIMIT_NPROC),
            "core": (self.core, resource.RLIMIT_CORE),
            "data": (self.data, resource.RLIMIT_DATA),
        }
        limits = {}
        for name, (value, which) in wanted.items():
            if value is None:
                continue
            hard = resource.getrlimit(which)[1]
            limits[name] = value if hard == resource.RLIM_INFINITY else min(value, hard)
        return limits

    def prlimit_args(self) -> list[str]:
        """``--nofile=N:N`` ... for util-linux prlimit."""
        return [f"--{name}={value}:{value}" for name, value in self.effective().items()]

    def apply_to(self, pid: int) -> None:
        """Set the limits on a running process (the fallback when prlimit is missing)."""
        for name, value in self.effective().items():
            which = getattr(resource, f"RLIMIT_{name.upper()}")
            resource.prlimit(pid, which, (value, value))


DEFAULT_LIMITS = ResourceLimits()


def exec_problem(program: str, cwd: Path, env: Mapping[str, str]) -> str | None:
    """Why exec'ing ``program`` would fail at once (an strerror text), or None.

    The app is exec'd by prlimit, which can only tell a failed exec through its
    exit status; checking first keeps the usual immediate and exact reason.
    A missing ``cwd`` is left for Popen to report, naming the folder.
    """
    if "/" not in program:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
        return None if found else os.strerror(errno.ENOENT)
    if not os.path.isdir(cwd):
        return None
    path = os.path.join(cwd, program)  # an absolute program stays as it is
    if not os.path.exists(path):
        return os.strerror(errno.ENOENT)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return os.strerror(errno.EACCES)
    return None


class SpawnError(Exception):
    """Why an app process could not be started (the text is the whole reason)."""


def spawn(
    spec: ProcessSpec,
    limits: ResourceLimits,
    prlimit: str | None,
    *,
    identity: Identity | None = None,
    cgroup: Cgroup | None = None,
    join: tuple[Path, ...] = (),
) -> subprocess.Popen:
    """Start ``spec``'s program in a session of its own, its output on one pipe.

    It runs as ``identity`` (else as ``spec.user``, else as keter), inside
    ``cgroup`` if given and in the v1 limit groups whose ``cgroup.procs`` files
    ``join`` lists (keter.processes.controllers). The chain, each step exec'ing
    the next: ``sh`` enters the cgroups (as root), ``prlimit`` sets the limits
    (``limits``: the rlimits), ``setpriv`` drops to the
    app's uid, gid and groups, then the app. Raises ``SpawnError`` with a reason
    fit for the operator when it cannot run. Without ``prlimit`` the limits
    are set just after the start (see above).
    """
    if not spec.command:
        raise SpawnError("empty command")
    if identity is None and spec.user:
        try:
            identity = Identity.of_user(spec.user)
        except KeyError:
            raise SpawnError(f"unknown user {spec.user!r}") from None
    if spec.data_dir is not None:
        # The app's data folder, owned by the identity it runs as (keter.appdata).
        uid, gid = (identity.uid, identity.gid) if identity else (os.getuid(), os.getgid())
        try:
            prepare_data_dir(spec.data_dir, uid, gid)
        except OSError as exc:
            raise SpawnError(f"cannot prepare {spec.data_dir}: {exc.strerror or exc}") from None
    problem = exec_problem(spec.command[0], spec.cwd, spec.env)
    if problem:
        raise SpawnError(f"cannot run {spec.command[0]}: {problem}")
    command = list(spec.command)
    credentials: dict[str, object] = {}
    procs = ([cgroup.procs] if cgroup is not None else []) + list(join)
    if identity is not None and (SETPRIV is None or not procs):
        # Popen switches users itself (no cgroup to enter as root first).
        credentials = {
            "user": identity.uid,
            "group": identity.gid,
            "extra_groups": list(identity.groups),
        }
    elif identity is not None:
        command = [SETPRIV, *identity.setpriv_args(), "--", *command]
    if prlimit is not None:
        command = [prlimit, *limits.prlimit_args(), "--", *command]
    if procs:
        command = enter_command(procs, command)
    try:
        with FORK_GATE.spawning():
            proc = subprocess.Popen(
                command,
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                **credentials,
            )
    except OSError as exc:
        # The failing file may be the working directory rather than the program.
        where = f"{exc.filename}: " if exc.filename not in (None, spec.command[0]) else ""
        raise SpawnError(f"cannot run {spec.command[0]}: {where}{exc.strerror or exc}") from None
    except (ValueError, TypeError, subprocess.SubprocessError) as exc:
        raise SpawnError(f"cannot run {spec.command[0]}: {exc}") from None
    if prlimit is None:
        try:
            limits.apply_to(proc.pid)
        except OSError as exc:
            log.warning("cannot set resource limits of pid %d: %s", proc.pid, exc)
    return proc
