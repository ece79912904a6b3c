"""A private ACME CA for tests: Debian's ``pebble`` (Let's Encrypt's test server).

pebble serves its directory over HTTPS with a certificate the fixture makes,
asks a private ``pebble-challtestsrv`` (every name: 127.0.0.1) where hosts
are, and validates HTTP-01 challenges on the port the test names (a private
nginx's plain listener). It signs with a root it makes up at start
(``root_ca``).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

from keter.messages import CertificatesWanted
from support.dns import PrivateDns
from support.net import free_port, listening
from support.processes import stop_child
from support.tls import make_certificate
from support.wait import wait_for

PEBBLE = "/usr/bin/pebble"


class PrivatePebble:
    def __init__(self, base: Path, http_port: int, *, authz_reuse: int = 0) -> None:
        self.base = Path(base)
        self.http_port = http_port
        # Percent of orders given an authorization the account made valid lately, as
        # Let's Encrypt does for 30 days; 0: every order validates again.
        self.authz_reuse = authz_reuse
        self.port = free_port()
        self.management = free_port()
        self.dns = PrivateDns(self.base / "challtestsrv.log", default_ipv4="127.0.0.1")
        self.tls_certificate: Path | None = None  # what a client trusts for the directory
        self._process: subprocess.Popen | None = None

    @property
    def directory(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.dns.start()
        certificate, key = make_certificate(self.base / "tls", "pebble", "localhost")
        self.tls_certificate = certificate
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management}",
                "certificate": str(certificate),
                "privateKey": str(key),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.base / "pebble.json").write_text(json.dumps(config))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # validate at once, not after a random pause
            "PEBBLE_WFE_NONCEREJECT": "0",  # no random "bad nonce" errors
            "PEBBLE_AUTHZREUSE": str(self.authz_reuse),
        }
        with (self.base / "pebble.log").open("ab") as log:
            self._process = subprocess.Popen(
                [PEBBLE, "-config", str(self.base / "pebble.json"),
                 "-dnsserver", f"127.0.0.1:{self.dns.port}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        wait_for(self._answers, 15, "pebble to serve its directory")

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_child(process)
        self.dns.stop()

    def keter_settings(self, certs: Path) -> tuple[dict, int]:
        """keter-config.yaml settings with this pebble as the CA: a plain listener on
        ``http_port`` (where pebble validates), a TLS listener on a free port with a
        default certificate made in ``certs``, and the acme section; and that TLS port."""
        certificate, key = make_certificate(certs, "default", "default.test")
        tls_port = free_port()
        settings = {
            "listeners": [
                {"host": "127.0.0.1", "port": self.http_port},
                {"host": "127.0.0.1", "port": tls_port,
                 "certificate": str(certificate), "key": str(key)},
            ],
            "acme": {"directory": self.directory, "ca-bundle": str(self.tls_certificate)},
        }  # fmt: skip
        return settings, tls_port

    def root_ca(self) -> bytes:
        """The root pebble signs with (PEM), from its management interface."""
        context = ssl.create_default_context(cafile=str(self.tls_certificate))
        url = f"https://localhost:{self.management}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.read()

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"pebble exited: {(self.base / 'pebble.log').read_text()}")
        return listening(self.port)


def wanted(*hosts: str, app: str = "app") -> CertificatesWanted:
    """What the supervisor tells keter.acme when ``app`` is the one app with ssl: acme."""
    return CertificatesWanted(hosts=hosts, owners=dict.fromkeys(hosts, app))
