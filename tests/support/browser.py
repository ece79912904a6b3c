"""A real browser for the dashboard's tests: headless Chromium over the DevTools pipe.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe``
(JSON messages separated by NUL bytes on file descriptors 3 and 4), so no
WebSocket client or browser download is needed. Screenshots go to
test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]


class Browser:
    """One headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def onto_3_and_4() -> None:  # Chromium's fixed descriptors for the pipe
            os.dup2(commands_read, 3)
            os.dup2(replies_write, 4)

        # Chromium also writes under $HOME (crash reports, caches): the test's folder too.
        home = profile / "home"
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
        env["XDG_CACHE_HOME"] = str(home / ".cache")
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=onto_3_and_4,
            pass_fds=(3, 4),
            start_new_session=True,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._ids = itertools.count(1)
        self._buffer = b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=1200,
            height=760,
            deviceScaleFactor=1,
            mobile=False,
            session=True,
        )

    def call(self, method: str, *, session: bool = False, timeout: float = 20, **params):
        """Send one command and return its result (events on the way are skipped)."""
        message = {"id": next(self._ids), "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def log_in(self, user: str, password: str) -> None:
        """Send basic-auth credentials with every request, as a browser does once a user
        has answered its login prompt for the site."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.call("Network.enable", session=True)
        self.call(
            "Network.setExtraHTTPHeaders",
            headers={"Authorization": f"Basic {token}"},
            session=True,
        )

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url, session=True)

    def js(self, expression: str):
        """Evaluate in the page; the value comes back as JSON."""
        result = self.call(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
            session=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text", "script failed"))
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        for fd in (self._commands, self._replies):
            os.close(fd)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (tests/run installs it)")
        pytest.skip("chromium is not installed (tests/run installs it)")
    chromium = Browser(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()
