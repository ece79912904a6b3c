"""A release command for the release tests (issue 13): runs SQL, then exits or hangs.

    release [--sleep SECONDS] [--sql STATEMENT]... [--exit STATUS] [--hang]

Each statement runs in its own transaction, through libpq's defaults (the PG*
variables keter gives the app). It appends a line to $KETER_DATA_DIR/releases
and prints what it does (its output goes to the app's log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sql", action="append", default=[])
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0, help="wait this long first")
    args = parser.parse_args()
    version = os.environ.get("VERSION", "unversioned")
    print(f"release of {version} starting, PORT={os.environ.get('PORT')}", flush=True)
    time.sleep(args.sleep)
    if args.sql:
        import psycopg

        with psycopg.connect("", autocommit=True) as conn:
            for statement in args.sql:
                conn.execute(statement)
                print(f"ran: {statement}", flush=True)
    data = os.environ.get("KETER_DATA_DIR")
    if data:
        with open(os.path.join(data, "releases"), "a") as f:
            f.write(f"{version}\n")
        with open(os.path.join(data, "release-uid"), "w") as f:
            f.write(f"{os.getuid()}\n")
    if args.hang:
        print("hanging", flush=True)
        time.sleep(3600)
    if args.exit:
        print(f"ERROR: release of {version} failed on purpose", flush=True)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
