"""Talking to a running keter through its status socket, ``ROOT/run/keter.sock``."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from keter.status import TOKEN_HEADER, socket_path
from keter.status.handler import MAX_BODY


class ClientError(Exception):
    """The request could not be answered; ``str()`` says why, for the operator."""


class NotRunning(ClientError):
    """No keter is listening on this ROOT."""


class PermissionDenied(ClientError):
    """The socket exists but this user may not use it."""


class NotAnswering(ClientError):
    """keter took the connection but gave no answer in time (hung, stopped, overloaded)."""


class UnexpectedAnswer(ClientError):
    """keter answered something this command cannot read (another version of keter?)."""

    def __init__(self) -> None:
        super().__init__(
            "keter answered something this keter command does not understand (another version?)"
        )


# How many answers this process has read from keter: a KeyError or TypeError in a command
# after one is read is an answer of a shape it does not know (keter.commands.run).
_answers_read = 0


def answers_read() -> int:
    return _answers_read


class ApiError(ClientError):
    """keter answered with an error (``status``: the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A blocking connect waits for room in keter's listen queue, for at most
            # the send timeout; a non-blocking one (Python's timeout) would fail at
            # once with EAGAIN when a burst of clients has filled it.
            seconds = max(self.timeout or 0.0, 0.001)
            timeout = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            sock.connect(str(self.path))
            sock.settimeout(self.timeout)
        except BlockingIOError:  # the send timeout ran out: keter is too busy to accept
            sock.close()
            raise TimeoutError from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class KeterClient:
    """The status API of the keter running on ``root``."""

    def __init__(self, root: Path, timeout: float = 10.0) -> None:
        self.root = Path(root)
        self.socket = socket_path(self.root)
        self.timeout = timeout
        self._token: str | None = None

    # -- the API ---------------------------------------------------------------------

    def status(self) -> dict:
        return self.get("/api/status")

    def certificates(self) -> dict:
        """Each host's certificate from keter.acme (issue 12)."""
        return self.get("/api/certificates")

    def app(self, name: str) -> dict:
        return self.get(f"/api/apps/{quote(name, safe='')}")

    def history_after(self, name: str, after: int, wait: float) -> list[dict]:
        """Entries newer than ``after``; the daemon holds the request up to ``wait`` s for one."""
        query = urlencode({"after": after, "wait": wait})
        path = f"/api/apps/{quote(name, safe='')}/history?{query}"
        return self.get(path, timeout=wait + self.timeout)["entries"]

    def stats(self, name: str) -> dict:
        """The app's traffic windows and last hour (issue 14)."""
        return self.get(f"/api/apps/{quote(name, safe='')}/stats")

    def log(self, name: str, lines: int) -> list[str]:
        return self.get(f"/api/apps/{quote(name, safe='')}/log?n={lines}")["lines"]

    def restart(self, name: str) -> dict:
        return self.post(f"/api/apps/{quote(name, safe='')}/restart", {})

    def rollback(
        self,
        name: str,
        version: str | None = None,
        *,
        with_data: bool = False,
        timeout: float | None = None,
    ) -> dict:
        body: dict = {"version": version} if version else {}
        if with_data:
            body["with_data"] = True
        return self.post(f"/api/apps/{quote(name, safe='')}/rollback", body, timeout=timeout)

    # Issue 13: settings, database, data folder (keter.status.appops).

    def env_names(self, name: str) -> list[str]:
        return self.get(f"/api/apps/{quote(name, safe='')}/env")["names"]

    def env_change(
        self, name: str, changes: dict[str, str], removals: list[str], *, restart: bool
    ) -> dict:
        body = {"set": changes, "unset": removals, "restart": restart}
        return self.post(f"/api/apps/{quote(name, safe='')}/env", body)

    def backups(self, name: str) -> list[dict]:
        return self.get(f"/api/apps/{quote(name, safe='')}/backups")["backups"]

    def take_backup(self, name: str, timeout: float) -> dict:
        return self.post(f"/api/apps/{quote(name, safe='')}/backups", {}, timeout=timeout)

    def restore(self, name: str, backup: str | None, timeout: float) -> dict:
        body = {"backup": backup} if backup is not None else {}
        return self.post(f"/api/apps/{quote(name, safe='')}/restore", body, timeout=timeout)

    def purge(self, name: str) -> dict:
        return self.post(f"/api/apps/{quote(name, safe='')}/data/purge", {"confirm": name})

    # -- HTTP over the socket --------------------------------------------------------

    def get(self, path: str, *, timeout: float | None = None) -> dict:
        return _json(*self._request("GET", path, None, timeout))

    def text(self, path: str) -> str:
        """A page that is not JSON (``/metrics``)."""
        status, raw = self._request("GET", path, None, None)
        if status >= 400:
            _json(status, raw)  # raises with keter's reason
        return raw.decode()

    def post(self, path: str, body: dict, *, timeout: float | None = None) -> dict:
        if self._token is None:
            self._token = self.get("/api/token")["token"]
        return _json(*self._request("POST", path, body, timeout))

    def _request(
        self, method: str, path: str, body: dict | None, timeout: float | None
    ) -> tuple[int, bytes]:
        connection = _UnixConnection(self.socket, timeout or self.timeout)
        headers = {"Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
            if len(data) > MAX_BODY:  # keter would close it unread: say why here
                raise ClientError(
                    f"the request is {len(data)} bytes, more than keter takes ({MAX_BODY}): "
                    "send less at once"
                )
            headers.update({"Content-Type": "application/json", TOKEN_HEADER: self._token or ""})
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(
                f"keter is not running on {self.root} (nothing listens on {self.socket})"
            ) from None
        except PermissionError:
            raise PermissionDenied(
                f"permission denied on {self.socket}: run as root or as a member of the "
                "group set by status-group"
            ) from None
        except TimeoutError:
            raise NotAnswering(f"keter did not answer within {connection.timeout:g}s") from None
        except (BrokenPipeError, ConnectionResetError):  # RemoteDisconnected is one too
            # Dropped unanswered (keter stopping, or an older keter full): no answer says
            # the operation failed, and "failed" (exit 1) had said so.
            raise NotAnswering("keter closed the connection without an answer") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot talk to keter on {self.socket}: {exc}") from None
        finally:
            connection.close()
        return response.status, raw


def _json(status: int, raw: bytes) -> dict:
    global _answers_read
    _answers_read += 1
    try:
        value = json.loads(raw)
    except ValueError:
        raise ClientError(f"keter answered {status} with something not JSON") from None
    if not isinstance(value, dict):  # every answer of the API is an object
        raise UnexpectedAnswer
    if status >= 400:
        raise ApiError(status, str(value.get("error", f"HTTP {status}")))
    return value


# How much earlier than the command a deploy of its own may seem to begin: an entry's
# beginning is worked out from its end and its duration, each rounded.
BEGAN_SLACK = 0.1
# A poll that failed is tried again this much later, until the command's deadline; not
# answers that say something of the request or of who asks.
RETRY_PAUSE = 0.5
_FINAL = (ApiError, PermissionDenied, UnexpectedAnswer)
# How long a keter gone from its socket is waited for: restarted (an upgrade, systemctl
# restart), it deploys again what it was deploying, and that deploy's end is the verdict.
RESTART_GRACE = 30.0
LAST_LOOK = 1.0  # seconds the history is waited on once nothing seems under way


def wait_for_verdict(
    client: KeterClient,
    app: str,
    after: int,
    sha256: str | None,
    timeout: float,
    *,
    since: float,
    superseded: dict | None = None,
) -> dict | None:
    """The history entry after ``after`` that ends the deploy of this version of ``app``
    the command began at ``since`` (wall clock, before its bundle was put in place or
    its request sent), or None.

    Entries are matched by version (any, for None): one of another version is another
    deploy's. An entry with an empty sha256 is a deploy that ended before its bundle
    was read (it cannot name its version): ours if it began after ``since`` (a bundle
    that was unpacking when ours came ended so too, superseded by ours). A deploy of
    ours ``superseded`` (found here, or given) is the verdict, unless a deploy of the
    same version, or of one not read yet, is under way (a restart, the same bundle
    copied again): that one's end is, then. The app's state is told a moment before
    a deploy's end: once nothing seems under way, the history is looked at once more.
    """
    deadline = time.monotonic() + timeout
    failed: ClientError | None = None
    gone_since: float | None = None  # since when keter's socket answers nothing
    last_look = False
    while (left := deadline - time.monotonic()) > 0:
        wait = 25.0
        if superseded is not None and not still_coming(client, app, sha256):
            if last_look:
                return superseded
            last_look, wait = True, LAST_LOOK
        try:
            entries = client.history_after(app, after, wait=min(left, wait))
        except _FINAL:
            raise
        except ClientError as exc:  # keter too busy to answer: the deploy goes on meanwhile
            if isinstance(exc, NotRunning):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > RESTART_GRACE:
                    raise  # stopped for good, not restarting
            failed, last_look = exc, False
            time.sleep(min(RETRY_PAUSE, max(deadline - time.monotonic(), 0.0)))
            continue
        failed, gone_since = None, None
        for entry in entries:
            after = max(after, entry["seq"])
            found = entry["sha256"]
            if found == "" and entry["at"] - entry["duration"] < since - BEGAN_SLACK:
                continue  # an older deploy, ended before its bundle was read
            if sha256 is None or found in (sha256, ""):
                if entry["outcome"] != "superseded":
                    return entry
                superseded, last_look = entry, False
    if failed is not None and superseded is None:
        raise failed  # no answer at the end: that, not "no verdict in time", is the news
    return superseded


def still_coming(client: KeterClient, app: str, sha256: str | None) -> bool:
    """Whether a deploy of ``app`` that may be of this version (any, for None) is under
    way; while keter restarts, maybe (it deploys again what it was deploying)."""
    try:
        deploying = client.app(app).get("deploying")
    except (NotRunning, NotAnswering):
        return True  # asked again once it is back or less busy (wait_for_verdict)
    except ClientError:  # gone (its bundle removed)
        return False
    if deploying is None:
        return False
    return deploying == "" or sha256 is None or sha256.startswith(deploying)
