"""The HTTP layer the ``acme`` library talks to the CA through, with bounds.

``acme.client.ClientNetwork`` reads each answer whole into memory (``requests``
without ``stream``) and bounds only each read from the socket, not the answer:
a CA sending one byte every few seconds held keter's ACME component for good,
and a 1 GiB answer cost keter 2.6 GB of memory. ``BoundedNetwork`` is that class
with its one request method replaced: the answer is streamed, refused past
``MAX_ANSWER`` bytes, and the whole request (connecting, sending, every byte of
the answer) ends at a deadline, as does the whole order. At a deadline the
request's sockets are shut down from a timer thread, which ends a blocked read
at once however the CA dribbles. Either is an ``AnswerError``: a failed attempt.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import weakref
from typing import Any

import requests
from acme import client, errors
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from keter.threadnames import name_this_thread

MAX_ANSWER = 1 << 20  # bytes: certificates and ACME's JSON are a few KB


class AnswerError(errors.Error):
    """The CA's answer was too large or too slow."""


class BoundedNetwork(client.ClientNetwork):
    """``ClientNetwork`` whose every request ends within ``request_seconds`` and by
    ``deadline`` (``time.monotonic``, the whole order's), with at most ``MAX_ANSWER``
    bytes of answer."""

    def __init__(self, *args: Any, request_seconds: float, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.request_seconds = request_seconds
        self.deadline = deadline
        self._watch = _Watch()
        adapter = _Adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any):
        # The library's own, without its debug log of the answer (which reads it whole).
        now = time.monotonic()
        ends = min(now + self.request_seconds, self.deadline)
        if ends <= now:
            raise AnswerError("the order took too long, given up")
        kwargs["verify"] = self.verify_ssl
        kwargs.setdefault("headers", {}).setdefault("User-Agent", self.user_agent)
        kwargs["timeout"] = ends - now
        kwargs["stream"] = True
        with self._watch.until(ends):
            try:
                response = self.session.request(method, url, *args, **kwargs)
                with contextlib.closing(response):
                    body = _body(response)
            except requests.RequestException:
                if not self._watch.expired:
                    raise
                body = None
            if self._watch.expired:  # a body cut short may have looked whole
                raise AnswerError(f"no whole answer to {method} {url} in time")
        response._content = body  # what requests' .content, .text and .json() read
        if "Accept" not in kwargs["headers"]:
            response.encoding = "utf-8"  # as the library does: ACME's JSON is UTF-8
        return response

    def close(self) -> None:
        self.session.close()


def _body(response: requests.Response) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER:
        raise AnswerError(f"an answer of {declared} bytes, more than {MAX_ANSWER}")
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):  # decoded: a gzip bomb is bounded too
        size += len(chunk)
        if size > MAX_ANSWER:
            raise AnswerError(f"an answer of more than {MAX_ANSWER} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Watch:
    """The sockets a network's requests opened, shut down at a request's deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self.expired = False

    @contextlib.contextmanager
    def until(self, ends: float):
        self.expired = False
        _current.watch = self  # the connections this thread opens are watched
        timer = threading.Timer(max(0.0, ends - time.monotonic()), self._expire)
        timer.name, timer.daemon = "keter-acme-timer", True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            _current.watch = None

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        name_this_thread()
        with self._lock:
            self.expired = True
            for sock in list(self._sockets):
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked on it returns now


_current = threading.local()


class _Watched:
    """A urllib3 connection whose socket the calling thread's ``_Watch`` knows."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.add(sock)
        return sock


class _Connection(_Watched, HTTPConnection):
    pass


class _TlsConnection(_Watched, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


class _Adapter(HTTPAdapter):
    """requests' adapter, with watched connections (direct or through an HTTP proxy)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}

    def proxy_manager_for(self, proxy: str, **kwargs: Any):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
        return manager
