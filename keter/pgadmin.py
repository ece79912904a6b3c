"""The SQL that gives an app its PostgreSQL role and database, and two ways to run it.

Every admin action is a JSON-able *request* (a dict) answered by a JSON-able
*answer*; ``run(request)`` executes one in this process. Both connection modes
of the provisioner (keter.postgres) go through it, so the same functions build
the same SQL either way:

* With an admin DSN (``postgres: {admin-dsn: ...}``) keter runs it in the same
  short-lived child as below, as keter's own user (``run_as(None, request)``):
  in keter's thread, a connection the server (or a failover, a partition) went
  silent on after its login held the provisioner, and every app's deploy behind
  it, for as long as TCP keeps a dead peer (hours); the child's wall-clock
  timeout ends it. libpq's own ``PG*`` variables and ``HOME`` (``~/.pgpass``) of
  keter's environment go along: they may hold how the DSN logs in. The admin
  role needs only CREATEROLE and CREATEDB.
* With no DSN (the default) keter targets a stock Debian host: the
  distribution's cluster on /var/run/postgresql port 5432, where only the
  ``postgres`` OS user may log in as the ``postgres`` superuser (peer
  authentication). ``run_as(os_user, request)`` starts
  ``python -m keter.pgadmin --as-user postgres`` as a short-lived child, writes
  the request to its stdin and reads the answer from its stdout, so no password
  is ever on a command line or in an environment. The child starts as root and
  drops to the OS user (setgroups([]), setgid, setuid) as its first act, before
  reading the request or touching the socket, so the server sees a connection
  from ``postgres``. It drops privileges itself rather than being started with
  ``subprocess``'s ``user=``: the interpreter and keter are often installed where
  only root can read them (a venv under /root), and a freshly exec'd
  single-threaded child can change users safely, which a ``preexec_fn`` in the
  multi-threaded daemon cannot.

Requests (``op`` plus the connection string ``dsn`` and ``connect_timeout``):

* ``{"op": "find", "pattern": REGEX, "claimed": [NAME, ...], "owner": COMMENT}``
  -> ``[NAME, ADOPTABLE]`` of each role matching ``pattern`` that is not in
  ``claimed``; ADOPTABLE is true when its comment is exactly ``owner`` (this
  keter's instance and the app: ``owner_comment``) and it may do nothing but log
  in (see ``find_roles``). Used to adopt an app's role and database after its
  postgres.yaml entry was lost, and to keep a new name off every existing role.
* ``{"op": "ensure", "name": DB, "user": ROLE, "password": PW, "app": APP,
  "instance": ID, "connection_limit": N}`` -> ``None``; makes the role and
  database exist with least privilege, at most N connections (-1: no limit) and
  the role's comment ``owner_comment(ID, APP)`` (see ``ensure_role_and_database``).

Answers: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "one line", "retry": bool}``; ``retry`` is true when the
server could not be reached or refused the login, i.e. trying later may help. A
statement that waited too long for a lock (``LOCK_TIMEOUT_MS``) or ran too long
(``STATEMENT_TIMEOUT_MS``) is no such case: the server answered, and trying again
would hold up every other app's request just as long.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

# Bounds how long one admin statement may block the provisioner's thread so other
# apps' requests are not held up forever.
STATEMENT_TIMEOUT_MS = 30_000
# How long an admin statement waits for a lock another session holds. An app's role may
# change its own role (its password) or its own database (ALTER DATABASE) in a
# transaction it leaves open: keter's ALTER ROLE or REVOKE then waits on that row. The
# provisioner serves every app on one thread, so such a wait must end long before
# STATEMENT_TIMEOUT_MS.
LOCK_TIMEOUT_MS = 2_000
# Headroom for the child's interpreter start-up and its statements.
CHILD_EXTRA_SECONDS = 2 * STATEMENT_TIMEOUT_MS / 1000 + 10
# Where the admin session looks up names: the system catalog alone. Every role may log
# into the database keter works in (``postgres``, by default), and where PUBLIC may
# create in its ``public`` schema (PostgreSQL 14 and older, and clusters upgraded from
# them) an app's role could put an operator or function there that the SQL below would
# pick over pg_catalog's (``~`` on a name and a text matches an exact ``~(name, name)``
# first, wherever it is), and it would run with keter's admin rights.
SEARCH_PATH = "-c search_path=pg_catalog,pg_temp"

Request = dict[str, Any]
Answer = dict[str, Any]


class Refused(Exception):
    """The server's state must not be handed to an app (e.g. a superuser role)."""


# -- the SQL ----------------------------------------------------------------------------


# A role's comment names the keter that made it (its instance id, keter.postgres) and the
# app it was made for. Several keters may share one server (staging and production,
# each with an app "shop"), app names that slug alike ("a-b", "a.b") share a name
# pattern, and an operator may name a role of their own like an app's: only the
# comment tells a role this keter made for this app from one it must leave alone.
def owner_comment(instance: str, app: str) -> str:
    return f"keter {instance} app {app}"


def find_roles(
    conn: psycopg.Connection, *, pattern: str, claimed: list[str], owner: str
) -> list[tuple[str, bool]]:
    """(name, adoptable) of each role matching the POSIX regex ``pattern`` and not in
    ``claimed``.

    Adoptable: its comment is exactly ``owner``, and it has no power beyond logging in
    (no SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, membership in no
    role, and nothing owned or granted outside its own database). keter never makes a
    role with any of these, so one that has them was changed by someone else since: its
    password is not keter's to reset, nor its rights an app's to get.
    """
    rows = conn.execute(
        "SELECT r.rolname, pg_catalog.shobj_description(r.oid, 'pg_authid'),"
        " r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication"
        " OR r.rolbypassrls OR EXISTS (SELECT FROM pg_catalog.pg_auth_members m"
        " WHERE m.member OPERATOR(pg_catalog.=) r.oid)"
        # Anything it owns or was granted outside its own database (named as the role):
        # another database, or an object in one.
        " OR EXISTS (SELECT FROM pg_catalog.pg_shdepend d"
        " WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_authid'::pg_catalog.regclass"
        " AND d.refobjid OPERATOR(pg_catalog.=) r.oid"
        " AND d.dbid OPERATOR(pg_catalog.<>) ALL (SELECT o.oid FROM pg_catalog.pg_database o"
        " WHERE o.datname OPERATOR(pg_catalog.=) r.rolname)"
        # A large object needs no right to make, in any database it may connect to: the
        # app could make keter refuse its own role.
        " AND d.classid OPERATOR(pg_catalog.<>)"
        " 'pg_catalog.pg_largeobject'::pg_catalog.regclass"
        " AND NOT (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_database'::pg_catalog.regclass"
        " AND d.objid OPERATOR(pg_catalog.=) ANY (SELECT o.oid FROM pg_catalog.pg_database o"
        " WHERE o.datname OPERATOR(pg_catalog.=) r.rolname)))"
        " FROM pg_catalog.pg_roles r"
        " WHERE r.rolname OPERATOR(pg_catalog.~) %s::text"
        " AND NOT r.rolname OPERATOR(pg_catalog.=) ANY(%s::text[])"
        " ORDER BY 1",
        (pattern, claimed),
    ).fetchall()
    return [(name, comment == owner and not powers) for name, comment, powers in rows]


def ensure_role_and_database(
    conn: psycopg.Connection,
    *,
    name: str,
    user: str,
    password: str,
    app: str | None = None,
    instance: str | None = None,
    connection_limit: int = -1,
) -> None:
    """Make role ``user`` (password ``password``, at most ``connection_limit``
    connections at once, -1: no limit) and database ``name`` it owns exist, the role's
    comment naming keter ``instance`` and ``app`` (``owner_comment``: set every time, so
    a role an older keter commented gets the current form).

    The limit keeps one app from taking every connection of the server, which had
    failed every other app's connections, backups and provisioning (the server keeps
    its last few for superusers only). A role cannot raise its own.

    Every step looks at the catalogs first, so running this again after a crash
    at any point converges instead of failing. ``conn`` must be in autocommit
    mode (CREATE DATABASE cannot run in a transaction).
    """
    # Only a salted verifier reaches the server, so the password cannot show
    # up in its statement log.
    verifier = conn.pgconn.encrypt_password(password.encode(), user.encode()).decode()
    role_is_superuser = _scalar(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", user)
    if role_is_superuser:
        raise Refused(f"role {user} is a superuser; refusing to give it to an app")
    holder = app if app is not None else f"role {user}"
    with _lock_wait(f"a session of {holder} holds a lock on its role {user}"):
        if role_is_superuser is None:
            conn.execute(
                sql.SQL(
                    "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                    "CONNECTION LIMIT {} PASSWORD {}"
                ).format(sql.Identifier(user), sql.Literal(connection_limit), sql.Literal(verifier))
            )
        else:
            # The stored password is the truth: reset it. (A non-superuser may not
            # even mention SUPERUSER here; the role was checked above.)
            conn.execute(
                sql.SQL(
                    "ALTER ROLE {} WITH LOGIN NOCREATEDB NOCREATEROLE CONNECTION LIMIT {} "
                    "PASSWORD {}"
                ).format(sql.Identifier(user), sql.Literal(connection_limit), sql.Literal(verifier))
            )
        if app is not None and instance is not None:
            conn.execute(
                sql.SQL("COMMENT ON ROLE {} IS {}").format(
                    sql.Identifier(user), sql.Literal(owner_comment(instance, app))
                )
            )
        if not _scalar(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # Giving a database to a role (CREATE DATABASE ... OWNER, ALTER ... OWNER
            # TO) requires membership in it; repeating the grant is harmless.
            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(user)))
    with _lock_wait(f"a session of {holder} holds a lock on its database {name}"):
        owner = _scalar(
            conn, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", name
        )
        if owner is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {} WITH OWNER {} TEMPLATE template0").format(
                    sql.Identifier(name), sql.Identifier(user)
                )
            )
        elif owner != user:
            conn.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(name), sql.Identifier(user)
                )
            )
        # Without this every role may connect to every database: keep apps apart.
        conn.execute(
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(name)
            )
        )


@contextlib.contextmanager
def _lock_wait(holds: str) -> Iterator[None]:
    """A statement inside that waited LOCK_TIMEOUT_MS for a lock is refused: ``holds``."""
    try:
        yield
    except errors.LockNotAvailable:
        # Most likely the app's own session left a transaction open after changing its
        # role or database; waiting longer would hold up every other app's request.
        raise Refused(
            f"{holds} (a transaction that changed it is still open; keter waited"
            f" {LOCK_TIMEOUT_MS / 1000:g}s): end that session, then deploy again"
        ) from None


def _scalar(conn: psycopg.Connection, query: str, *params: str) -> Any:
    """The first column of the first row, or None when there is no row."""
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


# -- running a request ------------------------------------------------------------------


def run(request: Request) -> Answer:
    """Execute ``request`` in this process and answer it; never raises for server errors."""
    try:
        timeout = max(2, math.ceil(float(request["connect_timeout"])))
        dsn = request["dsn"]
        options = f"{conninfo_to_dict(dsn).get('options') or ''} {SEARCH_PATH}".strip()
        with psycopg.connect(
            dsn, autocommit=True, connect_timeout=timeout, options=options
        ) as conn:
            for setting, value in (
                ("statement_timeout", STATEMENT_TIMEOUT_MS),
                ("lock_timeout", LOCK_TIMEOUT_MS),
            ):
                conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (setting, str(value)))
            match request["op"]:
                case "find":
                    result: Any = find_roles(
                        conn,
                        pattern=request["pattern"],
                        claimed=list(request["claimed"]),
                        owner=request["owner"],
                    )
                case "ensure":
                    ensure_role_and_database(
                        conn,
                        name=request["name"],
                        user=request["user"],
                        password=request["password"],
                        app=request.get("app"),
                        instance=request.get("instance"),
                        connection_limit=int(request.get("connection_limit", -1)),
                    )
                    result = None
                case op:
                    return _failed(f"unknown request {op!r}", retry=False)
    except errors.QueryCanceled as exc:
        # statement_timeout (an OperationalError too): the server answered; trying again
        # would hold up every other app's request as long once more.
        return _failed(f"an admin statement took too long: {exc}", retry=False)
    except psycopg.OperationalError as exc:
        # Connection refused, login refused, server shutting down: may pass.
        return _failed(str(exc), retry=True)
    except (psycopg.Error, Refused) as exc:
        return _failed(str(exc), retry=False)
    return {"ok": True, "result": result}


def run_as(os_user: str | None, request: Request, *, timeout: float) -> Answer:
    """Execute ``request`` in a child process connected as OS user ``os_user`` (None:
    keter's own, with libpq's variables of keter's environment), within ``timeout``."""
    package_parent = Path(__file__).resolve().parent.parent
    # PYTHONPATH finds keter when it runs from a checkout rather than an installed package.
    env = {"PATH": os.defpath, "PYTHONPATH": str(package_parent)}
    command = [sys.executable, "-m", "keter.pgadmin"]
    if os_user is not None:
        # A clean environment: keter's own (PG* variables included) must not steer
        # the connection to the machine's cluster.
        command += ["--as-user", os_user]
    else:
        env.update(
            (name, value)
            for name, value in os.environ.items()
            if name.startswith("PG") or name == "HOME"
        )
    try:
        child = subprocess.run(
            command,
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout,
            cwd="/",
            env=env,
        )
    except subprocess.TimeoutExpired:
        return _failed(f"admin helper gave no answer within {timeout:.0f}s", retry=True)
    except OSError as exc:
        return _failed(f"cannot start the admin helper: {exc}", retry=False)
    try:
        answer = json.loads(child.stdout)
    except ValueError:
        lines = child.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        return _failed(
            f"admin helper failed (exit status {child.returncode}): {lines[-1]}", retry=False
        )
    if not isinstance(answer, dict) or "ok" not in answer:
        return _failed("admin helper gave a malformed answer", retry=False)
    return answer


def _failed(error: str, *, retry: bool) -> Answer:
    # Server messages span lines; keter logs one line per event.
    return {"ok": False, "error": " ".join(error.split()), "retry": retry}


# -- the child process ------------------------------------------------------------------


def become(os_user: str) -> None:
    """Turn this (single-threaded) process into ``os_user``, irrevocably."""
    entry = pwd.getpwnam(os_user)
    if os.geteuid() == entry.pw_uid:
        return
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir  # libpq looks for ~/.pgpass and service files


def main(argv: list[str] | None = None) -> int:
    """Child entry point: become ``--as-user`` (if given), answer the JSON request on
    stdin."""
    parser = argparse.ArgumentParser(prog="python -m keter.pgadmin", description=__doc__)
    parser.add_argument("--as-user", help="OS user to connect as (else this process's)")
    args = parser.parse_args(argv)
    try:
        if args.as_user is not None:
            become(args.as_user)
    except (KeyError, OSError) as exc:
        answer = _failed(f"cannot become OS user {args.as_user}: {exc}", retry=False)
    else:
        try:
            request = json.loads(sys.stdin.buffer.read())
        except ValueError as exc:
            answer = _failed(f"malformed request: {exc}", retry=False)
        else:
            answer = run(request)
    sys.stdout.buffer.write(json.dumps(answer).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
