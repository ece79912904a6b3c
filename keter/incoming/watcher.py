"""The incoming-folder watcher: turns file-system noise into one fact per bundle change.

watchdog's observer thread only forwards raw paths into this actor's inbox;
all decisions happen here, on this actor's own thread.

Which files are bundles? ``NAME.keter`` with a valid app name that is a
regular file (``files.py``): a FIFO, socket, device, folder or symbolic link
under such a name is refused with one line, once per entry, and is never
opened or followed. A refused entry changes nothing: the running version of
the app keeps serving until a bundle replaces it or the name disappears.

When is a bundle "completely written"? A writer that closes the file (cp,
scp, a text editor) gives inotify's close-write, and a bundle renamed into
the folder is complete by construction; both are trusted after a short quiet
period. A small bundle (``FAST_CHECK_BYTES``) renamed in needs no quiet period
when its gzip stream is whole and the tar inside it ends with its
end-of-archive marker: nothing is missing, even if the writer was about to
append another gzip member (the unpacker stops at the tar's end anyway). A
close-write never skips it: ``cp`` run again truncates the same inode at once.
A file untouched (by its ctime) for ``GIVE_UP_QUIET`` is done as well:
nobody is writing it. Anything else (a touch, a write we saw no close for, a
young file found by a scan) is in doubt, and its gzip stream is checked
(``gzipcheck.py``) one slice per message, so the check never holds up other
files, the end of the start-up scan (``ScanCompleted``, systemd's READY=1)
or anything else. A half-written bundle never reaches the unpacker; a truly
truncated one is still reported once it has been quiet for ``GIVE_UP_QUIET``,
so the user hears about it.

The kernel drops inotify events for a reader that falls behind once its
queue is full (a burst of thousands of files on a busy machine); the watcher
then looks at every file again (``_OverflowAlarm``).

Whatever goes wrong while handling one file (an error nobody anticipated
included) is that file's failure: one line, and the watcher carries on.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from keter.actor import Actor
from keter.config import KeterConfig
from keter.incoming.files import NotABundleFile, Stamp, look, open_regular
from keter.incoming.gzipcheck import GzipCheck, Verdict
from keter.incoming.unpack import stream_limit
from keter.messages import (
    BundleArrived,
    BundleIgnored,
    BundleRemoved,
    Component,
    Rescan,
    ScanCompleted,
)
from keter.names import log_text, validate_app_name
from keter.threadnames import name_thread

log = logging.getLogger(__name__)

SUFFIX = ".keter"
# After a close-write or a rename, wait this long for further events before trusting the file.
CLOSED_QUIET = 0.05
# Without a close-write, the file must be quiet this long before its gzip stream is checked.
DOUBT_QUIET = 0.25
# A file quiet this long is done: reported even if its stream is incomplete (truly truncated).
GIVE_UP_QUIET = 30.0
# A bundle up to this size is checked at once on its close-write or rename (one gzip step,
# capped as below): complete, it is reported without the quiet period.
FAST_CHECK_BYTES = 1 << 20
FAST_CHECK_OUTPUT = 4 << 20
# The events that can change what a name in incoming/ holds. Left out: opens and
# closes without a write (reads: keter's own gzip check, the unpacker, the archive)
# and the folder's own "modified" (every change inside it): watchdog then asks
# inotify for none of them. A drop of 1000 bundles gave the observer 14,000 events
# to turn into objects and pass on (copied in under hidden names, renamed, each
# read three times) instead of 4,000.
WATCHED_EVENTS = (
    FileCreatedEvent,
    FileModifiedEvent,  # writes (this also asks inotify for attribute changes) ...
    FileAttribEvent,  # ... which watchdog reports apart: a touch
    FileClosedEvent,  # close-write: the writer is done
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,  # a folder under a bundle's name deserves its line
    DirMovedEvent,
    DirDeletedEvent,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class _PathTouched:
    """Private: the observer saw something happen to ``path``."""

    path: str
    certain: bool  # close-write or rename-in: the writer is done
    # Renamed in: this inode is whole and nobody rewrites it in place (a newer copy
    # renamed over it is another inode), so it may skip the quiet period.
    renamed: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class _Settle:
    """Private timer: look again at a file that may have settled."""

    app: str


@dataclass(frozen=True, kw_only=True, slots=True)
class _EventsLost:
    """Private: the kernel dropped inotify events (its queue for us was full)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _CheckStep:
    """Private: do the next slice of check ``check_id`` (sent to the inbox, so it
    takes its turn with every other message)."""

    app: str
    check_id: int


@dataclass(kw_only=True, slots=True)
class _Pending:
    """A bundle file that changed and is not reported yet."""

    stamp: Stamp | None
    certain: bool
    last_event: float  # time.monotonic()
    timer_due: float = 0.0
    check: GzipCheck | None = None  # a completeness check under way ...
    check_fd: int = -1  # ... on this descriptor ...
    check_id: int = 0  # ... and its number
    incomplete: Stamp | None = None  # the version a finished check found incomplete
    at_start: bool = False  # found by the first scan, unchanged since


class _Forwarder(FileSystemEventHandler):
    """Runs on watchdog's thread: forwards, decides nothing."""

    def __init__(self, inbox: queue.Queue) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Folders are forwarded too: one named NAME.keter deserves its line.
        if isinstance(event, FileMovedEvent) or event.event_type == "moved":
            # Moved out (or renamed away) is a possible removal; moved in is a complete file.
            self._inbox.put(_PathTouched(path=os.fsdecode(event.src_path), certain=False))
            dest = os.fsdecode(event.dest_path)
            self._inbox.put(_PathTouched(path=dest, certain=True, renamed=True))
        else:
            certain = isinstance(event, FileClosedEvent)
            self._inbox.put(_PathTouched(path=os.fsdecode(event.src_path), certain=certain))


class _OverflowAlarm(logging.Filter):
    """Runs on watchdog's thread: turns watchdog's WARNING that the kernel dropped
    events into ``_EventsLost`` (the line itself is logged as usual).

    The kernel queues a limited number of inotify events (``max_queued_events``,
    16384 by default) for a reader that falls behind, and then only says that it
    dropped some. For a folder watched without recursion, watchdog (7.x) passes
    nothing on to handlers but this log record: the bundles whose events were
    lost would wait for a ``systemctl reload keter`` (SIGHUP: a rescan).
    """

    LOGGER = "watchdog.observers.inotify_c"

    def __init__(self, inbox: queue.Queue) -> None:
        super().__init__()
        self._inbox = inbox

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Inotify queue overflowed"):
            self._inbox.put(_EventsLost())
        return True  # not False: another watcher in this process may need it too


class IncomingWatcher(Actor):
    """Reports BundleArrived / BundleRemoved / BundleIgnored for ``incoming_dir``.

    ``expand_limit`` is how far the unpacker lets a bundle's tar stream grow
    (``unpack.stream_limit``): the completeness check stops there, since a
    bundle that grows further is refused whatever follows.
    """

    def __init__(
        self,
        incoming_dir: Path,
        *,
        report_to: queue.Queue,
        expand_limit: int = stream_limit(KeterConfig.max_unpacked_bytes, KeterConfig.max_members),
    ) -> None:
        super().__init__(Component.WATCHER, report_to)
        self.incoming_dir = Path(incoming_dir)
        self.expand_limit = expand_limit
        self._observer: Observer | None = None
        self._pending: dict[str, _Pending] = {}
        self._reported: dict[str, Stamp] = {}  # app -> stamp last reported as arrived
        self._ignored: set[str] = set()  # file names that are no app name
        self._refused: dict[str, tuple[int, ...]] = {}  # file name -> identity of what was refused
        self._check_ids = itertools.count(1)
        self._alarm = _OverflowAlarm(self.inbox)

    # -- lifecycle -------------------------------------------------------------------

    def on_start(self) -> None:
        alarmed = logging.getLogger(_OverflowAlarm.LOGGER)
        alarmed.addFilter(self._alarm)
        if not alarmed.isEnabledFor(logging.WARNING):
            alarmed.setLevel(logging.WARNING)  # the note must be made to be heard
        # Watch before scanning so nothing written during the scan is missed.
        self._observer = Observer()
        self._observer.name = "keter-watchdog"
        self._observer.schedule(
            _Forwarder(self.inbox),
            str(self.incoming_dir),
            recursive=False,
            event_filter=list(WATCHED_EVENTS),
        )
        self._observer.start()
        name_thread(self._observer)
        for emitter in self._observer.emitters:
            emitter.name = "keter-inotify"
            name_thread(emitter)
        self._scan(initial=True)
        # Bundles in doubt are still being checked; they follow when settled.
        self.report(ScanCompleted())

    def on_stop(self) -> None:
        for pending in self._pending.values():
            self._cancel_check(pending)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
        logging.getLogger(_OverflowAlarm.LOGGER).removeFilter(self._alarm)

    # -- messages --------------------------------------------------------------------

    def handle(self, message: object) -> None:
        match message:
            case _PathTouched(path=path, certain=certain, renamed=renamed):
                self._guarded(os.path.basename(path), self._touched, Path(path), certain, renamed)
            case _Settle(app=app):
                self._guarded(app + SUFFIX, self._settle, app)
            case _CheckStep(app=app, check_id=check_id):
                self._guarded(app + SUFFIX, self._check_step, app, check_id)
            case Rescan():
                self.take_queued(Rescan)  # asked meanwhile (a burst of SIGHUPs): this one does
                log.info("incoming: rescanning %s", self.incoming_dir)
                self._scan(initial=False)
            case _EventsLost():
                log.info("incoming: file events were lost; rescanning %s", self.incoming_dir)
                self._scan(initial=False)
            case _:
                self.unexpected(message)

    # -- one file's failure ----------------------------------------------------------

    def _guarded(self, filename: str, step, *args) -> None:
        """Run one step of handling ``filename``; an exception fails that file alone."""
        try:
            step(*args)
        except Exception as exc:
            self._file_failed(filename, exc)

    def _file_failed(self, filename: str, exc: Exception) -> None:
        # Anything but the file system's refusal is a bug of keter's: its traceback is
        # what a fix needs (and it names no value of the file's).
        level = logging.DEBUG if isinstance(exc, OSError) else logging.ERROR
        log.log(level, "incoming: %s failed:\n%s", log_text(filename), traceback.format_exc())
        app = filename.removesuffix(SUFFIX)
        if (pending := self._pending.pop(app, None)) is not None:
            self._cancel_check(pending)
        try:
            stamp = look(self.incoming_dir / filename)
        except Exception:  # the file cannot even be looked at: remember that
            stamp = None
        if isinstance(exc, OSError):
            reason = f"cannot read it: {exc.strerror or exc}"
        else:
            reason = f"unexpected error while watching it: {type(exc).__name__}: {exc}"
        self._refuse(filename, stamp, log_text(reason))

    def _refuse(self, filename: str, stamp: Stamp | None, reason: str) -> None:
        """One ERROR line (and one BundleIgnored) per refused entry, however often it is touched."""
        identity = _identity(stamp)
        if self._refused.get(filename) == identity:
            return
        self._refused[filename] = identity
        log.error("%s: refused: %s", log_text(filename), reason)
        self.report(BundleIgnored(filename=filename, reason=reason))

    # -- internals -------------------------------------------------------------------

    def _app_of(self, path: Path) -> str | None:
        """The app a path in incoming/ stands for, or None if it is not a bundle."""
        if path.parent != self.incoming_dir or not path.name.endswith(SUFFIX):
            return None
        if path.name.startswith("."):
            return None  # scp/rsync temp names and editors' swap files
        name = path.name[: -len(SUFFIX)]
        try:
            return validate_app_name(name)
        except ValueError as exc:
            if path.name not in self._ignored:
                self._ignored.add(path.name)
                reason = log_text(exc)
                log.error("%s: ignored: %s", log_text(path.name), reason)
                self.report(BundleIgnored(filename=path.name, reason=reason))
            return None

    def _touched(self, path: Path, certain: bool, renamed: bool = False) -> None:
        app = self._app_of(path)
        if app is None:
            return
        now = time.monotonic()
        stamp = look(path)
        pending = self._pending.get(app)
        if pending is None:
            pending = self._pending[app] = _Pending(stamp=None, certain=certain, last_event=now)
        else:
            pending.last_event = now
            # A close after writes settles the doubt; later writes raise it again. But a
            # close cannot shrink a file: smaller than at the events before, the file was
            # truncated since by a newer writer (cp again) whose close is still to come.
            pending.certain = certain and not _shrank(pending.stamp, stamp)
            pending.at_start = False  # written since keter started
            self._cancel_check(pending)  # it was reading an older version
        pending.stamp = stamp
        if renamed and self._complete_now(path, pending.stamp):
            del self._pending[app]  # its timer finds nothing pending
            self._arrived(app, path, pending.stamp)
            return
        self._wake(app, CLOSED_QUIET if certain else DOUBT_QUIET)

    def _complete_now(self, path: Path, stamp: Stamp | None) -> bool:
        """Whether a small bundle just renamed in is whole now.

        Only a rename: a close-write may be followed at once by the next copy's
        truncating rewrite of the same inode (``cp`` again), which would pull the
        file from under the unpacker; the quiet period lets such a burst settle.

        Whole means: still this very version, a complete gzip stream, and a tar
        archive inside that has ended. Anything else (a bigger file, a stream that
        needs more than one bounded step, a version refused before) takes the usual
        way, with its quiet period.
        """
        if stamp is None or not stamp.regular or stamp.size > FAST_CHECK_BYTES:
            return False
        if self._refused.get(path.name) == _identity(stamp):
            return False
        try:
            fd, st = open_regular(path)
        except (NotABundleFile, OSError):
            return False
        try:
            if Stamp.of_stat(st) != stamp:
                return False
            check = GzipCheck(fd, self.expand_limit)
            verdict = check.step(max_input=FAST_CHECK_BYTES + 1, max_output=FAST_CHECK_OUTPUT)
            if verdict is not Verdict.COMPLETE or not check.tar_ended:
                return False
        finally:
            os.close(fd)
        return look(path) == stamp  # not written to while it was read

    def _wake(self, app: str, delay: float) -> None:
        pending = self._pending[app]
        due = time.monotonic() + delay
        # One timer per file is enough: a later due time supersedes an earlier one.
        if pending.timer_due <= time.monotonic() or due < pending.timer_due:
            pending.timer_due = due
            self.schedule(delay, _Settle(app=app))

    def _settle(self, app: str) -> None:
        pending = self._pending.get(app)
        if pending is None or pending.check is not None:
            return  # nothing to do, or a check under way will decide
        now = time.monotonic()
        quiet_needed = CLOSED_QUIET if pending.certain else DOUBT_QUIET
        quiet = now - pending.last_event
        if quiet < quiet_needed:
            self._wake(app, quiet_needed - quiet)
            return
        path = self.incoming_dir / f"{app}{SUFFIX}"
        stamp = look(path)
        if stamp != pending.stamp:
            # Changed since the last event we saw (events can be coalesced or still on
            # their way); start over. A close seen earlier no longer vouches for these
            # newer writes: doubt until their own close-write event arrives.
            self._doubt(app, pending, stamp)
            return
        if stamp is None:
            del self._pending[app]
            self._gone(app)
            return
        if (reason := stamp.refusal()) is not None:
            del self._pending[app]
            self._refuse(path.name, stamp, reason)
            return
        if self._refused.get(path.name) == _identity(stamp):
            del self._pending[app]  # this very version failed before: said once already
            return
        if not pending.certain and quiet < GIVE_UP_QUIET:
            if pending.incomplete == stamp:
                # Checked and found incomplete, and nothing changed since: wait (looking
                # now and then, in case an event was lost) until it has been quiet enough.
                self._wake(app, min(max(quiet, 1.0), GIVE_UP_QUIET - quiet + 0.01))
            else:
                self._start_check(app, pending, path)
            return
        if pending.incomplete == stamp:
            log.warning("%s: bundle has been incomplete for %.0fs; deploying it anyway", app, quiet)
        del self._pending[app]
        self._arrived(app, path, stamp, at_start=pending.at_start)

    def _doubt(self, app: str, pending: _Pending, stamp: Stamp | None) -> None:
        self._cancel_check(pending)
        pending.stamp, pending.last_event, pending.certain = stamp, time.monotonic(), False
        self._wake(app, DOUBT_QUIET)

    def _start_check(self, app: str, pending: _Pending, path: Path) -> None:
        try:
            fd, st = open_regular(path)
        except NotABundleFile as exc:  # swapped for something else since the look
            del self._pending[app]
            self._refuse(path.name, look(path), str(exc))
            return
        except FileNotFoundError:
            self._doubt(app, pending, None)
            return
        if Stamp.of_stat(st) != pending.stamp:
            os.close(fd)
            self._doubt(app, pending, look(path))
            return
        pending.check = GzipCheck(fd, self.expand_limit)
        pending.check_fd, pending.check_id = fd, next(self._check_ids)
        self.inbox.put(_CheckStep(app=app, check_id=pending.check_id))

    def _check_step(self, app: str, check_id: int) -> None:
        pending = self._pending.get(app)
        if pending is None or pending.check is None or pending.check_id != check_id:
            return  # cancelled: the file changed or went away
        verdict = pending.check.step()
        if verdict is None:
            self.inbox.put(_CheckStep(app=app, check_id=check_id))
            return
        self._cancel_check(pending)
        path = self.incoming_dir / f"{app}{SUFFIX}"
        stamp = look(path)
        if stamp != pending.stamp:
            self._doubt(app, pending, stamp)  # written to while being read: the verdict is void
            return
        if verdict is Verdict.INCOMPLETE:
            pending.incomplete = stamp
            quiet = time.monotonic() - pending.last_event
            self._wake(app, min(max(quiet, 1.0), GIVE_UP_QUIET - quiet + 0.01))
            return
        # COMPLETE, or HOPELESS: nothing appended could save it, so the unpacker
        # may as well refuse it now, with its own reason.
        del self._pending[app]
        self._arrived(app, path, stamp, at_start=pending.at_start)

    def _cancel_check(self, pending: _Pending) -> None:
        if pending.check is not None:
            pending.check = None
            os.close(pending.check_fd)
            pending.check_fd = -1

    def _arrived(self, app: str, path: Path, stamp: Stamp, *, at_start: bool = False) -> None:
        self._refused.pop(path.name, None)  # a good version ends an earlier refusal
        if self._reported.get(app) == stamp:
            return  # an event without a change (e.g. a chmod): already deployed
        self._reported[app] = stamp
        self.report(
            BundleArrived(
                app=app, path=path, mtime_ns=stamp.mtime_ns, size=stamp.size, at_start=at_start
            )
        )

    def _gone(self, app: str) -> None:
        self._refused.pop(app + SUFFIX, None)
        if self._reported.pop(app, None) is not None:
            self.report(BundleRemoved(app=app))

    def _scan(self, *, initial: bool) -> None:
        present: set[str] = set()
        with os.scandir(self.incoming_dir) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            self._guarded(name, self._scan_one, self.incoming_dir / name, present, initial)
        if not initial:
            for app in set(self._reported) - present - set(self._pending):
                self._gone(app)

    def _scan_one(self, path: Path, present: set[str], initial: bool) -> None:
        app = self._app_of(path)
        if app is None:
            return
        stamp = look(path)
        if stamp is None:
            return  # removed since the listing
        present.add(app)  # a refused entry keeps the running version: not a removal
        if app in self._pending:
            return  # already being watched settle
        if (reason := stamp.refusal()) is not None:
            self._refuse(path.name, stamp, reason)
            return
        if self._reported.get(app) == stamp or self._refused.get(path.name) == _identity(stamp):
            return
        # How long nobody has changed it (ctime cannot be set by a writer).
        age = max(0.0, time.time() - stamp.ctime_ns / 1e9)
        if age >= GIVE_UP_QUIET:
            # Done by the give-up rule: no need to read it.
            self._arrived(app, path, stamp, at_start=initial)
            return
        # Possibly still being written: let the usual settling decide.
        self._pending[app] = _Pending(
            stamp=stamp, certain=False, last_event=time.monotonic() - age, at_start=initial
        )
        self._wake(app, max(0.0, DOUBT_QUIET - age))


def _shrank(before: Stamp | None, now: Stamp | None) -> bool:
    """Whether the same file got smaller (truncated) between two looks."""
    if before is None or now is None:
        return False
    return now.ino == before.ino and now.size < before.size


def _identity(stamp: Stamp | None) -> tuple[int, ...]:
    """What makes a refused entry the same one: a FIFO or socket being written to
    changes its size and mtime, but is still the entry already refused."""
    if stamp is None:
        return ()
    if stamp.regular:
        return (stamp.kind, stamp.ino, stamp.size, stamp.mtime_ns)
    return (stamp.kind, stamp.ino)
