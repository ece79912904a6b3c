"""A web app that shows what keter gave it, for the release tests (issue 13).

Standard library, plus psycopg when keter gives it a database (``postgres: true``):

* ``GET /``: its version ($VERSION), one line, as tests/apps/versioned_app.py;
* ``GET /info?env=A,B``: JSON with its version, its pid, the tables of its
  database when it started and now, the notes stored, the values of the
  variables asked for, and the files in $KETER_DATA_DIR with their text;
* ``GET /write?note=X``: stores a note (in table ``notes``, which a release makes);
* ``GET /data-write?name=N&text=T``: writes $KETER_DATA_DIR/N.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import urllib.parse

VERSION = os.environ.get("VERSION", "unversioned")
DATA = os.environ.get("KETER_DATA_DIR")


def tables() -> list[str] | None:
    try:
        import psycopg
    except ImportError:  # the system's Python (tests of per-app users) may lack it
        return None
    if "PGDATABASE" not in os.environ:
        return None

    with psycopg.connect("", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' ORDER BY 1"
        )
        return [row[0] for row in rows]


def notes() -> list[str] | None:
    if "notes" not in (tables() or []):
        return None
    import psycopg

    with psycopg.connect("", autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT note FROM notes ORDER BY 1")]


def data_files() -> dict[str, str] | None:
    if DATA is None:
        return None
    return {name: open(os.path.join(DATA, name)).read() for name in sorted(os.listdir(DATA))}


AT_START = tables()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path == "/":
            self.answer(f"{VERSION}\n")
        elif url.path == "/info":
            names = [n for n in query.get("env", "").split(",") if n]
            info = {
                "version": VERSION,
                "pid": os.getpid(),
                "tables_at_start": AT_START,
                "tables": tables(),
                "notes": notes(),
                "env": {name: os.environ.get(name) for name in names},
                "data": data_files(),
                "data_dir": DATA,
            }
            self.answer(json.dumps(info))
        elif url.path == "/write":
            import psycopg

            with psycopg.connect("", autocommit=True) as conn:
                conn.execute("INSERT INTO notes (note) VALUES (%s)", (query["note"],))
            self.answer("ok\n")
        elif url.path == "/data-write":
            with open(os.path.join(DATA, query["name"]), "w") as f:
                f.write(query["text"])
            self.answer("ok\n")
        else:
            self.send_error(404)

    def answer(self, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stdout.write(f"db_app {VERSION} started, tables {AT_START}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
