"""Issue 13's tests of record: a real keter, real nginx, real PostgreSQL.

The release phase (a release runs before its version serves; a failing one
switches nothing, under load), backups and restores (``keter db``,
``rollback --with-data``), ``KETER_DATA_DIR``, and settings changed without a
new bundle (``keter env``), whose values never leave keter but to the app.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import yaml
from support.bundles import make_bundle, member, webapp_config
from support.daemon import app_processes, keter_cli, status_api
from support.net import Load, app_port_range, body, served
from support.processes import alive
from support.wait import wait_for

from keter import envstore
from keter.processes.programs import SETPRIV

appS = Path(__file__).parent / "apps"
HOST = "rel.test"


def release_bundle(
    path: Path,
    version: str,
    release: list[str] | None = None,
    *,
    postgres: bool = True,
    timeout: float | None = None,
    interpreter: str = sys.executable,
) -> Path:
    """tests/apps/db_app.py answering ``version``, with tests/apps/release.py as bin/release."""
    config: dict = {"exec": "../bin/app", "host": HOST, "env": {"VERSION": version}}
    if postgres:
        config["postgres"] = True
    if release is not None:
        config["release"] = ["../bin/release", *release]
    if timeout is not None:
        config["release-timeout"] = timeout
    # The app's user runs it: an interpreter that user may read (keter's own may be root's).
    script = f"#!{interpreter}\n{(appS / 'release.py').read_text()}".encode()
    return make_bundle(
        path,
        config=config,
        app_source=appS / "db_app.py",
        members=[member("bin/release", script, mode=0o755)],
        interpreter=interpreter,
    )


def info(nginx, env: str = "", *, settled: bool = False) -> dict:
    """The app's /info; ``settled``: first wait until no nginx worker has an older config
    (right after a switch an old worker may still route to the version before)."""
    if settled:
        nginx.wait_settled()
    data = body(nginx, HOST, f"/info?env={env}")
    assert data is not None, "the app did not answer /info"
    return json.loads(data)


def deploy(keter, app: str, bundle: Path) -> object:
    """``keter deploy`` of a bundle, waiting for the verdict."""
    return keter_cli(keter.root, "deploy", str(bundle), "--name", app, "--timeout", "60")


def serve_v1(keter, nginx, tmp_path: Path, app: str) -> None:
    """``keter deploy`` v1, whose release makes the notes table, and wait until it serves."""
    result = deploy(keter, app, release_bundle(tmp_path / "v1.keter", "v1", ["--sql", NOTES]))
    assert result.returncode == 0, result.stderr
    served(nginx, HOST, "v1")


def history(keter, app: str) -> list[dict]:
    return status_api(keter).app(app)["history"]


@pytest.fixture
def app() -> str:
    """A name of its own for each test: the PostgreSQL cluster is shared by the session,
    and keter adopts an unclaimed database whose name fits the app's."""
    return f"rel{secrets.token_hex(4)}"


@pytest.fixture
def pg_keter(keter_factory, private_postgres):
    return keter_factory(
        postgres={"admin-dsn": private_postgres.admin_dsn},
        **{"stop-timeout": 2, "port-range": app_port_range()},
    )


@pytest.fixture
def keter(keter_factory):
    """A keter whose narrow port range other test sessions on this machine rarely share."""
    return keter_factory(**{"port-range": app_port_range()})


NOTES = "CREATE TABLE IF NOT EXISTS notes (note text)"


# -- the release phase -------------------------------------------------------------------


def test_a_release_makes_a_table_before_its_version_starts(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    first = info(private_nginx)
    # The version started after the release: the table was there when it began.
    assert first["tables_at_start"] == ["notes"]
    log = keter.log_since_start()
    assert log.index("release finished") < log.index(f"{app}: deploy #1 started pid")
    # Its output is in the app's log, with the port the version got.
    app_log = (keter.root / "log" / f"app-{app}.log").read_text()
    assert f"ran: {NOTES}" in app_log
    port = status_api(keter).app(app)["port"]
    assert f"release of v1 starting, PORT={port}" in app_log

    # The backup taken before it: the database as it was, root's alone.
    [backup] = status_api(keter).backups(app)
    assert backup["kind"] == "release" and backup["version"] == history(keter, app)[0]["version"]
    folder = keter.root / "backups" / app
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / backup["name"]).stat().st_mode) == 0o600
    assert stat.S_IMODE((keter.root / "backups").stat().st_mode) == 0o700

    # The next version's release sees the first's data, and runs before it starts too.
    bundle = release_bundle(
        tmp_path / "v2.keter", "v2", ["--sql", NOTES, "--sql", "CREATE TABLE v2_only (x int)"]
    )
    assert deploy(keter, app, bundle).returncode == 0
    served(private_nginx, HOST, "v2")
    assert info(private_nginx)["tables_at_start"] == ["notes", "v2_only"]
    assert len(status_api(keter).backups(app)) == 2


@pytest.mark.parametrize("how", ["exit", "timeout"])
def test_a_failing_release_switches_nothing_under_load_and_the_backup_restores(
    pg_keter, private_nginx, tmp_path, how, app
) -> None:
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    body(private_nginx, HOST, "/write?note=before")

    load = Load(private_nginx.port, HOST)
    threads = load.run()
    try:
        wait_for(lambda: load.requests > 20, 10, "load to start")
        changes = ["--sql", "CREATE TABLE v2_only (x int)", "--sql", "DELETE FROM notes"]
        failing = ["--exit", "1"] if how == "exit" else ["--hang"]
        bundle = release_bundle(
            tmp_path / "v2.keter",
            "v2",
            [*changes, *failing],
            timeout=5 if how == "timeout" else None,
        )
        result = deploy(keter, app, bundle)
        wait_for(lambda: load.requests > 200, 20, "more load after the failure")
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(10)
    assert load.errors == []
    assert set(load.bodies) == {b"v1\n"}

    # keter deploy says why, with the release's last lines; so does keter's log.
    assert result.returncode == 1
    expected = "exited with status 1" if how == "exit" else "did not finish within 5s"
    assert expected in result.stderr
    last_line = "ERROR: release of v2 failed on purpose" if how == "exit" else "hanging"
    assert last_line in result.stderr
    [entry] = [e for e in history(keter, app) if e["outcome"] == "failed"]
    assert entry["kind"] == "release"
    assert re.search(rf"{app}: deploy #\d+ failed: release bin/release", keter.log())
    assert f"  | {last_line}" in keter.log()

    # The release got half way: the backup taken just before it undoes that.
    now = info(private_nginx)
    assert now["version"] == "v1" and now["tables"] == ["notes", "v2_only"]
    assert now["notes"] is None or now["notes"] == []
    before_v2 = [b for b in status_api(keter).backups(app) if b["version"] == entry["version"]]
    assert [b["kind"] for b in before_v2] == ["release"]
    restored = keter_cli(keter.root, "db", "restore", app, before_v2[0]["name"])
    assert restored.returncode == 0, restored.stderr
    assert f"database restored from {before_v2[0]['name']}" in restored.stderr
    served(private_nginx, HOST, "v1")
    after = info(private_nginx)
    assert after["tables"] == ["notes"] and after["notes"] == ["before"]
    assert after["pid"] != now["pid"]  # told by a restart of the version serving


def test_a_newer_bundle_waits_for_a_running_release_to_finish(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    keter = pg_keter
    first = release_bundle(tmp_path / "v1.keter", "v1", ["--sql", NOTES])
    assert deploy(keter, app, first).returncode == 0
    slow = ["--sleep", "3", "--sql", "CREATE TABLE by_v2 (x int)"]
    keter.drop(release_bundle(tmp_path / "v2.keter", "v2", slow), f"{app}.keter")
    wait_for(lambda: "release of v2 starting" in app_log(keter, app), 20, "v2's release to run")
    result = deploy(keter, app, release_bundle(tmp_path / "v3.keter", "v3", ["--sql", NOTES]))
    assert result.returncode == 0, result.stderr
    served(private_nginx, HOST, "v3")
    # v2's release was finished, not cut short; v2 itself never started.
    assert info(private_nginx)["tables"] == ["by_v2", "notes"]
    outcomes = [(e["outcome"], e["reason"]) for e in reversed(history(keter, app))]
    assert [o for o, _ in outcomes] == ["serving", "superseded", "serving"]
    assert "newer bundle" in outcomes[1][1]
    assert "waiting for the release of deploy" in keter.log()
    assert "db_app v2" not in app_log(keter, app)


def app_log(keter, app: str) -> str:
    path = keter.root / "log" / f"app-{app}.log"
    return path.read_text() if path.exists() else ""


def test_a_backup_restores_the_data_of_its_time(pg_keter, private_nginx, tmp_path, app) -> None:
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    body(private_nginx, HOST, "/write?note=a")

    taken = keter_cli(keter.root, "db", "backup", app)
    assert taken.returncode == 0, taken.stderr
    name = taken.stdout.strip()
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-manual-[0-9a-f]{12}\.dump", name)
    body(private_nginx, HOST, "/write?note=b")
    assert info(private_nginx)["notes"] == ["a", "b"]
    listing = keter_cli(keter.root, "db", "backups", app)
    assert name in listing.stdout and "manual" in listing.stdout

    before = info(private_nginx)["pid"]
    restored = keter_cli(keter.root, "db", "restore", app, name)
    assert restored.returncode == 0, restored.stderr
    served(private_nginx, HOST, "v1")
    after = info(private_nginx)
    assert after["notes"] == ["a"] and after["pid"] != before
    # What the restore replaced was backed up first: restoring that undoes the restore.
    [safety] = [b for b in status_api(keter).backups(app) if b["kind"] == "restore"]
    assert safety["name"] in restored.stderr
    undone = keter_cli(keter.root, "db", "restore", app, safety["name"])
    assert undone.returncode == 0, undone.stderr
    served(private_nginx, HOST, "v1")
    assert info(private_nginx)["notes"] == ["a", "b"]

    missing = keter_cli(keter.root, "db", "restore", app, "nope.dump")
    assert missing.returncode == 1 and "no backup named" in missing.stderr


def test_rollback_with_data_restores_the_backup_before_the_undone_version(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    body(private_nginx, HOST, "/write?note=by-v1")
    v2_release = ["--sql", NOTES, "--sql", "CREATE TABLE IF NOT EXISTS v2_only (x int)"]
    assert (
        deploy(keter, app, release_bundle(tmp_path / "v2.keter", "v2", v2_release)).returncode == 0
    )
    served(private_nginx, HOST, "v2")
    body(private_nginx, HOST, "/write?note=by-v2")
    assert info(private_nginx)["tables"] == ["notes", "v2_only"]
    # A restart of v2 backs up and runs its release again: that backup holds v2's data,
    # and once had --with-data restore it (v1 then ran on v2's tables).
    restarted = keter_cli(keter.root, "restart", app)
    assert restarted.returncode == 0, restarted.stderr
    kinds = [b["kind"] for b in status_api(keter).backups(app)]
    assert kinds[:2] == ["rerelease", "release"], kinds

    result = keter_cli(keter.root, "rollback", app, "--with-data")
    assert result.returncode == 0, result.stderr
    assert "database restored from" in result.stderr
    served(private_nginx, HOST, "v1")
    back = info(private_nginx)
    assert back["tables"] == ["notes"] and back["notes"] == ["by-v1"]


def test_rollback_with_data_to_a_damaged_version_changes_no_data(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    """The archived bundle was checked only after the restore: the rollback failed on it,
    and the version it was to undo served on, on the data from before its release."""
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    v2_release = ["--sql", NOTES, "--sql", "CREATE TABLE IF NOT EXISTS v2_only (x int)"]
    v2 = release_bundle(tmp_path / "v2.keter", "v2", v2_release)
    assert deploy(keter, app, v2).returncode == 0
    served(private_nginx, HOST, "v2")
    body(private_nginx, HOST, "/write?note=by-v2")
    serving = status_api(keter).app(app)["version"]
    archived = (keter.root / "archive" / app).glob("*.keter")
    [v1] = [path for path in archived if not path.name.startswith(serving)]
    data = bytearray(v1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: bit rot
    v1.write_bytes(bytes(data))

    result = keter_cli(keter.root, "rollback", app, "--with-data")
    assert result.returncode != 0
    assert "is damaged; nothing was restored" in result.stderr, result.stderr
    now = info(private_nginx)
    assert now["tables"] == ["notes", "v2_only"] and "by-v2" in now["notes"]


def test_a_bundle_a_rollback_with_data_replaces_is_said(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    # The upload that came while the restore ran was replaced by the rollback's bundle
    # with no word of it: the operator saw v1 serve and believed v3 was on its way.
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    v2 = release_bundle(tmp_path / "v2.keter", "v2", ["--sql", NOTES])
    assert deploy(keter, app, v2).returncode == 0
    served(private_nginx, HOST, "v2")
    v3 = release_bundle(tmp_path / "v3.keter", "v3", ["--sql", NOTES])
    with psycopg.connect(app_dsn(keter, app)) as holder:
        holder.execute("LOCK TABLE notes IN ACCESS SHARE MODE")  # the restore waits for it
        command = ["rollback", "--with-data", "--root", str(keter.root), app]
        rollback = subprocess.Popen(
            [sys.executable, "-m", "keter", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: re.search(r": psql started", keter.log_since_start()), 30, "psql")
        keter.drop(v3, f"{app}.keter")
        wait_for(lambda: status_api(keter).app(app)["deploying"] is not None, 30, "v3 coming")
        holder.rollback()
    _, err = rollback.communicate(timeout=120)
    assert rollback.returncode == 0, err
    replaced = r"the bundle on its way \((?:[0-9a-f]{12}|not read yet)\) was replaced"
    assert re.search(replaced, err), err
    assert "the rollback replaces the bundle on its way" in keter.log_since_start()
    served(private_nginx, HOST, "v1")


def app_dsn(keter, app: str) -> str:
    """The app's own connection string, from keter's record of its credentials."""
    entry = yaml.safe_load((keter.root / "etc" / "postgres.yaml").read_text())[app]
    return (
        f"host=127.0.0.1 port={entry['port']} user={entry['user']} "
        f"password={entry['pass']} dbname={entry['name']}"
    )


def test_a_bundle_uploaded_during_a_restore_deploys_on_the_restored_data(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    # The restore's redeploy of the version serving had copied it over the upload: the
    # newer version was dropped with no error, and v1 served again.
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    body(private_nginx, HOST, "/write?note=kept")
    taken = keter_cli(keter.root, "db", "backup", app)
    assert taken.returncode == 0, taken.stderr
    body(private_nginx, HOST, "/write?note=after-the-backup")
    dsn = app_dsn(keter, app)
    v2 = release_bundle(tmp_path / "v2.keter", "v2", ["--sql", NOTES])
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE notes IN ACCESS SHARE MODE")  # the restore waits for it
        restore = subprocess.Popen(
            [sys.executable, "-m", "keter", "db", "restore", "--root", str(keter.root), app],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: re.search(r": psql started", keter.log_since_start()), 30, "psql")
        keter.drop(v2, f"{app}.keter")
        wait_for(lambda: status_api(keter).app(app)["deploying"], 30, "v2 on its way")
        holder.rollback()
    _, err = restore.communicate(timeout=120)
    assert restore.returncode == 0, err
    assert "uploaded meanwhile, deploys on it" in err
    served(private_nginx, HOST, "v2")
    assert (keter.incoming / f"{app}.keter").read_bytes() == v2.read_bytes()
    assert info(private_nginx)["notes"] == ["kept"]  # v2 runs on the restored data


def test_a_restore_whose_restart_a_newer_version_supersedes_reports_that_versions_end(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    # The data was restored and v2 served on it, but the restart of v1 it superseded was
    # the verdict: the restore "failed" (exit 1) after it had succeeded.
    keter = pg_keter
    held = "SELECT pg_advisory_lock(7207)"  # v1's release waits for the test's lock
    v1 = release_bundle(tmp_path / "v1.keter", "v1", ["--sql", NOTES, "--sql", held])
    assert deploy(keter, app, v1).returncode == 0
    served(private_nginx, HOST, "v1")
    body(private_nginx, HOST, "/write?note=kept")
    taken = keter_cli(keter.root, "db", "backup", app)
    assert taken.returncode == 0, taken.stderr
    body(private_nginx, HOST, "/write?note=after-the-backup")
    v2 = release_bundle(tmp_path / "v2.keter", "v2", ["--sql", NOTES])
    with psycopg.connect(app_dsn(keter, app), autocommit=True) as holder:
        holder.execute(held)
        restore = subprocess.Popen(
            [sys.executable, "-m", "keter", "db", "restore", "--root", str(keter.root), app],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The restart's release (v1's second) waits for the lock: v2 comes now.
        wait_for(lambda: app_log(keter, app).count(f"ran: {NOTES}") == 2, 60, "the restart")
        keter.drop(v2, f"{app}.keter")
        wait_for(lambda: "waiting for the release of" in keter.log_since_start(), 30, "v2 seen")
    _, err = restore.communicate(timeout=120)
    assert restore.returncode == 0, err
    assert "a newer version came meanwhile and deployed on it" in err
    served(private_nginx, HOST, "v2")
    assert info(private_nginx)["notes"] == ["kept"]


def test_pg_dump_goes_before_keter_to_the_oom_killer(
    pg_keter, private_nginx, tmp_path, app
) -> None:
    # An app's data decides pg_dump's memory (an entry per large object): it had kept
    # keter's own OOM score, the last the kernel picks.
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    with waiting_pg_dump(keter, app) as (pg_dump, backup):
        assert Path(f"/proc/{pg_dump.pid}/oom_score_adj").read_text().strip() == "500"
    assert backup.wait(60) == 0


@contextlib.contextmanager
def waiting_pg_dump(keter, app: str) -> Iterator[tuple[psutil.Process, subprocess.Popen]]:
    """`keter db backup APP` run, and its pg_dump waiting for a lock on the app's table
    while the block runs (the lock is let go after it)."""
    with psycopg.connect(app_dsn(keter, app)) as holder:
        holder.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")  # pg_dump waits for it
        backup = subprocess.Popen(
            [sys.executable, "-m", "keter", "db", "backup", "--root", str(keter.root), app],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def dump() -> list[psutil.Process]:
            children = psutil.Process(keter.proc.pid).children(recursive=True)
            return [p for p in children if p.name() == "pg_dump"]

        [pg_dump] = wait_for(dump, 30, "pg_dump")
        yield pg_dump, backup
        holder.rollback()


def test_a_database_tool_dies_with_a_killed_keter(pg_keter, private_nginx, tmp_path, app) -> None:
    # pg_dump outlived a SIGKILLed keter (as did a restore's psql): its timeout gone with
    # keter, it held the app's connection and its lock, and a restore could commit
    # after the next keter had redeployed the app.
    keter = pg_keter
    serve_v1(keter, private_nginx, tmp_path, app)
    with waiting_pg_dump(keter, app) as (pg_dump, backup):
        keter.kill()
        wait_for(lambda: not alive(pg_dump.pid), 10, "pg_dump to die with keter")
    assert backup.wait(30) != 0  # keter went before it answered
    keter.start()
    served(private_nginx, HOST, "v1")


# -- KETER_DATA_DIR ------------------------------------------------------------------------


def test_the_data_folder_survives_redeploys_restarts_and_removal(
    keter, private_nginx, tmp_path, app
) -> None:
    bundle = release_bundle(tmp_path / "v1.keter", "v1", [], postgres=False)
    keter.drop(bundle, f"{app}.keter")
    served(private_nginx, HOST, "v1")
    folder = keter.root / "data" / app
    assert info(private_nginx)["data_dir"] == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o711
    body(private_nginx, HOST, "/data-write?name=kept&text=hello")

    keter.drop(release_bundle(tmp_path / "v2.keter", "v2", [], postgres=False), f"{app}.keter")
    served(private_nginx, HOST, "v2")
    data = info(private_nginx)["data"]
    assert (data["kept"], data["releases"]) == ("hello", "v1\nv2\n")

    keter.stop()
    keter.start()
    served(private_nginx, HOST, "v2")
    assert info(private_nginx)["data"]["kept"] == "hello"

    (keter.incoming / f"{app}.keter").unlink()
    wait_for(lambda: body(private_nginx, HOST) is None, 20, "the app to be removed")
    assert (folder / "kept").read_text() == "hello"  # removing the bundle keeps it

    keter.drop(bundle, f"{app}.keter")
    served(private_nginx, HOST, "v1")
    assert info(private_nginx)["data"]["kept"] == "hello"

    # keter data purge: never while the app runs, only with its name typed again.
    running = keter_cli(keter.root, "data", "purge", app, stdin=f"{app}\n".encode())
    assert running.returncode == 1 and "remove its bundle first" in running.stderr
    (keter.incoming / f"{app}.keter").unlink()
    wait_for(lambda: app not in [a["name"] for a in status_api(keter).status()["apps"]], 20)
    wrong = keter_cli(keter.root, "data", "purge", app, stdin=b"other\n")
    assert wrong.returncode == 1 and (folder / "kept").exists()
    purged = keter_cli(keter.root, "data", "purge", app, stdin=f"{app}\n".encode())
    assert purged.returncode == 0, purged.stderr
    assert not folder.exists()


def test_a_purge_waits_until_the_removed_apps_processes_have_ended(
    keter_factory, private_nginx, tmp_path, app
) -> None:
    # The app was forgotten as its bundle went, while its processes still drained and
    # stopped: a purge went ahead, and the app still running wrote its folder back.
    keter = keter_factory(**{"stop-timeout": 10})
    config = webapp_config(HOST, "v1", args=["--ignore-term"])  # stopped at stop-timeout
    keter.drop(make_bundle(tmp_path / "v1.keter", config=config), f"{app}.keter")
    served(private_nginx, HOST, "v1")
    folder = keter.root / "data" / app
    folder.mkdir(exist_ok=True)
    (folder / "kept").write_text("hello")
    (keter.incoming / f"{app}.keter").unlink()
    wait_for(lambda: body(private_nginx, HOST) is None, 20, "the app to be removed")

    def state() -> str | None:
        return {a["name"]: a["state"] for a in status_api(keter).status()["apps"]}.get(app)

    wait_for(lambda: state() == "stopping", 10, "the app shown as stopping")  # once nginx said
    assert app_processes(keter)
    refused = keter_cli(keter.root, "data", "purge", app, stdin=f"{app}\n".encode())
    assert refused.returncode == 1 and "still stops" in refused.stderr, refused.stderr
    assert (folder / "kept").exists()
    wait_for(lambda: not app_processes(keter), 20, "the app's processes to end")
    wait_for(lambda: app not in [a["name"] for a in status_api(keter).status()["apps"]], 10)
    purged = keter_cli(keter.root, "data", "purge", app, stdin=f"{app}\n".encode())
    assert purged.returncode == 0, purged.stderr
    assert not folder.exists()


# -- keter env -------------------------------------------------------------------------------


def test_env_set_under_load_restarts_without_a_failed_request(
    keter, private_nginx, tmp_path, app
) -> None:
    keter.drop(release_bundle(tmp_path / "v1.keter", "v1", postgres=False), f"{app}.keter")
    served(private_nginx, HOST, "v1")
    assert info(private_nginx, "GREETING")["env"] == {"GREETING": None}

    load = Load(private_nginx.port, HOST)
    threads = load.run()
    try:
        wait_for(lambda: load.requests > 20, 10, "load to start")
        result = keter_cli(keter.root, "env", "set", app, "GREETING=hello", "API_KEY=k-1")
        wait_for(lambda: load.requests > 200, 20, "more load after the restart")
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(10)
    assert result.returncode == 0, result.stderr
    assert load.errors == []
    assert info(private_nginx, "GREETING,API_KEY", settled=True)["env"] == {
        "GREETING": "hello",
        "API_KEY": "k-1",
    }

    listing = keter_cli(keter.root, "env", app)
    assert listing.stdout.split() == ["API_KEY", "GREETING"]
    shown = keter_cli(keter.root, "env", app, "--show")
    assert shown.stdout.split() == ["API_KEY=k-1", "GREETING=hello"]
    stored = keter.root / "etc" / "env" / f"{app}.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600

    # --no-restart stores only; the next deploy applies it.
    pid = info(private_nginx)["pid"]
    quiet = keter_cli(keter.root, "env", "set", app, "GREETING=later", "--no-restart")
    assert quiet.returncode == 0 and info(private_nginx, "GREETING")["env"]["GREETING"] == "hello"
    assert info(private_nginx)["pid"] == pid
    assert keter_cli(keter.root, "env", "unset", app, "API_KEY").returncode == 0
    now = info(private_nginx, "GREETING,API_KEY", settled=True)["env"]
    assert now == {"GREETING": "later", "API_KEY": None}

    # Settings from stdin stay off the command line.
    # A file edited on Windows: the line's carriage return is not the value's.
    piped = keter_cli(keter.root, "env", "set", app, "--stdin", stdin=b"FROM_STDIN=yes\r\n")
    assert piped.returncode == 0, piped.stderr
    assert info(private_nginx, "FROM_STDIN", settled=True)["env"]["FROM_STDIN"] == "yes"
    refused = keter_cli(keter.root, "env", "set", app, "PORT=1")
    assert refused.returncode == 2 and "set by keter" in refused.stderr

    # The largest value the store takes, of 4-byte characters, reaches keter: its JSON is
    # 96 KiB (\\ud83d\\ude00 for each), past the 64 KiB keter read, where the CLI said
    # "Broken pipe".
    big = "\U0001f600" * (envstore.MAX_VALUE // 4)
    stored = keter_cli(
        keter.root, "env", "set", app, "--stdin", "--no-restart", stdin=f"BIG={big}\n".encode()
    )
    assert stored.returncode == 0, stored.stderr
    assert envstore.load(keter.root / "etc", app)["BIG"] == big


def test_no_setting_value_leaves_keter_but_to_the_app(
    keter_factory, private_nginx, private_postgres, tmp_path, app
) -> None:
    keter = keter_factory(
        postgres={"admin-dsn": private_postgres.admin_dsn}, **{"port-range": app_port_range()}
    )
    secret = "s3cr3t-Value-That-Must-Not-Leak"
    bundle = release_bundle(tmp_path / "v1.keter", "v1", ["--sql", NOTES])
    assert deploy(keter, app, bundle).returncode == 0
    result = keter_cli(keter.root, "env", "set", app, f"SECRET_TOKEN={secret}")
    assert result.returncode == 0, result.stderr
    # The app has it (so the checks below could fail) ...
    assert info(private_nginx, "SECRET_TOKEN", settled=True)["env"]["SECRET_TOKEN"] == secret
    password = info(private_nginx, "PGPASSWORD")["env"]["PGPASSWORD"]
    assert password
    # keter sets the database variables of an app with postgres: true: one stored was
    # accepted and silently overridden.
    refused = keter_cli(keter.root, "env", "set", app, "DATABASE_URL=postgresql://x/prod")
    assert refused.returncode == 1  # keter refused it (the CLI cannot know the app's database)
    assert "DATABASE_URL: set by keter for " in refused.stderr, refused.stderr

    client = status_api(keter)
    seen = {
        "status --json": keter_cli(keter.root, "status", "--json").stdout,
        "app API": json.dumps(client.app(app)),
        "env API": json.dumps(client.get(f"/api/apps/{app}/env")),
        "history": json.dumps(client.history_after(app, 0, 0)),
        "history.json": (keter.root / "etc" / "history.json").read_text(),
        "metrics": client.text("/metrics"),
        "dashboard": client.text("/") + client.text(f"/app/{app}"),
        "keter's log": keter.log(),
    }
    assert "SECRET_TOKEN" in seen["env API"]  # names may show
    for where, text in seen.items():
        assert secret not in text, where
        assert password not in text, where


# -- as the app's own user (issue 11's default) ------------------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike the tests' own Python


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_the_release_data_and_backups_belong_to_the_apps_own_user(
    open_base, keter_factory, private_nginx, private_postgres, app
) -> None:
    keter = keter_factory(
        root=open_base / "root",
        postgres={"admin-dsn": private_postgres.admin_dsn},
        **{"port-range": app_port_range(), "run-apps-as-root": False},
    )
    bundle = release_bundle(open_base / "v1.keter", "v1", [], interpreter=SYSTEM_PYTHON)
    assert deploy(keter, app, bundle).returncode == 0
    served(private_nginx, HOST, "v1")
    users = json.loads((keter.root / "etc" / "app-users.json").read_text())
    uid, tools = users[app], users[f"{app}/tools"]
    assert tools != uid
    folder = keter.root / "data" / app
    # The release ran as the app's uid, in its data folder, which is that uid's alone.
    assert (folder / "release-uid").read_text() == f"{uid}\n"
    assert (folder.stat().st_uid, stat.S_IMODE(folder.stat().st_mode)) == (uid, 0o700)
    # pg_dump ran as the app's tools user: not the app's own, whose processes could take
    # it over (ptrace) and run outside the app's cgroup. Its backup is root's, and the
    # app cannot read it.
    assert re.search(rf"{app}: pg_dump started \(pid \d+, uid {tools}\)", keter.log())
    [backup] = (keter.root / "backups" / app).iterdir()
    assert (backup.stat().st_uid, stat.S_IMODE(backup.stat().st_mode)) == (0, 0o600)
    probe = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON, "-c"]
    read = "import sys\ntry: open(sys.argv[1], 'rb')\nexcept OSError as e: print(e.errno)"
    for target in (backup, backup.parent, keter.root / "etc" / "env"):
        done = subprocess.run([*probe, read, str(target)], capture_output=True, text=True)
        assert done.stdout.strip() == "13", (target, done)  # EACCES
