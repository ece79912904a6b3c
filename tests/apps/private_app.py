#!/usr/bin/env python3
"""An app that uses /tmp, /var/tmp, /dev/shm and System V IPC like any app, says what it
saw in one ``PRIVATE {json}`` line of output, then answers its VERSION.

Environment: APPNAME; SECRET (written to /tmp/APPNAME-secret.txt, or to HOST_FILE when
given); SHM_MB (MiB written to /dev/shm/APPNAME-shm); PEEK (paths of another app's
files, ":"-separated, read and reported); KIDS (children forked to wait, as a pre-fork
server's workers); PORT, VERSION.
"""

import http.server
import json
import os
import signal
import subprocess

app = os.environ["APPNAME"]
umask = os.umask(0)
os.umask(umask)
seen: dict = {"umask": f"{umask:03o}", "tmpdir": os.environ.get("TMPDIR")}
secret = os.environ.get("SECRET")
if secret:
    path = os.environ.get("HOST_FILE") or f"/tmp/{app}-secret.txt"
    with open(path, "w") as f:
        f.write(secret)
    seen["secret_mode"] = f"{os.stat(path).st_mode & 0o777:o}"
    with open(f"/var/tmp/{app}-var.txt", "w") as f:
        f.write(secret)
    if seen["tmpdir"]:
        with open(os.path.join(seen["tmpdir"], f"{app}-tmpdir.txt"), "w") as f:
            f.write(secret)
mb = int(os.environ.get("SHM_MB", "0"))
if mb:
    with open(f"/dev/shm/{app}-shm", "wb") as f:
        for _ in range(mb):
            f.write(b"s" * (1 << 20))
shm = os.statvfs("/dev/shm")
seen["shm_bytes"] = shm.f_blocks * shm.f_frsize
# One of each kind of System V object (util-linux ipcmk): shared memory, semaphores, queue.
seen["ipc"] = [
    subprocess.run(["ipcmk", option], capture_output=True, text=True).returncode
    for option in ("-M65536", "-S1", "-Q")
]
seen["peeked"] = {}
for path in filter(None, os.environ.get("PEEK", "").split(":")):
    try:
        with open(path) as f:
            seen["peeked"][path] = f.read()
    except OSError as exc:
        seen["peeked"][path] = exc.strerror
for _ in range(int(os.environ.get("KIDS", "0"))):
    if os.fork() == 0:
        while True:
            signal.pause()
print("PRIVATE " + json.dumps(seen), flush=True)


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (os.environ.get("VERSION", "v") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Answer).serve_forever()
