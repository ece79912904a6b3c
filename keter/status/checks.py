"""Who may ask what: the checks every request passes before it is routed.

1. Host. Every request must name this server in its Host header: localhost,
   the ``status-listen`` address, ``dashboard-host`` or a name listed in
   ``status-hosts``, whatever the bind address. A web page that rebinds its
   own DNS name to keter's address gets 421 and nothing else.
2. Login, on TCP. The Unix socket's mode and group decide who may use it;
   on TCP every request, reads included, must carry ``dashboard-users``
   credentials (basic auth: what browsers and nginx at ``dashboard-host``
   send) or the token in ``ROOT/etc/status-token`` (``Authorization: Bearer``,
   for scripts and Prometheus; readable by root and ``status-group``).
3. Writes (POST) also need the per-process token from ``/api/token`` (embedded
   in the dashboard's pages) in an ``X-Keter-Token`` header, and a same-origin
   ``Origin`` when a browser sends one: a logged-in browser's credentials are
   sent on any page's behalf (CSRF).
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from keter.config import KeterConfig
from keter.fsutil import atomic_write
from keter.status.errors import ApiError

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Keter-Token"
TOKEN_FILE = "status-token"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,128}")
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="keter", charset="UTF-8"'}


class RequestChecks:
    """The Host names this keter answers to, who may log in, and the token writes need."""

    def __init__(self, config: KeterConfig) -> None:
        self.token = secrets.token_urlsafe(32)  # for writes; new at each start
        self.allowed_hosts = allowed_hosts(config)
        self.api_token: str | None = None  # ROOT/etc/status-token, once read (load_api_token)
        self._users = {user: password.encode() for user, password in config.dashboard_users}

    def check_host(self, host: str | None) -> None:
        """Refuse requests for a name this server does not answer to (DNS rebinding)."""
        if host is None or host_name(host) not in self.allowed_hosts:
            raise ApiError(421, "this keter does not answer to that Host")

    def check_login(self, authorization: str | None) -> None:
        """TCP: the request must carry dashboard-users credentials or the API token."""
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "basic" and self._user_matches(credentials):
            return
        if scheme.lower() == "bearer" and self._token_matches(credentials):
            return
        raise ApiError(
            401,
            "log in with a dashboard-users name and password, or send "
            f"'Authorization: Bearer' with the token in ROOT/etc/{TOKEN_FILE}",
            _CHALLENGE,
        )

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

    def _token_matches(self, credentials: str) -> bool:
        token = self.api_token
        return token is not None and hmac.compare_digest(credentials.encode(), token.encode())

    def _user_matches(self, credentials: str) -> bool:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text
            return False
        user, colon, password = decoded.partition(":")
        expected = self._users.get(user)
        # Compared even for an unknown user, so the time taken does not tell names apart.
        matches = hmac.compare_digest(password.encode(), expected or b"\0" * 32)
        return bool(colon) and expected is not None and matches


def load_api_token(etc_dir: Path, group: str | None) -> str:
    """The token in ``etc_dir/status-token``, made (random) when missing or malformed.

    Kept across restarts so scripts and scrapers keep working. Mode 0640 with
    group ``status-group`` (0600 without one); ``etc_dir`` becomes 0710 with
    that group so its members can reach this one file (every other file there
    is owner-only).
    """
    path = etc_dir / TOKEN_FILE
    gid = grp.getgrnam(group).gr_gid if group else None
    token = None
    # A regular file only: not followed if a link, never blocking if a FIFO.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            text = f.read(200).decode(errors="replace").strip()
        token = text if _TOKEN.fullmatch(text) else None
    if token is None:
        token = secrets.token_urlsafe(32)
        atomic_write(path, (token + "\n").encode(), mode=0o600)
        log.info("keter: wrote a new status API token to %s", path)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o640 if gid is not None else 0o600)
    if gid is not None:
        os.chown(etc_dir, -1, gid)
        os.chmod(etc_dir, 0o710)
    return token


def allowed_hosts(config: KeterConfig) -> frozenset[str]:
    """The Host names the API answers to (with 0.0.0.0, only the names listed)."""
    hosts = {"localhost", "127.0.0.1", "::1", *config.status_hosts}
    if config.dashboard_host:
        hosts.add(config.dashboard_host)
    if config.status_listen is not None and config.status_listen[0] not in ("0.0.0.0", "::"):
        hosts.add(config.status_listen[0])
    return frozenset(hosts)


def host_name(header: str) -> str:
    """The name in a Host header, without its port and IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        # Nothing but a port may follow the address: "[::1]evil.example" names no one.
        name, bracket, rest = header[1:].partition("]")
        port = rest.removeprefix(":")
        return name if bracket and (rest == "" or (rest != port and port.isdigit())) else header
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header
