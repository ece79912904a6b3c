"""A private DNS server for tests: Debian's ``pebble-challtestsrv``, answering only what
a test tells it.

It listens on its own 127.0.0.1 UDP/TCP port and answers A queries for the
names a test adds (``add``) and nothing else, so a test can make a name stop
resolving (``remove``) while nginx is running. (pebble's ACME tests use it as
their DNS server too.)
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.net import free_port, listening
from support.processes import stop_child
from support.wait import wait_for

CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"


class PrivateDns:
    """A running pebble-challtestsrv with every challenge server off."""

    def __init__(self, log: Path, default_ipv4: str = "") -> None:
        """``default_ipv4``: the answer for every name not added (none by default)."""
        self.default_ipv4 = default_ipv4
        self.port = free_port()
        self.management = free_port()
        self.log = log
        self._process: subprocess.Popen | None = None

    @property
    def resolver(self) -> str:
        """The address for nginx's ``resolver``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            CHALLTESTSRV,
            "-defaultIPv4", self.default_ipv4,
            "-defaultIPv6", "",
            "-dns01", f"127.0.0.1:{self.port}",
            "-management", f"127.0.0.1:{self.management}",
            "-http01", "",
            "-https01", "",
            "-tlsalpn01", "",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(self._answers, 10, "pebble-challtestsrv to listen")

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_child(process)

    def add(self, host: str, address: str = "127.0.0.1") -> None:
        """Answer A queries for ``host`` with ``address``."""
        self._post("add-a", {"host": f"{host}.", "addresses": [address]})

    def remove(self, host: str) -> None:
        """Stop answering for ``host``."""
        self._post("clear-a", {"host": f"{host}."})

    def _post(self, path: str, data: dict) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.management}/{path}", data=json.dumps(data).encode()
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"pebble-challtestsrv exited: {self.log.read_text()}")
        return listening(self.management)


@pytest.fixture
def private_dns(tmp_path: Path) -> Iterator[PrivateDns]:
    """A started private DNS server, stopped on teardown."""
    dns = PrivateDns(tmp_path / "challtestsrv.log")
    dns.start()
    try:
        yield dns
    finally:
        dns.stop()
