"""The PostgreSQL provisioner: gives each app that asks a role and a database of its own.

The first time an app needs a database the provisioner picks a name (the app
name slugged, plus a random suffix) and a random password, saves them to
ROOT/etc/postgres.yaml (Keter's file: app -> name, user, pass, server, port;
mode 0600), and only then makes the role and database exist on the server.
Saving first is what makes it crash-safe: whatever step keter dies after, the
file already holds the truth and the next request converges the server to it
(see keter.pgadmin.ensure_role_and_database). Every later deploy and every
restart reuses the stored credentials; removing a bundle never drops anything.

If an app has no entry although its role exists (postgres.yaml was lost or
restored from an old backup), the one unclaimed role whose comment says this
keter made it for this app is adopted with a fresh password rather than leaving
it orphaned next to a second one. "This keter" is a random instance id made once
in ROOT/etc/instance-id: several keters may share one server, each with an app of
the same name, and a role of an operator's may fit an app's names; neither is
ever taken (see keter.pgadmin.find_roles).

How keter reaches the server (an admin DSN, or by default the local cluster as
the ``postgres`` OS user through a child process) is described in
keter.pgadmin. An unreachable server is retried with backoff for ``retry_for``
seconds using timers, so other apps' requests are answered meanwhile.

psycopg is imported where a database is first needed, not with this module:
it loads libpq and its libraries, about 14 MB of keter's memory that a host
whose apps ask for no database would hold for nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import secrets
import string
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from keter.actor import Actor
from keter.config.model import DEFAULT_PG_PORT, LOCAL_SOCKET_DIR, conninfo, first_server
from keter.fsutil import atomic_write
from keter.messages import (
    Component,
    DatabaseFailed,
    DatabaseReady,
    DbInfo,
    ProvisionDatabase,
    message,
)

log = logging.getLogger(__name__)

# Debian's cluster, reached by peer authentication as this OS user.
DEFAULT_PEER_DSN = f"host={LOCAL_SOCKET_DIR} port={DEFAULT_PG_PORT}"
PEER_OS_USER = "postgres"

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes
SUFFIX_LENGTH = 10
SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 5.0
INSTANCE_FILE = "instance-id"
_INSTANCE_ID = re.compile(r"[a-z0-9]{16,64}")


class ProvisionError(Exception):
    """Provisioning failed in a way that retrying now will not fix."""


class ServerUnavailable(Exception):
    """The server could not be reached or refused the admin login."""


@message
class _Retry:
    """Timer message to itself: try ``app`` again if ``deploy_id`` is still wanted."""

    app: str
    deploy_id: int


@dataclass
class _Attempt:
    deploy_id: int
    deadline: float  # time.monotonic() after which the app's request fails
    delay: float  # the next backoff


# -- pure helpers -------------------------------------------------------------------------


def slug(app: str) -> str:
    """The app name as an identifier stem: [a-z0-9_] only, never ``pg_``, never a digit first."""
    stem = re.sub(r"[^a-z0-9]+", "_", app.lower()).strip("_") or "app"
    # pg_ names are reserved for the system; a leading digit forces quoting.
    if stem == "pg" or stem.startswith("pg_") or stem[0].isdigit():
        stem = f"app_{stem}"
    return stem[: MAX_IDENTIFIER - 1 - SUFFIX_LENGTH].rstrip("_")


def name_pattern(app: str) -> str:
    """A POSIX regex matching exactly the names ``new_name(app)`` can produce."""
    return f"^{slug(app)}_[{SUFFIX_ALPHABET}]{{{SUFFIX_LENGTH}}}$"


def new_name(app: str) -> str:
    """A fresh role/database name for ``app``: its slug plus a random suffix."""
    suffix = "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(SUFFIX_LENGTH))
    return f"{slug(app)}_{suffix}"


def new_password() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


# What db_env sets: for an app with a database, keter's, whatever else names them.
DB_ENV_NAMES = ("PGHOST", "PGPORT", "PGUSER", "PGPASS", "PGPASSWORD", "PGDATABASE", "DATABASE_URL")


def db_env(db: DbInfo) -> dict[str, str]:
    """The variables that let an app reach its database with no code of its own.

    Keter's PGHOST PGPORT PGUSER PGPASS PGDATABASE, plus PGPASSWORD so plain
    libpq defaults connect, and DATABASE_URL for frameworks that want a URL.
    """
    user = quote(db.user, safe="")
    password = quote(db.password, safe="")
    database = quote(db.name, safe="")
    if db.host.startswith("/"):
        # A socket directory cannot be a URL authority; libpq takes it as a parameter.
        url = f"postgresql://{user}:{password}@/{database}?host={quote(db.host)}&port={db.port}"
    else:
        host = f"[{db.host}]" if ":" in db.host else db.host
        url = f"postgresql://{user}:{password}@{quote(host, safe='[]:')}:{db.port}/{database}"
    return {  # DB_ENV_NAMES
        "PGHOST": db.host,
        "PGPORT": str(db.port),
        "PGUSER": db.user,
        "PGPASS": db.password,
        "PGPASSWORD": db.password,
        "PGDATABASE": db.name,
        "DATABASE_URL": url,
    }


# -- postgres.yaml --------------------------------------------------------------------------


def load_store(path: Path) -> dict[str, Any]:
    """The file's app -> entry mapping ({} when there is no file yet)."""
    try:
        raw = yaml.safe_load(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProvisionError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProvisionError(f"{path} is not a mapping of app names to databases")
    return raw


def entry_to_db(path: Path, entry: object) -> DbInfo:
    """Check and convert one app's stored entry."""
    if not isinstance(entry, dict):
        raise ProvisionError(f"entry in {path} is not a mapping")
    try:
        db = DbInfo(
            name=entry["name"],
            user=entry["user"],
            password=entry["pass"],
            host=entry["server"],
            port=entry["port"],
        )
    except KeyError as exc:
        raise ProvisionError(f"entry in {path} lacks {exc.args[0]!r}") from exc
    text_fields = (db.name, db.user, db.password, db.host)
    if not all(isinstance(v, str) and v for v in text_fields) or type(db.port) is not int:
        raise ProvisionError(f"entry in {path} has an empty or mistyped field")
    return db


def db_to_entry(db: DbInfo) -> dict[str, Any]:
    return {
        "name": db.name,
        "user": db.user,
        "pass": db.password,
        "server": db.host,
        "port": db.port,
    }


def save_store(path: Path, store: dict[str, Any]) -> None:
    """Replace the file atomically, readable by root only (it holds passwords)."""
    data = yaml.safe_dump(store, default_flow_style=False, sort_keys=True, allow_unicode=True)
    atomic_write(path, data.encode(), mode=0o600)


def load_instance_id(etc_dir: Path) -> str:
    """This keter's instance id (``etc_dir/instance-id``), made once when there is none.

    It goes into every role's comment, so the id must stay: a malformed file is an
    error to fix, not one to replace (a new id would disown every role made so far).
    """
    path = etc_dir / INSTANCE_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot read {path}: {exc}") from None
    else:
        if not _INSTANCE_ID.fullmatch(text):
            raise ProvisionError(
                f"{path} holds no instance id (16 to 64 of [a-z0-9]); fix it, or remove it"
                " to make a new one (keter then adopts none of the roles it made before"
                " should postgres.yaml lose their entries)"
            )
        return text
    instance = secrets.token_hex(8)  # 64 random bits: no two keters pick the same
    try:
        etc_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, f"{instance}\n".encode(), mode=0o600)
    except OSError as exc:
        raise ProvisionError(f"cannot save {path}: {exc}") from exc
    log.info("postgres: this keter's instance id is %s (in %s)", instance, path)
    return instance


# -- the component --------------------------------------------------------------------------


class PostgresProvisioner(Actor):
    """Answers ProvisionDatabase with DatabaseReady or DatabaseFailed.

    ``admin_dsn`` empty means the local cluster at ``peer_dsn`` as the
    ``postgres`` OS user (see keter.pgadmin); ``peer_dsn`` exists so tests can
    point that mode at a private cluster.
    """

    def __init__(
        self,
        *,
        etc_dir: Path,
        admin_dsn: str,
        report_to: queue.Queue,
        retry_for: float = 30.0,
        connection_limit: int = -1,
        connect_timeout: float = 5.0,
        peer_dsn: str = DEFAULT_PEER_DSN,
    ) -> None:
        super().__init__(Component.POSTGRES, report_to)
        self.etc_dir = Path(etc_dir)
        self.store_path = self.etc_dir / "postgres.yaml"
        self.retry_for = retry_for
        self.connection_limit = connection_limit  # per app role; -1: none
        self.connect_timeout = connect_timeout
        self._peer = not admin_dsn
        self._given_dsn = admin_dsn or peer_dsn
        self._attempts: dict[str, _Attempt] = {}

    @functools.cached_property
    def _target(self) -> tuple[tuple[str, int], str]:
        """The server apps reach (host, port) and the DSN keter's admin requests use.

        Worked out at the first provision, not at start: it needs psycopg (see the
        module docstring). Raises ProvisionError for a DSN libpq cannot read (the
        config reader refuses such an admin-dsn before keter starts).
        """
        from psycopg import Error
        from psycopg.conninfo import make_conninfo

        dsn = self._given_dsn
        try:
            params = conninfo(dsn)
            server = first_server(params)
            if self._peer:
                # Only the postgres OS user gets in over the socket (Debian's pg_hba says
                # `local all all peer`); apps log in with their password over TCP.
                server = ("127.0.0.1", server[1])
            if "dbname" not in params:
                dsn = make_conninfo(dsn, dbname="postgres")
        except (Error, ValueError):
            # libpq's message may quote part of the DSN, which may hold a password.
            raise ProvisionError(
                "postgres admin-dsn is not a valid libpq connection string"
            ) from None
        return server, dsn

    @functools.cached_property
    def _instance(self) -> str:
        """This keter's instance id, read (or made) at the first provision."""
        return load_instance_id(self.etc_dir)

    def handle(self, message: object) -> None:
        match message:
            case ProvisionDatabase(app=app, deploy_id=deploy_id):
                # A newer deploy of the same app supersedes a retrying older one.
                self._attempts[app] = _Attempt(
                    deploy_id=deploy_id,
                    deadline=time.monotonic() + self.retry_for,
                    delay=FIRST_RETRY_DELAY,
                )
                self._attempt(app)
            case _Retry(app=app, deploy_id=deploy_id):
                attempt = self._attempts.get(app)
                if attempt is not None and attempt.deploy_id == deploy_id:
                    self._attempt(app)
            case _:
                self.unexpected(message)

    def _attempt(self, app: str) -> None:
        attempt = self._attempts[app]
        try:
            db = self._provision(app)
        except ServerUnavailable as exc:
            remaining = attempt.deadline - time.monotonic()
            if remaining <= 0:
                reason = f"database server unavailable for {self.retry_for:g}s: {exc}"
                self._fail(app, reason, unavailable=True)
                return
            delay = min(attempt.delay, remaining)
            log.warning("%s: database server unavailable, retrying in %.2gs: %s", app, delay, exc)
            attempt.delay = min(attempt.delay * 2, MAX_RETRY_DELAY)
            self.schedule(delay, _Retry(app=app, deploy_id=attempt.deploy_id))
        except ProvisionError as exc:
            self._fail(app, str(exc))
        else:
            del self._attempts[app]
            log.info("%s: database %s ready for role %s", app, db.name, db.user)
            self.report(DatabaseReady(app=app, deploy_id=attempt.deploy_id, db=db))

    def _fail(self, app: str, reason: str, *, unavailable: bool = False) -> None:
        attempt = self._attempts.pop(app)
        log.debug("%s: no database: %s", app, reason)  # the supervisor logs the failed deploy
        self.report(
            DatabaseFailed(
                app=app, deploy_id=attempt.deploy_id, reason=reason, unavailable=unavailable
            )
        )

    def _provision(self, app: str) -> DbInfo:
        """Credentials for ``app``, saved first, then made true on the server."""
        store = load_store(self.store_path)
        (host, port), _ = self._target
        if app in store:
            try:
                db = entry_to_db(self.store_path, store[app])
            except ProvisionError as exc:
                raise ProvisionError(f"{exc}; fix or remove it") from None
            if (db.host, db.port) != (host, port):
                log.info("%s: database server is now %s port %d", app, host, port)
                db = replace(db, host=host, port=port)
                store[app] = db_to_entry(db)
                self._save(store)
        else:
            name = self._choose_name(app, store)
            db = DbInfo(name=name, user=name, password=new_password(), host=host, port=port)
            store[app] = db_to_entry(db)
            self._save(store)
        self._admin(
            {
                "op": "ensure",
                "name": db.name,
                "user": db.user,
                "password": db.password,
                "app": app,
                "instance": self._instance,
                "connection_limit": self.connection_limit,
            }
        )
        self._tighten_mode()
        return db

    def _choose_name(self, app: str, store: dict[str, Any]) -> str:
        claimed = sorted(
            {str(e.get(k)) for e in store.values() if isinstance(e, dict) for k in ("name", "user")}
        )
        from keter import pgadmin  # psycopg with it: see the module docstring

        owner = pgadmin.owner_comment(self._instance, app)
        request = {"op": "find", "pattern": name_pattern(app), "claimed": claimed, "owner": owner}
        found = self._admin(request)
        # Only a role whose comment says this keter made it for this app is the app's:
        # other keters on the server, apps whose names slug alike and operators name
        # roles like these too (keter.pgadmin.find_roles).
        orphans = [name for name, adoptable in found if adoptable]
        if len(orphans) == 1:
            log.warning("%s: adopting role and database %s (not in postgres.yaml)", app, orphans[0])
            return orphans[0]
        if orphans:
            log.warning("%s: several unclaimed roles fit this app, creating a new one", app)
        taken = {name for name, _ in found} | set(claimed)
        while (name := new_name(app)) in taken:
            pass  # a suffix collision; vanishingly rare
        log.info("%s: chose database and role %s", app, name)
        return name

    def _admin(self, request: dict[str, Any]) -> Any:
        """Run an admin request in the configured mode; its result, or raise."""
        from keter import pgadmin  # psycopg with it: see the module docstring

        _, dsn = self._target
        request = {"dsn": dsn, "connect_timeout": self.connect_timeout, **request}
        timeout = self.connect_timeout + pgadmin.CHILD_EXTRA_SECONDS
        answer = pgadmin.run_as(PEER_OS_USER if self._peer else None, request, timeout=timeout)
        if answer["ok"]:
            return answer["result"]
        if answer.get("retry"):
            raise ServerUnavailable(answer["error"])
        raise ProvisionError(answer["error"])

    def _save(self, store: dict[str, Any]) -> None:
        try:
            self.store_path.parent.mkdir(parents=True, exist_ok=True)
            save_store(self.store_path, store)
        except OSError as exc:
            raise ProvisionError(f"cannot save {self.store_path}: {exc}") from exc

    def _tighten_mode(self) -> None:
        # A file written by hand or by an older tool may be readable by others.
        try:
            if self.store_path.stat().st_mode & 0o077:
                os.chmod(self.store_path, 0o600)
        except OSError as exc:
            log.warning("postgres: cannot restrict %s to mode 0600: %s", self.store_path, exc)
