"""The unpacking worker: a process of keter's own that runs ``safe_unpack``.

Unpacking a bundle is thousands of small system calls, and each one gives up
Python's lock. In keter's process, under a burst of deploys, every one of them
handed the lock to another busy thread and back: with 1000 bundles dropped at
once that doubled keter's context switches and cost a fifth of the machine's
CPU. In a process of its own the unpacking costs only itself. It also keeps an
app's executable from being open for writing in keter while keter forks
another app (that child's copy of the descriptor made the app's exec fail with
"Text file busy"): the worker never forks, and closes each file before it
answers.

``UnpackWorker`` is keter's end (used by the unpacker actor's thread alone): it
starts ``python -m keter.incoming.worker`` (a small process: the unpacking
code and nothing of the daemon), sends it one bundle at a time and returns the
sha256, or raises ``UnpackError`` with the worker's reason. A worker that died
(killed, out of memory) is started again and the bundle tried once more: it may
have died before the bundle reached it; a bundle that takes the worker down
twice raises ``WorkerDied``.

While it unpacks, the worker says so (``["working"]``, at most every
``PROGRESS_INTERVAL``, as it takes each member and each piece of the bundle it
reads or inflates); one that says nothing for ``STALL_SECONDS`` is stuck inside
one header (one a parser takes hours over): it is killed and that bundle
refused, so no bundle holds up the deploys behind it. The worker dies with
keter (the parent-death signal), also mid-unpack, and its memory is bounded
(``MEMORY_LIMIT``): what nobody foresaw fails one bundle, not the host.

The protocol is private to keter: one JSON document per line each way. A
request is ``[bundle, dest, max_bytes, max_members]`` (paths as ``os.fsdecode``
gives them); an answer is ``["unpacked", sha256]``, ``["refused", reason]``
(an ``UnpackError``) or ``["failed", reason]`` (anything else, a bug), after
any number of ``["working"]``. JSON,
not pickle: what a hostile bundle may have touched never becomes code in
keter.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from keter.incoming.unpack import UnpackError, safe_unpack
from keter.threadnames import name_this_thread

STOP_TIMEOUT = 5.0  # seconds the worker gets to exit once its input is closed
# Seconds a worker with a bundle may go without a word. Between two words there is
# one header to parse, or 1 MiB to inflate: microseconds' work for a real archive.
STALL_SECONDS = 30.0
PROGRESS_INTERVAL = 1.0  # the worker says it is working at most this often
CHECK_INTERVAL = 0.5  # how often keter looks at the time and at a stop meanwhile
_WORKING = b'["working"]\n'
# The worker's address space. It holds a few MiB at a time (1 MiB chunks, headers
# of at most 1 MiB): past this, what a bundle asked for is a MemoryError, that
# bundle's failure, not the host's memory.
MEMORY_LIMIT = 1 << 30
_PR_SET_PDEATHSIG = 1  # prctl(2)


class WorkerDied(Exception):
    """The worker died twice with the same bundle."""


class UnpackWorker:
    """keter's end of the worker process (started at the first use)."""

    def __init__(self, command: list[str] | None = None) -> None:
        # -P: keter's working folder is not put on the worker's import path. keter's
        # pid: the worker checks that its parent is still keter once it asked to die
        # with it (keter may have died before that).
        worker = [sys.executable, "-P", "-m", "keter.incoming.worker", str(os.getpid())]
        self.command = command or worker
        self._proc: subprocess.Popen | None = None
        self._unread = b""  # what the worker wrote past the last line read
        self.stall_seconds = STALL_SECONDS
        # Set from another thread (keter is stopping): a bundle being unpacked is given up.
        self.cancelled = threading.Event()

    def unpack(self, bundle: Path, dest: Path, *, max_bytes: int, max_members: int) -> str:
        """``safe_unpack(bundle, dest, ...)`` in the worker: its sha256, or its UnpackError
        (also when the worker is stuck on it, or keter is stopping)."""
        request = json.dumps([os.fsdecode(bundle), os.fsdecode(dest), max_bytes, max_members])
        for _ in range(2):
            try:
                answer = self._ask(request)
            except UnpackError:
                shutil.rmtree(dest, ignore_errors=True)
                raise
            if answer is None:  # it died: whatever it had written goes
                shutil.rmtree(dest, ignore_errors=True)
                continue
            match answer:
                case ["unpacked", str(sha256)]:
                    return sha256
                case ["refused", str(reason)]:
                    raise UnpackError(reason)
                case ["failed", str(reason)]:
                    raise RuntimeError(reason)
                case _:
                    raise RuntimeError(f"the unpacking process answered {answer!r:.100}")
        raise WorkerDied("the unpacking process died twice")

    def stop(self) -> None:
        """End the worker: its input closed, it exits; killed if it will not."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):  # a worker that died took its pipe along
                stream.close()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the worker unless it runs (a dead one is replaced)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.stop()
        self._unread = b""
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # keter waits on the pipe itself (select): nothing may wait in a buffer
            # Not in keter's process group: a Ctrl-C meant for keter is keter's to
            # handle. It ends with keter all the same (_die_with_keter).
            start_new_session=True,
        )

    def _ask(self, request: str) -> object | None:
        """Send one request and read its answer; None if the worker died meanwhile."""
        self.start()
        try:
            data = request.encode() + b"\n"
            while data:  # an unbuffered pipe may take a long request in parts
                data = data[self._proc.stdin.write(data) :]
            line = self._answer()
        except OSError:  # BrokenPipeError: it had died
            line = b""
        if not line:
            self.stop()
            return None
        try:
            return json.loads(line)
        except ValueError:
            self.stop()  # whatever it writes next cannot be trusted to match a request
            text = line[:100].decode(errors="backslashreplace")
            raise RuntimeError(f"the unpacking process answered {text!r}") from None

    def _answer(self) -> bytes:
        """The worker's next line but ``["working"]`` (b"" once it ended). Raises
        UnpackError if it says nothing for ``stall_seconds``, or keter is stopping; the
        worker is killed then (a new one starts at the next bundle)."""
        heard = time.monotonic()
        while True:
            line, newline, rest = self._unread.partition(b"\n")
            if newline:
                self._unread = rest
                if line + newline != _WORKING:
                    return line
                heard = time.monotonic()
                continue
            if self.cancelled.is_set():
                self._kill()
                raise UnpackError("keter is stopping")
            if time.monotonic() - heard >= self.stall_seconds:
                self._kill()
                raise UnpackError(
                    f"the unpacking made no progress for {self.stall_seconds:g} s "
                    "(a header that takes too long to parse)"
                )
            if select.select([self._proc.stdout], [], [], CHECK_INTERVAL)[0]:
                chunk = os.read(self._proc.stdout.fileno(), 65536)
                if not chunk:
                    return b""  # it ended (died) mid-line or before a word
                self._unread += chunk

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.kill()
            self.stop()


def _die_with_keter(keter: int) -> None:
    """Have the kernel kill this process when keter's thread that started it ends (the
    unpacker's: keter's end, or that component failing), then check keter did not
    end before that. A worker left alone would go on writing into temp/, where the
    next keter unpacks into folders of the same names."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != keter:
        sys.exit(0)


def _serve(requests, answers) -> None:
    said = 0.0

    def working() -> None:
        nonlocal said
        if time.monotonic() - said >= PROGRESS_INTERVAL:
            said = time.monotonic()
            answers.write(_WORKING.decode())
            answers.flush()

    for line in requests:
        bundle, dest, max_bytes, max_members = json.loads(line)
        try:
            sha256 = safe_unpack(
                Path(bundle),
                Path(dest),
                max_bytes=max_bytes,
                max_members=max_members,
                progress=working,
            )
            answer = ["unpacked", sha256]
        except UnpackError as exc:
            answer = ["refused", str(exc)]
        except Exception as exc:  # a bug: that bundle's internal error, never the worker's end
            answer = ["failed", f"{type(exc).__name__}: {exc}"]
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    # stdout carries answers only: anything printed goes to stderr (keter's log).
    answers, sys.stdout = sys.stdout, sys.stderr
    name_this_thread("keter-unpack")  # ps and top: keter's, not some "python"
    if len(sys.argv) > 1:  # keter's pid (tests may start a worker of their own)
        _die_with_keter(int(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    # keter gone mid-answer: nothing to tell, and no traceback in its log.
    with contextlib.suppress(BrokenPipeError):
        _serve(sys.stdin, answers)
