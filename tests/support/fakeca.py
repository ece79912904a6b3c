"""A small hostile ACME CA for tests (plain HTTP, in the test's process).

It follows RFC 8555 far enough for the ``acme`` library to order from it, checks
no signature, validates every challenge at once, and misbehaves on demand:

- ``cert_mode``: what it issues: ``good``, ``wrong_key`` (a leaf for another key),
  ``wrong_host`` (a leaf naming another host), ``junk_chain`` (a good leaf, then a
  CERTIFICATE block that is no certificate), ``not_pem``, ``expired`` (ended 10 days
  ago), ``zero_life`` (a few seconds left);
- ``drip_path``: requests to paths starting with it are answered one byte every
  ``drip_every`` seconds, forever;
- ``huge_path``: requests to paths starting with it get ``huge_bytes`` of JSON
  whitespace (with a Content-Length if ``huge_declared``, else up to the
  connection's end); ``huge_sent`` counts what the client took;
- ``delay``: every answer waits this many seconds first;
- ``serial``: the serial of every certificate it issues (else a random one);
- ``failing_hosts``: hosts whose certificates are ``wrong_host`` whatever the mode.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

JUNK_BLOCK = b"-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n"


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class FakeCa:
    def __init__(self) -> None:
        self.cert_mode = "good"
        self.drip_path: str | None = None
        self.drip_every = 1.0
        self.huge_path: str | None = None
        self.huge_bytes = 0
        self.huge_declared = True
        self.huge_sent = 0
        self.delay = 0.0
        self.serial: int | None = None  # every leaf's serial, if set (RFC 5280 forbids it)
        self.failing_hosts: set[str] = set()  # these get "wrong_host" whatever cert_mode says
        self.orders: list[str] = []  # the host of each new order, in order
        self.token = "tok" + "A" * 40
        self._state: dict[str, object] = {"host": None, "csr": None, "answered": False}
        self._closed = threading.Event()
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("Fake Hostile CA"))
            .issuer_name(_name("Fake Hostile CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        ca = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                ca._handle(self)

            def do_GET(self) -> None:
                ca._handle(self)

            def do_POST(self) -> None:
                ca._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def directory(self) -> str:
        return f"{self.base}/dir"

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()  # ends every dribble
            self.server.shutdown()
            self.server.server_close()

    # -- the protocol ---------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        payload = None
        if h.command == "POST":
            raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
            try:
                jws = json.loads(raw)
                payload = json.loads(_b64decode(jws["payload"])) if jws.get("payload") else None
            except (ValueError, KeyError):
                payload = None
        path = h.path
        if self.delay and self._closed.wait(self.delay):
            return
        if self.huge_path and path.startswith(self.huge_path):
            return self._huge(h)
        if self.drip_path and path.startswith(self.drip_path):
            return self._drip(h)
        if path == "/dir":
            return self._json(h, 200, self._directory())
        if path == "/nonce":
            return self._send(h, 200, b"", "text/plain")
        if path == "/acct":
            return self._json(h, 201, {"status": "valid"}, location=f"{self.base}/acct/1")
        if path == "/order":
            host = payload["identifiers"][0]["value"]
            self.orders.append(host)
            self._state = {"host": host, "csr": None, "answered": False}
            return self._json(h, 201, self._order("pending"), location=f"{self.base}/order/1")
        if path == "/authz/1":
            return self._json(h, 200, self._authz())
        if path == "/chall/1":
            self._state["answered"] = True
            challenge = {"type": "http-01", "url": f"{self.base}/chall/1",
                         "token": self.token, "status": "valid"}  # fmt: skip
            return self._json(h, 200, challenge)
        if path == "/finalize/1":
            self._state["csr"] = _b64decode(payload["csr"])
            return self._json(h, 200, self._order("valid"))
        if path == "/order/1":
            return self._json(h, 200, self._order("valid" if self._state["csr"] else "ready"))
        if path == "/cert/1":
            return self._send(h, 200, self._chain(), "application/pem-certificate-chain")
        problem = {"type": "urn:ietf:params:acme:error:malformed", "detail": "no such"}
        return self._json(h, 404, problem)

    def _send(self, h, status: int, body: bytes, content_type: str, location: str = "") -> None:
        h.send_response(status)
        if h.path == "/chall/1":
            h.send_header("Link", f'<{self.base}/authz/1>;rel="up"')
        h.send_header("Content-Type", content_type)
        h.send_header("Replay-Nonce", base64.urlsafe_b64encode(b"%d" % time.time_ns()).decode())
        if location:
            h.send_header("Location", location)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _json(self, h, status: int, body: object, location: str = "") -> None:
        self._send(h, status, json.dumps(body).encode(), "application/json", location)

    def _huge(self, h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if self.huge_declared:
            h.send_header("Content-Length", str(self.huge_bytes + 2))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        chunk = b" " * (1 << 16)
        try:
            h.wfile.write(b"{")
            while self.huge_sent < self.huge_bytes and not self._closed.is_set():
                part = chunk[: self.huge_bytes - self.huge_sent]
                h.wfile.write(part)
                self.huge_sent += len(part)
            h.wfile.write(b"}")
        except OSError:
            pass  # the client hung up

    def _drip(self, h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "1000000")
        h.end_headers()
        # Never whole: once the CA closes, the connection ends too (else the server
        # waited on it for a next request while the client waited for the rest).
        h.close_connection = True
        try:
            h.wfile.write(b"{")
            h.wfile.flush()
            while not self._closed.wait(self.drip_every):
                h.wfile.write(b" ")
                h.wfile.flush()
        except OSError:
            pass  # the client hung up

    def _directory(self) -> dict[str, str]:
        return {"newNonce": f"{self.base}/nonce", "newAccount": f"{self.base}/acct",
                "newOrder": f"{self.base}/order"}  # fmt: skip

    def _order(self, status: str) -> dict[str, object]:
        order = {
            "status": status,
            "identifiers": [{"type": "dns", "value": self._state["host"]}],
            "authorizations": [f"{self.base}/authz/1"],
            "finalize": f"{self.base}/finalize/1",
        }
        if status == "valid":
            order["certificate"] = f"{self.base}/cert/1"
        return order

    def _authz(self) -> dict[str, object]:
        status = "valid" if self._state["answered"] else "pending"
        challenge = {"type": "http-01", "url": f"{self.base}/chall/1", "token": self.token,
                     "status": status}  # fmt: skip
        return {"status": status, "identifier": {"type": "dns", "value": self._state["host"]},
                "challenges": [challenge]}  # fmt: skip

    def _chain(self) -> bytes:
        csr = x509.load_der_x509_csr(self._state["csr"])
        host, key = self._state["host"], csr.public_key()
        now = datetime.datetime.now(datetime.UTC)
        begins, ends = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=90)
        mode = "wrong_host" if host in self.failing_hosts else self.cert_mode
        if mode == "wrong_key":
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif mode == "wrong_host":
            host = "someone-else.test"
        elif mode == "expired":
            begins, ends = now - datetime.timedelta(days=100), now - datetime.timedelta(days=10)
        elif mode == "zero_life":
            begins, ends = now - datetime.timedelta(seconds=5), now + datetime.timedelta(seconds=3)
        elif mode == "not_pem":
            return b"<html>hello</html>"
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self.ca_cert.subject)
            .public_key(key)
            .serial_number(self.serial or x509.random_serial_number())
            .not_valid_before(begins)
            .not_valid_after(ends)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        if mode == "junk_chain":
            return leaf + JUNK_BLOCK
        return leaf + self.ca_cert.public_bytes(serialization.Encoding.PEM)
