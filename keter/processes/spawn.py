"""Starting an app process: its user and groups, its resource limits, whether
its program can run at all (checked before spawning, so the error is
immediate and clear), and the spawn itself.

Resource limits (``ResourceLimits``): the rlimits of an app process: always
``RLIMIT_NOFILE`` and no core dumps (a crash loop must not fill the disk), and
``RLIMIT_NPROC`` and ``RLIMIT_DATA`` for the limits no cgroup controller
carries out (``keter.processes.controllers`` decides), so an fd hog, a fork
bomb or a memory hog fails inside the app instead of taking the machine down.

Every start execs one shell first (``chain``): it joins the deploy's cgroups
(writing its pid into each ``cgroup.procs`` as root), sets the rlimits with
its ``ulimit`` builtin, and execs the app (through util-linux ``setpriv`` when
the app has its own user and groups to enter as root), so the groups and
limits are in place before the app's first instruction. Where the app gets a
``/tmp``, ``/dev/shm`` and IPC of its own (``keter.processes.private``), util-linux
``unshare`` comes first (new mount and IPC namespaces) and the shell mounts its
folders before it joins the cgroups; the shell also sets ``umask 077``.

What runs as root before the privilege drop (the chain's shell and setpriv)
gets a fixed environment, never the app's: the dynamic loader and libc read
``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ``GCONV_PATH`` and the like from the
environment, so a bundle's ``env`` would otherwise run its own code as root.
The app's environment reaches the app through a memfd on the chain's stdin: once
setpriv has dropped to the app's user, a second shell sources its ``export``
lines and execs the app with stdin from /dev/null (``APP_ENV``). The values
never appear on a command line, which every user may read.

``preexec_fn`` would be the obvious tool but is unsafe in a multi-threaded program, and
``prlimit(2)`` on the child after spawning races with an app that forks at
once. Caveats, from the kernel: ``RLIMIT_NPROC`` counts every process and
thread of the app's *user*, and does not bind root at all; and root may raise
its own hard limits. The rlimits therefore really hold for apps run as an
unprivileged user.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pwd
import resource
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from keter import names
from keter.appdata import prepare_data_dir
from keter.messages import ProcessSpec
from keter.processes.cgroups import Cgroup
from keter.processes.private import PrivateStart
from keter.processes.programs import MOUNT, SETPRIV, SHELL, SYSTEM_PATH

log = logging.getLogger(__name__)

# The chain's shell, with its arguments: the umask, the mounts of the app's private
# folders (four arguments each, keter.processes.private), "--", the cgroup.procs files
# to join, "--",
# the ulimit options and values, "--", the command. A step that fails ends the chain with
# 126 before the command runs. ``[``, ``echo``, ``ulimit`` and ``umask`` are builtins: a
# start execs one program before the app (two when setpriv drops to the app's user; one
# more, unshare, first, and a ``mount`` per private folder where the app gets
# namespaces of its own). First the app's OOM score goes up (keter lowers its own where
# it may, keter.daemon): the kernel's OOM killer picks an app, any app process, before
# keter, nginx or PostgreSQL. The mounts come before the cgroups: a ``mount`` process
# in the app's cgroup would count against its ``processes`` limit (a limit of 1 could
# never start). umask 077 for an app with a user of its own: what it writes is its own
# unless it says otherwise; 022 for one run as keter's user or the setuid user (both
# keep the old behaviour: the files it makes for nginx's workers, collected static
# files, say, stay readable to them).
APP_OOM_SCORE_ADJ = 500
OWN_UMASK = "077"  # an app with a user of its own (see CHAIN)
KETERS_UMASK = "022"  # an app run as keter's user or setuid's
_OOM_SCORE_UP = f"echo {APP_OOM_SCORE_ADJ} > /proc/self/oom_score_adj || exit 126; "
_MOUNT = shlex.quote(MOUNT or "mount")
CHAIN = (
    'umask "$1" || exit 126; shift; '
    + _OOM_SCORE_UP
    + 'while [ "$1" != -- ]; do '
    + f'{_MOUNT} -n -t "$1" -o "$2" -- "$3" "$4" || exit 126; shift 4; done; shift; '
    + 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 126; shift; done; shift; '
    + 'while [ "$1" != -- ]; do ulimit "$1" "$2" || exit 126; shift 2; done; shift; '
    + 'exec "$@"'
)
# What keter runs for an app outside its cgroup (pg_dump, psql) goes before keter too:
# an app's data decides how much memory they take.
OOM_FIRST = _OOM_SCORE_UP + 'exec "$@"'


def oom_first(command: Sequence[str]) -> list[str]:
    """``command`` with the apps' OOM score (``APP_OOM_SCORE_ADJ``), not keter's, killed
    when keter's thread that starts it ends (setpriv's parent-death signal): a tool
    of a SIGKILLed keter went on (its timeout gone with keter) holding the app's
    connections and locks, and a restore's psql could commit after the next keter
    had redeployed the app."""
    dies_with_keter = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
    return [SHELL, "-c", OOM_FIRST, "keter-tool", *dies_with_keter, *command]


# Run as the app's user, in the environment of the root part: takes the app's own
# environment from stdin (a memfd of ``export NAME='VALUE'`` lines), then execs the app.
APP_ENV = '. /dev/fd/0 || exit 126; exec "$@" </dev/null'
# All that the root part of a start sees of the environment.
ROOT_ENV = {"PATH": SYSTEM_PATH}


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
    # 0: no core dumps (a crash loop must not fill the disk). Shells count other sizes
    # in blocks of different sizes (dash 512 bytes, bash 1024), so no other is taken.
    core: int | None = 0
    data: int | None = None  # bytes of heap and private mappings (a memory hog gets ENOMEM)

    def __post_init__(self) -> None:
        if self.core not in (0, None):
            raise ValueError("core must be 0 (no core dumps) or None (keter's own limit)")

    def effective(self) -> dict[str, int]:
        """The limits that will be set, by name (nofile, nproc, core, data; in bytes and
        counts), capped as documented."""
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

    def ulimit_args(self) -> list[str]:
        """Options and values for the shell's ``ulimit`` builtin, one pair per limit.

        Without -H or -S, ``ulimit`` sets the soft and the hard limit alike. Data is
        counted in KiB (rounded down, at least 1).
        """
        args = []
        for name, value in self.effective().items():
            if name == "data":
                value = max(1, value // 1024)
            args += [_nproc_option() if name == "nproc" else _ULIMIT[name], str(value)]
        return args


_ULIMIT = {"nofile": "-n", "core": "-c", "data": "-d"}


@functools.cache
def _nproc_option() -> str:
    """The shell's ``ulimit`` option for RLIMIT_NPROC: dash (Debian's sh) has -p, bash
    and busybox have -u (bash's -p is the pipe size)."""
    asked = subprocess.run([SHELL, "-c", "ulimit -u"], capture_output=True, check=False)
    return "-u" if asked.returncode == 0 else "-p"


DEFAULT_LIMITS = ResourceLimits()


def exec_problem(program: str, cwd: Path, env: Mapping[str, str]) -> str | None:
    """Why exec'ing ``program`` would fail at once (an strerror text), or None.

    The app is exec'd by the chain's shell, which can only tell a failed exec
    through its exit status; checking first keeps the usual immediate and exact
    reason. A missing ``cwd`` is left for Popen to report, naming the folder.
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


def environment_file(env: Mapping[str, str]) -> int:
    """A memfd holding ``env`` as ``export NAME='VALUE'`` lines, at offset 0 (``APP_ENV``).

    Raises SpawnError for a name the shell cannot export.
    """
    lines = []
    for name, value in env.items():
        try:
            names.validate_env_name(name)
        except ValueError:
            raise SpawnError(f"invalid environment variable name {names.log_text(name)}") from None
        # Inside single quotes everything is literal but the quote itself: ' -> '\''
        quoted = os.fsencode(value).replace(b"'", b"'\\''")
        lines.append(b"export %s='%s'\n" % (name.encode(), quoted))
    data = memoryview(b"".join(lines))
    fd = os.memfd_create("keter-app-env", os.MFD_CLOEXEC)
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def chain(
    procs: Sequence[Path],
    limits: ResourceLimits,
    command: Sequence[str],
    mounts: Sequence[str] = (),
    umask: str = OWN_UMASK,
) -> list[str]:
    """``command`` run by the chain's shell: it sets ``umask``, makes ``mounts`` (type,
    options, source, target: four each), joins every cgroup of ``procs`` (their
    ``cgroup.procs`` files: its v2 cgroup, its v1 limit groups) and sets ``limits``
    before it execs ``command``."""
    return [
        SHELL,
        "-c",
        CHAIN,
        "keter-start",
        umask,
        *mounts,
        "--",
        *map(str, procs),
        "--",
        *limits.ulimit_args(),
        "--",
        *command,
    ]


def spawn(
    spec: ProcessSpec,
    limits: ResourceLimits,
    *,
    identity: Identity | None = None,
    cgroup: Cgroup | None = None,
    join: tuple[Path, ...] = (),
    private: PrivateStart | None = None,
) -> subprocess.Popen:
    """Start ``spec``'s program in a session of its own, its output on one pipe.

    It runs as ``identity`` (else as ``spec.user``, else as keter), inside
    ``cgroup`` if given and in the v1 limit groups whose ``cgroup.procs`` files
    ``join`` lists (keter.processes.controllers), under ``limits`` (the rlimits),
    with the private folders and namespaces of ``private`` (keter.processes.private).
    The chain (see above): ``unshare`` enters new namespaces, ``sh`` mounts the
    private folders, enters the cgroups (as root) and sets the limits, then execs
    ``setpriv``, which drops to the app's uid, gid and groups, then the app.
    Raises ``SpawnError`` with a reason fit for the operator when it cannot run.
    """
    if not spec.command:
        raise SpawnError("empty command")
    # A user of its own (keter.users) makes what it writes its own; one every app shares
    # (setuid) or keter's (run-apps-as-root) keeps the old behaviour.
    umask = OWN_UMASK if identity is not None else KETERS_UMASK
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
    env: dict[str, str] = dict(spec.env)
    stdin: int = subprocess.DEVNULL
    procs = ([cgroup.procs] if cgroup is not None else []) + list(join)
    prefix: list[str] = []
    mounts: list[str] = []
    if private is not None:
        uid, gid = (identity.uid, identity.gid) if identity else (os.getuid(), os.getgid())
        try:
            folders = private.private.prepare(private.name, uid, gid)
        except OSError as exc:
            raise SpawnError(f"cannot prepare its /tmp: {exc.strerror or exc}") from None
        env = private.private.environment(folders, env)
        # The namespaces need root: with no setpriv to drop to the app's user after
        # them, the app keeps the machine's (TMPDIR still its own).
        if private.private.namespaces and (identity is None or SETPRIV is not None):
            prefix = private.private.prefix()
            mounts = private.private.mounts(folders, private.memory)
    if identity is not None and (SETPRIV is None or not (procs or prefix)):
        # Popen switches users itself (no cgroup to enter as root first): nothing runs
        # as root after the fork, so the app's environment may go along.
        credentials = {
            "user": identity.uid,
            "group": identity.gid,
            "extra_groups": list(identity.groups),
        }
    elif identity is not None:
        command = [SETPRIV, *identity.setpriv_args(), "--", SHELL, "-c", APP_ENV, "keter-env"]
        command += spec.command
        try:
            stdin = environment_file(env)
        except OSError as exc:
            raise SpawnError(f"cannot pass the environment: {exc.strerror or exc}") from None
        env = dict(ROOT_ENV)
    command = prefix + chain(procs, limits, command, mounts, umask)
    try:
        proc = subprocess.Popen(
            command,
            cwd=spec.cwd,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Unbuffered: the output reader reads the pipe's fd itself; a buffered
            # reader would hold 8 KiB per app for nothing (8 MB with 1000 apps).
            bufsize=0,
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
    finally:
        if stdin != subprocess.DEVNULL:
            os.close(stdin)  # the child has its own copy
    # Popen keeps what it ran for the process's life: the app's own command, not the
    # chain's arguments (cgroup files, limits, setpriv's: about 1 KB, 1 MB for 1000 apps).
    proc.args = spec.command
    return proc
