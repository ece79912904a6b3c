"""The status component: what keter is doing, for operators, over HTTP.

The supervisor tells this actor every change (``AppChanged``, ``AppGone``,
``DeployFinished``, ``AppEvent``); it never looks at the supervisor's objects.
From those facts it keeps each app's latest snapshot, a recent-events feed,
the deploy history (``keter.history``, saved under ROOT/etc), Prometheus
metrics, and an archive of served bundles for rollback (``keter.archive``).

It serves all of that on ``ROOT/run/keter.sock`` (mode 0660, group root or
``status-group``) and optionally on TCP (``status-listen``): a JSON API, the
``/metrics`` page and the web dashboard. HTTP requests run on the servers'
own threads; they read the actor's state under ``self._cond`` and hand
restart and rollback to the actor's thread as private messages, so every
change to incoming/ and the archive happens in one place.

Writes (POST) need the per-process token from ``/api/token`` (embedded in the
dashboard's pages) in an ``X-Keter-Token`` header, a same-origin ``Origin``
when a browser sends one, and every request a Host header naming this
server, which stops DNS-rebinding pages from reading the API.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import grp
import hashlib
import hmac
import http.server
import json
import logging
import os
import queue
import re
import secrets
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from keter import __version__
from keter.actor import Actor
from keter.archive import SUFFIX, ArchiveError, BundleArchive
from keter.bundle import validate_app_name
from keter.config import KeterConfig
from keter.history import DeployHistory
from keter.logtail import tail_lines
from keter.messages import AppChanged, AppEvent, AppGone, AppSnapshot, DeployFinished
from keter.routes import approot

log = logging.getLogger(__name__)

SOCKET_NAME = "keter.sock"
TOKEN_HEADER = "X-Keter-Token"
EVENTS_KEPT = 100
MAX_LOG_LINES = 1000
LONG_POLL_SECONDS = 30.0  # the longest a history request waits for a new entry
COMMAND_TIMEOUT = 60.0  # archiving a large bundle may hold the actor for a while
MAX_BODY = 4096
DASHBOARD_DIR = Path(__file__).parent / "dashboard"
STATIC_FILES = {"dashboard.js": "text/javascript", "style.css": "text/css"}
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


def socket_path(root: Path) -> Path:
    """Where the status API listens for ``keter ROOT``."""
    return Path(root) / "run" / SOCKET_NAME


def is_health_check_failure(reason: str) -> bool:
    """Whether a failed deploy's reason says the app never passed its health check."""
    return "did not answer" in reason or "health check" in reason


def app_urls(hosts: tuple[str, ...], config: KeterConfig) -> list[str]:
    """Where an app is reached through nginx, as in its APPROOT (wildcards have no one URL)."""
    return [
        approot(host, secure=False, settings=config) + "/"
        for host in hosts
        if not host.startswith("*.")
    ]


class ApiError(Exception):
    """An HTTP error answer: ``status`` and a message for the operator."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, kw_only=True)
class _Command:
    """restart or rollback, from an HTTP thread to the actor; the answer comes back in reply."""

    action: str
    app: str
    version: str | None = None
    reply: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Metrics:
    """keter's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.up = Gauge(
            "keter_app_up", "1 while the app's serving version runs", ["app"], registry=r
        )
        self.deploys = Counter(
            "keter_deploys", "Finished deploy attempts by outcome", ["app", "outcome"], registry=r
        )
        self.duration = Histogram(
            "keter_deploy_duration_seconds",
            "Seconds from bundle seen to serving, for deploys that reached serving",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "keter_restarts", "Restarts of a serving version after a crash", ["app"], registry=r
        )
        self.health_check_failures = Counter(
            "keter_health_check_failures",
            "Deploys abandoned because the new version failed its health check",
            ["app"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusServer(Actor):
    """The status actor and its HTTP servers (Unix socket, optional TCP)."""

    def __init__(self, config: KeterConfig, report_to: queue.Queue | None = None) -> None:
        super().__init__("status", report_to)
        self.config = config
        self.socket_path = socket_path(config.root)
        self.token = secrets.token_urlsafe(32)
        self.metrics = Metrics()
        self.history = DeployHistory(config.etc_dir / "history.json")
        self.archive = BundleArchive(config.archive_dir, config.archive_keep)
        self.started_at = time.time()
        self.tcp_address: tuple[str, int] | None = None  # once listening
        self.listening = threading.Event()  # set once every server accepts connections
        self._allowed_hosts = _allowed_hosts(config)
        self._cond = threading.Condition()  # guards everything below
        self._apps: dict[str, AppSnapshot] = {}
        self._events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self._closing = False
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._socket_inode: int | None = None

    # -- the actor ---------------------------------------------------------------------

    def on_start(self) -> None:
        self.history.load()
        self._servers.append(self._bind_unix())
        if self.config.status_listen is not None:
            server = self._bind_tcp(*self.config.status_listen)
            self.tcp_address = server.server_address[:2]
            self._servers.append(server)
        for server in self._servers:
            server.status = self  # type: ignore[attr-defined]
            thread = threading.Thread(
                target=self._serve, args=(server,), name="keter-status-http", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        where = f" and http://{_join_host_port(*self.tcp_address)}" if self.tcp_address else ""
        log.info("keter: status API on %s%s", self.socket_path, where)
        self.listening.set()

    def on_stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # long polls answer now
        for server, thread in zip(self._servers, self._threads, strict=False):
            self._wake(server)
            thread.join()
        for server in self._servers:
            server.server_close()
        # Removed only if it is still ours: the path is all a client has to tell "not running".
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()

    def _serve(self, server: socketserver.BaseServer) -> None:
        """Accept connections until stopping (each is handled on a thread of its own).

        Not serve_forever(): that notices a shutdown only at its next poll, a
        delay on every stop; this loop blocks until a connection comes, and
        stopping wakes it (``_wake``).
        """
        while not self._closing:
            server.handle_request()

    @staticmethod
    def _wake(server: socketserver.BaseServer) -> None:
        # On Linux, shutting a listening socket down wakes the poll() waiting on it.
        with contextlib.suppress(OSError):
            server.socket.shutdown(socket.SHUT_RDWR)

    def handle(self, message: object) -> None:
        match message:
            case AppChanged(snapshot=snapshot):
                self._app_changed(snapshot)
            case AppGone(app=app):
                with self._cond:
                    self._apps.pop(app, None)
                with contextlib.suppress(KeyError):
                    self.metrics.up.remove(app)
            case DeployFinished():
                self._deploy_finished(message)
            case AppEvent(app=app, kind=kind, text=text, at=at):
                self._add_event(app, kind, text, at)
            case _Command():
                self._run_command(message)
            case _:
                raise TypeError(f"status: unexpected message {message!r}")

    def _app_changed(self, snapshot: AppSnapshot) -> None:
        with self._cond:
            previous = self._apps.get(snapshot.app)
            self._apps[snapshot.app] = snapshot
        self.metrics.up.labels(snapshot.app).set(1 if snapshot.state == "running" else 0)
        # restarts counts crashes of the serving version; a new version starts again at 0.
        if previous is not None and previous.version == snapshot.version:
            added = snapshot.restarts - previous.restarts
        else:
            added = snapshot.restarts
        if added > 0:
            self.metrics.restarts.labels(snapshot.app).inc(added)

    def _deploy_finished(self, msg: DeployFinished) -> None:
        self.metrics.deploys.labels(msg.app, msg.outcome).inc()
        if msg.outcome == "serving":
            self.metrics.duration.observe(msg.duration)
        elif msg.outcome == "failed" and is_health_check_failure(msg.reason):
            self.metrics.health_check_failures.labels(msg.app).inc()
        if msg.outcome == "serving":
            self._archive(msg)  # before the verdict is visible, so a rollback can use it at once
        with self._cond:
            self.history.record(msg)
            self._cond.notify_all()
        text = {
            "serving": f"version {msg.version} serving (took {msg.duration:.1f}s)",
            "failed": f"version {msg.version} failed: {msg.reason}",
        }.get(msg.outcome, f"version {msg.version} {msg.outcome}: {msg.reason}")
        self._add_event(msg.app, f"deploy-{msg.outcome}", text, msg.at)

    def _archive(self, msg: DeployFinished) -> None:
        bundle = self.config.incoming_dir / f"{msg.app}{SUFFIX}"
        try:
            self.archive.store(msg.app, bundle, msg.sha256, msg.at)
        except ArchiveError as exc:
            log.warning("%s: version %s not archived: %s", msg.app, msg.version, exc)
        except OSError as exc:
            log.error("%s: cannot archive version %s: %s", msg.app, msg.version, exc)

    def _add_event(self, app: str, kind: str, text: str, at: float) -> None:
        with self._cond:
            self._events.append({"at": at, "app": app, "kind": kind, "text": text})

    # -- restart and rollback (in the actor's thread) ------------------------------------

    def _run_command(self, command: _Command) -> None:
        try:
            if command.action == "restart":
                result = self._restart(command.app)
            else:
                result = self._rollback(command.app, command.version)
        except ApiError as exc:
            command.reply.set_exception(exc)
        except OSError as exc:
            log.error("%s: %s failed: %s", command.app, command.action, exc)
            command.reply.set_exception(ApiError(500, f"{command.action} failed: {exc}"))
        else:
            command.reply.set_result(result)

    def _restart(self, app: str) -> dict:
        if app not in self._apps:
            raise ApiError(404, f"no app named {app}")
        bundle = self.config.incoming_dir / f"{app}{SUFFIX}"
        after = self.history.seq
        try:
            with open(bundle, "rb") as f:
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            os.utime(bundle)  # the watcher redeploys a touched bundle
        except FileNotFoundError:
            raise ApiError(409, f"{app} has no bundle in incoming/ to restart") from None
        log.info("%s: restart requested through the status API", app)
        return {"app": app, "version": sha256[:12], "sha256": sha256, "after": after}

    def _rollback(self, app: str, version: str | None) -> dict:
        archived = self.archive.versions(app)
        if app not in self._apps and not archived:
            raise ApiError(404, f"no app named {app}")
        try:
            if version:
                chosen = self.archive.find(app, version)
            else:
                current = self._apps[app].version if app in self._apps else None
                older = [bundle for bundle in archived if bundle.version != current]
                if not older:
                    shown = ", ".join(bundle.version for bundle in archived) or "none"
                    raise ApiError(409, f"{app} has no earlier version archived ({shown})")
                chosen = older[0]
            after = self.history.seq
            self.archive.restore(app, chosen, self.config.incoming_dir)
        except ArchiveError as exc:
            raise ApiError(409, str(exc)) from None
        log.info("%s: rolling back to version %s", app, chosen.version)
        return {"app": app, "version": chosen.version, "sha256": chosen.sha256, "after": after}

    def command(self, action: str, app: str, version: str | None = None) -> dict:
        """Run restart or rollback in the actor's thread and wait for the answer (HTTP threads)."""
        request = _Command(action=action, app=app, version=version)
        self.tell(request)
        try:
            return request.reply.result(timeout=COMMAND_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise ApiError(503, "keter is busy or stopping; try again") from None

    # -- views (HTTP threads) --------------------------------------------------------------

    def status_view(self) -> dict:
        """Every app, the recent events and keter's own facts."""
        now = time.time()
        with self._cond:
            apps = [self._app_json(self._apps[name], now) for name in sorted(self._apps)]
            events = list(reversed(self._events))
            seq = self.history.seq
        keter = {
            "version": __version__,
            "root": str(self.config.root),
            "pid": os.getpid(),
            "started_at": self.started_at,
        }
        return {"keter": keter, "now": now, "apps": apps, "events": events, "history_seq": seq}

    def app_view(self, app: str) -> dict:
        """One app with its whole history and archived versions; 404 if keter never saw it."""
        now = time.time()
        with self._cond:
            snapshot = self._apps.get(app)
            if snapshot is not None:
                view = self._app_json(snapshot, now)
            elif app in self.history:
                view = {"name": app, "state": "removed", "last_deploy": self.history.last(app)}
            else:
                raise ApiError(404, f"no app named {app}")
            view["history"] = list(reversed(self.history.entries(app)))
            view["events"] = [e for e in reversed(self._events) if e["app"] == app]
        view["archive"] = [
            {"version": b.version, "sha256": b.sha256, "served_at": b.served_at}
            for b in self.archive.versions(app)
        ]
        view["now"] = now
        return view

    def history_after(self, app: str, after: int, wait: float) -> dict:
        """The app's history entries newer than ``after``, waiting up to ``wait`` s for one.

        An app keter has not seen yet is no error: its first bundle may be on its way.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._closing or self.history.entries(app, after),
                timeout=min(max(wait, 0.0), LONG_POLL_SECONDS),
            )
            return {"app": app, "entries": self.history.entries(app, after)}

    def log_lines(self, app: str, count: int) -> dict:
        with self._cond:
            if app not in self._apps and app not in self.history:
                raise ApiError(404, f"no app named {app}")
        path = self.config.log_dir / f"app-{app}.log"
        try:
            lines = tail_lines(path, min(max(count, 0), MAX_LOG_LINES))
        except FileNotFoundError:
            lines = []
        return {"app": app, "file": str(path), "lines": lines}

    def _app_json(self, snapshot: AppSnapshot, now: float) -> dict:
        started = snapshot.started_at
        return {
            "name": snapshot.app,
            "state": snapshot.state,
            "version": snapshot.version,
            "bundle_mtime": snapshot.bundle_mtime,
            "hosts": list(snapshot.hosts),
            "urls": app_urls(snapshot.hosts, self.config),
            "port": snapshot.port,
            "pid": snapshot.pid,
            "started_at": started,
            "uptime": now - started if started is not None and snapshot.pid else None,
            "restarts": snapshot.restarts,
            "database": snapshot.database,
            "deploying": snapshot.deploying,
            "last_deploy": self.history.last(snapshot.app),
        }

    # -- request checks ----------------------------------------------------------------

    def check_host(self, host: str | None) -> None:
        """Refuse requests for a name this server does not answer to (DNS rebinding)."""
        if self._allowed_hosts is None:
            return
        if host is None or _host_name(host) not in self._allowed_hosts:
            raise ApiError(421, "this keter does not answer to that Host")

    def check_write(self, headers: http.server.BaseHTTPRequestHandler.MessageClass) -> None:
        """CSRF protection for POST: same-origin browsers with the page's token only."""
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != headers.get("Host"):
            raise ApiError(403, "cross-origin request refused")
        if headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
            raise ApiError(403, "cross-site request refused")
        given = headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(403, f"missing or wrong {TOKEN_HEADER} header (reload the page)")

    # -- listening ---------------------------------------------------------------------

    def _bind_unix(self) -> socketserver.BaseServer:
        """Listen on ROOT/run/keter.sock, mode 0660, group root or ``status-group``.

        The socket is bound under a temporary name, given its owner and mode,
        then renamed into place: it is never reachable with the wrong mode,
        and a stale socket of an earlier run is replaced in one step.
        """
        run_dir = self.socket_path.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{SOCKET_NAME}.{os.getpid()}"
        if len(os.fsencode(tmp)) >= 108:  # sun_path's size on Linux
            raise OSError(f"{self.socket_path}: path too long for a Unix socket (max 107 bytes)")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        server = _UnixHTTPServer(str(tmp), _Handler)
        try:
            group = self.config.status_group
            gid = grp.getgrnam(group).gr_gid if group else os.getgid()
            os.chown(tmp, -1, gid)
            os.chmod(tmp, 0o660)
            os.replace(tmp, self.socket_path)
            self._socket_inode = os.stat(self.socket_path).st_ino
        except BaseException:
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return server

    @staticmethod
    def _bind_tcp(host: str, port: int) -> socketserver.BaseServer:
        server_class = _TCP6HTTPServer if ":" in host else _TCPHTTPServer
        try:
            return server_class((host, port), _Handler)
        except OSError as exc:
            raise OSError(
                f"status-listen {_join_host_port(host, port)}: {exc.strerror or exc}"
            ) from None


# -- HTTP --------------------------------------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _TCP6HTTPServer(_TCPHTTPServer):
    address_family = socket.AF_INET6


_APP = r"/api/apps/(?P<app>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/"), "index"),
    ("GET", re.compile(r"/app/(?P<app>[^/]+)"), "app_page"),
    ("GET", re.compile(r"/static/(?P<name>[a-z.]+)"), "static"),
    ("GET", re.compile(r"/metrics"), "metrics"),
    ("GET", re.compile(r"/api/token"), "token"),
    ("GET", re.compile(r"/api/status"), "status"),
    ("GET", re.compile(_APP), "app"),
    ("GET", re.compile(_APP + r"/history"), "history"),
    ("GET", re.compile(_APP + r"/log"), "log"),
    ("POST", re.compile(_APP + r"/restart"), "restart"),
    ("POST", re.compile(_APP + r"/rollback"), "rollback"),
]
_HTML_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "keter-status"
    sys_version = ""
    timeout = 15  # a stalled client must not hold a thread for ever

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: object) -> None:
        pass  # the dashboard polls every second; keter's log is for events

    def _dispatch(self, method: str) -> None:
        status: StatusServer = self.server.status  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        self.body = b""
        try:
            # Read before anything can answer: closing a connection with the body unread
            # makes the client's send fail (EPIPE) or its read (a reset) lose the answer.
            if method == "POST":
                self.body = self._read_body()
            status.check_host(self.headers.get("Host"))
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if match:
                    if route_method != method:
                        raise ApiError(405, f"{url.path} does not take {method}")
                    if method == "POST":
                        status.check_write(self.headers)
                    args = match.groupdict()
                    if "app" in args:
                        args["app"] = _app_name(args["app"])
                    getattr(self, f"_{name}")(status, parse_qs(url.query), **args)
                    return
            raise ApiError(404, f"nothing at {url.path}")
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message})
        except Exception:  # a bug answers 500 instead of dropping the connection
            log.exception("keter: status request %s %s failed", method, url.path)
            self._send_json(500, {"error": "internal error; see keter's log"})

    # -- pages -----------------------------------------------------------------------

    def _index(self, status: StatusServer, query: dict) -> None:
        self._page(status, "index.html")

    def _app_page(self, status: StatusServer, query: dict, app: str) -> None:
        self._page(status, "app.html")

    def _page(self, status: StatusServer, name: str) -> None:
        html = (DASHBOARD_DIR / name).read_text().replace("{{token}}", status.token)
        self._send(200, html.encode(), "text/html; charset=utf-8", _HTML_HEADERS)

    def _static(self, status: StatusServer, query: dict, name: str) -> None:
        if name not in STATIC_FILES:
            raise ApiError(404, f"nothing at /static/{name}")
        data = (DASHBOARD_DIR / name).read_bytes()
        self._send(200, data, f"{STATIC_FILES[name]}; charset=utf-8")

    def _metrics(self, status: StatusServer, query: dict) -> None:
        self._send(200, status.metrics.render(), CONTENT_TYPE_LATEST)

    # -- API -------------------------------------------------------------------------

    def _token(self, status: StatusServer, query: dict) -> None:
        self._send_json(200, {"token": status.token, "header": TOKEN_HEADER})

    def _status(self, status: StatusServer, query: dict) -> None:
        self._send_json(200, status.status_view())

    def _app(self, status: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, status.app_view(app))

    def _history(self, status: StatusServer, query: dict, app: str) -> None:
        after = _number(query, "after", 0, int)
        wait = _number(query, "wait", 0.0, float)
        self._send_json(200, status.history_after(app, after, wait))

    def _log(self, status: StatusServer, query: dict, app: str) -> None:
        self._send_json(200, status.log_lines(app, _number(query, "n", 100, int)))

    def _restart(self, status: StatusServer, query: dict, app: str) -> None:
        self._send_json(202, status.command("restart", app))

    def _rollback(self, status: StatusServer, query: dict, app: str) -> None:
        body = self._read_json()
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            raise ApiError(400, "version must be a string")
        self._send_json(202, status.command("rollback", app, version or None))

    # -- plumbing --------------------------------------------------------------------

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _read_json(self) -> dict:
        if not self.body.strip():
            return {}
        try:
            body = json.loads(self.body)
        except ValueError:
            raise ApiError(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _send_json(self, code: int, value: object) -> None:
        data = json.dumps(value, separators=(",", ":")).encode()
        self._send(code, data, "application/json")

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
        return kind(values[0])
    except ValueError:
        raise ApiError(400, f"{key} must be a number") from None


def _allowed_hosts(config: KeterConfig) -> frozenset[str] | None:
    """The Host names the API answers to; None when it listens on every address."""
    hosts = {"localhost", "127.0.0.1", "::1"}
    if config.dashboard_host:
        hosts.add(config.dashboard_host)
    if config.status_listen is not None:
        address = config.status_listen[0]
        if address in ("0.0.0.0", "::"):
            return None  # reached under any of the machine's names
        hosts.add(address)
    return frozenset(hosts)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port and IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
