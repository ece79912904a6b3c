"""Health probes: does a new version really answer HTTP on its port?

A probe connects to 127.0.0.1:PORT, sends one ``GET`` of the app's health path
with its Host, and reads the status line, all within one deadline.

ONE thread runs every probe (``Prober``): each is a non-blocking socket in a
selector, so an app that is slow to answer holds its own probe and nothing
else. A pool of four blocking probes had made every app's checks wait behind
four slow ones: in a drop of 1000 apps, CPU-starved starts took the pool's
workers for up to a second each, and healthy apps waited up to 5 s in its
queue. An app that accepts and never answers had the same effect on purpose.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable

from keter.messages import HealthCheck
from keter.processes.mailbox import Mailbox
from keter.threadnames import name_this_thread

log = logging.getLogger(__name__)

MAX_HEAD = 4096  # bytes read looking for the status line's end
_CLOSE = object()  # the mailbox item that ends the prober's thread


def is_healthy(status: int, strict: bool) -> bool:
    """An explicit health-check path must answer 2xx/3xx; "/" anything below 500."""
    return 200 <= status < 400 if strict else status < 500


_SAFE_PATH = re.compile(r"/[\x21-\x7e]*")  # no spaces or control characters: no injection
_SAFE_HOST = re.compile(r"[\x21-\x7e]+")
# A whole status line: the code is three digits from 100, then the reason (may be empty).
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? ([1-9]\d\d)(?: [^\r\n]*)?\r?\n")


class Exchange:
    """One probe as a non-blocking state machine: connect, send the request, read
    until the status line has ended. ``result`` is (healthy, what happened) once done;
    whoever runs it closes it then (``close``)."""

    def __init__(self, port: int, check: HealthCheck, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.result: tuple[bool, str] | None = None
        self.sock: socket.socket | None = None
        self._check = check
        self._connecting = True
        self._head = b""
        if not _SAFE_PATH.fullmatch(check.path) or not _SAFE_HOST.fullmatch(check.host):
            self._out = b""
            self.result = (
                False,
                f"invalid health check path {check.path!r} or host {check.host!r}",
            )
            return
        self._out = (
            f"GET {check.path} HTTP/1.1\r\nHost: {check.host}\r\n"
            "User-Agent: keter-health-check\r\nConnection: close\r\n\r\n"
        ).encode()
        self.sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        code = self.sock.connect_ex(("127.0.0.1", port))
        if code == 0:
            self._connecting = False
        elif code != errno.EINPROGRESS:
            self.finish(False, _reason(code))

    @property
    def events(self) -> int:
        """What the socket waits for next."""
        return selectors.EVENT_WRITE if self._connecting or self._out else selectors.EVENT_READ

    def step(self) -> None:
        """Go as far as the socket allows now."""
        assert self.sock is not None and self.result is None
        try:
            if self._connecting:
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self.finish(False, _reason(code))
                    return
                self._connecting = False
            while self._out:
                self._out = self._out[self.sock.send(self._out) :]
            while b"\n" not in self._head and len(self._head) < MAX_HEAD:
                chunk = self.sock.recv(1024)
                if not chunk:
                    break
                self._head += chunk
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(False, exc.strerror or str(exc))
            return
        match = _STATUS_LINE.match(self._head)
        if not match:
            self.finish(False, "not an HTTP answer")
            return
        status = int(match.group(1))
        self.finish(is_healthy(status, self._check.strict), f"HTTP {status} on {self._check.path}")

    def expire(self) -> None:
        """The deadline passed: an app that answers a byte at a time is no answer either."""
        self.finish(False, f"no answer within {self.timeout:g}s")

    def finish(self, healthy: bool, detail: str) -> None:
        self.result = (healthy, detail)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _reason(code: int) -> str:
    return "connection refused" if code == errno.ECONNREFUSED else os.strerror(code)


# on_done(key, healthy, what happened); called in the prober's thread.
DoneCallback = Callable[[object, bool, str], None]


class Prober:
    """Runs health probes in one thread; ``on_done(key, ...)`` reports each."""

    def __init__(self, on_done: DoneCallback) -> None:
        self._on_done = on_done
        self._requests = Mailbox()  # (key, port, check, timeout), or _CLOSE
        self._selector = selectors.DefaultSelector()
        self._deadlines: list[tuple[float, int, object, Exchange]] = []  # a heap
        self._order = itertools.count()  # ties in the heap never compare exchanges
        self._thread = threading.Thread(target=self._loop, name="keter-probes", daemon=True)
        self._started = False

    def probe(self, key: object, port: int, check: HealthCheck, timeout: float) -> None:
        """Probe 127.0.0.1:``port`` once, within ``timeout`` seconds (any thread)."""
        self._requests.put((key, port, check, timeout))
        if not self._started:
            self._started = True
            self._thread.start()

    def close(self, timeout: float) -> None:
        """End the thread; probes still out are dropped, unreported."""
        if self._started:
            self._requests.put(_CLOSE)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            for selected in list(self._selector.get_map().values()):
                if selected.data is not None:
                    selected.data[1].close()
            self._selector.close()
            self._requests.close()

    # -- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        name_this_thread()
        self._selector.register(self._requests, selectors.EVENT_READ, None)
        while True:
            timeout = None
            if self._deadlines:
                timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
            for selected, _ in self._selector.select(timeout):
                if selected.data is None:
                    if not self._take_requests():
                        return
                    continue
                key, exchange = selected.data
                self._guarded(key, exchange, exchange.step)
            self._expire_due()

    def _take_requests(self) -> bool:
        """Start each probe asked for; False once asked to close."""
        for request in self._requests.take():
            if request is _CLOSE:
                return False
            self._start(*request)
        return True

    def _start(self, key: object, port: int, check: HealthCheck, timeout: float) -> None:
        """Start one probe; one that cannot start is reported failed at once, and the
        thread goes on with every other app's."""
        exchange: Exchange | None = None
        try:
            exchange = Exchange(port, check, timeout)
            if exchange.result is None:  # else refused at once, or an invalid check
                assert exchange.sock is not None
                self._selector.register(exchange.sock, exchange.events, (key, exchange))
                deadline = (exchange.deadline, next(self._order), key, exchange)
                heapq.heappush(self._deadlines, deadline)
                return
            result = exchange.result
        except OSError as exc:  # no socket to be had (EMFILE), no room in the selector
            result = (False, exc.strerror or str(exc))
        except Exception as exc:
            log.exception("processes: a health probe could not start")
            result = (False, f"probe failed: {type(exc).__name__}")
        if exchange is not None:
            exchange.close()
        self._report(key, *result)

    def _guarded(self, key: object, exchange: Exchange, action: Callable[[], None]) -> None:
        """Run one step of one probe: whatever it raises fails that probe alone."""
        sock = exchange.sock
        try:
            action()
        except Exception as exc:
            log.exception("processes: a health probe failed")
            exchange.finish(False, f"probe failed: {type(exc).__name__}")
        if exchange.result is None:
            if self._selector.get_key(sock).events != exchange.events:
                self._selector.modify(sock, exchange.events, (key, exchange))
            return
        self._selector.unregister(sock)  # while it has its descriptor: a closed one is
        exchange.close()  # looked for in every registered socket
        self._report(key, *exchange.result)

    def _expire_due(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, key, exchange = heapq.heappop(self._deadlines)
            if exchange.result is None:  # else reported already
                self._guarded(key, exchange, exchange.expire)

    def _report(self, key: object, healthy: bool, detail: str) -> None:
        try:
            self._on_done(key, healthy, detail)
        except Exception:  # the thread runs every app's probes: it goes on
            log.exception("processes: reporting a health probe failed")
