"""The incoming-folder watcher against real inotify events, and gzip_complete().

Every actor test starts a real IncomingWatcher on a private incoming/ folder,
writes files the way real tools do (cp, scp, rename-into-place, touch, chmod,
rm) and asserts exactly which reports arrive, then that nothing more does.
"""

from __future__ import annotations

import gzip
import io
import os
import queue
import tarfile
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import BinaryIO

import pytest
from support.bundles import bundle_bytes

from keter.messages import BundleArrived, BundleIgnored, BundleRemoved, Rescan, ScanCompleted
from keter.watcher import (
    CLOSED_QUIET,
    DOUBT_QUIET,
    IncomingWatcher,
    _PathTouched,
    _Settle,
    gzip_complete,
)

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


def arrived(path: Path) -> BundleArrived:
    """The report the file as it is now on disk deserves."""
    st = path.stat()
    return BundleArrived(
        app=path.name.removesuffix(".keter"), path=path, mtime_ns=st.st_mtime_ns, size=st.st_size
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

    def start() -> IncomingWatcher:
        watcher = IncomingWatcher(incoming, report_to=reports)
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
    assert {next_report(reports), next_report(reports)} == {arrived(small), arrived(big)}
    assert next_report(reports) == ScanCompleted()
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


# -- Rescan --------------------------------------------------------------------------


def test_rescan_of_an_unchanged_folder_reports_nothing(
    start_watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    path.write_bytes(small_bundle())
    watcher = start_watcher()
    assert next_report(reports) == arrived(path)
    assert next_report(reports) == ScanCompleted()

    watcher.tell(Rescan())
    no_report(reports)


def test_rescan_right_after_a_deletion_reports_the_removal_once(
    start_watcher, incoming: Path, reports: queue.Queue
) -> None:
    path = incoming / "app.keter"
    path.write_bytes(small_bundle())
    watcher = start_watcher()
    assert next_report(reports) == arrived(path)
    assert next_report(reports) == ScanCompleted()

    # The rescan and the deletion's own event race; either may notice first.
    path.unlink()
    watcher.tell(Rescan())
    assert next_report(reports) == BundleRemoved(app="app")
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
    assert reports.get_nowait() == arrived(path)
    watcher.handle(Rescan())
    assert reports.empty()

    path.unlink()
    watcher.handle(Rescan())
    assert reports.get_nowait() == BundleRemoved(app="app")
    watcher.handle(Rescan())
    assert reports.empty()


# -- gzip_complete -------------------------------------------------------------------


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "f.keter"
    path.write_bytes(data)
    return path


def member_of_exact_size(size: int) -> bytes:
    """A single stored gzip member of exactly ``size`` bytes (random content)."""
    payload = size
    for _ in range(10):
        member = gzip.compress(os.urandom(payload), compresslevel=0, mtime=0)
        if len(member) == size:
            return member
        payload += size - len(member)
    raise AssertionError(f"could not build a gzip member of {size} bytes")


def test_gzip_complete_accepts_complete_streams(tmp_path: Path) -> None:
    assert gzip_complete(write(tmp_path, small_bundle()))
    assert gzip_complete(write(tmp_path, big_bundle()))
    # Highly compressible: the bounded output buffer is refilled many times per read.
    assert gzip_complete(write(tmp_path, gzip.compress(bytes(20 * MIB))))


@pytest.mark.parametrize("keep", [1, 9, 10, 100, "half", -8, -4, -1])
def test_gzip_complete_refuses_a_truncated_stream(tmp_path: Path, keep: int | str) -> None:
    data = big_bundle()
    cut = len(data) // 2 if keep == "half" else keep
    assert not gzip_complete(write(tmp_path, data[:cut]))


def test_gzip_complete_accepts_concatenated_members(tmp_path: Path) -> None:
    data = gzip.compress(b"first") + gzip.compress(b"second")
    assert gzip_complete(write(tmp_path, data))
    # A truncated second member is still incomplete.
    assert not gzip_complete(write(tmp_path, data[:-1]))


def test_gzip_complete_across_a_member_boundary_on_a_read_boundary(tmp_path: Path) -> None:
    first = member_of_exact_size(MIB)  # gzip_complete reads 1 MiB at a time
    second = gzip.compress(os.urandom(1000))
    assert gzip_complete(write(tmp_path, first))
    assert gzip_complete(write(tmp_path, first + second))
    assert not gzip_complete(write(tmp_path, first + second[:5]))
    assert not gzip_complete(write(tmp_path, first + second[:-3]))


@pytest.mark.parametrize("garbage", [b"x", b"\0" * 512, b"\x1f\x8b", b"not gzip at all"], ids=repr)
def test_gzip_complete_refuses_trailing_garbage(tmp_path: Path, garbage: bytes) -> None:
    assert not gzip_complete(write(tmp_path, small_bundle() + garbage))


def test_gzip_complete_refuses_empty_missing_and_non_gzip_files(tmp_path: Path) -> None:
    assert not gzip_complete(write(tmp_path, b""))
    assert not gzip_complete(tmp_path / "missing.keter")
    assert not gzip_complete(write(tmp_path, b"plain text, not a bundle\n" * 100))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # an uncompressed tarball
        tar.addfile(tarfile.TarInfo("empty"), io.BytesIO())
    assert not gzip_complete(write(tmp_path, buf.getvalue()))
