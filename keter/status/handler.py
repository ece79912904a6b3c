"""HTTP requests to the status API: routing, the dashboard's pages, JSON in and out.

Requests run on the listeners' threads. They read through the status actor's
``board`` and hand restart and rollback to the actor (``api.command``). Every
request passes ``checks`` first (Host; on TCP a login; for POST also the
token and Origin).
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import math
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from keter.bundle import validate_app_name
from keter.status import appops
from keter.status.checks import TOKEN_HEADER
from keter.status.errors import ApiError
from keter.status.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from keter.status.redeploy import Action

if TYPE_CHECKING:
    from keter.status.component import StatusServer

log = logging.getLogger(__name__)

# A request's body: one app's settings (`keter env set`: certificates, keys) take up to
# envstore.MAX_FILE (2 MiB) on disk, and their JSON a little more. A request not let in
# (its login, its Host) is answered after its body only up to REFUSED_BODY; past that it
# is closed unread, so that no stranger makes keter read megabytes.
MAX_BODY = 4 * 1024 * 1024
REFUSED_BODY = 64 * 1024
# A request's line and headers: a browser's are well under 8 KiB. Bounded before any
# login is checked, so that a client cannot make keter hold megabytes per connection.
MAX_HEAD = 16 * 1024
READ_SECONDS = 15  # to send a whole request, head and body: a stalled client lets go
DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
STATIC_FILES = {"dashboard.js": "text/javascript", "style.css": "text/css"}

_APP = r"/api/apps/(?P<app>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/"), "index"),
    ("GET", re.compile(r"/app/(?P<app>[^/]+)"), "app_page"),
    ("GET", re.compile(r"/static/(?P<name>[a-z.]+)"), "static"),
    ("GET", re.compile(r"/metrics"), "metrics"),
    ("GET", re.compile(r"/api/token"), "token"),
    ("GET", re.compile(r"/api/status"), "status"),
    ("GET", re.compile(r"/api/certificates"), "certificates"),
    ("GET", re.compile(_APP), "app"),
    ("GET", re.compile(_APP + r"/history"), "history"),
    ("GET", re.compile(_APP + r"/log"), "log"),
    ("GET", re.compile(_APP + r"/stats"), "stats"),
    ("POST", re.compile(_APP + r"/restart"), "restart"),
    ("POST", re.compile(_APP + r"/rollback"), "rollback"),
    # Issue 13 (keter.status.appops): settings, database, data folder.
    ("GET", re.compile(_APP + r"/env"), "env"),
    ("POST", re.compile(_APP + r"/env"), "env_change"),
    ("GET", re.compile(_APP + r"/backups"), "backups"),
    ("POST", re.compile(_APP + r"/backups"), "take_backup"),
    ("POST", re.compile(_APP + r"/restore"), "restore"),
    ("POST", re.compile(_APP + r"/data/purge"), "purge"),
]
_HTML_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class _RequestInput:
    """A connection's input while a request is read: at most ``MAX_HEAD`` bytes of
    request line and headers, and the whole request within ``READ_SECONDS`` (the
    socket's timeout shrinks to what is left before each read)."""

    def __init__(self, raw: io.BufferedIOBase, sock: socket.socket) -> None:
        self._raw = raw
        self._sock = sock
        self._head_left = 0
        self._deadline = 0.0

    def next_request(self) -> None:
        self._head_left = MAX_HEAD
        self._deadline = time.monotonic() + READ_SECONDS

    def readline(self, limit: int = -1) -> bytes:
        """A line of the head; raises ``HeadTooLarge`` past the bound."""
        if self._head_left <= 0:
            raise HeadTooLarge
        size = self._head_left + 1 if limit < 0 else min(limit, self._head_left + 1)
        parts = []
        while size > 0:  # what one receive brings at a time, so the deadline holds
            self._arm()
            chunk = self._raw.peek(1)[:size]  # type: ignore[attr-defined]
            if not chunk:
                break
            end = chunk.find(b"\n")
            part = self._raw.read(len(chunk) if end < 0 else end + 1)  # from the buffer
            parts.append(part)
            size -= len(part)
            if end >= 0:
                break
        line = b"".join(parts)
        self._head_left -= len(line)
        if self._head_left < 0:
            raise HeadTooLarge
        return line

    def read(self, size: int) -> bytes:
        """``size`` bytes of the body (fewer if the client closed)."""
        chunks = []
        while size > 0:
            self._arm()
            chunk = self._raw.read1(size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not sent in time")
        self._sock.settimeout(left)

    def close(self) -> None:
        self._raw.close()


class HeadTooLarge(Exception):
    """A request's line and headers passed ``MAX_HEAD``."""


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "keter-status"
    sys_version = ""
    timeout = READ_SECONDS  # a stalled client must not hold a thread for ever

    def setup(self) -> None:
        super().setup()
        self.rfile = _RequestInput(self.rfile, self.connection)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        self.rfile.next_request()  # type: ignore[attr-defined]
        # Until its request is let in, a full server may close this connection for a new one.
        self.server.may_close(self.connection)  # type: ignore[attr-defined]
        try:
            super().handle_one_request()
        except HeadTooLarge:
            # Answered without reading further: what follows cannot be trusted.
            self.close_connection = True
            self.command, self.request_version = None, "HTTP/1.1"
            self.send_error(431, f"request line and headers larger than {MAX_HEAD} bytes")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: object) -> None:
        pass  # the dashboard polls every second; keter's log is for events

    def _dispatch(self, method: str) -> None:
        api: StatusServer = self.server.api  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        self.body = b""
        try:
            # Let in, a request's connection is never closed to make room for another: on
            # TCP once its login is checked, before its body is read; on the socket, where
            # whoever can open it may ask, once it is read whole (the heads of POSTs whose
            # bodies never came had held every slot for 15 s each).
            refused = self._refusal(api)
            if refused is None and self.server.tcp:  # type: ignore[attr-defined]
                self.server.keep(self.connection)  # type: ignore[attr-defined]
            if method == "POST":
                self.body = self._take_body(refused)
            if refused is not None:
                raise refused
            self.server.keep(self.connection)  # type: ignore[attr-defined]
            matched = False
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                matched = matched or match is not None
                if match and route_method == method:
                    if method == "POST":
                        api.checks.check_write(self.headers)
                    args = match.groupdict()
                    if "app" in args:
                        args["app"] = _app_name(args["app"])
                    getattr(self, f"_{name}")(api, parse_qs(url.query), **args)
                    return
            if matched:
                raise ApiError(405, f"{url.path} does not take {method}")
            raise ApiError(404, f"nothing at {url.path}")
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message}, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            raise  # the client hung up (a waiting `keter deploy` cut short): no bug of ours
        except Exception:  # a bug answers 500 instead of dropping the connection
            log.exception("keter: status request %s %s failed", method, url.path)
            self._send_json(500, {"error": "internal error; see keter's log"})

    def _refusal(self, api: StatusServer) -> ApiError | None:
        """Why this request is not let in (its Host, or on TCP its login), or None."""
        try:
            api.checks.check_host(self.headers.get("Host"))
            if self.server.tcp:  # type: ignore[attr-defined]
                api.checks.check_login(self.headers.get("Authorization"))
        except ApiError as refusal:
            return refusal
        return None

    # -- pages -----------------------------------------------------------------------

    def _index(self, api: StatusServer, query: dict) -> None:
        self._page(api, "index.html")

    def _app_page(self, api: StatusServer, query: dict, app: str) -> None:
        self._page(api, "app.html")

    def _page(self, api: StatusServer, name: str) -> None:
        html = (DASHBOARD_DIR / name).read_text().replace("{{token}}", api.checks.token)
        self._send(200, html.encode(), "text/html; charset=utf-8", _HTML_HEADERS)

    def _static(self, api: StatusServer, query: dict, name: str) -> None:
        if name not in STATIC_FILES:
            raise ApiError(404, f"nothing at /static/{name}")
        data = (DASHBOARD_DIR / name).read_bytes()
        self._send(200, data, f"{STATIC_FILES[name]}; charset=utf-8")

    def _metrics(self, api: StatusServer, query: dict) -> None:
        self._send(200, api.metrics.render(), METRICS_CONTENT_TYPE)

    # -- API -------------------------------------------------------------------------

    def _token(self, api: StatusServer, query: dict) -> None:
        self._send_json(200, {"token": api.checks.token, "header": TOKEN_HEADER})

    def _status(self, api: StatusServer, query: dict) -> None:
        self._send_json(200, api.board.status_view())

    def _certificates(self, api: StatusServer, query: dict) -> None:
        self._send_json(200, api.board.certificates_view())

    def _app(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, api.board.app_view(app))

    def _history(self, api: StatusServer, query: dict, app: str) -> None:
        after = _number(query, "after", 0, int)
        wait = _number(query, "wait", 0.0, float)
        with self.server.long_poll(wait) as wait:  # type: ignore[attr-defined]
            entries = api.board.history_after(app, after, wait)
        self._send_json(200, entries)

    def _log(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, api.board.log_lines(app, _number(query, "n", 100, int)))

    def _stats(self, api: StatusServer, query: dict, app: str) -> None:
        if not api.board.knows(app):
            raise ApiError(404, f"no app named {app}")
        self._send_json(200, api.traffic_details(app))

    def _restart(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(202, api.command(Action.RESTART, app))

    def _rollback(self, api: StatusServer, query: dict, app: str) -> None:
        body = self._read_json()
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            raise ApiError(400, "version must be a string")
        if body.get("with_data") is True:
            self._send_json(202, appops.rollback_with_data(api, app, version or None))
            return
        self._send_json(202, api.command(Action.ROLLBACK, app, version or None))

    def _env(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, appops.env_names(api, app))

    def _env_change(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, appops.env_change(api, app, self._read_json()))

    def _backups(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, appops.backups(api, app))

    def _take_backup(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, appops.take_backup(api, app))

    def _restore(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(202, appops.restore(api, app, self._read_json()))

    def _purge(self, api: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, appops.purge(api, app, self._read_json()))

    # -- plumbing --------------------------------------------------------------------

    def _take_body(self, refused: ApiError | None) -> bytes:
        """The body, read before anything answers: closing a connection with the body
        unread makes the client's send fail (EPIPE) or its read (a reset) lose the answer.
        A refused request's is read up to REFUSED_BODY only (past that, the refusal is the
        answer and the connection closes), and its connection may still be closed for
        another meanwhile: a stranger makes keter read no megabytes, and keeps out no one
        who logs in."""
        if refused is None:
            return self._read_body(MAX_BODY)
        if 0 <= self._body_length() <= REFUSED_BODY:
            self._read_body(REFUSED_BODY)
        else:
            self.close_connection = True
        return b""

    def _body_length(self) -> int:
        """The body's length its head declares (-1 if it says nonsense)."""
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return -1

    def _read_body(self, limit: int) -> bytes:
        length = self._body_length()
        if length < 0:
            self.close_connection = True
            raise ApiError(400, "bad Content-Length")
        if length > limit:
            self.close_connection = True
            raise ApiError(413, f"request body larger than {limit} bytes")
        try:
            body = self.rfile.read(length) if length > 0 else b""
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, f"the request body was not sent within {READ_SECONDS} s") from None
        if len(body) < length:  # the client hung up, or its connection was closed for another
            self.close_connection = True
            raise ApiError(400, "the request body ended early")
        return body

    def _read_json(self) -> dict:
        if not self.body.strip():
            return {}
        try:
            body = json.loads(self.body)
        except (ValueError, RecursionError):  # nested past Python's stack: not a bug of ours
            raise ApiError(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _send_json(self, code: int, value: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value, separators=(",", ":")).encode()
        self._send(code, data, "application/json", headers)

    def _send(
        self, code: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _app_name(text: str) -> str:
    try:
        return validate_app_name(text)
    except ValueError:
        raise ApiError(404, f"no app named {text[:64]!r}") from None


def _number(query: dict, key: str, default: float, kind: type) -> float:
    values = query.get(key)
    if not values:
        return default
    try:
        number = kind(values[0])
    except ValueError:
        raise ApiError(400, f"{key} must be a number") from None
    if not math.isfinite(number):
        raise ApiError(400, f"{key} must be a finite number")
    return number
