"""A private PostgreSQL cluster for tests: own data dir, own port, own socket dir.

It never touches the machine's cluster. When the tests run as root the server
runs as the ``postgres`` OS user (PostgreSQL refuses to run as root), and its
files live in a fresh folder under the system temp dir, because pytest's
tmp_path sits under a root-only (0700) folder that user cannot enter.

Authentication mirrors a stock Debian host: the ``postgres`` superuser logs in
over the socket by peer authentication only, so a test that gets in that way
proves the client really ran as the ``postgres`` OS user. Everyone else uses
scram-sha-256 passwords, over the socket or TCP on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from support.net import free_port

ADMIN_ROLE = "keter_admin"


def newest_bin_dir() -> Path:
    """The bin folder of the newest installed PostgreSQL major version."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version)
    if not found:
        pytest.skip("PostgreSQL server binaries not installed under /usr/lib/postgresql")
    return found[-1]


class PrivatePostgres:
    """One initdb'ed cluster; ``start``/``stop`` may be called repeatedly."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.bin = newest_bin_dir()
        self.data = base / "data"
        self.socket_dir = base / "sock"
        self.log = base / "postgres.log"
        self.port = free_port()
        self._os_user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._superuser_password = secrets.token_urlsafe(16)
        self._admin_password = secrets.token_urlsafe(16)
        # The superuser over TCP with a password: tests run as root, which peer
        # authentication (rightly) does not let in as postgres.
        self.superuser_dsn = make_conninfo(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self._superuser_password,
            dbname="postgres",
        )
        # What keter gets: a non-superuser with only CREATEROLE CREATEDB.
        self.admin_dsn = make_conninfo(
            host="127.0.0.1",
            port=self.port,
            user=ADMIN_ROLE,
            password=self._admin_password,
            dbname="postgres",
        )

    def _run(self, *args: str | Path) -> None:
        """Run a PostgreSQL program as the server's OS user; fail with its output."""
        kwargs: dict = {}
        if self._os_user is not None:
            kwargs = {"user": self._os_user.pw_uid, "group": self._os_user.pw_gid}
            kwargs["extra_groups"] = []
        result = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, cwd=self.base, **kwargs
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed:\n{result.stdout}{result.stderr}{log}")

    def init(self) -> None:
        """initdb, configure, start, and create the admin role."""
        self.socket_dir.mkdir()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self._superuser_password + "\n")
        if self._os_user is not None:
            for path in (self.base, self.socket_dir, pwfile):
                os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)
        self._run(
            self.bin / "initdb",
            "--pgdata", self.data,
            "--username", "postgres",
            "--pwfile", pwfile,
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        (self.data / "pg_hba.conf").write_text(
            "local all postgres peer\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 16MB\n"
                "max_connections = 40\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        self.start()
        with psycopg.connect(self.superuser_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB PASSWORD {}").format(
                    sql.Identifier(ADMIN_ROLE), sql.Literal(self._admin_password)
                )
            )

    def start(self) -> None:
        self._run(self.bin / "pg_ctl", "--pgdata", self.data, "--log", self.log, "-w", "start")

    def stop(self) -> None:
        self._run(self.bin / "pg_ctl", "--pgdata", self.data, "-w", "-m", "fast", "stop")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture(scope="session")
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    """A running private cluster shared by the whole test session."""
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="keter-test-pg-"))
    else:
        base = tmp_path_factory.mktemp("postgres")
    server = PrivatePostgres(base)
    try:
        server.init()
        yield server
    finally:
        if server.is_running():
            server.stop()
        if os.geteuid() == 0:
            shutil.rmtree(base, ignore_errors=True)
