"""The operator's subcommands of ``keter``: status, certs, deploy, bundle, logs, stats,
rollback, restart.

All but ``bundle`` talk to the running daemon through its status socket
(``keter.client``). Exit codes: 0 done; 1 the operation failed (a deploy
failed, an unknown app); 2 bad usage or a bundle refused locally; 3 keter is
not running, does not answer (or answers what this command cannot read) or the
socket may not be used; 4 no verdict within ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import select
import signal
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from keter.archive import SUFFIX, copy_hashed, install_bundle, is_version
from keter.bundle import BundleConfigError, parse_bundle_config
from keter.client import (
    ApiError,
    ClientError,
    KeterClient,
    NotAnswering,
    NotRunning,
    PermissionDenied,
    UnexpectedAnswer,
    answers_read,
    wait_for_verdict,
)
from keter.config import KeterConfig
from keter.history import REASON_LIMIT, capped_text
from keter.incoming.gzipcheck import GZIP_MAGIC
from keter.incoming.unpack import UnpackError, bundle_limit, safe_unpack
from keter.log import MESSAGE_LIMIT
from keter.logtail import LogFollower, tail_lines
from keter.names import log_text, validate_app_name
from keter.yamlcheck import MAX_SECONDS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
DEFAULT_ROOT = "/opt/keter"
LOG_LINES_ON_FAILURE = 15
WATCH_MARGIN = 15.0  # seconds past a watch window deploy --watch waits for its end


class Refused(Exception):
    """Bad input from the operator: say why and exit with EXIT_USAGE."""


def main(argv: list[str]) -> int:
    """Run one subcommand; returns the exit code."""
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse ``argv`` and run its subcommand, mapping failures to exit codes
    (``keter.appcommands`` runs env, db and data through this too)."""
    args = parser.parse_args(argv)
    answers = answers_read()
    try:
        return args.run(args)
    except Refused as exc:
        _say(exc)
        return EXIT_USAGE
    except (NotRunning, PermissionDenied, NotAnswering, UnexpectedAnswer) as exc:
        _say(exc)
        return EXIT_UNAVAILABLE
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        # Commands read keter's answers as this version writes them; a keter of another
        # version ({} or null where a list was) would end them in a traceback.
        if answers_read() == answers:
            raise  # no answer read: a fault of the command's own
        _say(UnexpectedAnswer())
        return EXIT_UNAVAILABLE
    except ClientError as exc:
        _say(exc)
        return EXIT_FAILED
    except BrokenPipeError:  # `keter logs app | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK


def seconds(text: str) -> float:
    """A ``--timeout``: a finite number of seconds above 0, at most a year (inf, nan or
    -1 ended commands in a traceback where the socket's timeout is set)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_SECONDS):  # also false for nan
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds above 0 and at most {MAX_SECONDS}, got {text!r}"
        )
    return value


def _say(failure: Exception) -> None:
    """Why a command failed, as one line a terminal shows as it is: the text may carry a
    name from a bundle folder or the operator's own arguments (escape sequences, a forged
    "keter: wrote ..." line after a newline)."""
    print(f"keter: {log_text(failure, limit=MESSAGE_LIMIT)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keter", description="Operate a running keter.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    root_help = "keter's root folder (default: $KETER_ROOT, else /opt/keter)"

    def command(name: str, run, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description)
        sub.add_argument("--root", type=Path, default=default_root(), help=root_help)
        sub.set_defaults(run=run)
        return sub

    status = command(
        "status", cmd_status, "show every app", "Show every app keter runs and its state."
    )
    status.add_argument("--json", action="store_true", help="print the API's JSON for scripts")

    certs = command(
        "certs",
        cmd_certs,
        "show each host's certificate",
        "Show each host's certificate from the ACME CA (ssl: acme): its issuer, when it "
        "expires, the last attempt to get or renew it and how it went, and the next one.",
    )
    certs.add_argument("--json", action="store_true", help="print the API's JSON for scripts")

    deploy = command(
        "deploy",
        cmd_deploy,
        "deploy a bundle and wait for the verdict",
        "Check a bundle locally, copy it into ROOT/incoming/ and wait until keter serves it "
        "(exit 0) or gives up on it (exit 1, with the reason and the app's last log lines).",
    )
    deploy.add_argument("bundle", help="NAME.keter, or - to read the bundle from stdin")
    deploy.add_argument("--name", help="the app's name (required with -; default: from BUNDLE)")
    deploy.add_argument("--timeout", type=seconds, default=120, help="seconds to wait (120)")
    deploy.add_argument(
        "--watch",
        action="store_true",
        help="once it serves, also wait through its watch window (watch-seconds): exit 1 "
        "with the reason if keter rolls it back",
    )

    bundle = command(
        "bundle",
        cmd_bundle,
        "build a bundle from a folder",
        "Build NAME.keter from a folder holding config/keter.yaml and the app, "
        "after checking the config.",
    )
    bundle.add_argument("dir", type=Path, help="the folder to pack")
    bundle.add_argument("-o", "--output", type=Path, help="NAME.keter (default: FOLDER.keter)")

    logs = command("logs", cmd_logs, "show an app's log", "Show the app's stdout and stderr.")
    logs.add_argument("app")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=20, help="lines of backlog (20)")
    logs.add_argument(
        "--access", action="store_true", help="the app's access log (one line per request)"
    )

    stats = command(
        "stats",
        cmd_stats,
        "show an app's traffic",
        "Show the app's requests, status classes, bytes and upstream latency over the last "
        "minute, 5, 15 and 60 minutes, for the app and for each version.",
    )
    stats.add_argument("app")
    stats.add_argument("--json", action="store_true", help="print the API's JSON for scripts")

    rollback = command(
        "rollback",
        cmd_rollback,
        "redeploy an archived version",
        "Redeploy the version served before the current one (or VERSION) from ROOT/archive/, "
        "with the usual zero-downtime switch, and wait for the verdict.",
    )
    rollback.add_argument("app")
    rollback.add_argument("version", nargs="?", help="a version (sha256 prefix) to go back to")
    rollback.add_argument(
        "--with-data",
        action="store_true",
        help="first restore the database backup taken before the version being undone",
    )
    rollback.add_argument("--timeout", type=seconds, default=120, help="seconds to wait (120)")

    restart = command(
        "restart",
        cmd_restart,
        "redeploy the current bundle",
        "Redeploy the app's current bundle with the usual zero-downtime switch.",
    )
    restart.add_argument("app")
    restart.add_argument("--timeout", type=seconds, default=120, help="seconds to wait (120)")
    return parser


def default_root() -> Path:
    return Path(os.environ.get("KETER_ROOT") or DEFAULT_ROOT)


# -- status ------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    status = KeterClient(args.root).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(render_table(status["apps"], status["now"]))
    print(switch_line(status["keter"].get("switch") or {}))
    return EXIT_OK


def switch_line(switch: dict) -> str:
    """How keter switches versions (keter.switch), as `keter status` says it."""
    match switch.get("mode"):
        case "kernel":
            return "switch: kernel (nftables re-points stable addresses; no nginx reload)"
        case "reload":
            return f"switch: reload (nginx is reloaded on every switch: {switch.get('reason')})"
        case _:
            return "switch: not known yet"


HOSTS_SHOWN = 2  # in a row of ``keter status``; `keter status APP` and --json show all


def _hosts_cell(hosts: list[str]) -> str:
    """The first hosts and a count of the rest: the column is as wide as its widest cell,
    and an app with hundreds of hosts would push every app's other columns off screen."""
    if not hosts:
        return "-"
    more = len(hosts) - HOSTS_SHOWN
    return ",".join(hosts[:HOSTS_SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def render_table(apps: list[dict], now: float) -> str:
    """The apps as an aligned text table."""
    if not apps:
        return "no apps"
    header = (
        "APP",
        "STATE",
        "VERSION",
        "HOSTS",
        "PORT",
        "PID",
        "UPTIME",
        "RESTARTS",
        "REQ/S",
        "5XX",
        "LAST DEPLOY",
    )
    rows = [header]
    for app in apps:
        last = app.get("last_deploy")
        deployed = f"{last['outcome']} {human_duration(now - last['at'])} ago" if last else "-"
        traffic = app.get("traffic")  # None when traffic-stats is off
        rows.append(
            (
                app["name"],
                app["state"] + (f" (deploying {app['deploying']})" if app["deploying"] else ""),
                app["version"] or "-",
                _hosts_cell(app["hosts"]),
                str(app["port"] or "-"),
                str(app["pid"] or "-"),
                human_duration(app["uptime"]) if app["uptime"] is not None else "-",
                str(app["restarts"]),
                f"{traffic['rate']:.1f}" if traffic else "-",
                f"{traffic['error_ratio']:.1%}" if traffic else "-",
                deployed,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def human_duration(seconds: float) -> str:
    """3s, 4m05s, 2h13m, 3d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# -- certs -------------------------------------------------------------------------------

ISSUER_SHOWN = 200  # characters of an issuer shown (the API caps it too)
DETAIL_SHOWN = 600


def cmd_certs(args: argparse.Namespace) -> int:
    answer = KeterClient(args.root).certificates()
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    print(render_certificates(answer["certificates"], answer["now"]))
    return EXIT_OK


def render_certificates(certificates: list[dict], now: float) -> str:
    """One line per host: issuer, expiry, last attempt and its outcome, next attempt, why."""
    if not certificates:
        return "no certificates (no host of a running app has ssl: acme, or none was tried yet)"
    header = ("HOST", "ISSUER", "EXPIRES", "LAST ATTEMPT", "OUTCOME", "NEXT", "DETAIL")
    rows = [header]
    for cert in certificates:
        last = cert["last_attempt"]
        rows.append(
            (
                log_text(cert["host"]),
                log_text(cert["issuer"], ISSUER_SHOWN) if cert["issuer"] else "-",
                expiry_text(cert["not_after"], now),
                f"{human_duration(now - last)} ago" if last is not None else "-",
                log_text(cert["outcome"]),
                next_text(cert["next_attempt"], now),
                log_text(cert["detail"], DETAIL_SHOWN),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def utc_date(epoch: float) -> str:
    """2026-03-01 12:00 UTC."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def expiry_text(not_after: float | None, now: float) -> str:
    """The expiry date and how far off it is: "... (in 89 days)", "... (expired 2h05m ago)"."""
    if not_after is None:
        return "-"
    left = not_after - now
    if left <= 0:
        return f"{utc_date(not_after)} (expired {human_duration(-left)} ago)"
    if left < 86400:
        return f"{utc_date(not_after)} (in {human_duration(left)})"
    days = int(left // 86400)
    return f"{utc_date(not_after)} (in {days} day{'s' if days != 1 else ''})"


def next_text(next_attempt: float | None, now: float) -> str:
    if next_attempt is None:
        return "-"
    if next_attempt <= now:
        return "due now"
    return f"in {human_duration(next_attempt - now)}"


# -- deploy ------------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    from_stdin = args.bundle == "-"
    if from_stdin and not args.name:
        raise Refused("--name is required when the bundle comes from stdin")
    name = args.name or Path(args.bundle).name.removesuffix(SUFFIX)
    if not from_stdin and not args.name and not args.bundle.endswith(SUFFIX):
        raise Refused(f"{args.bundle}: a bundle's name must end in {SUFFIX} (or give --name)")
    name = checked_name(name)
    client = KeterClient(args.root)
    limits = _bundle_limits(client)
    # A hang-up (an ssh connection lost mid-upload) or SIGTERM must not leave the copy in
    # $TMPDIR: both end the command through the `with` that removes it.
    with _exit_on_hangup(), tempfile.TemporaryDirectory(prefix="keter-deploy-") as tmp:
        # The bundle is copied once and checked; that copy is what goes to incoming/.
        spool = Path(tmp) / "bundle.keter"
        try:
            with contextlib.ExitStack() as stack:
                source = sys.stdin.buffer
                if not from_stdin:
                    source = stack.enter_context(open(args.bundle, "rb"))
                bundle = _Bundle(source, args.bundle, limits.max_bundle_bytes)
                copy_hashed(bundle, spool.parent, spool.name, mode=0o600)
        except OSError as exc:
            raise Refused(f"cannot read {args.bundle}: {exc.strerror or exc}") from None
        problem = check_bundle(spool, name, Path(tmp) / "unpacked", limits)
        if problem:
            problem = capped_text(problem, REASON_LIMIT)  # a bundle may make it big or odd
            raise Refused(f"{name}: bundle refused, nothing was deployed: {problem}")

        after = client.status()["history_seq"]
        incoming = args.root / "incoming"
        since = time.time()
        try:
            with open(spool, "rb") as source:
                sha256 = install_bundle(source, incoming, name)
        except PermissionError:
            raise PermissionDenied(f"permission denied writing to {incoming}") from None
        except OSError as exc:
            raise ClientError(f"cannot copy the bundle into {incoming}: {exc}") from None
    print(f"{name}: {sha256[:12]} copied to {incoming}, waiting for keter", file=sys.stderr)
    entry = wait_for_verdict(client, name, after, sha256, args.timeout, since=since)
    code = report_verdict(client, args.root, name, entry, args.timeout)
    if code == EXIT_OK and args.watch and entry is not None:
        return watch_verdict(client, name, entry)
    return code


def watch_verdict(client: KeterClient, app: str, served: dict) -> int:
    """Wait through a serving version's watch window; EXIT_FAILED if it was rolled back."""
    version, seconds = served["version"], served.get("watch") or 0
    if not seconds:
        print(f"{app} {version}: not watched (first version, or watch-seconds is 0)")
        return EXIT_OK
    print(f"{app} {version}: watching real traffic for {seconds:g}s", file=sys.stderr)
    deadline = time.monotonic() + seconds + WATCH_MARGIN
    after = served["seq"]
    while (left := deadline - time.monotonic()) > 0:
        for entry in client.history_after(app, after, wait=min(left, 2.0)):
            after = max(after, entry["seq"])
            if entry["sha256"] == served["sha256"] and entry["outcome"] == "rolled-back":
                reason = capped_text(entry["reason"], REASON_LIMIT)
                print(f"keter: {app} {version} rolled back: {reason}", file=sys.stderr)
                return EXIT_FAILED
            if entry["outcome"] == "serving" and entry["sha256"] != served["sha256"]:
                print(f"{app} {version}: replaced by {entry['version']} during its watch")
                return EXIT_OK
        watch = client.app(app).get("watch")
        if watch and watch["version"] == version and watch["verdict"] == "passed":
            print(f"{app} {version} passed its watch ({watch['requests']} requests)")
            return EXIT_OK
        if stays := _not_rolled_back(client, app, version):
            print(f"keter: {app}: {capped_text(stays, REASON_LIMIT)}", file=sys.stderr)
            return EXIT_FAILED
    print(f"keter: {app} {version}: no end of its watch seen in time", file=sys.stderr)
    return EXIT_TIMEOUT


def _not_rolled_back(client: KeterClient, app: str, version: str) -> str | None:
    """Why ``version`` made things worse and stays (its predecessor could not be put
    back), as keter's events say; None if they do not say so."""
    for event in client.status()["events"]:
        text = event["text"]
        if event["app"] == app and event["kind"] == "no-rollback" and version in text:
            return text
    return None


@dataclass(frozen=True)
class BundleLimits:
    """What keter unpacks at most (``max-unpacked-bytes``, ``max-members``)."""

    max_unpacked_bytes: int = KeterConfig.max_unpacked_bytes
    max_members: int = KeterConfig.max_members

    @property
    def max_bundle_bytes(self) -> int:
        """The most such a bundle can take as a file (keter refuses a larger one unread)."""
        return bundle_limit(self.max_unpacked_bytes, self.max_members)


DEFAULT_LIMITS = BundleLimits()  # keter's defaults: when no keter answers


def _bundle_limits(client: KeterClient) -> BundleLimits:
    """The running keter's limits (its keter-config.yaml may raise or lower them), else
    the defaults: a bundle is still checked when keter is not running."""
    try:
        shown = client.status()["keter"]["bundle_limits"]
        return BundleLimits(int(shown["max_unpacked_bytes"]), int(shown["max_members"]))
    except (ClientError, KeyError, TypeError, ValueError):
        return DEFAULT_LIMITS


class _Bundle:
    """What ``keter deploy`` reads: refused at its first bytes if it is no gzip, and past
    ``limit`` bytes (``keter deploy /dev/zero`` filled $TMPDIR before any check)."""

    def __init__(self, source: BinaryIO, shown: str, limit: int) -> None:
        self.source, self.shown, self.limit, self.read_bytes = source, shown, limit, 0
        try:
            self.fd: int | None = source.fileno()  # nothing has read it yet: no buffer
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            self.fd = None
        if self.fd is not None:
            # Said at once, not after copying as much into $TMPDIR (a hole of terabytes
            # is a file of that size that costs no disk).
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                raise Refused(f"{shown}: larger than any bundle keter unpacks")

    def read(self, size: int) -> bytes:
        if self.fd is None:
            data = self.source.read(size)
        else:
            # Python runs a signal's handler between reads: a hang-up that comes just
            # before a blocking read would wait for more of the upload, which may never
            # come. Waiting in select, a second at a time, lets the handler run.
            while not select.select([self.fd], [], [], 1.0)[0]:
                pass
            data = os.read(self.fd, size)
        if not self.read_bytes and data and not GZIP_MAGIC.startswith(data[:2]):
            raise Refused(f"{self.shown}: not a gzip file, so no bundle")
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise Refused(f"{self.shown}: larger than any bundle keter unpacks")
        return data


@contextlib.contextmanager
def _exit_on_hangup() -> Iterator[None]:
    """SIGHUP and SIGTERM end the command as an exception would (so ``with`` blocks clean
    up) instead of killing it at once."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    before = {sig: signal.signal(sig, leave) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def check_bundle(
    bundle: Path, app: str, scratch: Path, limits: BundleLimits = DEFAULT_LIMITS
) -> str | None:
    """Why keter would refuse this bundle, or None: unpacked and parsed as keter would."""
    try:
        safe_unpack(
            bundle, scratch, max_bytes=limits.max_unpacked_bytes, max_members=limits.max_members
        )
        config = parse_bundle_config(scratch, app)
    except UnpackError as exc:
        return str(exc)
    except BundleConfigError as exc:
        return "; ".join(exc.problems)
    if not (config.runs_something or config.serves_http):  # the supervisor's own rule
        return "config/keter.yaml defines nothing to run or serve"
    return None


def checked_name(name: str) -> str:
    try:
        return validate_app_name(name)
    except ValueError as exc:
        raise Refused(f"{name!r} cannot be an app's name: {exc}") from None


def report_verdict(
    client: KeterClient, root: Path, app: str, entry: dict | None, timeout: float
) -> int:
    """Print what became of a deploy; returns the exit code."""
    if entry is None:
        print(
            f"keter: {app}: no verdict within {timeout:g}s; keter is still at it "
            "(see `keter status`)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    version = entry["version"]
    if entry["outcome"] == "serving":
        view = client.app(app)
        where = ", ".join(view.get("urls") or view.get("hosts") or ["(no host)"])
        print(f"{app} {version} serving at {where}")
        return EXIT_OK
    reason = capped_text(entry["reason"], REASON_LIMIT)  # the API's is safe; an old keter's?
    print(f"keter: {app} {version} {entry['outcome']}: {reason}", file=sys.stderr)
    lines = client.log(app, LOG_LINES_ON_FAILURE)
    if lines:
        print(f"last lines of {root / 'log' / f'app-{app}.log'}:", file=sys.stderr)
        for line in lines:
            # The API shows them escaped already; capped_text escapes only what is not.
            print(f"  | {capped_text(line, LOG_LINE_LIMIT)}", file=sys.stderr)
    return EXIT_FAILED


# -- rollback and restart ----------------------------------------------------------------


def cmd_rollback(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    if args.version is not None and not is_version(args.version):
        raise Refused(f"{args.version!r} is not a version (4 to 64 hex digits of its sha256)")
    client = KeterClient(args.root)

    def request() -> dict:
        if args.with_data:
            print(f"{app}: restoring the database, then rolling back", file=sys.stderr)
        started = client.rollback(app, args.version, with_data=args.with_data, timeout=args.timeout)
        if "restored" in started:
            print(f"{app}: database restored from {started['restored']['name']}", file=sys.stderr)
        if "replaced" in started:
            replaced = log_text(str(started["replaced"]))
            print(f"{app}: the bundle on its way ({replaced}) was replaced", file=sys.stderr)
        return started

    return _redeploy(client, args, app, "rolling back to", request)


def cmd_restart(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    client = KeterClient(args.root)
    return _redeploy(client, args, app, "restarting", lambda: client.restart(app))


def _redeploy(
    client: KeterClient, args: argparse.Namespace, app: str, doing: str, request: Callable[[], dict]
) -> int:
    """Ask keter to redeploy, then wait for the verdict like ``deploy`` does."""
    since = time.time()
    try:
        started = request()
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{app}: {doing} {started['version']}", file=sys.stderr)
    after, sha256 = started["after"], started["sha256"]
    entry = wait_for_verdict(client, app, after, sha256, args.timeout, since=since)
    return report_verdict(client, args.root, app, entry, args.timeout)


# -- logs --------------------------------------------------------------------------------

LOG_LINE_LIMIT = 64 * 1024  # characters of a line shown (keter splits lines at 64 KiB)


def shown(line: str) -> str:
    """A line an app wrote, safe for the operator's terminal: control characters and escape
    sequences are shown escaped (``\\x1b[2J``), never run by the terminal."""
    return log_text(line, LOG_LINE_LIMIT)


def cmd_logs(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    try:
        KeterClient(args.root).app(app)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    path = args.root / "log" / (f"access-{app}.log" if args.access else f"app-{app}.log")
    try:
        if not args.follow:
            for line in tail_lines(path, args.lines):
                print(shown(line))
            return EXIT_OK
        with LogFollower(path, backlog=args.lines) as follower:
            try:
                for line in follower.lines():
                    print(shown(line), flush=True)
            except KeyboardInterrupt:
                pass
    except FileNotFoundError:
        print(f"keter: {app} has written no log yet ({path})", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError:
        print(f"keter: permission denied reading {path}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


# -- stats -------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    app = checked_name(args.app)
    client = KeterClient(args.root)
    try:
        stats = client.stats(app)
    except ApiError as exc:
        print(f"keter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    print(render_stats(stats))
    return EXIT_OK


def render_stats(stats: dict) -> str:
    """The app's windows as a table, then each version's."""
    header = ("", "WINDOW", "REQUESTS", "REQ/S", "2XX", "3XX", "4XX", "5XX", "5XX%")
    header += ("P50", "P95", "P99", "BYTES")
    rows = [header]
    groups = [("all", stats["windows"])]
    groups += [(v["version"], v["windows"]) for v in stats["versions"]]
    for name, windows in groups:
        for window in windows:
            classes = window["classes"]
            latency = window["latency"]
            rows.append(
                (
                    name,
                    window_name(window["seconds"]),
                    str(window["requests"]),
                    f"{window['rate']:.2f}",
                    *(str(classes[c]) for c in ("2xx", "3xx", "4xx", "5xx")),
                    f"{window['error_ratio']:.1%}",
                    *(milliseconds(latency[p]) for p in ("p50", "p95", "p99")),
                    human_bytes(window["bytes"]),
                )
            )
            name = ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = "\n".join(
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )
    return f"{stats['app']}: requests through nginx (latency: the app's answer time)\n{table}"


def window_name(seconds: int) -> str:
    """1m, 5m, 15m, 1h."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count}"  # pragma: no cover


# -- bundle ------------------------------------------------------------------------------


def cmd_bundle(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    if not folder.is_dir():
        raise Refused(f"{folder} is not a folder")
    output = args.output or Path(folder.resolve().name + SUFFIX)
    if not output.name.endswith(SUFFIX):
        raise Refused(f"{output}: the bundle's name must end in {SUFFIX} (it names the app)")
    app = checked_name(output.name.removesuffix(SUFFIX))
    try:
        config = parse_bundle_config(folder, app)
    except BundleConfigError as exc:
        raise Refused(f"{folder}: {capped_text('; '.join(exc.problems), REASON_LIMIT)}") from None
    if not (config.runs_something or config.serves_http):
        raise Refused(f"{folder}: config/keter.yaml defines nothing to run or serve")
    members = bundle_members(folder, skip=output)
    try:
        write_bundle(output, members)
    except OSError as exc:  # a folder missing or read-only, -o naming a folder, a file unread
        about = f" ({exc.filename})" if exc.filename in {str(p) for p, _ in members} else ""
        raise Refused(f"cannot write {output}: {exc.strerror or exc}{about}") from None
    hosts = ", ".join(config.all_hosts) or "no host"
    print(f"wrote {output} ({len(members)} entries) for {hosts}")
    return EXIT_OK


def bundle_members(folder: Path, *, skip: Path) -> list[tuple[Path, str]]:
    """(path, name in the archive) of every file and folder, sorted; links are refused."""
    skip_resolved = skip.resolve()
    members = []
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in [*dirs, *sorted(files)]:
            path = Path(current) / name
            arcname = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise Refused(f"{arcname} is a symlink; bundles hold only files and folders")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise Refused(f"{arcname} is not a regular file or folder")
            if path.resolve() == skip_resolved or path.name.startswith(f".{skip.name}."):
                continue  # the bundle being written, when it is inside the folder
            members.append((path, arcname))
    return sorted(members, key=lambda member: member[1])


def write_bundle(output: Path, members: list[tuple[Path, str]]) -> None:
    """Write the gzip tarball atomically (a half-written bundle never has the final name)."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        # Ownership means nothing on the server (keter ignores it); names would leak.
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = min(info.mtime, int(time.time()))
        return info

    parent = output.parent if str(output.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for path, arcname in members:
                tar.add(path, arcname=arcname, recursive=False, filter=clean)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
