"""Records of keter's access spool (keter.stats.record), written as nginx writes them."""

from __future__ import annotations

import time

from keter.stats.record import TAG


def spool_line(
    app: str = "hello",
    version: str = "0123456789ab",
    *,
    at: float | None = None,
    status: int = 200,
    sent: int = 3,
    upstream: str = "0.004",
    upstream_addr: str = "127.0.0.1:40001",
    request: str = "GET / HTTP/1.1",
) -> bytes:
    """A record as nginx writes it with keter's log format (without its newline)."""
    fields = [
        TAG.decode(),
        app,
        version,
        f"{time.time() if at is None else at:.3f}",
        str(status),
        str(sent),
        "0.005",
        upstream,
        upstream_addr,
        "127.0.0.1",
        "-",
        "30/Nov/2026:03:40:25 +0000",
        f"{app}.test",
        request,
        "-",
        "curl/7.88",
    ]
    return "\t".join(fields).encode()
