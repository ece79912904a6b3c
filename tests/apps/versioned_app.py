"""A tiny web app for the process monitor's tests.

It answers its version (``--version`` or $VERSION) on 127.0.0.1:$PORT, and
flags make it misbehave in the ways real apps do. Standard library only.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default=os.environ.get("VERSION", "unversioned"))
    parser.add_argument("--exit-at-start", type=int, metavar="STATUS", help="exit at once")
    parser.add_argument("--never-listen", action="store_true", help="run without listening")
    parser.add_argument("--hang", action="store_true", help="listen but never answer")
    parser.add_argument("--fail-path", help="answer 500 on this path")
    parser.add_argument("--require-host", help="answer 500 unless this is the Host header")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    parser.add_argument("--grandchildren", type=int, default=0, help="fork N port holders")
    parser.add_argument("--grandchildren-ignore-term", action="store_true")
    parser.add_argument("--exit-after", type=float, metavar="SECONDS", help="exit 3 later")
    parser.add_argument("--exit-after-requests", type=int, metavar="N", help="exit 3 after N")
    parser.add_argument("--spam-mb", type=int, default=0, help="print this much first")
    parser.add_argument("--first-run-only", metavar="FILE", help="later runs never listen")
    parser.add_argument("--fail-every", type=int, metavar="N", help="every Nth / answers 500")
    parser.add_argument("--keep-alive", action="store_true", help="HTTP/1.1 persistent connections")
    parser.add_argument("--allocate-at-start", type=int, metavar="MB", help="use this much first")
    parser.add_argument("--spin", action="store_true", help="a child burns CPU meanwhile")
    return parser.parse_args()


def say(text: str) -> None:
    # One write per line: print() writes the newline separately, and lines of
    # processes sharing the pipe would interleave.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def fork_grandchildren(count: int, ignore_term: bool) -> None:
    """Children that inherit the listening socket and stdout, and just wait."""
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            if ignore_term:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                signal.pause()
        say(f"forked grandchild {pid}")


def spam(megabytes: int) -> None:
    line = b"x" * 999 + b"\n"
    block = line * 64
    out = sys.stdout.buffer
    for _ in range(megabytes * 1_000_000 // len(block)):
        out.write(block)
    out.flush()
    say("DONE")


HELD: list[bytearray] = []  # memory the app was asked to use (--allocate-at-start, /allocate)


def allocate(megabytes: int) -> None:
    """Use this many MiB for real: every page written (a zeroed allocation costs nothing)."""
    for _ in range(megabytes):
        HELD.append(bytearray(b"x") * (1 << 20))


def spin() -> None:
    """A child process that burns CPU until the app's group is stopped."""
    if os.fork() == 0:
        while True:
            pass


def main() -> None:
    args = parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    say(f"starting version {args.version} as pid {os.getpid()}")
    if args.allocate_at_start:
        allocate(args.allocate_at_start)
        say(f"allocated {args.allocate_at_start} MiB")
    if args.spin:
        spin()
    if args.spam_mb:
        spam(args.spam_mb)
    if args.first_run_only:
        if os.path.exists(args.first_run_only):
            args.never_listen = True
            say("not the first run: never listening")
        else:
            open(args.first_run_only, "w").close()
    if args.never_listen:
        fork_grandchildren(args.grandchildren, args.grandchildren_ignore_term)
        while True:
            signal.pause()

    port = int(os.environ["PORT"]) if "PORT" in os.environ else None
    if port is None:
        while True:
            signal.pause()
    listener = socket.create_server(("127.0.0.1", port))
    fork_grandchildren(args.grandchildren, args.grandchildren_ignore_term)
    if args.exit_at_start is not None:
        say(f"fatal: exiting with status {args.exit_at_start}")
        sys.exit(args.exit_at_start)
    if args.hang:
        say(f"listening on port {port} but never answering")
        held = []
        while True:
            held.append(listener.accept()[0])
            say("holding a connection")
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: os._exit(3)).start()

    requests = 0
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if args.keep_alive else "HTTP/1.0"

        def do_GET(self) -> None:
            nonlocal requests
            wrong_host = args.require_host and self.headers["Host"] != args.require_host
            if self.path == args.fail_path or wrong_host:
                self.answer(500, "failing on purpose\n")
            elif self.path == "/":
                with lock:
                    served = requests + 1
                if args.fail_every and served % args.fail_every == 0:
                    self.answer(500, "failing every few requests\n")
                else:
                    self.answer(200, f"{args.version}\n")
            elif self.path.startswith("/answer/"):
                # /answer/404?sleep=0.05: this status, after this long (traffic tests).
                code, _, query = self.path.removeprefix("/answer/").partition("?")
                delay = float(urllib.parse.parse_qs(query).get("sleep", ["0"])[0])
                if delay > 0:
                    time.sleep(delay)
                self.answer(int(code), "as asked\n")
            elif self.path.startswith("/slow?"):  # answers after this many seconds
                time.sleep(float(self.path.partition("?")[2]))
                self.answer(200, f"{args.version} slow\n")
            elif self.path.startswith("/allocate?"):  # use this many MiB more
                allocate(int(self.path.partition("?")[2]))
                self.answer(200, f"holding {len(HELD)} MiB\n")
            elif self.path == "/env":
                self.answer(200, json.dumps(dict(os.environ)))
            elif self.path.startswith("/can-read?"):
                # Whether this app may read a file (e.g. keter's credentials): it must not.
                path = urllib.parse.unquote(self.path.partition("?")[2])
                try:
                    with open(path, "rb"):
                        self.answer(200, "yes\n")
                except OSError as exc:
                    self.answer(200, f"no: {exc.strerror}\n")
            elif self.path == "/whoami":
                ids = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
                self.answer(200, json.dumps(ids))
            else:
                self.answer(404, "not found\n")
            with lock:
                requests += 1
                if args.exit_after_requests is not None and requests >= args.exit_after_requests:
                    say(f"exiting after {requests} requests")
                    os._exit(3)

        def answer(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def log_message(self, format: str, *args: object) -> None:
            pass  # health probes would flood the app log

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    say(f"listening on port {port} version {args.version}")
    server.serve_forever()


if __name__ == "__main__":
    main()
