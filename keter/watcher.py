"""The incoming-folder watcher: turns file-system noise into one fact per bundle change.

watchdog's observer thread only forwards raw paths into this actor's inbox;
all decisions happen here, on this actor's own thread.

When is a bundle "completely written"? A writer that closes the file (cp,
scp, a text editor) gives inotify's close-write, and a bundle renamed into
the folder is complete by construction; both are trusted after a short quiet
period. Anything else (a touch, a write we saw no close for, a rescan, the
initial scan) is in doubt, so the gzip stream itself is checked: it must end
with a complete gzip member. A half-written bundle therefore never reaches the
unpacker, and a truly truncated one is still reported once it has been quiet
for a long time, so the user hears about it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from keter.actor import Actor
from keter.bundle import validate_app_name
from keter.messages import (
    BundleArrived,
    BundleIgnored,
    BundleRemoved,
    Rescan,
    ScanCompleted,
)

log = logging.getLogger(__name__)

SUFFIX = ".keter"
# After a close-write or a rename, wait this long for further events before trusting the file.
CLOSED_QUIET = 0.05
# Without a close-write, the file must be quiet this long before its gzip stream is checked.
DOUBT_QUIET = 0.25
# A file still incomplete after being quiet this long is reported anyway (truly truncated).
GIVE_UP_QUIET = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class _PathTouched:
    """Private: the observer saw something happen to ``path``."""

    path: str
    certain: bool  # close-write or rename-in: the writer is done


@dataclass(frozen=True, kw_only=True, slots=True)
class _Settle:
    """Private timer: look again at a file that may have settled."""

    app: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Stamp:
    """What identifies one version of a bundle file."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stamp | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return cls(ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


@dataclass(kw_only=True, slots=True)
class _Pending:
    stamp: Stamp | None
    certain: bool
    last_event: float  # time.monotonic()
    timer_due: float = 0.0


class _Forwarder(FileSystemEventHandler):
    """Runs on watchdog's thread: forwards, decides nothing."""

    def __init__(self, inbox: queue.Queue) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            # Moved out (or renamed away) is a possible removal; moved in is a complete file.
            self._inbox.put(_PathTouched(path=os.fsdecode(event.src_path), certain=False))
            self._inbox.put(_PathTouched(path=os.fsdecode(event.dest_path), certain=True))
        elif event.event_type in ("opened", "closed_no_write"):
            return  # reads (our own gzip check, the unpacker) are not changes
        else:
            certain = isinstance(event, FileClosedEvent)
            self._inbox.put(_PathTouched(path=os.fsdecode(event.src_path), certain=certain))


def gzip_complete(path: Path) -> bool:
    """True if the file is one or more complete gzip members: nothing is missing at its end.

    Decompresses into a bounded buffer that is thrown away, so memory stays
    flat whatever the bundle's size.
    """
    try:
        with open(path, "rb") as f:
            decomp, fed, members = zlib.decompressobj(wbits=31), False, 0
            while chunk := f.read(1 << 20):
                while chunk:
                    if decomp.eof:  # a concatenated gzip member follows
                        decomp, fed = zlib.decompressobj(wbits=31), False
                    fed = True
                    decomp.decompress(chunk, 1 << 16)
                    if decomp.eof:
                        members += 1
                        chunk = decomp.unused_data
                    else:
                        chunk = decomp.unconsumed_tail
            return members > 0 and (decomp.eof or not fed)
    except (OSError, zlib.error):
        return False


class IncomingWatcher(Actor):
    """Reports BundleArrived / BundleRemoved for ``incoming_dir`` to the supervisor."""

    def __init__(self, incoming_dir: Path, *, report_to: queue.Queue) -> None:
        super().__init__("watcher", report_to)
        self.incoming_dir = Path(incoming_dir)
        self._observer: Observer | None = None
        self._pending: dict[str, _Pending] = {}
        self._reported: dict[str, Stamp] = {}  # app -> stamp last reported as arrived
        self._ignored: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------

    def on_start(self) -> None:
        # Watch before scanning so nothing written during the scan is missed.
        self._observer = Observer()
        self._observer.name = "keter-watchdog"
        self._observer.schedule(_Forwarder(self.inbox), str(self.incoming_dir), recursive=False)
        self._observer.start()
        self._scan(initial=True)
        self.report(ScanCompleted())

    def on_stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()

    # -- messages --------------------------------------------------------------------

    def handle(self, message: object) -> None:
        match message:
            case _PathTouched(path=path, certain=certain):
                self._touched(Path(path), certain)
            case _Settle(app=app):
                self._settle(app)
            case Rescan():
                log.info("incoming: rescanning %s", self.incoming_dir)
                self._scan(initial=False)
            case _:
                self.unexpected(message)

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
                # A name with a newline or other control character would forge log lines.
                shown = path.name if path.name.isprintable() else json.dumps(path.name)
                log.error("%s: ignored: %s", shown, exc)
                self.report(BundleIgnored(filename=path.name, reason=str(exc)))
            return None

    def _touched(self, path: Path, certain: bool) -> None:
        app = self._app_of(path)
        if app is None:
            return
        now = time.monotonic()
        pending = self._pending.get(app)
        if pending is None:
            pending = self._pending[app] = _Pending(stamp=None, certain=certain, last_event=now)
        else:
            pending.last_event = now
            # A close after writes settles the doubt; later writes raise it again.
            pending.certain = certain
        pending.stamp = Stamp.of(path)
        self._wake(app, CLOSED_QUIET if certain else DOUBT_QUIET)

    def _wake(self, app: str, delay: float) -> None:
        pending = self._pending[app]
        due = time.monotonic() + delay
        # One timer per file is enough: a later due time supersedes an earlier one.
        if pending.timer_due <= time.monotonic() or due < pending.timer_due:
            pending.timer_due = due
            self.schedule(delay, _Settle(app=app))

    def _settle(self, app: str) -> None:
        pending = self._pending.get(app)
        if pending is None:
            return
        now = time.monotonic()
        quiet_needed = CLOSED_QUIET if pending.certain else DOUBT_QUIET
        quiet = now - pending.last_event
        if quiet < quiet_needed:
            self._wake(app, quiet_needed - quiet)
            return
        path = self.incoming_dir / f"{app}{SUFFIX}"
        stamp = Stamp.of(path)
        if stamp != pending.stamp:
            # Changed since the last event we saw (events can be coalesced or still on
            # their way); start over. A close seen earlier no longer vouches for these
            # newer writes: doubt until their own close-write event arrives.
            pending.stamp, pending.last_event, pending.certain = stamp, now, False
            self._wake(app, DOUBT_QUIET)
            return
        if stamp is None:
            del self._pending[app]
            self._gone(app)
            return
        if not pending.certain and not gzip_complete(path):
            if quiet < GIVE_UP_QUIET:
                self._wake(app, min(max(quiet, 1.0), GIVE_UP_QUIET - quiet + 0.01))
                return
            log.warning("%s: bundle has been incomplete for %.0fs; deploying it anyway", app, quiet)
        del self._pending[app]
        self._arrived(app, path, stamp)

    def _arrived(self, app: str, path: Path, stamp: Stamp) -> None:
        if self._reported.get(app) == stamp:
            return  # an event without a change (e.g. a chmod): already deployed
        self._reported[app] = stamp
        self.report(BundleArrived(app=app, path=path, mtime_ns=stamp.mtime_ns, size=stamp.size))

    def _gone(self, app: str) -> None:
        if self._reported.pop(app, None) is not None:
            self.report(BundleRemoved(app=app))

    def _scan(self, *, initial: bool) -> None:
        present: set[str] = set()
        for entry in sorted(os.scandir(self.incoming_dir), key=lambda e: e.name):
            if not entry.is_file():
                continue
            path = Path(entry.path)
            app = self._app_of(path)
            if app is None:
                continue
            present.add(app)
            if app in self._pending:
                continue  # already being watched settle
            stamp = Stamp.of(path)
            if stamp is None or self._reported.get(app) == stamp:
                continue
            if gzip_complete(path):
                self._arrived(app, path, stamp)
            else:
                # Possibly still being written: let the usual settling decide.
                self._pending[app] = _Pending(
                    stamp=stamp, certain=False, last_event=time.monotonic()
                )
                self._wake(app, DOUBT_QUIET)
        if not initial:
            for app in set(self._reported) - present - set(self._pending):
                self._gone(app)
