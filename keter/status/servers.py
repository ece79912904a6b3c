"""The status API's listeners: the Unix socket ``ROOT/run/keter.sock`` and optional TCP.

Each listener accepts on a thread of its own and handles every connection on
a further thread (``ThreadingMixIn``), so a long poll never blocks the others.

Whoever can connect is not trusted yet (on TCP, anyone who reaches the port,
before any login), so what a connection can hold is bounded: at most
``MAX_CONNECTIONS`` at once per listener, and the request head
(``handler.Handler``) is bounded in size and time. When every slot is taken and
a client comes, the connection that has waited longest for its request to be let
in is closed to make room for it: clients that connect and send nothing, or a
byte now and then, had held every slot and locked out every client that sends
its request at once, each for as long as they reconnected. With none to close,
the newcomer is not accepted until a slot frees: it waits in the listen queue
(``BACKLOG``), within its own timeout. Closed at once instead, a burst of CLI
calls behind 256 long polls (each waiting `keter deploy`) had failed with a
broken pipe. Long polls have a share of the slots of their own
(``MAX_LONG_POLLS``), so that requests answered at once always find room. A
client that hangs up early is not an error of keter's.
"""

from __future__ import annotations

import contextlib
import grp
import http.server
import logging
import os
import select
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from keter.status.handler import Handler
from keter.threadnames import name_this_thread

log = logging.getLogger(__name__)

SOCKET_NAME = "keter.sock"


def socket_path(root: Path) -> Path:
    """Where the status API listens for ``keter ROOT``."""
    return Path(root) / "run" / SOCKET_NAME


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Connections handled at once per listener: each holds a thread. The Unix socket's
# users are root and keter's group (long polls of `keter deploy`, the CLI); TCP is
# the dashboard's and the metrics scraper's, reachable by more.
MAX_CONNECTIONS = {False: 256, True: 64}  # keyed by "is TCP"
# How many of them may wait for news at once (history requests with a wait: every waiting
# `keter deploy`, restart, rollback, env set); one more waits SHORT_POLL at most, so the
# rest of the slots stay free for requests answered at once.
MAX_LONG_POLLS = {False: 192, True: 48}
SHORT_POLL = 1.0
# How long a new connection waits for the slot of one closed for it (its thread ends
# as soon as its read fails, in microseconds).
EVICT_WAIT = 1.0
# How often a client waiting in the listen queue for a slot looks for a connection to close
# for it (a request that ended waits for the next on its connection).
SLOT_POLL = 0.25
BACKLOG = 128
# A client gone before its answer was written: its own doing.
_HUNG_UP = (BrokenPipeError, ConnectionResetError, TimeoutError)


class _Bounded:
    """A threading server that gives at most ``slots`` connections a thread at once,
    closing, to make room, the one that has waited longest for its request to be let
    in (its request read; on TCP, its login checked: see the handler), and otherwise
    leaving the newcomer in the listen queue until a slot frees."""

    daemon_threads = True
    request_queue_size = BACKLOG
    slots: threading.BoundedSemaphore
    long_polls: threading.BoundedSemaphore

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        # Connections whose request is not let in yet, and since when they wait.
        self._awaiting: dict[socket.socket, float] = {}
        self._awaiting_lock = threading.Lock()
        self._slot_held = False  # by the accept thread, for the next connection

    def may_close(self, connection: socket.socket) -> None:
        """From now ``connection`` may be closed to make room for another."""
        with self._awaiting_lock:
            self._awaiting[connection] = time.monotonic()

    def keep(self, connection: socket.socket) -> None:
        """``connection``'s request is let in (or it ended): it is not closed for another."""
        with self._awaiting_lock:
            self._awaiting.pop(connection, None)

    @contextlib.contextmanager
    def long_poll(self, wait: float) -> Iterator[float]:
        """How long a request may wait for news: ``wait``, or SHORT_POLL at most while
        every long poll's slot is taken."""
        if wait <= SHORT_POLL or not self.long_polls.acquire(blocking=False):
            yield min(wait, SHORT_POLL)
            return
        try:
            yield wait
        finally:
            self.long_polls.release()

    def take_slot(self) -> bool:
        """Hold a slot for the next connection (the accept thread, before accepting it);
        False if none could be had yet. With every slot taken, the newcomer stays in the
        listen queue (its client waits there) until a connection is closed for it or a
        request ends."""
        if not self._slot_held:
            self._slot_held = self.slots.acquire(blocking=False) or self._slot_for_newcomer()
        return self._slot_held

    def _slot_for_newcomer(self) -> bool:
        """Wait for a client, then for a slot for it: closing no one for no one."""
        waiting = select.poll()
        waiting.register(self.socket, select.POLLIN)  # type: ignore[attr-defined]
        waiting.poll()  # closing the listener wakes it too (``_wake``)
        if self.slots.acquire(blocking=False):  # a request ended meanwhile
            return True
        if self._close_longest_waiting():
            return self.slots.acquire(timeout=EVICT_WAIT)
        return self.slots.acquire(timeout=SLOT_POLL)

    def process_request(self, request, client_address) -> None:
        self._slot_held = False  # the connection's thread gives it back
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.slots.release()  # no thread was started to release it
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.keep(request)
            self.slots.release()

    def _close_longest_waiting(self) -> bool:
        """Close the connection that has waited longest to be let in; False if none is
        waiting. Its handler's read ends at once, and its thread with it."""
        with self._awaiting_lock:
            if not self._awaiting:
                return False
            longest = min(self._awaiting, key=self._awaiting.__getitem__)
            del self._awaiting[longest]
            # Under the lock: a request let in (keep) meanwhile would be cut mid-way.
            with contextlib.suppress(OSError):  # it ended meanwhile
                longest.shutdown(socket.SHUT_RDWR)
        return True

    def handle_error(self, request, client_address) -> None:
        """One line in keter's log, not socketserver's traceback on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, _HUNG_UP):
            return
        log.error("keter: status connection failed: %s: %s", type(error).__name__, error)
        log.debug("status connection failure", exc_info=True)


class _UnixHTTPServer(_Bounded, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    pass


class _TCPHTTPServer(_Bounded, http.server.ThreadingHTTPServer):
    pass


class _TCP6HTTPServer(_TCPHTTPServer):
    address_family = socket.AF_INET6


class Listeners:
    """The listening sockets, their accept threads, and closing them."""

    def __init__(self, api: object) -> None:
        self.api = api  # what the handler serves (the StatusServer)
        self.socket_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._socket_inode: int | None = None
        self._closing = False

    @property
    def bound(self) -> bool:
        return bool(self._servers)

    def bind_unix(self, path: Path, group: str | None) -> None:
        """Listen on ``path``, mode 0660, group root or ``group``.

        The socket is bound under a temporary name, given its owner and mode,
        then renamed into place: it is never reachable with the wrong mode,
        and a stale socket of an earlier run is replaced in one step.
        """
        run_dir = path.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{path.name}.{os.getpid()}"
        if len(os.fsencode(tmp)) >= 108:  # sun_path's size on Linux
            raise OSError(f"{path}: path too long for a Unix socket (max 107 bytes)")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        server = _UnixHTTPServer(str(tmp), Handler)
        try:
            gid = grp.getgrnam(group).gr_gid if group else os.getgid()
            os.chown(tmp, -1, gid)
            os.chmod(tmp, 0o660)
            os.replace(tmp, path)
            self._socket_inode = os.stat(path).st_ino
        except BaseException:
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.socket_path = path
        self._add(server, tcp=False)

    def bind_tcp(self, host: str, port: int) -> None:
        server_class = _TCP6HTTPServer if ":" in host else _TCPHTTPServer
        try:
            server = server_class((host, port), Handler)
        except OSError as exc:
            raise OSError(
                f"status-listen {join_host_port(host, port)}: {exc.strerror or exc}"
            ) from None
        self.tcp_address = server.server_address[:2]
        self._add(server, tcp=True)

    def start(self) -> None:
        for server in self._servers:
            thread = threading.Thread(
                target=self._serve, args=(server,), name="keter-status-http", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop accepting, then remove the socket if it is still ours."""
        self._closing = True
        for server in self._servers:
            _wake(server)
        for thread in self._threads:
            thread.join()
        for server in self._servers:
            server.server_close()
        # Removed only if it is still ours: the path is all a client has to tell "not running".
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.socket_path).st_ino == self._socket_inode:
                    self.socket_path.unlink()
        # Ready to bind again (a failed bind is closed and tried again at a restart).
        self._servers.clear()
        self._threads.clear()
        self.socket_path = self.tcp_address = self._socket_inode = None
        self._closing = False

    def _add(self, server: socketserver.BaseServer, *, tcp: bool) -> None:
        server.api = self.api  # type: ignore[attr-defined]
        server.tcp = tcp  # type: ignore[attr-defined]
        server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS[tcp])  # type: ignore[attr-defined]
        server.long_polls = threading.BoundedSemaphore(MAX_LONG_POLLS[tcp])  # type: ignore[attr-defined]
        self._servers.append(server)

    def _serve(self, server: socketserver.BaseServer) -> None:
        """Accept connections until closing (each is handled on a thread of its own).

        Not serve_forever(): that notices a shutdown only at its next poll, a
        delay on every stop; this loop blocks until a connection comes, and
        closing wakes it (``_wake``).
        """
        name_this_thread()
        while not self._closing:
            if server.take_slot():  # type: ignore[attr-defined]
                server.handle_request()


def _wake(server: socketserver.BaseServer) -> None:
    # On Linux, shutting a listening socket down wakes the poll() waiting on it.
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)
