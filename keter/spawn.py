"""What an app process runs as: its user and groups, its resource limits, and
whether its program can run at all (checked before spawning, so the error is
immediate and clear).
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import resource
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PRLIMIT = shutil.which("prlimit", path=SYSTEM_PATH)


def user_credentials(name: str) -> dict[str, object]:
    """Popen keyword arguments to run as ``name`` with its groups (initgroups semantics)."""
    entry = pwd.getpwnam(name)
    return {
        "user": entry.pw_uid,
        "group": entry.pw_gid,
        "extra_groups": os.getgrouplist(name, entry.pw_gid),
    }


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
