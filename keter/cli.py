"""``keter ROOT`` (or ``keter CONFIGFILE``): run the daemon in the foreground.

``keter COMMAND ...`` (status, certs, deploy, bundle, logs, rollback, restart; env,
db, data) operates a running daemon instead; see ``keter.commands`` and
``keter.appcommands``.
"""

from __future__ import annotations

import argparse
import fcntl
import grp
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from keter import __version__, names, rootcheck
from keter.config import CONFIG_NAME, ConfigError, KeterConfig, load_config
from keter.fsutil import remove_partial_writes
from keter.log import setup_logging
from keter.nginx.files import LOCK
from keter.nginx.render import support_dir

log = logging.getLogger("keter")

# Subcommands; a ROOT folder with one of these names is given as ./NAME.
COMMANDS = ("status", "certs", "deploy", "bundle", "logs", "stats", "rollback", "restart")
APP_COMMANDS = ("env", "db", "data")  # an app's settings, database and data folder


INCOMING_QUIET = 600.0  # seconds a `keter deploy` copy in incoming/ is never untouched for


class StartRefused(Exception):
    """keter cannot start on this ROOT; ``str()`` says why in one line (exit 1)."""


class AlreadyRunning(StartRefused):
    pass


def prepare_root(config: KeterConfig) -> None:
    """Create ROOT's folders. etc/ holds database credentials: owner only."""
    # Apps (each its own user, keter.users) may cross temp/ to their own folder but list
    # nothing there, and see nothing of incoming/, etc/ and log/. Bundles arrive in
    # incoming/ from the status-group (setgid: scp'd files keep that group).
    group = grp.getgrnam(config.status_group).gr_gid if config.status_group else None
    for folder, mode in [
        (config.root, 0o755),
        (config.incoming_dir, 0o2770 if group is not None else 0o700),
        (config.etc_dir, 0o700),
        (config.temp_dir, 0o711),
        (config.log_dir, 0o700),
        # keter.sock's group crosses it; nobody else lists it or opens keter.lock (an app
        # holding a lock of its own on that file would keep the next keter from starting).
        (config.run_dir, 0o711),
        (config.backups_dir, 0o700),  # database dumps: root only, never an app
        (config.data_dir, 0o711),  # apps reach their own folder by name, list none
    ]:
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        if folder != config.root:
            os.chmod(folder, mode)  # also when an earlier version left it open
    if group is not None:
        os.chown(config.incoming_dir, 0, group)


def take_lock(config: KeterConfig) -> int:
    """Hold ROOT/run/keter.lock for the life of the process: one keter per ROOT."""
    return _hold(
        config.run_dir / "keter.lock",
        str(os.getpid()),
        lambda holder: f"another keter (pid {holder}) is already running on {config.root}",
    )


def take_nginx_lock(config: KeterConfig) -> int:
    """Hold a lock beside nginx's config file for the life of the process: two keters
    on different ROOTs writing one config file replaced each other's sites in silence.

    The lock file lives in the config's hidden support folder, where nginx's
    ``include .../*`` never reads."""
    config_file = config.nginx.config_file
    folder = support_dir(config_file)
    folder.mkdir(mode=0o750, exist_ok=True)  # nginx's own folder must be there
    return _hold(
        folder / LOCK,
        f"pid {os.getpid()} on {config.root}",
        lambda holder: (
            f"another keter ({holder}) writes nginx's {config_file}; give each keter a "
            "config-file of its own (nginx: config-file: in keter-config.yaml)"
        ),
    )


def _hold(path: Path, holder: str, refusal: Callable[[str], str]) -> int:
    """Lock ``path`` for the life of the process and write ``holder`` into it; raises
    AlreadyRunning with ``refusal(what the holder wrote)``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # root's alone, also when an earlier version made it 0644
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        written = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(refusal(names.log_text(written))) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}\n".encode(), 0)
    return fd


def take_root(config: KeterConfig) -> tuple[int, int]:
    """Prepare ROOT and take keter's two locks (ROOT's, nginx's config file's): their
    descriptors, held for the life of the process. Raises StartRefused."""
    try:
        prepare_root(config)
        lock_fd = take_lock(config)
    except OSError as exc:
        raise StartRefused(f"cannot prepare {config.root}: {exc}") from None
    try:
        nginx_lock_fd = take_nginx_lock(config)
    except OSError as exc:
        os.close(lock_fd)
        raise StartRefused(f"cannot use nginx's {config.nginx.config_file}: {exc}") from None
    except StartRefused:
        os.close(lock_fd)
        raise
    try:
        remove_leftovers(config)
    except OSError as exc:
        os.close(nginx_lock_fd)
        os.close(lock_fd)
        raise StartRefused(f"cannot prepare {config.root}: {exc}") from None
    return lock_fd, nginx_lock_fd


def refused(problems: list[str]) -> int:
    """Say why keter does not start, one line each; the exit code (2: bad setup)."""
    for problem in problems:
        print(f"keter: {problem}", file=sys.stderr)
    return 2


def remove_leftovers(config: KeterConfig) -> None:
    """The half-written files of a killed keter (a bundle's copy to the archive can be
    a gigabyte): nothing else removes them. Not data/ (the apps') nor temp/ (the
    unpacker empties it)."""
    # Where keter writes them: etc/, etc/env/, etc/acme/hosts/HOST/; archive/APP/;
    # incoming/; run/ and run/processes/, never the apps' own folders in run/tmp/. In
    # incoming/ `keter deploy` writes too, and its copy may be under way: only those
    # quiet for INCOMING_QUIET are left over.
    folders = (
        (config.etc_dir, 3, frozenset(), 0.0),
        (config.archive_dir, 1, frozenset(), 0.0),
        (config.incoming_dir, 0, frozenset(), INCOMING_QUIET),
        (config.run_dir, 1, frozenset({"tmp"}), 0.0),
    )
    removed = 0
    for folder, depth, skip, quiet in folders:
        try:
            removed += remove_partial_writes(folder, depth, skip, quiet)
        except OSError as exc:  # a leftover must not stop keter's start
            log.warning("keter: half-written files under %s not looked for: %s", folder, exc)
    if removed:
        log.info("keter: removed %d half-written files a stopped keter left", removed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        from keter.commands import main as run_command

        return run_command(argv)
    if argv and argv[0] in APP_COMMANDS:
        from keter.appcommands import main as run_app_command

        return run_app_command(argv)
    parser = argparse.ArgumentParser(
        prog="keter",
        description="Deploy web-app bundles dropped into ROOT/incoming/ behind nginx.",
        epilog=f"To operate a running keter: keter {{{','.join(COMMANDS + APP_COMMANDS)}}} --help",
    )
    parser.add_argument(
        "target",
        metavar="ROOT|CONFIGFILE",
        help="keter's root folder (e.g. /opt/keter) or its keter-config.yaml",
    )
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"keter {__version__}")
    args = parser.parse_args(argv)

    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    if problems := rootcheck.user_problems():
        return refused(problems)
    # Resolved once: what is checked is what is read (a link on the way, re-pointed in
    # between, had keter read another user's config and run its commands as root).
    target = os.path.realpath(args.target)
    named = os.path.join(target, "etc", CONFIG_NAME) if os.path.isdir(target) else target
    # Checked before it is read: it names commands keter runs as root.
    if os.path.exists(named) and (problems := rootcheck.file_problems(Path(named))):
        return refused(problems)
    try:
        config = load_config(target)
    except ConfigError as exc:
        print(f"keter: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    config_file = config.config_file or config.root / "etc" / CONFIG_NAME
    if problems := rootcheck.problems(
        config.root, config_file, nginx_config=config.nginx.config_file
    ):
        return refused(problems)
    try:
        lock_fd, nginx_lock_fd = take_root(config)
    except StartRefused as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return 1

    from keter import daemon  # imports every component; after the cheap checks

    try:
        code = daemon.run(config)
    finally:
        os.close(nginx_lock_fd)
        os.close(lock_fd)
    main = threading.main_thread()
    if running := [
        t for t in threading.enumerate() if t is not main and t.is_alive() and not t.daemon
    ]:
        # A component stuck past the shutdown deadline (logged): its thread must not
        # keep keter alive. Said once more here, so that a thread nobody stopped shows.
        log.warning(
            "keter: exiting while threads still run: %s", ", ".join(t.name for t in running)
        )
        logging.shutdown()
        os._exit(code)
    return code
