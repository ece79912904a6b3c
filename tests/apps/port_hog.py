"""An app that reaches for ports that are not its own, then serves $VERSION on $PORT.

- ``TRY_PORTS``: a comma-separated list; each is bound once on 127.0.0.1 and on ::1,
  and one line says how each went: ``bind 4 PORT ok`` or ``bind 6 PORT EPERM``.
- ``HOG_LOW``, ``HOG_HIGH``: a squatter. It binds (SO_REUSEADDR, as servers do) every
  port of the range but its own it can, says ``holding N ports``, then keeps taking any
  of the others the moment it is free (``sniped PORT``), answering ``stolen`` there.
- ``ONLY_TRY``: exit after the ``TRY_PORTS`` attempts, serving nothing.

Standard library only.
"""

from __future__ import annotations

import errno
import http.server
import os
import socket
import sys
import threading
import time

PORT = int(os.environ.get("PORT", "0"))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")  # one write per line: lines of threads never interleave
    sys.stdout.flush()


def try_bind(family: socket.AddressFamily, address: str, port: int) -> socket.socket | None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        version = 4 if family == socket.AF_INET else 6
        say(f"bind {version} {port} {errno.errorcode.get(exc.errno, exc.errno)}")
        return None
    return sock


def try_ports(ports: list[int]) -> None:
    for port in ports:
        for family, address, version in (
            (socket.AF_INET, "127.0.0.1", 4),
            (socket.AF_INET6, "::1", 6),
        ):
            sock = try_bind(family, address, port)
            if sock is not None:
                say(f"bind {version} {port} ok")
                sock.close()


def serve_stolen(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nstolen\n")
        conn.close()


def quiet_bind(port: int) -> socket.socket | None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


def hog(low: int, high: int) -> None:
    rest = [p for p in range(low, high + 1) if p != PORT]
    held = []
    for port in list(rest):
        if (sock := quiet_bind(port)) is not None:
            held.append(sock)
            rest.remove(port)
            threading.Thread(target=serve_stolen, args=(sock,), daemon=True).start()
    say(f"holding {len(held)} ports")
    while True:  # a squatter's loop: any port that frees is taken at once
        for port in list(rest):
            if (sock := quiet_bind(port)) is not None:
                held.append(sock)
                rest.remove(port)
                say(f"sniped {port}")
                threading.Thread(target=serve_stolen, args=(sock,), daemon=True).start()
        time.sleep(0.002)  # a squatter, not a CPU hog: still within a restart's backoff


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        data = (os.environ.get("VERSION", "ok") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


if os.environ.get("TRY_PORTS"):
    try_ports([int(p) for p in os.environ["TRY_PORTS"].split(",")])
if os.environ.get("ONLY_TRY"):
    sys.exit(0)
if os.environ.get("HOG_LOW"):
    low, high = int(os.environ["HOG_LOW"]), int(os.environ["HOG_HIGH"])
    threading.Thread(target=hog, args=(low, high), daemon=True).start()
server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
say(f"serving on {PORT}")
server.serve_forever()
