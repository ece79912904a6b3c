"""Database backups: ``pg_dump`` before every release, ``keter db backup`` and ``restore``.

Files. ``ROOT/backups/APP/STAMP-KIND-VERSION.dump``: pg_dump's custom format,
root's, mode 0600, in folders of mode 0700, so no app (and no local user) can
read them. STAMP is the UTC time it was taken, KIND why (``BackupKind``:
``release`` before VERSION's release ran as it replaced another version,
``rerelease`` before the release of VERSION, serving already, ran again (a
restart), ``manual`` from ``keter db backup``, ``restore`` before a restore
replaced the data; VERSION then is the version that was serving). Each app
keeps its last ``backup-keep`` (default 5), of any kind, and beside them the
``release`` backup of each version they name: what ``rollback --with-data``
restores, which five restarts would otherwise have deleted. A dump is written
under a hidden ``.part`` name and renamed when complete, so a listed backup is
always whole.

Why a component of its own (not the postgres provisioner): a dump or a
restore may take minutes, and provisioning another app's database must not
wait behind it; backups also own their files and their retention. Nothing
here blocks the actor's loop either: every PostgreSQL program runs as a child
process, a small thread per child copies its error output and waits for its
exit, and reports it as a message (``_StepDone``); a timer per job
(``backup-timeout``) kills the child's group if it takes too long. Jobs of one
app run one after the other; different apps' run side by side.

The programs are connected with the app's own credentials, so they can do
nothing the app could not do itself (a restore executes SQL taken from a file
the app's data shaped). They run as a user of their own, the app's "tools"
user (``keter.users.tools_key``), not as the app's: a process of the app could
otherwise take over a program of its own user (ptrace) and, through it, run
outside the app's cgroup and limits, and past its removal. A dump is taken
only if it is one (pg_dump's custom format begins ``PGDMP``).
They get the backup file as an open descriptor (stdin or stdout) and never
see the backups folder. The password reaches them in ``PGPASSWORD``, never on
a command line.

Restore: the current data is backed up first (kind ``restore``, so a restore
can be undone), then ``pg_restore`` turns the backup into SQL (a temporary
file, 0600) and ``psql`` runs ``DROP OWNED BY CURRENT_USER`` and that SQL in
ONE transaction: the app sees its old data until the restore commits, then
the restored data, never a half-restored database; a failure changes
nothing. Objects the app made after the backup are dropped too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from keter.actor import Actor
from keter.diskshare import DiskShare
from keter.fsutil import fsync_dir
from keter.messages import (
    BackupDatabase,
    BackupFailed,
    BackupInfo,
    BackupKind,
    BackupTaken,
    Component,
    DbInfo,
    RequestRefused,
    RestoreDatabase,
    message,
)
from keter.names import log_text
from keter.processes.spawn import Identity, oom_first
from keter.threadnames import name_this_thread
from keter.users import AppUsers, tools_key

log = logging.getLogger(__name__)

SUFFIX = ".dump"
DUMP_MAGIC = b"PGDMP"  # how pg_dump's custom format begins
_NAME = re.compile(
    r"(?P<stamp>\d{8}T\d{6}\.\d{6}Z)-(?P<kind>release|rerelease|manual|restore)-(?P<version>[0-9a-f]{12}|unknown)"
    + re.escape(SUFFIX)
)
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
ERROR_TAIL = 4096  # bytes of a program's error output kept for the reason
SYSTEM_PATH = "/usr/bin:/bin"
LOCK_TIMEOUT_MS = 60_000  # a restore waits this long for the app's locks, then fails


# -- the files -----------------------------------------------------------------------------


def app_dir(backups_dir: Path, app: str) -> Path:
    return Path(backups_dir) / app


def backup_name(kind: BackupKind, version: str, at: float) -> str:
    stamp = datetime.fromtimestamp(at, UTC).strftime(STAMP_FORMAT)
    version = version if re.fullmatch(r"[0-9a-f]{12}", version) else "unknown"
    return f"{stamp}-{kind.value}-{version}{SUFFIX}"


def parse_name(app: str, name: str, size: int = 0) -> BackupInfo | None:
    """The backup a file name describes, or None if it is not one of keter's names."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    at = datetime.strptime(match["stamp"], STAMP_FORMAT).replace(tzinfo=UTC).timestamp()
    return BackupInfo(
        app=app,
        name=name,
        kind=BackupKind(match["kind"]),
        version=match["version"],
        at=at,
        size=size,
    )


def list_backups(backups_dir: Path, app: str) -> list[BackupInfo]:
    """The app's backups, newest first (any thread may call this)."""
    folder = app_dir(backups_dir, app)
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        info = parse_name(app, entry.name, entry.stat(follow_symlinks=False).st_size)
        if info is not None:
            found.append(info)
    return sorted(found, key=lambda b: b.name, reverse=True)


def backup_before(backups_dir: Path, app: str, version: str) -> BackupInfo | None:
    """The newest backup taken before ``version``'s release as it replaced another version
    (what ``rollback --with-data`` restores when it undoes ``version``).

    Not a ``rerelease``: a restart of the version serving backs up data its release
    has already changed.
    """
    return next(
        (
            b
            for b in list_backups(backups_dir, app)
            if b.kind is BackupKind.RELEASE and b.version == version
        ),
        None,
    )


def prune(backups_dir: Path, app: str, keep: int, serving: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` backups and the newest ``release`` backup of
    each version they name and of the version ``serving``; returns the names deleted."""
    backups = list_backups(backups_dir, app)
    kept = backups[:keep]
    anchors = {b.version: b for b in reversed(backups) if b.kind is BackupKind.RELEASE}
    named = {b.version for b in kept} | ({serving} if serving else set())
    kept += [anchors[version] for version in named if version in anchors]
    doomed = [b for b in backups if b not in kept]
    for backup in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(app_dir(backups_dir, app) / backup.name)
    return [b.name for b in doomed]


def info_json(backup: BackupInfo) -> dict:
    return {
        "name": backup.name,
        "kind": backup.kind.value,
        "version": backup.version,
        "at": backup.at,
        "size": backup.size,
    }


def pg_program(name: str) -> str:
    """The newest installed PostgreSQL's ``name`` (pg_dump refuses newer servers), else PATH's."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=version)
    return str(found[-1]) if found else (shutil.which(name, path=SYSTEM_PATH) or name)


def program_env(db: DbInfo) -> dict[str, str]:
    """A clean environment that points libpq at the app's database (keter's own stays out)."""
    return {
        "PATH": SYSTEM_PATH,
        "HOME": "/",
        "LANG": "C.UTF-8",
        "PGHOST": db.host,
        "PGPORT": str(db.port),
        "PGUSER": db.user,
        "PGDATABASE": db.name,
        "PGPASSWORD": db.password,
        "PGPASSFILE": "/dev/null",
        "PGCONNECT_TIMEOUT": "10",
        "PGAPPNAME": "keter-backup",
        "PGOPTIONS": f"-c lock_timeout={LOCK_TIMEOUT_MS}",
    }


def credentials(identity: Identity | None) -> dict[str, object]:
    """Popen arguments to run as ``identity`` (None: keter's own user)."""
    if identity is None:
        return {}
    return {"user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}


# -- the component -------------------------------------------------------------------------


@message
class _StepDone:
    """A job's child process exited (posted by its waiter thread)."""

    app: str
    job: int
    returncode: int
    errors: str


@message
class _JobTimeout:
    app: str
    job: int


@dataclass(eq=False)
class _Job:
    """One backup or restore of one app: a few steps, each one child process."""

    number: int
    request: BackupDatabase | RestoreDatabase
    steps: deque = field(default_factory=deque)  # callables that start the next child
    child: subprocess.Popen | None = None
    program: str = ""
    timed_out: bool = False
    backup: BackupInfo | None = None  # the backup this job wrote (a restore's: the safety one)
    restoring: BackupInfo | None = None
    part: Path | None = None  # a file being written (removed if the job fails)
    part_fd: int | None = None
    input_fd: int | None = None


class BackupFailure(Exception):
    """A step could not even start; the text is the reason."""


class Backups(Actor):
    """Answers BackupDatabase and RestoreDatabase (see the module docstring)."""

    def __init__(
        self,
        *,
        backups_dir: Path,
        keep: int,
        timeout: float,
        report_to: queue.Queue | None,
        users: AppUsers | None = None,
    ) -> None:
        """``users``: each app's own uid, as the process monitor has them (issue 11)."""
        super().__init__(Component.BACKUPS, report_to)
        self.users = users
        self.backups_dir = Path(backups_dir)
        self.keep = keep
        self.timeout = timeout
        self._numbers = iter(range(1, 1 << 62))
        self._queues: dict[str, deque[_Job]] = {}
        self._running: dict[str, _Job] = {}
        self._disk = DiskShare(self.backups_dir)

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        """Remove what a killed keter left half written."""
        self.backups_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.backups_dir, 0o700)
        for part in self.backups_dir.glob("*/.*.part"):
            with contextlib.suppress(OSError):
                part.unlink()

    def on_restart(self) -> None:
        """A bug failed a job (ComponentFailed): end what ran, so the app's queue goes on."""
        for job in list(self._running.values()):
            if job.child is not None:
                _kill(job.child)
            self._finish(job, "internal error in keter's backups component")

    def on_stop(self) -> None:
        """keter is stopping: kill what runs (a dump can be taken again; a restore's
        transaction is rolled back) and refuse what waits."""
        for job in list(self._running.values()):
            if job.child is not None:
                _kill(job.child)
                job.child.wait()
            self._finish(job, "keter is stopping")
        for jobs in self._queues.values():
            for job in jobs:
                self._finish(job, "keter is stopping")
        self._queues.clear()

    # -- messages ------------------------------------------------------------------------

    def handle(self, message: object) -> None:
        match message:
            case BackupDatabase() | RestoreDatabase():
                job = _Job(number=next(self._numbers), request=message)
                self._queues.setdefault(message.app, deque()).append(job)
                self._next_job(message.app)
            case _StepDone():
                job = self._running.get(message.app)
                if job is not None and job.number == message.job:
                    self._step_done(job, message)
            case _JobTimeout(app=app, job=number):
                job = self._running.get(app)
                if job is not None and job.number == number and job.child is not None:
                    job.timed_out = True
                    _kill(job.child)
            case _:
                self.unexpected(message)

    # -- jobs ------------------------------------------------------------------------------

    def _next_job(self, app: str) -> None:
        if app in self._running or not self._queues.get(app):
            return
        job = self._queues[app].popleft()
        self._running[app] = job
        request = job.request
        try:
            if isinstance(request, RestoreDatabase):
                job.restoring = self._chosen(request)
                job.steps.extend([self._start_dump, self._start_pg_restore, self._start_psql])
            else:
                job.steps.append(self._start_dump)
        except RequestRefused as exc:
            self._finish(job, exc)
            return
        self.schedule(self.timeout, _JobTimeout(app=app, job=job.number))
        self._advance(job)

    def _chosen(self, request: RestoreDatabase) -> BackupInfo:
        backups = list_backups(self.backups_dir, request.app)
        if request.backup is None:
            if not backups:
                raise RequestRefused(404, f"{request.app} has no backup")
            return backups[0]
        chosen = next((b for b in backups if b.name == request.backup), None)
        if chosen is None:
            shown = log_text(request.backup, 100)
            raise RequestRefused(404, f"{request.app} has no backup named {shown}")
        return chosen

    def _advance(self, job: _Job) -> None:
        """Start the job's next step, or finish it."""
        if not job.steps:
            self._finish(job, None)
            return
        try:
            job.steps.popleft()(job)
        except (BackupFailure, OSError) as exc:
            self._finish(job, f"cannot run {job.program or 'it'}: {exc}")
            return
        assert job.child is not None
        threading.Thread(
            target=self._wait,
            args=(job.request.app, job.number, job.child),
            name=f"keter-backup-{job.request.app}",
            daemon=True,
        ).start()

    def _wait(self, app: str, number: int, child: subprocess.Popen) -> None:
        """In a thread of its own: the child's error output, then its exit, as a message."""
        name_this_thread()
        kept = b""
        assert child.stderr is not None
        with child.stderr:
            while chunk := child.stderr.read(65536):
                kept = (kept + chunk)[-ERROR_TAIL:]
        returncode = child.wait()
        errors = kept.decode(errors="replace")
        self.tell(_StepDone(app=app, job=number, returncode=returncode, errors=errors))

    def _step_done(self, job: _Job, done: _StepDone) -> None:
        job.child = None
        others = self._disk.remove(job)
        _close(job, "input_fd")
        if done.returncode != 0 or job.timed_out:
            if job.timed_out:
                why = f"did not finish within {self.timeout:g}s"
            elif done.returncode == -signal.SIGXFSZ:
                why = self._out_of_space(others)
            else:
                why = f"exited with status {done.returncode}"
            last = [line for line in done.errors.strip().splitlines() if line.strip()]
            detail = f": {log_text(last[-1], 500)}" if last else ""
            self._finish(job, f"{job.program} {why}{detail}")
            return
        if job.program == "pg_dump":
            if os.pread(job.part_fd, len(DUMP_MAGIC), 0) != DUMP_MAGIC:  # type: ignore[arg-type]
                self._finish(job, "pg_dump exited with status 0 but wrote no dump")
                return
            self._dump_written(job)
        self._advance(job)

    def _out_of_space(self, others: int) -> str:
        """Why a writer was stopped at its bound (keter.diskshare)."""
        reserve = f"less than {self._disk.reserve // 2**20} MiB free on ROOT's disk"
        if not others:
            return f"stopped: it would have left {reserve}"
        beside = (
            "1 other backup or restore" if others == 1 else f"{others} other backups or restores"
        )
        return f"stopped: it and {beside} writing beside it would have left {reserve}"

    def _finish(self, job: _Job, failure: str | RequestRefused | None) -> None:
        """Report the job's end, clean up what it left, start the app's next job."""
        request = job.request
        app = request.app
        if self._running.get(app) is job:
            del self._running[app]
        self._disk.remove(job)
        _close(job, "input_fd")
        _close(job, "part_fd")
        if job.part is not None and failure is not None:
            with contextlib.suppress(OSError):
                job.part.unlink()
        # After a failure too: failed restores' safety dumps had piled up past the bound.
        self._prune(job)
        if failure is None:
            self._succeeded(job)
        else:
            self._failed(job, failure)
        self._next_job(app)

    def _prune(self, job: _Job) -> None:
        request = job.request
        serving = request.version if isinstance(request, RestoreDatabase) else request.serving
        pruned = prune(self.backups_dir, request.app, self.keep, serving)
        if pruned:
            log.info("%s: deleted old backup(s) %s", request.app, ", ".join(pruned))

    def _succeeded(self, job: _Job) -> None:
        request, backup = job.request, job.backup
        assert backup is not None
        if isinstance(request, RestoreDatabase):
            assert job.restoring is not None
            log.info("%s: database restored from %s", request.app, job.restoring.name)
            result = {"app": request.app, "restored": info_json(job.restoring)}
            result["safety_backup"] = info_json(backup)
            request.reply.set_result(result)
            return
        if request.deploy_id is not None:
            self.report(BackupTaken(app=request.app, deploy_id=request.deploy_id, backup=backup))
        if request.reply is not None:
            request.reply.set_result({"app": request.app, "backup": info_json(backup)})

    def _failed(self, job: _Job, failure: str | RequestRefused) -> None:
        request = job.request
        if isinstance(failure, RequestRefused):
            refusal = failure
        else:
            what = "restore" if isinstance(request, RestoreDatabase) else "backup"
            # A deploy's backup: the supervisor's line says what it meant for the deploy
            # (failed, or released anyway); a second ERROR for one failure was noise.
            for_deploy = isinstance(request, BackupDatabase) and request.deploy_id is not None
            level = logging.INFO if for_deploy else logging.ERROR
            log.log(level, "%s: database %s failed: %s", request.app, what, failure)
            refusal = RequestRefused(500, f"{what} failed: {failure}")
        if isinstance(request, BackupDatabase) and request.deploy_id is not None:
            reason = str(failure) if isinstance(failure, str) else refusal.message
            self.report(BackupFailed(app=request.app, deploy_id=request.deploy_id, reason=reason))
        if request.reply is not None:
            request.reply.set_exception(refusal)

    # -- steps: each starts one child -------------------------------------------------------

    def _start_dump(self, job: _Job) -> None:
        """pg_dump into a hidden .part file (kind RESTORE when it precedes a restore)."""
        request = job.request
        kind = request.kind if isinstance(request, BackupDatabase) else BackupKind.RESTORE
        folder = app_dir(self.backups_dir, request.app)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        name = backup_name(kind, request.version, time.time())
        job.backup = parse_name(request.app, name)
        job.part = folder / f".{name}.part"
        # Read and write: keter reads its first bytes back (DUMP_MAGIC).
        job.part_fd = os.open(
            job.part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        args = ["--format=custom", "--no-password"]
        self._spawn(job, "pg_dump", args, stdout=job.part_fd, bounded=True)

    def _dump_written(self, job: _Job) -> None:
        """The dump is complete: make it durable and give it its name."""
        assert job.part is not None and job.part_fd is not None and job.backup is not None
        os.fsync(job.part_fd)
        size = os.fstat(job.part_fd).st_size
        _close(job, "part_fd")
        final = job.part.with_name(job.backup.name)
        os.replace(job.part, final)
        fsync_dir(final.parent)
        job.part = None
        job.backup = dataclasses.replace(job.backup, size=size)

    def _start_pg_restore(self, job: _Job) -> None:
        """pg_restore turns the chosen backup into SQL, into a temporary file."""
        assert job.restoring is not None
        folder = app_dir(self.backups_dir, job.request.app)
        job.input_fd = os.open(folder / job.restoring.name, os.O_RDONLY | os.O_NOFOLLOW)
        job.part = folder / f".restore-{job.number}.sql.part"
        with contextlib.suppress(FileNotFoundError):
            job.part.unlink()
        job.part_fd = os.open(
            job.part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        args = ["--no-owner", "--no-acl", "--file=-"]
        self._spawn(job, "pg_restore", args, stdin=job.input_fd, stdout=job.part_fd, bounded=True)

    def _start_psql(self, job: _Job) -> None:
        """psql runs DROP OWNED and the SQL in one transaction (see the module docstring)."""
        assert job.part_fd is not None and job.part is not None
        job.input_fd, job.part_fd = job.part_fd, None
        os.lseek(job.input_fd, 0, os.SEEK_SET)
        os.unlink(job.part)  # the open descriptor keeps it readable
        job.part = None
        args = [
            "--no-psqlrc",
            "--no-password",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            "--single-transaction",
            "--command=DROP OWNED BY CURRENT_USER",
            "--file=-",
        ]
        self._spawn(job, "psql", args, stdin=job.input_fd, stdout=subprocess.DEVNULL)

    def _spawn(
        self,
        job: _Job,
        program: str,
        args: list[str],
        bounded: bool = False,
        **streams: object,
    ) -> None:
        """Start ``program``; a ``bounded`` one (writing ``job.part_fd``) gets its share of
        what is free on ROOT's disk above the reserve (keter.diskshare)."""
        request = job.request
        job.program = program
        identity = self._identity(request)
        run_as = credentials(identity)
        command = [pg_program(program), *args]
        job.child = subprocess.Popen(
            # The app's data shapes how much memory they take (pg_dump holds every large
            # object's entry): the OOM killer picks them before keter, as it picks apps.
            oom_first(command),
            env=program_env(request.db),
            cwd="/",
            stdin=streams.pop("stdin", subprocess.DEVNULL),
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            **streams,
            **run_as,
        )
        uid = identity.uid if identity is not None else os.getuid()
        if bounded:
            assert job.part_fd is not None
            gid = identity.gid if identity is not None else os.getgid()
            self._disk.add(job, request.app, job.child.pid, job.part_fd, uid, gid)
        log.info("%s: %s started (pid %d, uid %d)", request.app, program, job.child.pid, uid)

    def _identity(self, request: BackupDatabase | RestoreDatabase) -> Identity | None:
        """Who the app's processes run as, decided as the process monitor decides it."""
        if request.user is not None:
            try:
                return Identity.of_user(request.user)
            except KeyError:
                raise BackupFailure(f"unknown user {request.user!r}") from None
        if self.users is not None:
            uid = self.users.uid(tools_key(request.app))
            return Identity(uid, uid)
        return None


def _kill(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def _close(job: _Job, attribute: str) -> None:
    fd = getattr(job, attribute)
    if fd is not None:
        setattr(job, attribute, None)
        with contextlib.suppress(OSError):
            os.close(fd)
