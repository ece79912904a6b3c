"""The nginx writer: the component that makes nginx serve what the supervisor asks.

A deploy switches traffic by rewriting keter's include file and reloading
nginx: the master starts new workers with the new upstreams while the old
workers finish the requests they already hold, so no request is lost.

``nginx -s reload`` only sends a signal; nginx may still reject the new config
(a listen port already taken) and keep the old one. The writer therefore only
reports success once nginx's status server answers with the new generation.
"""

from __future__ import annotations

import http.client
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from keter.actor import Actor
from keter.fsutil import atomic_write
from keter.messages import ApplyNginx, NginxApplied, NginxFailed
from keter.nginx.files import SupportFiles, support_dir
from keter.nginx.render import (
    STATUS_HOST,
    STATUS_PATH,
    ListenerLike,
    ProxyOptions,
    is_tls,
    render,
    status_address,
)

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0
CONFIRM_INTERVAL = 0.03
CONFIRM_SOCKET_TIMEOUT = 0.25


class NginxWriter(Actor):
    """Applies ``ApplyNginx`` messages: write, ``nginx -t``, reload, confirm.

    Reports ``NginxApplied`` once nginx serves the new generation, otherwise
    ``NginxFailed`` with the old file restored (nginx keeps serving it).

    Before the config, it writes the files the config names into
    ``support_dir(config_file)`` (see ``keter.nginx.files``).
    """

    def __init__(
        self,
        *,
        listeners: Sequence[ListenerLike],
        config_file: Path,
        test_command: Sequence[str],
        reload_command: Sequence[str],
        report_to: queue.Queue | None,
        confirm_timeout: float = 10.0,
        error_log: Path | None = None,
        options: ProxyOptions | None = None,
        auth_group: str | None = "www-data",
    ) -> None:
        """``error_log``, if given, is nginx's error log; its new ``[emerg]``
        lines explain a reload nginx did not take. ``options`` are the global
        proxy settings (``ProxyOptions.from_config``). ``auth_group`` is the
        group of nginx's workers (Debian's www-data); when no such group
        exists, support files keep root's group."""
        super().__init__("nginx", report_to)
        self.listeners = tuple(listeners)
        self.options = options or ProxyOptions()
        self.config_file = Path(config_file)
        self.support = support_dir(self.config_file)
        self.files = SupportFiles(self.support, auth_group)
        self.test_command = tuple(test_command)
        self.reload_command = tuple(reload_command)
        self.confirm_timeout = confirm_timeout
        self.error_log = Path(error_log) if error_log is not None else None
        # Set by stop() so a shutdown does not wait out a whole confirm timeout.
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Queue Stop and cut short a confirmation that is waiting on nginx."""
        self._stopping.set()
        super().stop()

    def handle(self, message: object) -> None:
        match message:
            case ApplyNginx():
                self._apply(message)
            case _:
                self.unexpected(message)

    # -- one apply -----------------------------------------------------------------------

    def _apply(self, command: ApplyNginx) -> None:
        generation = command.generation
        try:
            text = render(command.sites, self.listeners, generation, self.options, self.support)
        except ValueError as exc:
            self._fail(generation, f"refused to render: {exc}")
            return
        try:
            wanted = self.files.write(command.sites, self.listeners)
        except (OSError, ValueError) as exc:
            self._fail(generation, f"cannot write the files nginx needs: {exc}")
            return
        try:
            old = self.config_file.read_bytes()
        except FileNotFoundError:
            old = None
        except OSError as exc:
            self._fail(generation, f"cannot read {self.config_file}: {exc}")
            return
        try:
            atomic_write(self.config_file, text.encode(), mode=0o644)
        except OSError as exc:
            self._fail(generation, f"cannot write {self.config_file}: {exc}")
            return

        error = _run(self.test_command)
        if error is not None:
            self._fail(generation, f"nginx rejected the config: {error}{self._restore(old)}")
            return

        log_offset = self._error_log_size()
        error = _run(self.reload_command)
        if error is not None:
            self._fail(generation, f"nginx reload failed: {error}{self._restore(old)}")
            return

        if not self._confirm(generation):
            if self._stopping.is_set():
                # nginx was told to load this config and may well have done so:
                # leave the file as it is rather than guess.
                self._fail(generation, "keter stopped before nginx confirmed the reload")
                return
            restored = self._restore(old)
            reason = (
                f"nginx did not serve generation {generation} within "
                f"{self.confirm_timeout:g}s; it kept the previous configuration"
            )
            emerg = self._new_emerg(log_offset)
            if emerg:
                reason += f": {emerg}"
            self._fail(generation, reason + restored)
            return

        log.info("nginx: generation %d applied (%d sites)", generation, len(command.sites))
        self.files.prune(wanted)
        self.report(NginxApplied(generation=generation))

    def _fail(self, generation: int, reason: str) -> None:
        log.error("nginx: generation %d failed: %s", generation, reason)
        self.report(NginxFailed(generation=generation, reason=reason))

    def _restore(self, old: bytes | None) -> str:
        """Put back the file nginx is still running, so disk and nginx agree.

        Returns "" or, if that fails too, a note to append to the failure reason.
        """
        try:
            if old is None:
                self.config_file.unlink(missing_ok=True)
            else:
                atomic_write(self.config_file, old, mode=0o644)
        except OSError as exc:
            return f" (and restoring the previous {self.config_file} failed: {exc})"
        return ""

    # -- confirmation ----------------------------------------------------------------------

    def _confirm(self, generation: int) -> bool:
        """Poll the status server until it reports ``generation``; False on timeout."""
        listener = next(each for each in self.listeners if not is_tls(each))
        host, port = status_address(listener), listener.port
        expected = str(generation)
        deadline = time.monotonic() + self.confirm_timeout
        while True:
            if fetch_generation(host, port) == expected:
                return True
            if time.monotonic() >= deadline:
                return False
            # An Event wait, not a sleep: stop() cuts the wait short.
            if self._stopping.wait(CONFIRM_INTERVAL):
                return fetch_generation(host, port) == expected

    def _error_log_size(self) -> int:
        if self.error_log is None:
            return 0
        try:
            return self.error_log.stat().st_size
        except OSError:
            return 0

    def _new_emerg(self, offset: int) -> str | None:
        """The last ``[emerg]`` line nginx logged after ``offset``, if any."""
        if self.error_log is None:
            return None
        try:
            with self.error_log.open("rb") as f:
                f.seek(offset)
                tail = f.read(1 << 20).decode(errors="replace")
        except OSError:
            return None
        lines = [line.strip() for line in tail.splitlines() if "[emerg]" in line]
        return lines[-1] if lines else None


def fetch_generation(host: str, port: int, timeout: float = CONFIRM_SOCKET_TIMEOUT) -> str | None:
    """The generation nginx's status server reports, or None if it does not answer."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", STATUS_PATH, headers={"Host": STATUS_HOST, "Connection": "close"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    if response.status != 200:
        return None
    return body.decode(errors="replace").strip()


def _run(command: Sequence[str]) -> str | None:
    """Run an nginx command; None on success, else a reason quoting nginx's errors."""
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{_shell(command)} did not finish within {COMMAND_TIMEOUT:g}s"
    except OSError as exc:
        return f"cannot run {_shell(command)}: {exc}"
    if result.returncode == 0:
        return None
    output = (result.stderr + result.stdout).strip().splitlines()
    # nginx says why in its [emerg] lines; the rest ("test failed") adds nothing.
    detail = [line for line in output if "[emerg]" in line] or output[-3:]
    text = "; ".join(detail) or "no output"
    # The full command line (with -p/-c paths) is in the config; the program's name is enough here.
    return f"{os.path.basename(command[0])} exited with status {result.returncode}: {text}"


def _shell(command: Sequence[str]) -> str:
    return " ".join(command)
