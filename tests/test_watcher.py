"""The incoming-folder watcher against real inotify events, and the gzip completeness check.

Every actor test starts a real IncomingWatcher on a private incoming/ folder,
writes files the way real tools do (cp, scp, rename-into-place, touch, chmod,
rm) and asserts exactly which reports arrive, then that nothing more does.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import os
import queue
import tarfile
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import BinaryIO

import pytest
from support import entries
from support.bundles import bundle_bytes, zero_gzip
from support.entries import OpenWatch, make_link_out, poke
from support.wait import wait_for

from keter.incoming import watcher as watcher_module
from keter.incoming.gzipcheck import GzipCheck, Verdict, check_file
from keter.incoming.watcher import (
    CLOSED_QUIET,
    DOUBT_QUIET,
    IncomingWatcher,
    _PathTouched,
    _Settle,
)
from keter.messages import BundleArrived, BundleIgnored, BundleRemoved, Rescan, ScanCompleted

MIB = 1 << 20
CHUNK = 64 * 1024  # cp-sized writes: a big bundle takes dozens of them

# The watcher reports a settled file at most DOUBT_QUIET after its last event
# (plus one gzip check), so a report that has not come within four times that
# will not come from the events the test caused.
NOTHING_WITHIN = 4 * DOUBT_QUIET
REPORT_TIMEOUT = 10.0


# -- bundles and writers -------------------------------------------------------------


def payload_bundle(payload_size: int) -> bytes:
    """A gzip tarball around random (incompressible) bytes: the size on disk ~ payload_size."""
    return bundle_bytes(
        config=None, app_source=None, files={"payload.bin": os.urandom(payload_size)}
    )


@cache
def small_bundle() -> bytes:
    return payload_bundle(2048)


@cache
def big_bundle() -> bytes:
    return payload_bundle(3 * MIB)


def write_chunks(f: BinaryIO, data: bytes) -> None:
    for start in range(0, len(data), CHUNK):
        f.write(data[start : start + CHUNK])


def copy_like_cp(path: Path, data: bytes) -> None:
    """Open (truncating), write in chunks, close: what cp does."""
    with open(path, "wb", buffering=0) as f:
        write_chunks(f, data)


def arrived(path: Path, *, at_start: bool = False) -> BundleArrived:
    """The report the file as it is now on disk deserves (``at_start``: found by the
    watcher's first scan, there before keter started)."""
    st = path.stat()
    return BundleArrived(
        app=path.name.removesuffix(".keter"),
        path=path,
        mtime_ns=st.st_mtime_ns,
        size=st.st_size,
        at_start=at_start,
    )


# -- reading reports -----------------------------------------------------------------


def next_report(q: queue.Queue, timeout: float = REPORT_TIMEOUT) -> object:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no report from the watcher within {timeout}s") from None


def no_report(q: queue.Queue, within: float = NOTHING_WITHIN) -> None:
    """Assert that nothing more is reported.

    The only bounded wait for "nothing happens" in this file: absence cannot be
    awaited, so it is observed for a window several times longer than the
    watcher's own settling delay (see NOTHING_WITHIN).
    """
    try:
        extra = q.get(timeout=within)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected report from the watcher: {extra!r}")


def run_until_idle(watcher: IncomingWatcher) -> None:
    """Play an unstarted watcher's loop by hand until no timer or message is left."""
    while watcher._timers or not watcher.inbox.empty():
        message = watcher._next_message()
        if message is not None:
            watcher.handle(message)


# -- the actor under test ------------------------------------------------------------


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    path = tmp_path / "incoming"
    path.mkdir()
    return path


@pytest.fixture
def reports() -> queue.Queue:
    return queue.Queue()


@pytest.fixture
def start_watcher(incoming: Path, reports: queue.Queue) -> Iterator[Callable[[], IncomingWatcher]]:
    """Starts the watcher on demand (so tests can prepare files first); always stops it."""
    started: list[IncomingWatcher] = []

    def start(**options: int) -> IncomingWatcher:
        watcher = IncomingWatcher(incoming, report_to=reports, **options)
        started.append(watcher)
        watcher.start()
        return watcher

    yield start
    for watcher in started:
        watcher.stop()
        watcher.join(timeout=10)
        assert not watcher.is_alive(), "the watcher did not stop"


@pytest.fixture
def watcher(start_watcher, reports: queue.Queue) -> IncomingWatcher:
    """A running watcher on an empty incoming/ whose initial scan is done."""
    started = start_watcher()
    assert next_report(reports) == ScanCompleted()
    return started


# -- initial scan --------------------------------------------------------------------


def test_initial_scan_reports_complete_bundles_then_waits_for_the_half_written(
    start_watcher, incoming: Path, reports: queue.Queue
) -> None:
    small, big = incoming / "small.keter", incoming / "big.keter"
    small.write_bytes(small_bundle())
    big.write_bytes(big_bundle())
    half = incoming / "half.keter"
    cut = len(big_bundle()) // 2
    half.write_bytes(big_bundle()[:cut])

    start_watcher()
    # Files this young may still be being written: the scan ends at once and their
    # checks follow, so the end of the scan (READY=1) never waits for a check.
    assert next_report(reports) == ScanCompleted()
    assert {next_report(reports), next_report(reports)} == {
        arrived(small, at_start=True),
        arrived(big, at_start=True),
    }
    no_report(reports)  # the half-written file is not reported while it stays incomplete

    with open(half, "ab", buffering=0) as f:
        write_chunks(f, big_bundle()[cut:])
    assert next_report(reports) == arrived(half)
    assert half.stat().st_size == len(big_bundle())
    no_report(reports)


# -- the ways a bundle gets written --------------------------------------------------


def test_cp_style_copy_is_reported_once_with_its_final_stamp(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    copy_like_cp(path, big_bundle())
    assert next_report(reports) == arrived(path)
    no_report(reports)


def test_slow_writer_is_reported_only_after_its_last_byte(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    data = big_bundle()
    # The last part is only the gzip trailer, so the file looks whole but for its end.
    parts = [data[: len(data) // 3], data[len(data) // 3 : -4], data[-4:]]
    path = incoming / "app.keter"
    with open(path, "wb", buffering=0) as f:  # scp: one open file, written as data comes in
        for i, part in enumerate(parts):
            write_chunks(f, part)
            if i < len(parts) - 1:
                # The scenario itself: a stalled network, longer than the watcher's
                # patience for a file without a close. Not a wait for an outcome.
                time.sleep(2 * DOUBT_QUIET)
                assert reports.empty(), f"reported before the last byte: {reports.get()!r}"
    assert next_report(reports) == arrived(path)
    assert path.stat().st_size == len(data)
    no_report(reports)


def test_complete_file_still_open_is_reported_once_and_not_again_on_close(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    with open(path, "wb", buffering=0) as f:
        write_chunks(f, big_bundle())
        # No close-write yet: the watcher must settle the doubt from the gzip stream.
        assert next_report(reports) == arrived(path)
    no_report(reports)  # the close changed nothing, so it is no new version


def test_hidden_temp_file_renamed_into_place_is_reported_once(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    temp, path = incoming / ".app.keter.part", incoming / "app.keter"
    copy_like_cp(temp, big_bundle())
    os.replace(temp, path)
    first = next_report(reports)
    assert first == arrived(path)

    # Replacing a deployed bundle the same way is a new version.
    copy_like_cp(temp, big_bundle())
    os.replace(temp, path)
    second = next_report(reports)
    assert second == arrived(path)
    assert second != first
    no_report(reports)  # in particular nothing about the hidden name


def test_reading_a_bundle_wakes_nothing(
    start_watcher, incoming: Path, reports: queue.Queue, monkeypatch
) -> None:
    """keter reads every bundle several times (the gzip check, the unpacker, the
    archive): those opens and closes are no change and never reach the watcher,
    nor does the folder's own "modified" after each change inside it."""
    seen: list[str] = []
    forward = watcher_module._Forwarder.on_any_event

    def spy(self, event) -> None:
        seen.append(f"{event.event_type} {os.path.basename(event.src_path)}")
        forward(self, event)

    monkeypatch.setattr(watcher_module._Forwarder, "on_any_event", spy)
    start_watcher()
    assert next_report(reports) == ScanCompleted()
    path = incoming / "app.keter"
    copy_like_cp(path, small_bundle())
    assert next_report(reports) == arrived(path)
    assert seen and all(line.endswith(" app.keter") for line in seen), seen

    seen.clear()
    for _ in range(3):
        path.read_bytes()
    (incoming / ".sentinel").touch()  # its event comes after any the reads caused
    wait_for(lambda: seen, what="the sentinel's event")
    assert seen[0] == "created .sentinel", seen
    no_report(reports)


def test_touch_redeploys_and_chmod_does_not(watcher, incoming: Path, reports: queue.Queue) -> None:
    path = incoming / "app.keter"
    copy_like_cp(path, small_bundle())
    first = next_report(reports)
    assert first == arrived(path)

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touch
    touched = next_report(reports)
    assert touched == arrived(path)
    assert touched.mtime_ns == first.mtime_ns + 1_000_000_000

    path.chmod(0o600)  # an attribute event, but no new content or mtime
    no_report(reports)


def test_repeated_copies_only_ever_report_complete_files(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    data = big_bundle()
    for _ in range(3):
        copy_like_cp(path, data)
    final = arrived(path)

    # Earlier copies may or may not get their own report, but every report is of a
    # whole file, and the last one is of the file as it finally is.
    seen = []
    while not seen or seen[-1] != final:
        report = next_report(reports)
        assert isinstance(report, BundleArrived), report
        assert report.size == len(data), f"a partial file was reported: {report!r}"
        seen.append(report)
    assert len(seen) <= 3
    no_report(reports)


def test_an_earlier_close_does_not_vouch_for_writes_whose_events_are_late(
    incoming: Path, reports: queue.Queue
) -> None:
    """Regression: a settle timer that finds the file changed behind the events it has
    seen must doubt it, or a copy in progress is reported on the strength of the
    previous copy's close-write.

    inotify delivery lag cannot be produced on demand, so this drives the
    (unstarted) actor's handler directly with the events that did arrive.
    """
    watcher = IncomingWatcher(incoming, report_to=reports)
    path, data = incoming / "app.keter", big_bundle()
    copy_like_cp(path, data)
    watcher.handle(_PathTouched(path=str(path), certain=True))  # copy 1's close-write
    with open(path, "wb", buffering=0) as f:  # copy 2 starts; its events are still on the way
        write_chunks(f, data[: len(data) // 2])
        # Time passing with no events is the scenario here, not a wait for an outcome.
        time.sleep(2 * CLOSED_QUIET)
        watcher.handle(_Settle(app="app"))  # notices the file changed
        time.sleep(2 * DOUBT_QUIET)
        watcher.handle(_Settle(app="app"))
        assert reports.empty(), f"a partial file was reported: {reports.get()!r}"

        write_chunks(f, data[len(data) // 2 :])
    watcher.handle(_PathTouched(path=str(path), certain=True))  # copy 2's close-write
    time.sleep(2 * CLOSED_QUIET)
    watcher.handle(_Settle(app="app"))
    assert reports.get_nowait() == arrived(path)
    assert reports.empty()


def test_a_close_seen_after_the_next_copy_truncated_the_file_does_not_vouch_for_it(
    incoming: Path, reports: queue.Queue
) -> None:
    """Regression: a close-write whose event is handled only after the next copy (cp
    again) has truncated the file, and that copy then stalls, must not report the
    truncated file (seen under a benchmark's load: "bundle seen (0 bytes)", then a
    second deploy). A close cannot shrink a file, so a file smaller than at the events
    before is a newer writer's: doubted until that writer's own close.

    Driven through the (unstarted) actor's handler, as the test above.
    """
    watcher = IncomingWatcher(incoming, report_to=reports)
    path, data = incoming / "app.keter", big_bundle()
    with open(path, "wb", buffering=0) as f:  # copy 1, its write events seen as they come
        write_chunks(f, data)
        watcher.handle(_PathTouched(path=str(path), certain=False))
    with open(path, "wb", buffering=0) as f:  # copy 2 truncates the file ...
        watcher.handle(_PathTouched(path=str(path), certain=True))  # ... before copy 1's close
        # Copy 2 stalling is the scenario here, not a wait for an outcome.
        time.sleep(2 * CLOSED_QUIET)
        watcher.handle(_Settle(app="app"))
        time.sleep(2 * DOUBT_QUIET)
        watcher.handle(_Settle(app="app"))
        assert reports.empty(), f"a truncated file was reported: {reports.get()!r}"
        write_chunks(f, data)
    watcher.handle(_PathTouched(path=str(path), certain=True))  # copy 2's close-write
    time.sleep(2 * CLOSED_QUIET)
    watcher.handle(_Settle(app="app"))
    assert reports.get_nowait() == arrived(path)
    assert reports.empty()


def test_a_small_whole_bundle_renamed_in_needs_no_quiet_period(
    incoming: Path, reports: queue.Queue
) -> None:
    """A small bundle renamed in whole is reported at once; one written in place waits
    for its quiet period even when it is whole at its close (the next copy may already
    be truncating it), and so does a renamed stream cut between two gzip members
    (complete as gzip, its tar not ended).

    Drives the (unstarted) actor's handler directly: "at once" means while handling
    the event, before any timer.
    """
    watcher = IncomingWatcher(incoming, report_to=reports)
    path = incoming / "app.keter"
    temp = incoming / ".app.keter.part"
    tar = gzip.decompress(small_bundle())
    temp.write_bytes(gzip.compress(tar[:512]))  # one member of two: the tar has not ended
    os.replace(temp, path)
    watcher.handle(_PathTouched(path=str(path), certain=True, renamed=True))
    assert reports.empty(), f"a partial file was reported: {reports.get()!r}"

    path.write_bytes(small_bundle())  # whole, but written in place
    watcher.handle(_PathTouched(path=str(path), certain=True))  # its close-write
    assert reports.empty(), f"reported before its quiet period: {reports.get()!r}"

    temp.write_bytes(small_bundle())
    os.replace(temp, path)
    watcher.handle(_PathTouched(path=str(path), certain=True, renamed=True))
    assert reports.get_nowait() == arrived(path)
    assert reports.empty()


# -- removal -------------------------------------------------------------------------


def test_deleting_a_reported_bundle_is_reported_once(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    copy_like_cp(path, small_bundle())
    assert next_report(reports) == arrived(path)
    path.unlink()
    assert next_report(reports) == BundleRemoved(app="app")
    no_report(reports)


def test_deleting_a_never_reported_file_says_nothing(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "cancelled.keter"
    data = big_bundle()
    with open(path, "wb", buffering=0) as f:  # an upload cancelled half-way
        write_chunks(f, data[: len(data) // 2])
        path.unlink()
    no_report(reports)


# -- names that are not bundles ------------------------------------------------------


def test_bad_names_are_ignored_once_and_other_files_are_not_mentioned(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    names = ["bad name.keter", "a..b.keter", "x.txt", ".hidden.keter"]
    for name in names:
        copy_like_cp(incoming / name, small_bundle())
    ignored = {}
    for _ in range(2):
        report = next_report(reports)
        assert isinstance(report, BundleIgnored), report
        ignored[report.filename] = report.reason
    assert set(ignored) == {"bad name.keter", "a..b.keter"}
    assert '".."' in ignored["a..b.keter"]
    assert "letters, digits" in ignored["bad name.keter"]

    # More events on the same files repeat nothing.
    for name in names:
        with open(incoming / name, "ab") as f:
            f.write(b"more")
        os.utime(incoming / name, ns=(0, 0))
    no_report(reports)


# -- entries that are not regular files ------------------------------------------------


def make_folder(path: Path, secret: Path) -> None:
    path.mkdir()


NOT_REGULAR = {**entries.NOT_REGULAR, "folder": (make_folder, "folder")}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside incoming/ holding a secret a link may lead to."""
    path = tmp_path / "outside"
    path.mkdir()
    secret = path / "secret"
    secret.write_bytes(small_bundle())  # even a valid bundle: links are never followed
    secret.chmod(0o600)
    return path


@pytest.fixture
def watch_opens(outside: Path) -> Iterator[Callable[[], list[str]]]:
    """From the call on, record every opening of a file in ``outside``."""
    watches: list[OpenWatch] = []

    def start() -> list[str]:
        watches.append(OpenWatch(outside))
        return watches[-1].opened

    yield start
    for watch in watches:
        watch.close()


def refused(report: object, filename: str, kind: str) -> None:
    assert isinstance(report, BundleIgnored), report
    assert report.filename == filename
    assert kind in report.reason, report.reason


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_an_entry_that_is_no_regular_file_is_refused_once_and_never_opened(
    watcher, incoming: Path, outside: Path, watch_opens, reports: queue.Queue, kind: str
) -> None:
    make, word = NOT_REGULAR[kind]
    path = incoming / "x.keter"
    opened = watch_opens()
    make(path, outside / "secret")
    refused(next_report(reports), "x.keter", word)
    poke(path)
    watcher.tell(Rescan())
    no_report(reports)  # said once, however often it is touched

    # The watcher did not hang on it or die of it: a real bundle still arrives.
    good = incoming / "good.keter"
    copy_like_cp(good, small_bundle())
    assert next_report(reports) == arrived(good)
    assert opened == []


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_an_entry_that_is_no_regular_file_is_refused_at_start_up(
    start_watcher, incoming: Path, outside: Path, watch_opens, reports: queue.Queue, kind: str
) -> None:
    make, word = NOT_REGULAR[kind]
    make(incoming / "x.keter", outside / "secret")
    opened = watch_opens()
    good = incoming / "good.keter"
    good.write_bytes(small_bundle())
    watcher = start_watcher()
    refused(next_report(reports), "x.keter", word)
    assert next_report(reports) == ScanCompleted()
    assert next_report(reports) == arrived(good, at_start=True)
    watcher.tell(Rescan())
    no_report(reports)
    assert opened == []


def test_a_deployed_bundle_replaced_by_a_link_keeps_its_version(
    watcher, incoming: Path, outside: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    copy_like_cp(path, small_bundle())
    assert next_report(reports) == arrived(path)

    link = incoming / ".app.keter.new"
    make_link_out(link, outside / "secret")
    os.replace(link, path)  # refused, but it is no removal of the running version
    refused(next_report(reports), "app.keter", "symbolic link")
    watcher.tell(Rescan())
    no_report(reports)

    path.unlink()  # the name is gone: now the app is removed
    assert next_report(reports) == BundleRemoved(app="app")
    copy_like_cp(path, small_bundle())
    assert next_report(reports) == arrived(path)


def test_an_unexpected_error_with_one_file_fails_that_file_alone(
    watcher, incoming: Path, reports: queue.Queue, monkeypatch
) -> None:
    real_open = watcher_module.open_regular

    def open_regular(path: Path):
        if path.name == "boom.keter":
            raise RuntimeError("a bug nobody anticipated")
        return real_open(path)

    monkeypatch.setattr(watcher_module, "open_regular", open_regular)
    boom = incoming / "boom.keter"
    with open(boom, "wb", buffering=0) as f:  # no close-write yet: the check opens it
        f.write(small_bundle())
        report = next_report(reports)
        assert isinstance(report, BundleIgnored), report
        assert report.filename == "boom.keter"
        assert "RuntimeError: a bug nobody anticipated" in report.reason

    good = incoming / "good.keter"
    copy_like_cp(good, small_bundle())
    assert next_report(reports) == arrived(good)
    assert watcher.is_alive()
    # A new version of the failed file is looked at afresh.
    copy_like_cp(boom, big_bundle())
    assert next_report(reports) == arrived(boom)
    no_report(reports)


def test_a_zero_bomb_at_start_up_delays_neither_the_scan_nor_other_bundles(
    start_watcher, incoming: Path, reports: queue.Queue
) -> None:
    """4 MB of deflated zeros (4 GB inflated) took 9 s to check before the scan ended."""
    bomb = zero_gzip(incoming / "zeros.keter", 4 * MIB)
    older = incoming / "older.keter"
    older.write_bytes(small_bundle())

    # The order of the reports is the point: a check that held the actor would delay
    # the end of the scan and report the bomb first. The timeouts only bound the wait.
    # Its check stops at 1 GiB inflated (keter passes its own unpack limit, 2.9 GB by default).
    start_watcher(expand_limit=1 << 30)
    assert next_report(reports, timeout=10.0) == ScanCompleted()
    assert next_report(reports, timeout=10.0) == arrived(older, at_start=True)
    # Checked a slice at a time: a bundle written meanwhile is reported before the bomb.
    newer = incoming / "newer.keter"
    copy_like_cp(newer, small_bundle())
    assert next_report(reports, timeout=10.0) == arrived(newer)
    # The bomb itself is handed on once it has inflated past what the unpacker
    # accepts (the unpacker then refuses it with its reason).
    assert next_report(reports, timeout=60.0) == arrived(bomb, at_start=True)


# -- Rescan --------------------------------------------------------------------------


def test_rescan_of_an_unchanged_folder_reports_nothing(
    start_watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    path.write_bytes(small_bundle())
    watcher = start_watcher()
    assert next_report(reports) == ScanCompleted()
    assert next_report(reports) == arrived(path, at_start=True)  # young: checked after the scan

    watcher.tell(Rescan())
    no_report(reports)


def test_rescan_right_after_a_deletion_reports_the_removal_once(
    start_watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    path.write_bytes(small_bundle())
    watcher = start_watcher()
    assert next_report(reports) == ScanCompleted()
    assert next_report(reports) == arrived(path, at_start=True)  # young: checked after the scan

    # The rescan and the deletion's own event race; either may notice first.
    path.unlink()
    watcher.tell(Rescan())
    assert next_report(reports) == BundleRemoved(app="app")
    no_report(reports)


def test_a_bundle_whose_events_the_kernel_dropped_is_found_all_the_same(
    watcher, incoming: Path, reports: queue.Queue
) -> None:
    """The kernel queues at most ``max_queued_events`` inotify events (16384 by
    default) for a reader that has fallen behind (a burst of bundles, a busy
    machine); the rest it drops, and says only that it did. The watcher then
    looks at the whole folder again, so no bundle is missed."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1 << 20:
        pytest.skip(f"this machine queues {limit} inotify events: too many to overflow here")
    noise = [incoming / ".noise-a", incoming / ".noise-b"]  # hidden: no bundles
    for each in noise:
        each.touch()
    path = incoming / "app.keter"
    # watchdog's reader takes this lock for every event it hands on: held, the reader
    # stops and the kernel's queue fills up, as behind a busy reader.
    with watcher._observer._inotify_fd._lock:
        for i in range(limit + 100):
            os.utime(noise[i % 2])  # alternate: the kernel merges repeats of one event
        copy_like_cp(path, small_bundle())  # its events find the queue full
    # The reader first works through the thousands of events the kernel did queue.
    assert next_report(reports, timeout=60) == arrived(path)
    no_report(reports)


def test_rescan_reports_what_the_events_missed(incoming: Path, reports: queue.Queue) -> None:
    """Rescan's own comparison, without an observer that could notice first.

    The actor is not started (no inotify watch), so every change below is one
    the events "missed"; Rescan is delivered to its handler directly.
    """
    watcher = IncomingWatcher(incoming, report_to=reports)
    path = incoming / "app.keter"
    path.write_bytes(small_bundle())
    watcher.handle(Rescan())
    run_until_idle(watcher)  # the young file's settling and check
    assert reports.get_nowait() == arrived(path)
    watcher.handle(Rescan())
    run_until_idle(watcher)
    assert reports.empty()

    path.unlink()
    watcher.handle(Rescan())
    assert reports.get_nowait() == BundleRemoved(app="app")
    watcher.handle(Rescan())
    assert reports.empty()


def test_rescans_asked_in_a_burst_are_one_rescan(
    incoming: Path, reports: queue.Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst of SIGHUPs (each a Rescan) made as many rescans, a line each; one rescan
    after them all sees everything each would have seen."""
    watcher = IncomingWatcher(incoming, report_to=reports)
    path = incoming / "app.keter"
    path.write_bytes(small_bundle())
    for _ in range(100):
        watcher.tell(Rescan())
    with caplog.at_level(logging.INFO, logger="keter.incoming.watcher"):
        run_until_idle(watcher)
    assert caplog.text.count("incoming: rescanning") == 1
    assert reports.get_nowait() == arrived(path)
    assert reports.empty()


# -- the completeness check (gzipcheck) ------------------------------------------------

NO_LIMIT = 1 << 40


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "f.keter"
    path.write_bytes(data)
    return path


def verdict(tmp_path: Path, data: bytes, limit: int = NO_LIMIT) -> Verdict:
    return check_file(write(tmp_path, data), limit)


def member_of_exact_size(size: int) -> bytes:
    """A single stored gzip member of exactly ``size`` bytes (random content)."""
    payload = size
    for _ in range(10):
        member = gzip.compress(os.urandom(payload), compresslevel=0, mtime=0)
        if len(member) == size:
            return member
        payload += size - len(member)
    raise AssertionError(f"could not build a gzip member of {size} bytes")


def test_check_accepts_complete_streams(tmp_path: Path) -> None:
    assert verdict(tmp_path, small_bundle()) is Verdict.COMPLETE
    assert verdict(tmp_path, big_bundle()) is Verdict.COMPLETE
    # Highly compressible: the bounded output buffer is refilled many times per read.
    assert verdict(tmp_path, gzip.compress(bytes(20 * MIB))) is Verdict.COMPLETE


@pytest.mark.parametrize("keep", [0, 1, 2, 9, 10, 100, "half", -8, -4, -1])
def test_check_finds_a_truncated_stream_incomplete(tmp_path: Path, keep: int | str) -> None:
    data = big_bundle()
    cut = len(data) // 2 if keep == "half" else keep
    assert verdict(tmp_path, data[:cut]) is Verdict.INCOMPLETE


def test_check_accepts_concatenated_members(tmp_path: Path) -> None:
    data = gzip.compress(b"first") + gzip.compress(b"second")
    assert verdict(tmp_path, data) is Verdict.COMPLETE
    # A truncated second member is still incomplete, down to its first byte.
    assert verdict(tmp_path, data[:-1]) is Verdict.INCOMPLETE
    assert verdict(tmp_path, gzip.compress(b"first") + b"\x1f") is Verdict.INCOMPLETE


def test_check_across_a_member_boundary_on_a_read_boundary(tmp_path: Path) -> None:
    first = member_of_exact_size(MIB)  # a multiple of the check's read size
    second = gzip.compress(os.urandom(1000))
    assert verdict(tmp_path, first) is Verdict.COMPLETE
    assert verdict(tmp_path, first + second) is Verdict.COMPLETE
    assert verdict(tmp_path, first + second[:1]) is Verdict.INCOMPLETE
    assert verdict(tmp_path, first + second[:5]) is Verdict.INCOMPLETE
    assert verdict(tmp_path, first + second[:-3]) is Verdict.INCOMPLETE


@pytest.mark.parametrize("padding", [b"x", b"\0" * 512, b"not gzip at all"], ids=repr)
def test_check_takes_padding_after_a_member_as_the_end(tmp_path: Path, padding: bytes) -> None:
    # The unpacker ignores what follows the last member unless it starts another one.
    assert verdict(tmp_path, small_bundle() + padding) is Verdict.COMPLETE


def test_check_tells_whether_the_tar_inside_has_ended(tmp_path: Path) -> None:
    tar = gzip.decompress(small_bundle())
    cut = gzip.compress(tar[:1024])  # whole as gzip, but only the start of the archive
    for data, ended in [(small_bundle(), True), (cut, False), (gzip.compress(b""), False)]:
        fd = os.open(write(tmp_path, data), os.O_RDONLY)
        try:
            check = GzipCheck(fd, NO_LIMIT)
            while (result := check.step()) is None:
                pass
            assert result is Verdict.COMPLETE
            assert check.tar_ended is ended
        finally:
            os.close(fd)


def test_check_finds_what_no_appending_can_save_hopeless(tmp_path: Path) -> None:
    assert verdict(tmp_path, b"plain text, not a bundle\n" * 100) is Verdict.HOPELESS
    assert verdict(tmp_path, b"x") is Verdict.HOPELESS
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # an uncompressed tarball
        tar.addfile(tarfile.TarInfo("empty"), io.BytesIO())
    assert verdict(tmp_path, buf.getvalue()) is Verdict.HOPELESS
    corrupt = bytearray(big_bundle())
    for i in range(len(corrupt) // 2, len(corrupt) // 2 + 64):
        corrupt[i] ^= 0xFF
    assert verdict(tmp_path, bytes(corrupt)) is Verdict.HOPELESS


def test_check_stops_once_the_data_expands_past_the_limit(tmp_path: Path) -> None:
    # 256 MiB of zeros in 256 KB: inflating all of it is what took 2 s per MB.
    path = zero_gzip(tmp_path / "zeros.keter", MIB // 4)
    started = time.process_time()
    assert check_file(path, 8 * MIB) is Verdict.HOPELESS
    assert time.process_time() - started < 1.0
    # Under a limit it stays within, the same stream is judged by its end.
    assert check_file(path, NO_LIMIT) is Verdict.COMPLETE


def test_check_works_in_bounded_slices(tmp_path: Path) -> None:
    path = write(tmp_path, gzip.compress(bytes(64 * MIB), compresslevel=1))
    fd = os.open(path, os.O_RDONLY)
    try:
        check = GzipCheck(fd, NO_LIMIT)
        seen = [0]
        while (result := check.step(max_input=MIB, max_output=4 * MIB)) is None:
            seen.append(check.inflated)
        assert result is Verdict.COMPLETE
        slices = [b - a for a, b in itertools.pairwise(seen)]
        assert len(slices) >= 15  # 64 MiB in slices of about 4 MiB
        assert max(slices) <= 5 * MIB
    finally:
        os.close(fd)


@pytest.mark.parametrize("swap", ["link", "gone"])
def test_a_bundle_swapped_between_the_look_and_the_open_of_its_check(
    incoming: Path, reports: queue.Queue, monkeypatch, tmp_path: Path, swap: str
) -> None:
    """The completeness check opens the file the watcher looked at a moment before; what
    is there by then decides: a link is refused once (never followed), a removed file
    is doubted, then forgotten (it never arrived), and a new copy arrives as usual.
    The swap is put into that moment by wrapping the open: the race cannot be produced
    on demand. Driven through the (unstarted) actor's handler, as the tests above."""
    watcher = IncomingWatcher(incoming, report_to=reports)
    path, data = incoming / "app.keter", big_bundle()
    with open(path, "wb", buffering=0) as f:  # its close not seen: checked before use
        write_chunks(f, data)
        watcher.handle(_PathTouched(path=str(path), certain=False))
    outside = tmp_path / "elsewhere.keter"
    outside.write_bytes(data)
    real_open = watcher_module.open_regular

    def swapped_then_opened(target: Path):
        path.unlink()
        if swap == "link":
            path.symlink_to(outside)
        return real_open(target)

    monkeypatch.setattr(watcher_module, "open_regular", swapped_then_opened)
    # Time passing with no events is the scenario here, not a wait for an outcome.
    time.sleep(2 * DOUBT_QUIET)
    watcher.handle(_Settle(app="app"))
    if swap == "link":
        refused = reports.get_nowait()
        assert isinstance(refused, BundleIgnored) and refused.filename == "app.keter"
        assert "link" in refused.reason, refused.reason
        watcher.handle(_Settle(app="app"))  # said once
    else:
        time.sleep(2 * DOUBT_QUIET)
        watcher.handle(_Settle(app="app"))
        assert reports.empty()  # nothing arrived, so nothing is removed either
        monkeypatch.setattr(watcher_module, "open_regular", real_open)
        copy_like_cp(path, data)
        watcher.handle(_PathTouched(path=str(path), certain=True))
        time.sleep(2 * CLOSED_QUIET)
        watcher.handle(_Settle(app="app"))
        assert reports.get_nowait() == arrived(path)
    assert reports.empty()
