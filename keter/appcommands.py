"""The operator's commands for what an app keeps: ``keter env``, ``keter db``, ``keter data``.

* ``keter env APP [--show]``: the app's settings' names (values with
  ``--show``, read from ``ROOT/etc/env/APP.json`` itself: the status API never
  hands values out, so ``--show`` needs root).
* ``keter env set APP NAME=VALUE... [--no-restart]`` and ``keter env unset
  APP NAME... [--no-restart]``: store, then restart the app and wait for the
  verdict like ``deploy`` (``--no-restart``: the next deploy takes them).
* ``keter db backups APP``, ``keter db backup APP``, ``keter db restore APP
  [BACKUP]`` (the newest when none is named; the app is restarted on the
  restored data and the verdict awaited).
* ``keter data purge APP``: delete ``ROOT/data/APP`` after the operator types
  the app's name again.

All of them go through the status socket (``keter.client``); exit codes as in
``keter.commands``.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path

from keter import envstore
from keter.client import ApiError, KeterClient, PermissionDenied, wait_for_verdict
from keter.commands import (
    EXIT_FAILED,
    EXIT_OK,
    Refused,
    checked_name,
    default_root,
    human_duration,
    report_verdict,
    run,
    seconds,
)
from keter.history import REASON_LIMIT, capped_text
from keter.names import log_text

DB_TIMEOUT = 1800.0  # seconds `keter db` waits for a dump or a restore by default


def main(argv: list[str]) -> int:
    return run(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keter", description="An app's settings and data.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    root_help = "keter's root folder (default: $KETER_ROOT, else /opt/keter)"

    def command(group, name: str, run, help: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help)
        # Given before or after the subcommand (`keter db --root R backup APP` too).
        sub.add_argument("--root", type=Path, default=argparse.SUPPRESS, help=root_help)
        sub.set_defaults(run=run)
        return sub

    def group(name: str, help: str):
        parser = commands.add_parser(name, help=help, description=help)
        parser.add_argument("--root", type=Path, default=default_root(), help=root_help)
        return parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    env = command(
        commands,
        "env",
        cmd_env,
        "an app's settings: keter env APP [--show] | set APP NAME=VALUE... | unset APP NAME...",
    )
    env.usage = (
        "keter env [--show] APP\n"
        "       keter env set APP NAME=VALUE... [--stdin] [--no-restart] [--timeout S]\n"
        "       keter env unset APP NAME... [--no-restart] [--timeout S]"
    )
    env.add_argument("words", nargs="+", metavar="WORD", help="[set|unset] APP NAME[=VALUE]...")
    env.add_argument("--show", action="store_true", help="show the values too (root only)")
    env.add_argument(
        "--stdin",
        action="store_true",
        help="set: read NAME=VALUE lines from stdin too (a command line is visible in ps)",
    )
    env.add_argument(
        "--no-restart", action="store_true", help="only store; the next deploy applies them"
    )
    env.add_argument("--timeout", type=seconds, default=120, help="seconds to wait (120)")
    env.set_defaults(root=default_root())

    db_commands = group("db", "an app's database backups")
    listing = command(db_commands, "backups", cmd_db_backups, "list the app's backups")
    listing.add_argument("app")
    backup = command(db_commands, "backup", cmd_db_backup, "back up the app's database now")
    backup.add_argument("app")
    backup.add_argument("--timeout", type=seconds, default=DB_TIMEOUT, help="seconds to wait")
    restore = command(
        db_commands,
        "restore",
        cmd_db_restore,
        "replace the app's data with a backup (the newest by default), then restart it",
    )
    restore.add_argument("app")
    restore.add_argument("backup", nargs="?", help="a backup's name (see keter db backups)")
    restore.add_argument("--timeout", type=seconds, default=DB_TIMEOUT, help="seconds to wait")

    data_commands = group("data", "an app's data folder, ROOT/data/APP")
    purge = command(
        data_commands, "purge", cmd_data_purge, "delete ROOT/data/APP (asks for APP again)"
    )
    purge.add_argument("app")
    return parser


# -- keter env ---------------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    words = list(args.words)
    action = words.pop(0) if words[0] in ("set", "unset", "list") and len(words) > 1 else "list"
    app, rest = checked_name(words[0]), words[1:]
    client = KeterClient(args.root)
    if action == "list":
        if rest:
            raise Refused("keter env APP takes no more words (did you mean env set?)")
        return _env_list(client, args.root, app, show=args.show)
    piped = []
    if action == "set" and args.stdin:
        # A file edited on Windows: each value had kept its line's carriage return.
        piped = [line.removesuffix("\n").removesuffix("\r") for line in sys.stdin if line.strip()]
    if not rest and not piped:
        raise Refused(f"keter env {action} {app}: name at least one setting")
    try:
        if action == "set":
            changes, removals = envstore.parse_assignments(rest), []
            changes.update(envstore.parse_assignments(piped, where="stdin"))
        else:
            changes, removals = {}, [envstore.check_name(name) for name in rest]
    except envstore.SettingsError as exc:
        raise Refused(str(exc)) from None
    since = time.time()
    try:
        result = client.env_change(app, changes, removals, restart=not args.no_restart)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    done = [f"set {', '.join(result['set'])}" if result["set"] else ""]
    done.append(f"unset {', '.join(result['unset'])}" if result["unset"] else "")
    print(f"{app}: {'; '.join(d for d in done if d) or 'nothing changed'}", file=sys.stderr)
    started = result["restart"]
    if result.get("restart_error"):
        error = capped_text(result["restart_error"], REASON_LIMIT)
        print(f"keter: {app}: stored, but not restarted: {error}", file=sys.stderr)
        return EXIT_FAILED
    if started is None:
        why = "--no-restart" if args.no_restart else f"{app} is not running"
        print(f"{app}: stored ({why}); the next deploy applies them", file=sys.stderr)
        return EXIT_OK
    print(f"{app}: restarting {started['version']} with the new settings", file=sys.stderr)
    after, sha256 = started["after"], started["sha256"]
    entry = wait_for_verdict(client, app, after, sha256, args.timeout, since=since)
    return report_verdict(client, args.root, app, entry, args.timeout)


def _env_list(client: KeterClient, root: Path, app: str, *, show: bool) -> int:
    if not show:
        for name in client.env_names(app):
            print(name)
        return EXIT_OK
    try:
        settings = envstore.load(root / "etc", app)
    except envstore.SettingsError as exc:
        if exc.errno == errno.EACCES:
            raise PermissionDenied(f"{exc}; --show reads the file itself: run as root") from None
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for name, value in sorted(settings.items()):
        print(f"{name}={log_text(value, envstore.MAX_VALUE)}")
    return EXIT_OK


# -- keter db ------------------------------------------------------------------------------------


def cmd_db_backups(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    try:
        backups = KeterClient(args.root).backups(app)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not backups:
        print(f"{app} has no backup")
        return EXIT_OK
    now = time.time()
    rows = [("BACKUP", "KIND", "VERSION", "SIZE", "AGE")]
    for backup in backups:
        age = f"{human_duration(now - backup['at'])} ago"
        size = str(backup["size"])
        rows.append((backup["name"], backup["kind"], backup["version"], size, age))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_db_backup(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    print(f"{app}: backing up its database", file=sys.stderr)
    try:
        result = KeterClient(args.root).take_backup(app, timeout=args.timeout)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    backup = result["backup"]
    print(f"{app}: backup {backup['name']} ({backup['size']} bytes)", file=sys.stderr)
    print(backup["name"])
    return EXIT_OK


def cmd_db_restore(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    client = KeterClient(args.root)
    which = args.backup or "the newest backup"
    print(f"{app}: restoring {which} (the current data is backed up first)", file=sys.stderr)
    since = time.time()
    try:
        result = client.restore(app, args.backup, timeout=args.timeout)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{app}: database restored from {result['restored']['name']}", file=sys.stderr)
    print(f"{app}: the data before it is in {result['safety_backup']['name']}", file=sys.stderr)
    if result.get("newer"):
        print(f"{app}: {result['version']}, uploaded meanwhile, deploys on it", file=sys.stderr)
    else:
        print(f"{app}: restarting {result['version']} on the restored data", file=sys.stderr)
    after, sha256 = result["after"], result["sha256"]
    deadline = time.monotonic() + args.timeout
    entry = wait_for_verdict(client, app, after, sha256, args.timeout, since=since)
    if entry is not None and entry["outcome"] == "superseded":
        # The data is restored all the same: a version that superseded the restart
        # deploys on it, and its end is the restore's verdict (a removal ends it here).
        left = max(0.0, deadline - time.monotonic())
        newer = wait_for_verdict(
            client, app, entry["seq"], None, left, since=since, superseded=entry
        )
        if newer is not entry:
            print(f"{app}: a newer version came meanwhile and deployed on it", file=sys.stderr)
            entry = newer
    return report_verdict(client, args.root, app, entry, args.timeout)


# -- keter data ------------------------------------------------------------------------------------


def cmd_data_purge(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    folder = args.root / "data" / app
    print(f"This deletes {folder} and everything in it, for good.", file=sys.stderr)
    print("Type the app's name to confirm: ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip()
    if answer != app:
        print("keter: the names differ; nothing was deleted", file=sys.stderr)
        return EXIT_FAILED
    try:
        result = KeterClient(args.root).purge(app)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result["purged"]:
        print(f"{app}: {result['folder']} deleted", file=sys.stderr)
    else:
        print(f"{app}: {result['folder']} did not exist", file=sys.stderr)
    return EXIT_OK
