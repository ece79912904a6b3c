"""Who may ask what: the checks every request passes before it is routed.

Every request must name this server in its Host header, which stops a web
page that rebinds its own DNS name to keter's address from reading the API.
Writes (POST) also need the per-process token from ``/api/token`` (embedded
in the dashboard's pages) in an ``X-Keter-Token`` header, and a same-origin
``Origin`` when a browser sends one (CSRF).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from keter.config import KeterConfig
from keter.status.errors import ApiError

TOKEN_HEADER = "X-Keter-Token"


class RequestChecks:
    """The Host names this keter answers to and the token its writes need."""

    def __init__(self, config: KeterConfig) -> None:
        self.token = secrets.token_urlsafe(32)  # new at each start
        self.allowed_hosts = allowed_hosts(config)

    def check_host(self, host: str | None) -> None:
        """Refuse requests for a name this server does not answer to (DNS rebinding)."""
        if self.allowed_hosts is None:
            return
        if host is None or host_name(host) not in self.allowed_hosts:
            raise ApiError(421, "this keter does not answer to that Host")

    def check_write(self, headers: Mapping[str, str]) -> None:
        """CSRF protection for POST: same-origin browsers with the page's token only."""
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != headers.get("Host"):
            raise ApiError(403, "cross-origin request refused")
        if headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
            raise ApiError(403, "cross-site request refused")
        given = headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(403, f"missing or wrong {TOKEN_HEADER} header (reload the page)")


def allowed_hosts(config: KeterConfig) -> frozenset[str] | None:
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


def host_name(header: str) -> str:
    """The name in a Host header, without its port and IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header
