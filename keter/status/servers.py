"""The status API's listeners: the Unix socket ``ROOT/run/keter.sock`` and optional TCP.

Each listener accepts on a thread of its own and handles every connection on
a further thread (``ThreadingMixIn``), so a long poll never blocks the others.
"""

from __future__ import annotations

import contextlib
import grp
import http.server
import os
import socket
import socketserver
import threading
from pathlib import Path

from keter.status.handler import Handler
from keter.threadnames import name_this_thread

SOCKET_NAME = "keter.sock"


def socket_path(root: Path) -> Path:
    """Where the status API listens for ``keter ROOT``."""
    return Path(root) / "run" / SOCKET_NAME


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


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

    def _add(self, server: socketserver.BaseServer, *, tcp: bool) -> None:
        server.api = self.api  # type: ignore[attr-defined]
        server.tcp = tcp  # type: ignore[attr-defined]
        self._servers.append(server)

    def _serve(self, server: socketserver.BaseServer) -> None:
        """Accept connections until closing (each is handled on a thread of its own).

        Not serve_forever(): that notices a shutdown only at its next poll, a
        delay on every stop; this loop blocks until a connection comes, and
        closing wakes it (``_wake``).
        """
        name_this_thread()
        while not self._closing:
            server.handle_request()


def _wake(server: socketserver.BaseServer) -> None:
    # On Linux, shutting a listening socket down wakes the poll() waiting on it.
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)
