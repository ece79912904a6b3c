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

The protocol is private to keter: one JSON document per line each way. A
request is ``[bundle, dest, max_bytes, max_members]`` (paths as ``os.fsdecode``
gives them); an answer is ``["unpacked", sha256]``, ``["refused", reason]``
(an ``UnpackError``) or ``["failed", reason]`` (anything else, a bug). JSON,
not pickle: what a hostile bundle may have touched never becomes code in
keter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from keter.incoming.unpack import UnpackError, safe_unpack
from keter.threadnames import name_this_thread

STOP_TIMEOUT = 5.0  # seconds the worker gets to exit once its input is closed


class WorkerDied(Exception):
    """The worker died twice with the same bundle."""


class UnpackWorker:
    """keter's end of the worker process (started at the first use)."""

    def __init__(self, command: list[str] | None = None) -> None:
        # -P: keter's working folder is not put on the worker's import path.
        self.command = command or [sys.executable, "-P", "-m", "keter.incoming.worker"]
        self._proc: subprocess.Popen | None = None

    def unpack(self, bundle: Path, dest: Path, *, max_bytes: int, max_members: int) -> str:
        """``safe_unpack(bundle, dest, ...)`` in the worker: its sha256, or its UnpackError."""
        request = json.dumps([os.fsdecode(bundle), os.fsdecode(dest), max_bytes, max_members])
        for _ in range(2):
            answer = self._ask(request)
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
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,  # lines
            # Not in keter's process group: a Ctrl-C meant for keter is keter's to
            # handle. Once keter is gone, its input ends and it exits.
            start_new_session=True,
        )

    def _ask(self, request: str) -> object | None:
        """Send one request and read its answer; None if the worker died meanwhile."""
        self.start()
        try:
            self._proc.stdin.write(request + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except OSError:  # BrokenPipeError: it had died
            line = ""
        if not line:
            self.stop()
            return None
        try:
            return json.loads(line)
        except ValueError:
            self.stop()  # whatever it writes next cannot be trusted to match a request
            raise RuntimeError(f"the unpacking process answered {line[:100]!r}") from None


def _serve(requests, answers) -> None:
    for line in requests:
        bundle, dest, max_bytes, max_members = json.loads(line)
        try:
            sha256 = safe_unpack(
                Path(bundle),
                Path(dest),
                max_bytes=max_bytes,
                max_members=max_members,
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
    # keter gone mid-answer: nothing to tell, and no traceback in its log.
    with contextlib.suppress(BrokenPipeError):
        _serve(sys.stdin, answers)
