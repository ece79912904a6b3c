"""The pure parts of issue 13: ``release:`` in both formats, the backup settings, the
settings store (``keter env``), the data folder and backup file names."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.bundles import make_bundle

from keter import appdata, envstore
from keter.appdata import prepare_data_dir, purge_data_dir
from keter.backups import backup_before, backup_name, list_backups, parse_name, prune
from keter.bundle import BundleConfigError, Release, parse_bundle_config
from keter.bundle.model import RELEASE_TIMEOUT
from keter.config import ConfigError, parse_config
from keter.environment import app_environment
from keter.messages import BackupKind, DbInfo
from keter.postgres import DB_ENV_NAMES, db_env


def bundle(tmp_path: Path, config: str) -> Path:
    return make_bundle(
        tmp_path / "bundle",
        config=config,
        folders=["config"],
        executables=["bin/app", "bin/migrate"],
        files={"bin/not-executable": "#!/bin/sh\n"},
        app_source=None,
        unpacked=True,
    )


def release_of(tmp_path: Path, config: str) -> Release | None:
    folder = bundle(tmp_path, config)
    webapp = parse_bundle_config(folder, "app").webapp
    assert webapp is not None
    return webapp.release


def problems(tmp_path: Path, config: str) -> list[str]:
    with pytest.raises(BundleConfigError) as caught:
        parse_bundle_config(bundle(tmp_path, config), "app")
    return caught.value.problems


# -- release: in a bundle --------------------------------------------------------------


def test_release_as_a_path_in_the_flat_format(tmp_path: Path) -> None:
    release = release_of(tmp_path, "exec: ../bin/app\nhost: a.test\nrelease: ../bin/migrate\n")
    folder = (tmp_path / "bundle").resolve()
    assert release == Release(exec=folder / "bin/migrate", args=(), timeout=RELEASE_TIMEOUT)
    assert RELEASE_TIMEOUT == 300


def test_release_as_a_list_in_a_stanza_with_its_timeout(tmp_path: Path) -> None:
    config = (
        "stanzas:\n"
        "  - type: webapp\n    exec: ../bin/app\n    host: a.test\n"
        "    release: [../bin/migrate, up, --verbose, 3]\n    release-timeout: 12.5\n"
    )
    release = release_of(tmp_path, config)
    assert release.args == ("up", "--verbose", "3") and release.timeout == 12.5
    assert release.exec == (tmp_path / "bundle" / "bin/migrate").resolve()


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("release: ../bin/nope", 'release: "../bin/nope" does not exist in the bundle'),
        ("release: ../bin/not-executable", "not executable"),
        ("release: ../../../bin/sh", "escapes the bundle folder"),
        ("release: []", "release: expected [program, arguments...], got an empty list"),
        ("release: [../bin/nope, up]", "release[0]: "),
        ("release: [../bin/migrate, [x]]", "release[0]: expected a string"),
        ("release: 3", "release: "),
        ("release: ../bin/migrate\nrelease-timeout: 0", "release-timeout: expected a number"),
        ("release: ../bin/migrate\nrelease-timeout: true", "release-timeout: expected"),
        ("release: ../bin/migrate\nrelease-timeout: 99999999999", "release-timeout: expected"),
    ],
)
def test_a_bad_release_names_its_key(tmp_path: Path, lines: str, expected: str) -> None:
    [problem] = problems(tmp_path, f"exec: ../bin/app\nhost: a.test\n{lines}\n")
    assert expected in problem


def test_a_release_timeout_alone_is_a_warning(tmp_path: Path) -> None:
    folder = bundle(tmp_path, "exec: ../bin/app\nhost: a.test\nrelease-timeout: 5\n")
    config = parse_bundle_config(folder, "app")
    assert config.webapp.release is None
    assert any("release-timeout" in w for w in config.warnings)


def test_a_release_needs_a_web_app(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, "release: ../bin/migrate\n")
    assert "exec: missing, but release given" in problem


# -- the global settings ----------------------------------------------------------------


def test_backup_settings_have_defaults_and_are_checked(tmp_path: Path) -> None:
    config = parse_config({}, root=tmp_path, base=tmp_path)
    assert (config.backup_keep, config.backup_required, config.backup_timeout) == (5, True, 600)
    assert config.backups_dir == tmp_path / "backups" and config.data_dir == tmp_path / "data"
    given = {"backup-keep": 2, "backup-required": False, "backup-timeout": 30}
    config = parse_config(given, root=tmp_path, base=tmp_path)
    assert (config.backup_keep, config.backup_required, config.backup_timeout) == (2, False, 30)
    with pytest.raises(ConfigError) as caught:
        bad = {"backup-keep": 0, "backup-required": "no", "backup-timeout": -1}
        parse_config(bad, root=tmp_path, base=tmp_path)
    assert len(caught.value.problems) == 3


# -- keter env: the settings store -------------------------------------------------------


def test_settings_are_stored_atomically_and_privately(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    assert envstore.load(etc, "app") == {}
    changed, removed = envstore.update(etc, "app", {"API_KEY": "k1", "MODE": "fast"})
    assert (changed, removed) == (["API_KEY", "MODE"], [])
    changed, removed = envstore.update(etc, "app", {"MODE": "slow"}, ["API_KEY", "UNSET"])
    assert (changed, removed) == (["MODE"], ["API_KEY"])
    assert envstore.load(etc, "app") == {"MODE": "slow"}
    path = envstore.settings_path(etc, "app")
    assert path == etc / "env" / "app.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["app.json"]  # no temporary left


def test_db_env_names_every_variable_it_sets() -> None:
    db = DbInfo(name="n", user="u", password="p", host="/run/postgresql", port=5432)
    assert tuple(db_env(db)) == DB_ENV_NAMES


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"PORT": "s3cr3t-1"}, "set by keter"),
        ({"KETER_DATA_DIR": "s3cr3t-2"}, "set by keter"),
        ({"1BAD": "s3cr3t-3"}, "variable name"),
        ({"OPTIND": "s3cr3t-6"}, "the shell's own"),  # dash would not start the app
        ({"A": "s3cr3t-4\0"}, "NUL"),
        ({"A": "s3cr3t-5" * envstore.MAX_VALUE}, "longer than"),
        # Bytes, as the kernel counts them: 32 Ki 4-byte characters made a variable past
        # its 128 KiB, and the app could never start.
        ({"A": "s3cr3t-7" + "\U0001f600" * (envstore.MAX_VALUE // 4)}, "longer than 32768 bytes"),
    ],
)
def test_bad_settings_are_refused_without_showing_values(
    tmp_path: Path, changes: dict, words: str
) -> None:
    with pytest.raises(envstore.SettingsError) as caught:
        envstore.update(tmp_path, "app", changes)
    assert words in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_a_broken_settings_file_is_named_not_shown(tmp_path: Path) -> None:
    path = envstore.settings_path(tmp_path, "app")
    path.parent.mkdir()
    path.write_text('{"TOKEN": "hunter2"')
    with pytest.raises(envstore.SettingsError) as caught:
        envstore.load(tmp_path, "app")
    assert "not JSON" in str(caught.value) and "hunter2" not in str(caught.value)
    path.write_text(json.dumps({"TOKEN": 3}))
    with pytest.raises(envstore.SettingsError):
        envstore.load(tmp_path, "app")


def test_settings_that_would_outgrow_the_file_are_refused_and_the_file_stays_readable(
    tmp_path: Path,
) -> None:
    """Each value within its bound, their sum past the file's: the store once wrote what
    it then refused to read (every deploy of the app, and even `keter env unset`)."""
    value = "x" * envstore.MAX_VALUE
    count = envstore.MAX_FILE // envstore.MAX_VALUE + 1
    with pytest.raises(envstore.SettingsError) as caught:
        for i in range(count):
            envstore.update(tmp_path, "app", {f"K{i}": value})
    assert "more than" in str(caught.value) and value not in str(caught.value)
    kept = envstore.load(tmp_path, "app")
    assert 0 < len(kept) < count
    envstore.update(tmp_path, "app", {}, ["K0"])  # the way out still works
    assert "K0" not in envstore.load(tmp_path, "app")


def test_command_line_assignments() -> None:
    assert envstore.parse_assignments(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(envstore.SettingsError) as caught:
        envstore.parse_assignments(["SECRETVALUE"])
    assert "SECRETVALUE" not in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=50), max_size=5))
def test_any_settings_either_round_trip_or_are_refused(tmp_path_factory, changes) -> None:
    etc = tmp_path_factory.mktemp("etc")
    try:
        envstore.update(etc, "app", changes)
    except envstore.SettingsError:
        assert envstore.load(etc, "app") == {}
        return
    assert envstore.load(etc, "app") == changes


def test_precedence_keter_then_settings_then_bundle_then_global(tmp_path: Path) -> None:
    from keter.bundle import WebApp
    from keter.config import KeterConfig

    config = KeterConfig(root=tmp_path, env={"A": "global", "B": "global", "C": "global"})
    webapp = WebApp(exec=tmp_path / "app", hosts=("a.test",), env={"B": "bundle", "C": "bundle"})
    db = DbInfo(name="d", user="u", password="p", host="127.0.0.1", port=5432)
    env = app_environment(
        config,
        webapp,
        4001,
        db,
        settings={"C": "setting", "PGPASSWORD": "mine", "DATABASE_URL": "x"},
        data_dir=tmp_path / "data" / "a",
    )
    assert (env["A"], env["B"], env["C"]) == ("global", "bundle", "setting")
    assert env["PGPASSWORD"] == "p" and env["DATABASE_URL"].startswith("postgresql://")
    assert env["PORT"] == "4001" and env["KETER_DATA_DIR"] == str(tmp_path / "data" / "a")


# -- the data folder ----------------------------------------------------------------------


def test_the_data_folder_changes_owner_without_following_links(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "app"
    outside = tmp_path / "outside"
    outside.write_text("root's")
    prepare_data_dir(folder, os.getuid(), os.getgid())
    (folder / "sub").mkdir()
    (folder / "sub" / "file").write_text("mine")
    (folder / "link").symlink_to(outside)
    os.link(outside, folder / "hard")
    if os.getuid() != 0:
        pytest.skip("changing owners needs root")
    prepare_data_dir(folder, 65534, 65534)
    assert os.stat(folder).st_uid == 65534
    assert os.stat(folder / "sub" / "file").st_uid == 65534
    assert os.lstat(folder / "link").st_uid == 65534
    assert os.stat(outside).st_uid == 0  # neither through the link nor the hard link


def test_a_purge_deletes_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "app"
    prepare_data_dir(folder, os.getuid(), os.getgid())
    (folder / "kept").write_text("x")
    assert purge_data_dir(folder) is True
    assert not folder.exists() and list(folder.parent.iterdir()) == []
    assert purge_data_dir(folder) is False


def nest(folder: Path, depth: int) -> None:
    """``depth`` folders one in another under ``folder``, a file at the bottom (as an app
    makes them, with each step relative: the whole path is far past PATH_MAX)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)


def test_folders_nested_deeper_than_recursion_goes_are_purged_and_handed_over(
    tmp_path: Path,
) -> None:
    # An app makes 3000 levels in milliseconds; os.fwalk and shutil.rmtree recurse, and
    # raised RecursionError out of the spawn (the monitor's) and the purge.
    folder = tmp_path / "data" / "app"
    prepare_data_dir(folder, os.getuid(), os.getgid())
    nest(folder, 3000)
    if os.getuid() == 0:
        prepare_data_dir(folder, 65534, 65534)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(3000):
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        assert os.stat("bottom", dir_fd=fd).st_uid == 65534
        os.close(fd)
    assert purge_data_dir(folder) is True
    assert list(folder.parent.iterdir()) == []


def test_folders_nested_past_the_bound_fail_the_handover_cleanly_and_are_purged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The purge had the bound too: it failed after renaming the folder away, and the
    # next purge said "was already gone" while the data stayed where no command reaches.
    monkeypatch.setattr(appdata, "MAX_DEPTH", 50)
    folder = tmp_path / "data" / "app"
    prepare_data_dir(folder, os.getuid(), os.getgid())
    nest(folder, 60)
    open_before = len(os.listdir("/proc/self/fd"))
    if os.getuid() == 0:
        with pytest.raises(OSError, match="folders nested deeper than 50"):
            prepare_data_dir(folder, 65534, 65534)
        assert list(folder.parent.iterdir()) == [folder]  # the failed handover kept it all
    assert purge_data_dir(folder) is True  # removal has no bound: nothing may stay
    assert list(folder.parent.iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) == open_before  # every descriptor closed


def test_a_purge_that_failed_midway_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data" / "app"
    prepare_data_dir(folder, os.getuid(), os.getgid())
    for name in ("one", "two", "three"):
        (folder / name).write_text(name)
    nest(folder, 5)
    other = folder.with_name(".purged-app-b-0123abcd")  # what a purge of app "app-b" left
    other.mkdir()
    real, calls = os.unlink, []

    def fail_midway(*args, **kwargs) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real(*args, **kwargs)

    monkeypatch.setattr(os, "unlink", fail_midway)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Input/output"):
        purge_data_dir(folder)
    monkeypatch.setattr(os, "unlink", real)
    assert len(os.listdir("/proc/self/fd")) == open_before
    [left] = [p for p in folder.parent.iterdir() if p != other]
    assert left.name.startswith(".purged-app-")
    assert purge_data_dir(folder) is True  # not "was already gone": it was not
    assert list(folder.parent.iterdir()) == [other]  # another app's is not this app's
    assert purge_data_dir(folder) is False


def test_a_purge_never_climbs_out_of_a_folder_moved_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data" / "app"
    prepare_data_dir(folder, os.getuid(), os.getgid())
    nest(folder, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the app's")
    real, calls = appdata._entries, []

    def move_midway(fd: int):
        calls.append(fd)
        if len(calls) == 3:  # inside d/d: it moves to elsewhere/ while it is emptied
            [doomed] = folder.parent.iterdir()
            os.rename(doomed / "d" / "d", elsewhere / "d")
        return real(fd)

    monkeypatch.setattr(appdata, "_entries", move_midway)
    with pytest.raises(OSError, match="was moved while it was deleted"):
        purge_data_dir(folder)
    assert (elsewhere / "keep").read_text() == "not the app's"


# -- backup file names ---------------------------------------------------------------------


def test_backup_names_carry_kind_version_and_time(tmp_path: Path) -> None:
    name = backup_name(BackupKind.RELEASE, "0123456789ab", 1_700_000_000.25)
    assert name == "20231114T221320.250000Z-release-0123456789ab.dump"
    info = parse_name("app", name, 7)
    assert (info.kind, info.version, info.at, info.size) == (
        BackupKind.RELEASE,
        "0123456789ab",
        1_700_000_000.25,
        7,
    )
    assert backup_name(BackupKind.MANUAL, "not-hex", 0).endswith("-manual-unknown.dump")
    for bad in ("x.dump", f".{name}.part", name + ".tmp", "../" + name):
        assert parse_name("app", bad) is None


def test_listing_and_pruning_keep_the_newest(tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    names = [
        backup_name(kind, version, at)
        for at, kind, version in [
            (100, BackupKind.RELEASE, "aaaaaaaaaaaa"),
            (200, BackupKind.MANUAL, "aaaaaaaaaaaa"),
            (300, BackupKind.RELEASE, "bbbbbbbbbbbb"),
            (400, BackupKind.RESTORE, "bbbbbbbbbbbb"),
        ]
    ]
    for name in [*names, "notes.txt", ".x.dump.part"]:
        (folder / name).write_text("x")
    assert [b.name for b in list_backups(tmp_path, "app")] == names[::-1]
    assert backup_before(tmp_path, "app", "bbbbbbbbbbbb").name == names[2]
    assert backup_before(tmp_path, "app", "aaaaaaaaaaaa").name == names[0]
    assert backup_before(tmp_path, "app", "cccccccccccc") is None
    assert prune(tmp_path, "app", 2) == [names[1], names[0]]
    assert [b.name for b in list_backups(tmp_path, "app")] == names[:1:-1]
    assert list_backups(tmp_path, "other") == []


def test_failed_deploys_never_prune_the_backup_before_the_version_serving(tmp_path: Path) -> None:
    # v2 serves; two new versions failed their release, each after its own backup. With
    # backup-keep 2 they pushed v2's out, and rollback --with-data had nothing to restore.
    folder = tmp_path / "app"
    folder.mkdir()
    before_v2 = backup_name(BackupKind.RELEASE, "bbbbbbbbbbbb", 200)
    failed = [backup_name(BackupKind.RELEASE, f"{n}" * 12, 300 + n) for n in (3, 4)]
    for name in (backup_name(BackupKind.RELEASE, "aaaaaaaaaaaa", 100), before_v2, *failed):
        (folder / name).write_text("x")
    prune(tmp_path, "app", 2, serving="bbbbbbbbbbbb")
    assert backup_before(tmp_path, "app", "bbbbbbbbbbbb").name == before_v2
    assert {b.name for b in list_backups(tmp_path, "app")} == {before_v2, *failed}


def test_restarts_neither_stand_for_nor_prune_the_backup_before_a_version(tmp_path: Path) -> None:
    # v2 replaced v1, then restarted six times (each a backup before its release ran
    # again). rollback --with-data had restored the newest (v2's data, migrated), and
    # five restarts pruned the one before v2's release.
    folder = tmp_path / "app"
    folder.mkdir()
    first = backup_name(BackupKind.RELEASE, "aaaaaaaaaaaa", 100)
    before_v2 = backup_name(BackupKind.RELEASE, "bbbbbbbbbbbb", 200)
    restarts = [backup_name(BackupKind.RERELEASE, "bbbbbbbbbbbb", 300 + n) for n in range(6)]
    for name in (first, before_v2, *restarts):
        (folder / name).write_text("x")
    assert parse_name("app", restarts[0]).kind is BackupKind.RERELEASE
    assert backup_before(tmp_path, "app", "bbbbbbbbbbbb").name == before_v2
    assert sorted(prune(tmp_path, "app", 5)) == sorted([first, restarts[0]])
    assert backup_before(tmp_path, "app", "bbbbbbbbbbbb").name == before_v2
    assert prune(tmp_path, "app", 5) == []


def test_a_bundle_cannot_set_keter_data_dir(tmp_path: Path) -> None:
    folder = bundle(tmp_path, "exec: ../bin/app\nhost: a.test\nenv: {KETER_DATA_DIR: /tmp}\n")
    [warning] = parse_bundle_config(folder, "app").warnings
    assert warning.startswith("env.KETER_DATA_DIR: keter sets KETER_DATA_DIR itself")
    config = parse_config({"env": {"KETER_DATA_DIR": "/tmp"}}, root=tmp_path, base=tmp_path)
    assert any("KETER_DATA_DIR" in w for w in config.warnings)
