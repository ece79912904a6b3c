"""Health probes: does a new version really answer HTTP on its port?

A probe is a plain blocking request with short timeouts; the process monitor
runs probes in a small thread pool so they never block its loop.
"""

from __future__ import annotations

import logging
import re
import socket
import time

from keter.messages import HealthCheck

log = logging.getLogger(__name__)


def is_healthy(status: int, strict: bool) -> bool:
    """An explicit health-check path must answer 2xx/3xx; "/" anything below 500."""
    return 200 <= status < 400 if strict else status < 500


_SAFE_PATH = re.compile(r"/[\x21-\x7e]*")  # no spaces or control characters: no injection
_SAFE_HOST = re.compile(r"[\x21-\x7e]+")
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})")


def probe_http(port: int, check: HealthCheck, timeout: float = 1.0) -> tuple[bool, str]:
    """One health probe of 127.0.0.1:port; returns (healthy, what happened)."""
    if not _SAFE_PATH.fullmatch(check.path) or not _SAFE_HOST.fullmatch(check.host):
        return False, f"invalid health check path {check.path!r} or host {check.host!r}"
    request = (
        f"GET {check.path} HTTP/1.1\r\nHost: {check.host}\r\n"
        "User-Agent: keter-health-check\r\nConnection: close\r\n\r\n"
    ).encode()
    head = b""
    # One deadline for the whole probe: an app that answers a byte at a time must not
    # hold a worker of the shared pool (and so delay every other app's probes) for long.
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            while b"\r\n" not in head and len(head) < 4096:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(1024)
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except ConnectionRefusedError:
        return False, "connection refused"
    except OSError as exc:
        return False, exc.strerror or str(exc)
    match = _STATUS_LINE.match(head)
    if not match:
        return False, "not an HTTP answer"
    status = int(match.group(1))
    return is_healthy(status, check.strict), f"HTTP {status} on {check.path}"
