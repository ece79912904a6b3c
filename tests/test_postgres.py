"""The PostgreSQL provisioner against a real, private PostgreSQL cluster."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support.net import free_port
from support.postgres import ADMIN_ROLE, PrivatePostgres
from support.wait import wait_for

from keter import pgadmin
from keter.config.model import conninfo, first_server
from keter.messages import DatabaseFailed, DatabaseReady, DbInfo, ProvisionDatabase
from keter.postgres import (
    PostgresProvisioner,
    db_env,
    name_pattern,
    new_name,
    new_password,
    slug,
)

REPLY_TIMEOUT = 20.0
_app_numbers = itertools.count(1)


def unique_app(stem: str) -> str:
    """An app name no other test in this session uses (roles are cluster-wide)."""
    return f"{stem}{next(_app_numbers)}"


# -- pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("myapp", "myapp"),
        ("My-App.v2", "my_app_v2"),
        ("pg_stat", "app_pg_stat"),
        ("PG", "app_pg"),
        ("9lives", "app_9lives"),
        ("--", "app"),
        ("café", "caf"),
        ('x"; DROP ROLE postgres; --', "x_drop_role_postgres"),
    ],
)
def test_slug(app: str, expected: str) -> None:
    assert slug(app) == expected


@given(st.text(max_size=200))
def test_new_name_is_a_safe_identifier_the_pattern_recognises(app: str) -> None:
    name = new_name(app)
    assert re.fullmatch(r"[a-z0-9_]{1,63}", name)
    assert not name.startswith("pg_")
    assert not name[0].isdigit()
    assert re.fullmatch(name_pattern(app), name)


def test_new_names_and_passwords_are_random() -> None:
    assert new_name("shop") != new_name("shop")
    password = new_password()
    assert password != new_password()
    assert len(password) >= 22  # URL-safe base64: 6 bits a character, so >= 128 bits


def test_the_first_server_defaults_to_the_debian_socket() -> None:
    assert first_server(conninfo("")) == ("/var/run/postgresql", 5432)
    assert first_server(conninfo("host=db.example port=6543 user=admin")) == ("db.example", 6543)


@pytest.mark.parametrize(
    "host",
    ["/var/run/postgresql", "127.0.0.1", "::1", "db.example"],
)
def test_database_url_round_trips_through_libpq(host: str) -> None:
    db = DbInfo(name="shop_1", user="shop_1", password="p@ss:/?#%&= w", host=host, port=5433)
    env = db_env(db)
    params = conninfo_to_dict(env["DATABASE_URL"])
    assert params["user"] == "shop_1"
    assert params["password"] == "p@ss:/?#%&= w"
    assert params["dbname"] == "shop_1"
    assert params["host"] == host
    assert params["port"] == "5433"
    assert env["PGPASS"] == env["PGPASSWORD"] == db.password
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"], env["PGDATABASE"]) == (
        host,
        "5433",
        "shop_1",
        "shop_1",
    )


def test_socket_host_goes_in_the_query_string() -> None:
    db = DbInfo(name="a_b", user="a_b", password="pw", host="/var/run/postgresql", port=5432)
    url = db_env(db)["DATABASE_URL"]
    assert url == "postgresql://a_b:pw@/a_b?host=/var/run/postgresql&port=5432"


# -- harness ------------------------------------------------------------------------------


@dataclass
class Running:
    """A started provisioner and the queue it reports to."""

    actor: PostgresProvisioner
    reports: queue.Queue

    def send(self, app: str, deploy_id: int = 1) -> None:
        self.actor.tell(ProvisionDatabase(app=app, deploy_id=deploy_id))

    def reply(self, timeout: float = REPLY_TIMEOUT) -> object:
        return self.reports.get(timeout=timeout)

    def ready(self, app: str, deploy_id: int = 1) -> DbInfo:
        """Ask for ``app``'s database and insist on getting it."""
        self.send(app, deploy_id)
        reply = self.reply()
        assert reply == DatabaseReady(app=app, deploy_id=deploy_id, db=reply.db), reply
        return reply.db


@pytest.fixture
def etc_dir(tmp_path: Path) -> Path:
    return tmp_path / "etc"


@pytest.fixture
def start(etc_dir: Path) -> Iterator[Callable[..., Running]]:
    """Start provisioners (admin DSN given per call); all are stopped afterwards."""
    started: list[PostgresProvisioner] = []

    def start_one(admin_dsn: str, **kwargs) -> Running:
        reports: queue.Queue = queue.Queue()
        kwargs.setdefault("etc_dir", etc_dir)
        actor = PostgresProvisioner(admin_dsn=admin_dsn, report_to=reports, **kwargs)
        actor.start()
        started.append(actor)
        return Running(actor, reports)

    yield start_one
    for actor in started:
        actor.stop()
    for actor in started:
        actor.join(timeout=10)
        assert not actor.is_alive()


def query(pg: PrivatePostgres, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def stored(etc_dir: Path) -> dict:
    return yaml.safe_load((etc_dir / "postgres.yaml").read_text())


def connect_as(db: DbInfo, dbname: str | None = None) -> psycopg.Connection:
    return psycopg.connect(
        host=db.host, port=db.port, user=db.user, password=db.password, dbname=dbname or db.name
    )


def assert_converged(pg: PrivatePostgres, etc_dir: Path, app: str, db: DbInfo) -> None:
    """One role, one database, one stored credential for ``app``, and it works."""
    pattern = name_pattern(app)
    assert query(pg, "SELECT rolname FROM pg_roles WHERE rolname ~ %s", pattern) == [(db.user,)]
    owners = query(
        pg,
        "SELECT datname, pg_get_userbyid(datdba), datacl::text[] FROM pg_database"
        " WHERE datname ~ %s",
        pattern,
    )
    assert owners == [(db.name, db.user, [f"{db.user}=CTc/{db.user}"])]
    assert stored(etc_dir)[app]["pass"] == db.password
    with connect_as(db) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (db.user,)


# -- provisioning ---------------------------------------------------------------------------


def test_provision_creates_least_privilege_role_and_database(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("shop")
    db = start(private_postgres.admin_dsn).ready(app)

    assert db.name == db.user and re.fullmatch(name_pattern(app), db.name)
    assert (db.host, db.port) == ("127.0.0.1", private_postgres.port)
    roles = query(
        private_postgres,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname = %s",
        db.user,
    )
    assert roles == [(False, False, False, True)]
    assert_converged(private_postgres, etc_dir, app, db)

    path = etc_dir / "postgres.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stored(etc_dir) == {
        app: {
            "name": db.name,
            "user": db.user,
            "pass": db.password,
            "server": "127.0.0.1",
            "port": private_postgres.port,
        }
    }


def test_an_apps_role_holds_at_most_its_connection_limit(
    private_postgres: PrivatePostgres, start: Callable[..., Running]
) -> None:
    # One app had taken every connection of the server: every other app's connections,
    # its backups and new apps' provisioning failed. A role cannot raise its own limit.
    app = unique_app("greedy")
    db = start(private_postgres.admin_dsn, connection_limit=2).ready(app)
    with connect_as(db) as first, connect_as(db):
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            connect_as(db)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            first.execute(f'ALTER ROLE "{db.user}" CONNECTION LIMIT -1')
    # A later provisioning (another deploy) sets the limit keter has then.
    start(private_postgres.admin_dsn, connection_limit=5).ready(app, deploy_id=2)
    limit = query(private_postgres, "SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", db.user)
    assert limit == [(5,)]


def test_credentials_are_reused_by_later_deploys_and_after_a_restart(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("blog")
    first = start(private_postgres.admin_dsn)
    db = first.ready(app, deploy_id=1)
    assert first.ready(app, deploy_id=2) == db

    first.actor.stop()
    first.actor.join(timeout=10)
    restarted = start(private_postgres.admin_dsn)
    assert restarted.ready(app, deploy_id=3) == db
    assert_converged(private_postgres, etc_dir, app, db)


APP_SCRIPT = """
import os, sys, psycopg
with psycopg.connect(os.environ.get("URL_ONLY", "")) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS notes (body text)")
    if sys.argv[1] == "write":
        conn.execute("INSERT INTO notes VALUES (%s)", (sys.argv[2],))
    else:
        print(conn.execute("SELECT string_agg(body, ',') FROM notes").fetchone()[0])
"""


def run_app(env: dict[str, str], *args: str) -> str:
    """Run a tiny 'app' in a child process with exactly ``env``; its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", APP_SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_app_environment_connects_with_libpq_defaults_and_database_url(
    private_postgres: PrivatePostgres, start: Callable[..., Running]
) -> None:
    db = start(private_postgres.admin_dsn).ready(unique_app("notes"))
    env = db_env(db)

    run_app(env, "write", "hello")
    assert run_app(env, "read") == "hello"
    url_only = {"URL_ONLY": env["DATABASE_URL"]}
    run_app(url_only, "write", "again")
    assert run_app(url_only, "read") == "hello,again"
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (db.name,)


def test_one_apps_role_cannot_open_another_apps_database(
    private_postgres: PrivatePostgres, start: Callable[..., Running]
) -> None:
    running = start(private_postgres.admin_dsn)
    a = running.ready(unique_app("alpha"))
    b = running.ready(unique_app("beta"))

    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        connect_as(a, dbname=b.name)
    with connect_as(b) as conn:  # while b itself gets in
        assert conn.execute("SELECT 1").fetchone() == (1,)


# An app's role logs into the admin database (every role may connect to `postgres`) and,
# where PUBLIC may create in its public schema (PostgreSQL 14 and older), plants an
# operator and a function that keter's unqualified SQL would have picked over
# pg_catalog's: they record who ran them.
_TROJANS = r"""
CREATE TABLE public.trojan_calls (who text);
GRANT INSERT ON public.trojan_calls TO PUBLIC;
CREATE FUNCTION public.trojan_match(name, name) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.trojan_calls VALUES (current_user);
    RETURN $1::text ~ $2::text;
END $$;
CREATE OPERATOR public.~ (LEFTARG = name, RIGHTARG = name, FUNCTION = public.trojan_match);
CREATE FUNCTION public.shobj_description(oid, text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.trojan_calls VALUES (current_user);
    RETURN NULL;
END $$;
CREATE FUNCTION public.set_config(text, text, boolean) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.trojan_calls VALUES (current_user);
    RETURN $2;
END $$;
"""


def test_an_apps_operators_and_functions_never_run_with_keters_admin_rights(
    private_postgres: PrivatePostgres, start: Callable[..., Running]
) -> None:
    running = start(private_postgres.admin_dsn)
    attacker = running.ready(unique_app("alpha"))
    superuser_run(private_postgres, "GRANT CREATE ON SCHEMA public TO PUBLIC")
    try:
        with connect_as(attacker, dbname="postgres") as conn:
            conn.execute(_TROJANS)
            conn.commit()
        victim = running.ready(unique_app("beta"))  # a new app: keter looks for its roles
        calls = query(private_postgres, "SELECT who FROM public.trojan_calls")
    finally:
        for statement in (
            "DROP OPERATOR IF EXISTS public.~ (name, name)",
            "DROP FUNCTION IF EXISTS public.trojan_match(name, name)",
            "DROP FUNCTION IF EXISTS public.shobj_description(oid, text)",
            "DROP FUNCTION IF EXISTS public.set_config(text, text, boolean)",
            "DROP TABLE IF EXISTS public.trojan_calls",
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        ):
            superuser_run(private_postgres, statement)
    assert calls == []
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        connect_as(attacker, dbname=victim.name)


# -- crash safety ---------------------------------------------------------------------------


def superuser_run(pg: PrivatePostgres, statement: str, *identifiers: str) -> None:
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        names = [psycopg.sql.Identifier(name) for name in identifiers]
        conn.execute(psycopg.sql.SQL(statement).format(*names))


def test_crash_after_saving_credentials_before_the_role(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("crashrole")
    running = start(private_postgres.admin_dsn)
    db = running.ready(app, deploy_id=1)
    superuser_run(private_postgres, "DROP DATABASE {}", db.name)
    superuser_run(private_postgres, "DROP ROLE {}", db.user)

    assert running.ready(app, deploy_id=2) == db
    assert_converged(private_postgres, etc_dir, app, db)


def test_crash_after_the_role_before_the_database(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("crashdb")
    running = start(private_postgres.admin_dsn)
    db = running.ready(app, deploy_id=1)
    superuser_run(private_postgres, "DROP DATABASE {}", db.name)
    # The role may even hold a different password than the file (a crash
    # between choosing a new password and setting it): the file wins.
    superuser_run(private_postgres, "ALTER ROLE {} PASSWORD 'something else'", db.user)

    assert running.ready(app, deploy_id=2) == db
    assert_converged(private_postgres, etc_dir, app, db)


def test_crash_after_the_database_before_owner_and_revokes(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("crashacl")
    running = start(private_postgres.admin_dsn)
    db = running.ready(app, deploy_id=1)
    # As if created by the admin role, which had not yet handed it over.
    superuser_run(private_postgres, "ALTER DATABASE {} OWNER TO {}", db.name, ADMIN_ROLE)
    superuser_run(private_postgres, "GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC", db.name)

    assert running.ready(app, deploy_id=2) == db
    assert_converged(private_postgres, etc_dir, app, db)


def test_lost_credentials_file_adopts_the_existing_role_and_database(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("lost")
    other = unique_app("kept")
    running = start(private_postgres.admin_dsn)
    db = running.ready(app, deploy_id=1)
    with connect_as(db) as conn:  # the app's data: what it owns there is no reason to refuse
        conn.execute("CREATE TABLE data (x int)")
    # Nor a large object it made where any role may (the postgres database): that had
    # let an app have keter refuse its own role.
    with connect_as(db, dbname="postgres") as conn:
        conn.execute("SELECT lo_create(0)")
    (etc_dir / "postgres.yaml").unlink()
    kept = running.ready(other, deploy_id=2)  # the file exists again, without app

    again = running.ready(app, deploy_id=3)
    assert (again.name, again.user) == (db.name, db.user)
    assert again.password != db.password  # a fresh one, set on the role
    assert_converged(private_postgres, etc_dir, app, again)
    assert stored(etc_dir)[other]["name"] == kept.name


def test_a_lost_credentials_file_never_hands_an_app_the_role_of_a_namesake(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    dotted = unique_app("sib.ling")
    dashed = dotted.replace(".", "-")  # the same slug, so the same name pattern
    running = start(private_postgres.admin_dsn)
    db = running.ready(dotted, deploy_id=1)
    (etc_dir / "postgres.yaml").unlink()

    other = running.ready(dashed, deploy_id=2)
    assert other.name != db.name  # the dotted app's role says whose it is
    again = running.ready(dotted, deploy_id=3)
    assert (again.name, again.user) == (db.name, db.user)  # adopted by its own app
    comments = query(
        private_postgres,
        "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = ANY(%s)",
        [db.user, other.user],
    )
    instance = instance_id(etc_dir)
    assert sorted(comments) == sorted(
        [
            (db.user, f"keter {instance} app {dotted}"),
            (other.user, f"keter {instance} app {dashed}"),
        ]
    )


def instance_id(etc_dir: Path) -> str:
    return (etc_dir / "instance-id").read_text().strip()


def comment_of(pg: PrivatePostgres, role: str) -> str | None:
    [(comment,)] = query(
        pg, "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", role
    )
    return comment


def test_two_keters_sharing_a_server_never_take_each_others_database(
    private_postgres: PrivatePostgres, start: Callable[..., Running], tmp_path: Path
) -> None:
    # Staging and production on one PostgreSQL server, each with an app "shop": the
    # second keter's first deploy had taken the first's role, reset its password and
    # handed its data to the other app, locking the first out.
    app = unique_app("shop")
    production = start(private_postgres.admin_dsn, etc_dir=tmp_path / "production")
    staging = start(private_postgres.admin_dsn, etc_dir=tmp_path / "staging")
    ours = production.ready(app)
    with connect_as(ours) as conn:
        conn.execute("CREATE TABLE cards (number text)")

    theirs = staging.ready(app)
    assert theirs.name != ours.name and theirs.user != ours.user
    with connect_as(theirs) as conn:
        assert conn.execute("SELECT to_regclass('cards')").fetchone() == (None,)
    with connect_as(ours) as conn:  # the first keter's app still logs in, data intact
        assert conn.execute("SELECT to_regclass('cards')::text").fetchone() == ("cards",)
    assert instance_id(tmp_path / "production") != instance_id(tmp_path / "staging")
    assert comment_of(private_postgres, ours.user).startswith(
        f"keter {instance_id(tmp_path / 'production')} app "
    )


def test_an_operators_role_that_fits_an_apps_names_is_never_taken(
    private_postgres: PrivatePostgres, start: Callable[..., Running]
) -> None:
    app = unique_app("reports")
    role = f"{slug(app)}_readerbot1"  # the operator's; it happens to fit the app's names
    assert re.fullmatch(name_pattern(app), role)
    superuser_run(private_postgres, "CREATE ROLE {} LOGIN CREATEDB PASSWORD 'ops-password'", role)

    db = start(private_postgres.admin_dsn).ready(app)  # the app's first deploy
    assert db.user != role
    assert comment_of(private_postgres, role) is None
    attributes = "SELECT rolcreatedb, rolconnlimit FROM pg_roles WHERE rolname = %s"
    assert query(private_postgres, attributes, role) == [(True, -1)]
    with psycopg.connect(
        host="127.0.0.1",
        port=private_postgres.port,
        user=role,
        password="ops-password",
        dbname="postgres",
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


@pytest.mark.parametrize(
    "change",
    [
        "ALTER ROLE {} CREATEDB",
        "ALTER ROLE {} CREATEROLE",
        "ALTER ROLE {} BYPASSRLS",
        "ALTER ROLE {} REPLICATION",
        "ALTER ROLE {} SUPERUSER",
        "GRANT pg_monitor TO {}",
        "GRANT CONNECT ON DATABASE postgres TO {}",
        "CREATE DATABASE {} OWNER {}",  # another database of its own
    ],
)
def test_a_lost_apps_role_given_more_rights_since_is_not_adopted(
    private_postgres: PrivatePostgres,
    start: Callable[..., Running],
    etc_dir: Path,
    change: str,
) -> None:
    # The comment says this keter made it for this app, but someone gave it more than
    # logging in since: neither its password is keter's to reset nor its rights the app's.
    app = unique_app("lifted")
    running = start(private_postgres.admin_dsn)
    db = running.ready(app, deploy_id=1)
    with connect_as(db) as conn:  # what it owns in its own database does not count
        conn.execute("CREATE TABLE kept (x int)")
    if change.startswith("CREATE DATABASE"):
        superuser_run(private_postgres, change, f"{db.user}_other", db.user)
    else:
        superuser_run(private_postgres, change, db.user)
    (etc_dir / "postgres.yaml").unlink()

    again = running.ready(app, deploy_id=2)
    assert again.user != db.user
    with connect_as(db) as conn:  # its password was left alone
        assert conn.execute("SELECT current_user").fetchone() == (db.user,)


def test_a_role_an_older_keter_made_keeps_working_and_gets_the_new_comment(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app, lost = unique_app("upgraded"), unique_app("upgradedlost")
    running = start(private_postgres.admin_dsn)
    db = running.ready(app, deploy_id=1)
    old = running.ready(lost, deploy_id=2)
    # What an older keter wrote: no instance in the comment.
    superuser_run(private_postgres, f"COMMENT ON ROLE {{}} IS 'keter app {app}'", db.user)
    superuser_run(private_postgres, f"COMMENT ON ROLE {{}} IS 'keter app {lost}'", old.user)

    assert running.ready(app, deploy_id=3) == db  # in postgres.yaml: still the app's
    assert comment_of(private_postgres, db.user) == f"keter {instance_id(etc_dir)} app {app}"

    # Without an entry, a role of the old form names no keter: it might be another's.
    store = stored(etc_dir)
    del store[lost]
    (etc_dir / "postgres.yaml").write_text(yaml.safe_dump(store))
    assert running.ready(lost, deploy_id=4).user != old.user
    with connect_as(old) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (old.user,)


def test_the_instance_id_is_made_once_owner_only_and_kept(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    first = start(private_postgres.admin_dsn)
    first.ready(unique_app("ident"))
    path = etc_dir / "instance-id"
    made = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(rb"[a-z0-9]{16}\n", made)

    first.actor.stop()
    first.actor.join(timeout=10)
    start(private_postgres.admin_dsn).ready(unique_app("ident"))
    assert path.read_bytes() == made


def test_a_malformed_instance_id_fails_clearly_and_is_left_alone(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    etc_dir.mkdir()
    path = etc_dir / "instance-id"
    path.write_text("not an id!\n")
    running = start(private_postgres.admin_dsn)
    running.send(unique_app("ident"))
    reply = running.reply()
    assert isinstance(reply, DatabaseFailed) and "instance-id" in reply.reason
    assert path.read_text() == "not an id!\n"


def test_an_unclaimed_role_of_a_similar_app_name_is_not_adopted_when_claimed(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    app = unique_app("twin")
    running = start(private_postgres.admin_dsn)
    first = running.ready(app)
    # "Twin7" slugs like "twin7", but the role is claimed by the first entry.
    second = running.ready(app.capitalize())
    assert second.name != first.name
    assert re.fullmatch(name_pattern(app), second.name)


# -- bad input ------------------------------------------------------------------------------


def test_hostile_app_name_is_harmless(
    private_postgres: PrivatePostgres,
    start: Callable[..., Running],
    etc_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="keter")
    app = f'x{next(_app_numbers)}"; DROP ROLE postgres; --'
    running = start(private_postgres.admin_dsn)
    db = running.ready(app)

    assert re.fullmatch(r"x\d+_drop_role_postgres_[a-z0-9]{10}", db.name)
    assert query(private_postgres, "SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'") == [
        (True,)
    ]
    assert stored(etc_dir)[app]["name"] == db.name
    assert running.ready(app, deploy_id=2) == db
    assert any(r.getMessage().startswith(f"{app}: ") for r in caplog.records)


def test_unreadable_credentials_file_fails_clearly_and_is_left_alone(
    start: Callable[..., Running], etc_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    etc_dir.mkdir()
    path = etc_dir / "postgres.yaml"
    path.write_text("shop: [unclosed\n")
    dsn = make_conninfo(host="127.0.0.1", port=free_port(), user="nobody", password="x")
    running = start(dsn, retry_for=30.0)

    running.send("shop")
    reply = running.reply(timeout=5)
    assert isinstance(reply, DatabaseFailed) and "postgres.yaml" in reply.reason
    assert path.read_text() == "shop: [unclosed\n"
    # One line for the user: the supervisor's "deploy failed", carrying this reason.
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "line 1" in reply.reason


def test_a_dsn_libpq_cannot_read_fails_the_deploy_without_showing_it(
    start: Callable[..., Running],
) -> None:
    """The config reader refuses such an admin-dsn before keter starts; the provisioner,
    which reads its DSN at the first deploy that needs a database (keter.postgres:
    psycopg is loaded then), still fails each such deploy in one line."""
    running = start("host=db.test password=s3cret port='unterminated")
    for deploy_id in (1, 2):
        running.send("shop", deploy_id)
        reply = running.reply(timeout=5)
        assert isinstance(reply, DatabaseFailed) and reply.deploy_id == deploy_id
        assert "not a valid libpq connection string" in reply.reason
        assert "s3cret" not in reply.reason


def test_malformed_entry_fails_clearly_and_is_left_alone(
    start: Callable[..., Running], etc_dir: Path
) -> None:
    etc_dir.mkdir()
    path = etc_dir / "postgres.yaml"
    path.write_text("shop:\n  name: shop_x\n")
    dsn = make_conninfo(host="127.0.0.1", port=free_port(), user="nobody", password="x")
    running = start(dsn)

    running.send("shop")
    reply = running.reply(timeout=5)
    assert isinstance(reply, DatabaseFailed) and "lacks 'user'" in reply.reason
    assert not reply.unavailable  # deploying again will not help
    assert path.read_text() == "shop:\n  name: shop_x\n"


# -- faults ---------------------------------------------------------------------------------


def retry_logged(caplog: pytest.LogCaptureFixture, app: str) -> bool:
    return any(
        r.getMessage().startswith(f"{app}: database server unavailable, retrying")
        for r in list(caplog.records)
    )


def test_unreachable_server_fails_after_retry_for_without_holding_up_other_apps(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keter")
    retry_for = 3.0
    dsn = make_conninfo(host="127.0.0.1", port=free_port(), user="nobody", password="x")
    running = start(dsn, retry_for=retry_for)

    sent_a = time.monotonic()
    running.send("first")
    wait_for(lambda: retry_logged(caplog, "first"), 5, "first app's first retry")
    sent_b = time.monotonic()
    running.send("second")

    got = {}
    for _ in range(2):
        reply = running.reply()
        got[reply.app] = time.monotonic()
        assert isinstance(reply, DatabaseFailed)
        assert "unavailable for 3s" in reply.reason and "refused" in reply.reason
        assert reply.unavailable  # the supervisor may deploy the bundle again later
    # Each gave up after its own retry_for (and the attempt under way then: a helper
    # process each, slower on a busy machine): the second was not queued behind the
    # first app's retries (that would be past 2 * retry_for).
    assert retry_for <= got["first"] - sent_a < retry_for + 2.0
    assert retry_for <= got["second"] - sent_b < retry_for + 2.0
    assert retry_logged(caplog, "second")


def test_refused_admin_login_is_retried_then_reported(
    private_postgres: PrivatePostgres, start: Callable[..., Running]
) -> None:
    params = conninfo_to_dict(private_postgres.admin_dsn)
    params["password"] = "wrong"
    running = start(make_conninfo(**params), retry_for=0.3)

    running.send("refused")
    reply = running.reply()
    assert isinstance(reply, DatabaseFailed)
    assert "password authentication failed" in reply.reason


def test_server_outage_is_waited_out_and_later_requests_succeed(
    private_postgres: PrivatePostgres,
    start: Callable[..., Running],
    etc_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="keter")
    patient = start(private_postgres.admin_dsn, retry_for=30.0)
    impatient = start(private_postgres.admin_dsn, retry_for=0.3, etc_dir=etc_dir / "other")
    waiting, failing = unique_app("patient"), unique_app("impatient")
    private_postgres.stop()
    try:
        impatient.send(failing)
        assert isinstance(impatient.reply(), DatabaseFailed)
        patient.send(waiting)
        wait_for(lambda: retry_logged(caplog, waiting), 5, "a retry while the server is down")
    finally:
        private_postgres.start()

    db = patient.reply()
    assert isinstance(db, DatabaseReady) and db.app == waiting
    assert_converged(private_postgres, etc_dir, waiting, db.db)
    impatient.ready(failing)  # the next request after a failure works


@pytest.mark.parametrize(
    ("hold", "what"),
    [
        ("ALTER ROLE CURRENT_USER PASSWORD 'changed by the app'", "role"),
        ('ALTER DATABASE "{name}" CONNECTION LIMIT 5', "database"),
    ],
)
def test_an_app_holding_a_lock_on_its_role_or_database_fails_its_deploy_alone_and_fast(
    private_postgres: PrivatePostgres,
    start: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
    hold: str,
    what: str,
) -> None:
    # The app's own session changes its role or database and leaves the transaction
    # open: keter's ALTER ROLE (or REVOKE on the database) waits on that row. It had
    # waited the whole statement timeout (30 s) on the provisioner's one thread, every
    # other app's request queued behind it, then called it "unavailable" and retried.
    caplog.set_level(logging.INFO, logger="keter")
    running = start(private_postgres.admin_dsn, retry_for=30.0)
    locker, bystander = unique_app("locker"), unique_app("bystander")
    db = running.ready(locker)
    bound = pgadmin.LOCK_TIMEOUT_MS / 1000 + 5  # far below the statement timeout
    with connect_as(db) as conn:  # not autocommit: the transaction stays open
        conn.execute(hold.format(name=db.name))
        sent = time.monotonic()
        running.send(locker, deploy_id=2)
        running.send(bystander, deploy_id=3)
        failed = running.reply(timeout=bound)
        ready = running.reply(timeout=bound)
        took = time.monotonic() - sent
        conn.rollback()
    assert isinstance(failed, DatabaseFailed) and failed.deploy_id == 2, failed
    assert f"a session of {locker} holds a lock on its {what} {db.name}" in failed.reason
    assert not failed.unavailable and "unavailable" not in failed.reason
    assert not retry_logged(caplog, locker)
    assert isinstance(ready, DatabaseReady) and ready.app == bystander, ready
    assert took < bound
    assert running.ready(locker, deploy_id=4) == db  # the session let go: it deploys


def test_passwords_never_reach_the_log(
    private_postgres: PrivatePostgres,
    start: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    running = start(private_postgres.admin_dsn)
    app = unique_app("secret")
    db = running.ready(app, deploy_id=1)
    assert running.ready(app, deploy_id=2) == db
    admin_password = conninfo_to_dict(private_postgres.admin_dsn)["password"]

    assert caplog.records  # the provisioner did log its work
    assert db.password not in caplog.text
    assert admin_password not in caplog.text
    assert db.password not in repr(DatabaseReady(app=app, deploy_id=1, db=db))


# -- default mode: the local cluster as the postgres OS user ---------------------------------


def test_default_mode_provisions_through_a_child_running_as_postgres(
    private_postgres: PrivatePostgres, start: Callable[..., Running], etc_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the default mode switches to the postgres OS user, which needs root")
    socket_dsn = f"host={private_postgres.socket_dir} port={private_postgres.port}"
    # The fixture lets the postgres superuser in over the socket by peer
    # authentication only: this very process (root) is turned away ...
    as_root = {"dsn": f"{socket_dsn} user=postgres", "connect_timeout": 5}
    refused = pgadmin.run({"op": "find", "pattern": "x", "claimed": [], **as_root})
    assert not refused["ok"] and "Peer authentication failed" in refused["error"]

    # ... so succeeding proves the helper really connected as the postgres OS user.
    app = unique_app("peer")
    db = start("", peer_dsn=socket_dsn).ready(app)
    # Apps log in with their password over TCP: on Debian only the postgres OS user
    # gets in over the socket (`local all all peer`).
    assert (db.host, db.port) == ("127.0.0.1", private_postgres.port)
    assert stored(etc_dir)[app]["server"] == "127.0.0.1"
    assert_converged(private_postgres, etc_dir, app, db)

    env = db_env(db)
    run_app(env, "write", "over tcp")
    assert run_app({"URL_ONLY": env["DATABASE_URL"]}, "read") == "over tcp"


def test_admin_helper_reports_an_unknown_os_user_in_one_line() -> None:
    answer = pgadmin.run_as("no-such-user-keter", {"op": "find"}, timeout=30)
    assert (answer["ok"], answer["retry"]) == (False, False)
    assert answer["error"].startswith("cannot become OS user no-such-user-keter")


class SilencingProxy:
    """A TCP proxy to the server that, once a client sends ``trigger``, forwards nothing
    more on that connection: a partition, a failover, as keter's side sees it."""

    def __init__(self, port: int, trigger: bytes = b"set_config") -> None:
        self.port, self.trigger = port, trigger
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.silenced = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def listen_port(self) -> int:
        return self.listener.getsockname()[1]

    def close(self) -> None:
        for sock in [self.listener, *self.held]:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            self.held += [client, server]
            silent = threading.Event()
            for source, target in ((client, server), (server, client)):
                pump = (source, target, source is client, silent)
                threading.Thread(target=self._pump, args=pump, daemon=True).start()

    def _pump(self, source, target, from_client: bool, silent: threading.Event) -> None:
        while data := self._recv(source):
            if from_client and self.trigger in data:
                silent.set()
                self.silenced.set()
            if not silent.is_set():
                try:
                    target.sendall(data)
                except OSError:
                    return

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""


def test_an_admin_connection_gone_silent_fails_within_its_bound(
    private_postgres: PrivatePostgres, start: Callable[..., Running], monkeypatch
) -> None:
    # Silent after its login, the admin-dsn connection held the provisioner (and every
    # app's deploy behind it) for as long as TCP keeps a dead peer: hours, unsaid.
    monkeypatch.setattr(pgadmin, "CHILD_EXTRA_SECONDS", 3)
    proxy = SilencingProxy(private_postgres.port)
    try:
        dsn = make_conninfo(private_postgres.admin_dsn, port=proxy.listen_port)
        running = start(dsn, retry_for=1, connect_timeout=2)
        app = unique_app("silent")
        began = time.monotonic()
        running.send(app)
        reply = running.reply(timeout=30)
        assert proxy.silenced.is_set()
        assert isinstance(reply, DatabaseFailed) and reply.unavailable, reply
        assert "gave no answer within" in reply.reason
        assert time.monotonic() - began < 20
    finally:
        proxy.close()
