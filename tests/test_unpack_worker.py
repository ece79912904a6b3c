"""keter.incoming.worker: the unpacking process, its deaths and its answers.

The unpacker actor's own tests (tests/test_unpacker.py) unpack every bundle
through a real worker; these check keter's end when the worker misbehaves,
with stand-in workers that die or answer nonsense on cue.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from support import tars
from support.processes import alive
from support.wait import wait_for

from keter.incoming.unpack import UnpackError
from keter.incoming.worker import UnpackWorker, WorkerDied

MIB = 1 << 20


def bundle(path: Path) -> Path:
    members = tars.tar_members({"config/keter.yaml": b"exec: ../app\nhost: a.test\n"})
    path.write_bytes(gzip.compress(members + bytes(2 * tars.BLOCK)))
    return path


def stand_in(script: str) -> list[str]:
    """A worker that reads each request, then runs ``script``."""
    return [sys.executable, "-c", f"import os, sys\nfor line in sys.stdin:\n    {script}"]


@pytest.fixture
def worker():
    made: list[UnpackWorker] = []

    def make(command: list[str] | None = None) -> UnpackWorker:
        made.append(UnpackWorker(command))
        return made[-1]

    yield make
    for each in made:
        each.stop()


def test_the_worker_unpacks_and_refuses_as_safe_unpack_does(tmp_path, worker) -> None:
    unpacking = worker()
    sha256 = unpacking.unpack(
        bundle(tmp_path / "a.keter"), tmp_path / "a", max_bytes=MIB, max_members=10
    )
    assert len(sha256) == 64 and (tmp_path / "a" / "config" / "keter.yaml").is_file()
    (tmp_path / "bad.keter").write_bytes(b"not gzip")
    with pytest.raises(UnpackError, match="not a gzip file"):
        unpacking.unpack(tmp_path / "bad.keter", tmp_path / "b", max_bytes=MIB, max_members=10)
    assert not (tmp_path / "b").exists()
    # A name that is not UTF-8 travels both ways.
    odd = tmp_path / os.fsdecode(b"caf\xe9")
    assert unpacking.unpack(bundle(tmp_path / "c.keter"), odd, max_bytes=MIB, max_members=10)
    assert (odd / "config" / "keter.yaml").is_file()


def test_a_worker_killed_between_bundles_is_replaced(tmp_path, worker) -> None:
    unpacking = worker()
    unpacking.start()
    first = unpacking.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie",
        10,
        "the worker to die",
    )
    unpacking.unpack(bundle(tmp_path / "a.keter"), tmp_path / "a", max_bytes=MIB, max_members=10)
    assert unpacking.pid not in (None, first)


def test_a_bundle_that_kills_its_worker_twice_fails_alone(tmp_path, worker) -> None:
    dest = tmp_path / "a"
    dying = worker(stand_in(f"os.makedirs({str(dest)!r}, exist_ok=True); os._exit(3)"))
    with pytest.raises(WorkerDied):
        dying.unpack(bundle(tmp_path / "a.keter"), dest, max_bytes=MIB, max_members=10)
    assert not dest.exists()  # what a dying worker wrote goes with it


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('print("not json", flush=True)', "answered 'not json"),
        ("print('[\"unpacked\", 7]', flush=True)", "answered ['unpacked', 7]"),
        ('print(\'["failed", "KeyError: x"]\', flush=True)', "KeyError: x"),
    ],
    ids=["garbage", "a wrong answer", "a bug in the worker"],
)
def test_a_worker_that_answers_nonsense_fails_that_bundle(
    tmp_path, worker, answer, expected
) -> None:
    confused = worker(stand_in(answer))
    with pytest.raises(RuntimeError, match=expected.replace("[", r"\[")):
        confused.unpack(bundle(tmp_path / "a.keter"), tmp_path / "a", max_bytes=MIB, max_members=10)


def test_stop_ends_the_worker(worker) -> None:
    unpacking = worker()
    unpacking.start()
    pid = unpacking.pid
    unpacking.stop()
    assert unpacking.pid is None and not psutil.pid_exists(pid)


def test_keters_worker_lives_as_long_as_keter(keter, private_nginx, tmp_path) -> None:
    """One worker for keter's life, not counted among its apps; it ends with a stopped
    keter, and with a killed one (its input closes)."""
    worker = keter.unpacking_worker()
    assert worker is not None
    keter.kill()  # SIGKILL: no on_stop, the pipe just closes
    wait_for(lambda: not alive(worker.pid), 10, "the worker to go with a killed keter")
    keter.start()
    worker = keter.unpacking_worker()
    assert worker is not None
    keter.stop()
    assert not alive(worker.pid)


SPIN = "any(iter(int, 1))"  # stuck inside one header: no word, no read, no write


def test_a_worker_stuck_on_a_bundle_is_killed_and_that_bundle_refused(tmp_path, worker) -> None:
    """A 1 KiB bundle that tarfile parsed for 50 minutes held the worker, and every
    deploy behind it, all that time: keter waited on it without a deadline."""
    stuck = worker(stand_in(f"os.makedirs({str(tmp_path / 'a')!r}); {SPIN}"))
    stuck.stall_seconds = 1
    began = time.monotonic()
    with pytest.raises(UnpackError, match="made no progress for 1 s"):
        stuck.unpack(bundle(tmp_path / "a.keter"), tmp_path / "a", max_bytes=MIB, max_members=10)
    assert time.monotonic() - began < 5
    assert stuck.pid is None and not (tmp_path / "a").exists()


def test_a_worker_that_says_it_is_working_is_waited_for(tmp_path, worker) -> None:
    working = "print('[\"working\"]', flush=True); __import__('time').sleep(0.4)"
    answer = f'print(\'["unpacked", "{"0" * 64}"]\', flush=True)'
    slow = worker(stand_in(f"{working}; " * 6 + answer))
    slow.stall_seconds = 2  # its words come every 0.4 s; more than 2 s in all
    assert slow.unpack(tmp_path / "a.keter", tmp_path / "a", max_bytes=MIB, max_members=10)


def test_keter_stopping_gives_up_a_bundle_at_once(tmp_path, worker) -> None:
    stuck = worker(stand_in(SPIN))
    threading.Timer(0.3, stuck.cancelled.set).start()
    began = time.monotonic()
    with pytest.raises(UnpackError, match="keter is stopping"):
        stuck.unpack(bundle(tmp_path / "a.keter"), tmp_path / "a", max_bytes=MIB, max_members=10)
    assert time.monotonic() - began < 3


KETER = """
import sys
from keter.incoming.worker import UnpackWorker
worker = UnpackWorker()
worker.start()
print(worker.pid, flush=True)
worker.unpack(sys.argv[1], sys.argv[2], max_bytes=1 << 30, max_members=1 << 20)
"""


def test_the_worker_dies_with_keter_also_mid_unpack(tmp_path) -> None:
    """A killed keter's worker went on unpacking (its input is read between bundles
    only) into temp/, where the next keter unpacks into folders of the same names."""
    members = 40_000  # about 9 s of unpacking here
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as writing:
        for i in range(members):
            writing.addfile(tarfile.TarInfo(f"d{i % 100}/f{i}"))
    big = tmp_path / "big.keter"
    big.write_bytes(gzip.compress(tar.getvalue()))
    dest = tmp_path / "big"
    keter = subprocess.Popen(
        [sys.executable, "-c", KETER, str(big), str(dest)], stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(keter.stdout.readline())
        wait_for(lambda: dest.exists() and len(os.listdir(dest)) > 1, 30, "the unpacking to begin")
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(r"Max address space\s+1073741824\s+1073741824", limits), limits
    finally:
        keter.kill()
        keter.wait()
    wait_for(lambda: not alive(pid), 2, "the worker to die with keter")
    assert sum(len(files) for _, _, files in os.walk(dest)) < members
