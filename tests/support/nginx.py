"""A private nginx for tests: own prefix, own port, never the machine's nginx.

Each ``PrivateNginx`` lives entirely under a directory it owns (config, pid,
logs, temp paths), listens on a free 127.0.0.1 port and runs as a child
process in its own session, so any number can run side by side and none
touches /etc/nginx or the system service. A ``WriterRig`` puts keter's
``NginxWriter`` on one, with a TLS listener beside its plain port.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from keter.config import Listener
from keter.messages import ApplyNginx, NginxApplied, Site
from keter.nginx import NginxWriter, ProxyOptions, fetch_generation
from support.net import free_port, listening
from support.tls import make_certificate
from support.wait import wait_for

NGINX = "/usr/sbin/nginx"
WORKERS = 1

# Until keter writes its own default server, requests get this instead of a
# silent connection refusal; it also lets start() see that nginx listens.
_MAIN_CONF = """\
# Private nginx started by the keter test-suite.
{user}worker_processes {workers};
daemon off;
pid {base}/nginx.pid;
error_log {error_log} info;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {base}/temp/client_body;
    proxy_temp_path {base}/temp/proxy;
    fastcgi_temp_path {base}/temp/fastcgi;
    uwsgi_temp_path {base}/temp/uwsgi;
    scgi_temp_path {base}/temp/scgi;

    server {{
        listen 127.0.0.1:{port};
        server_name _nginx-fixture;
        default_type text/plain;
        return 503 "keter has not configured nginx yet\\n";
    }}

    include {config_file};
    include {extra_dir}/*.conf;
}}
"""


class PrivateNginx:
    """An nginx master process confined to ``base``."""

    def __init__(
        self, base: Path, port: int | None = None, workers: int = WORKERS, user: str | None = None
    ) -> None:
        """``user``: the workers' (as root; default root). Debian's nginx runs them as
        www-data; then ``base`` must lie where that user may cross (``open_base``)."""
        self.base = Path(base)
        self.user = user
        self.port = port if port is not None else free_port()
        self.workers = workers
        self.config_file = self.base / "keter.conf"
        # Tests drop extra *.conf files here (e.g. a broken one to fail `nginx -t`).
        self.extra_dir = self.base / "conf.d"
        self.main_conf = self.base / "nginx.conf"
        self.error_log = self.base / "logs" / "error.log"
        self.stderr_log = self.base / "logs" / "stderr.log"
        prefix = (NGINX, "-p", str(self.base), "-e", str(self.error_log), "-c", str(self.main_conf))
        self.start_command: tuple[str, ...] = prefix
        self.test_command: tuple[str, ...] = (*prefix, "-t", "-q")
        self.reload_command: tuple[str, ...] = (*prefix, "-s", "reload")
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        """Write the config, start the master and wait until it answers on the port."""
        for folder in ("logs", "temp", "conf.d"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("")
        # A root master's workers would run as nobody and could not use the temp
        # dirs inside the test's private (0700) tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        if self.user is not None:
            user = f"user {self.user};\n"
            shutil.chown(self.base / "temp", self.user)
        self.main_conf.write_text(
            _MAIN_CONF.format(
                user=user,
                workers=self.workers,
                base=self.base,
                error_log=self.error_log,
                port=self.port,
                config_file=self.config_file,
                extra_dir=self.extra_dir,
            )
        )
        with self.stderr_log.open("ab") as stderr:
            self._process = subprocess.Popen(
                self.start_command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        process = self._process
        wait_for(
            lambda: process.poll() is not None or self._answers(),
            timeout=10,
            what=f"private nginx to listen on port {self.port}",
        )
        if process.poll() is not None:
            self._process = None
            raise RuntimeError(
                f"nginx exited with status {process.returncode}:\n"
                f"{self.stderr_log.read_text()}{self.error_log_text()}"
            )

    def stop(self) -> None:
        """Graceful QUIT, then SIGKILL for the whole process group; no process is left."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            workers = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        # The group id is the master's pid (start_new_session); this also gets
        # workers that a killed master would otherwise leave behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        _, alive = psutil.wait_procs(workers, timeout=5)
        if alive:
            raise RuntimeError(f"nginx workers survived: {[p.pid for p in alive]}")

    @property
    def pid(self) -> int | None:
        """The master's pid while it runs."""
        return self._process.pid if self._process is not None else None

    def request(
        self, host: str, path: str = "/", timeout: float = 5, port: int | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """GET ``path`` through nginx with this Host header: (status, headers, body).

        Header names are lower-cased.
        """
        connection = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers={"Host": host, "Connection": "close"})
            response = connection.getresponse()
            body = response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
            return response.status, headers, body
        finally:
            connection.close()

    def wait_generation(self, generation: int, timeout: float = 10) -> None:
        """Wait until nginx serves ``generation`` and no older worker still accepts."""
        wait_for(
            lambda: fetch_generation("127.0.0.1", self.port) == str(generation),
            timeout,
            f"nginx to serve generation {generation}",
        )
        self.wait_settled(timeout)

    def wait_settled(self, timeout: float = 10) -> None:
        """Wait until only the newest workers accept connections.

        A reload starts new workers about 100 ms before the old ones are told to
        stop accepting, so right after a reload a connection may still land on an
        old worker with the old config. Tests that assert new routing wait here.
        """
        wait_for(
            lambda: len(self.accepting_workers()) == self.workers,
            timeout,
            "nginx's old workers to stop accepting",
        )

    def accepting_workers(self) -> set[int]:
        """The pids of nginx's workers that still accept connections."""
        # An old worker renames itself to "... is shutting down" as it closes its
        # listening sockets.
        workers = psutil.Process(self.pid).children()
        return {each.pid for each in workers if "shutting down" not in " ".join(each.cmdline())}

    def reload(self) -> None:
        """Have the master reload its config (tests that write the include file themselves)."""
        subprocess.run(self.reload_command, check=True, capture_output=True, timeout=30)

    def keter_config(self) -> dict:
        """The keter-config.yaml content that points keter at this nginx."""
        return {
            "listeners": [{"host": "127.0.0.1", "port": self.port}],
            "nginx": {
                "config-file": str(self.config_file),
                "test-command": list(self.test_command),
                "reload-command": list(self.reload_command),
                "error-log": str(self.error_log),
            },
        }

    def served_config(self) -> str:
        """keter's include file with every site file it includes written in place."""

        def inline(match: re.Match) -> str:
            return Path(match.group(1)).read_text()

        return re.sub(r'^include "([^"]+)";$', inline, self.config_file.read_text(), flags=re.M)

    def error_log_text(self) -> str:
        """Everything nginx has written to its error log so far."""
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _answers(self) -> bool:
        return listening(self.port, timeout=0.5)


class WriterRig:
    """keter's ``NginxWriter`` on a private nginx: its plain port and a TLS listener.

    For tests of what nginx serves over both, as keter's config would have it.
    The TLS listener's self-signed certificate names ``hosts`` (its files go in
    ``folder``); ``options`` are the writer's global proxy settings.
    """

    def __init__(
        self,
        nginx: PrivateNginx,
        folder: Path,
        hosts: Sequence[str],
        options: ProxyOptions | None = None,
    ) -> None:
        self.nginx = nginx
        self.certificate, key = make_certificate(folder, "tls", *hosts)
        self.tls = Listener("127.0.0.1", free_port(), certificate=self.certificate, key=key)
        self.reports: queue.Queue = queue.Queue()
        self.generation = 0
        # The plain listener is keter's own Listener without a certificate, as
        # keter's config makes it.
        self.writer = NginxWriter(
            listeners=[Listener("127.0.0.1", nginx.port), self.tls],
            config_file=nginx.config_file,
            test_command=nginx.test_command,
            reload_command=nginx.reload_command,
            report_to=self.reports,
            options=options,
        )
        self.writer.start()

    def apply(self, *sites: Site) -> None:
        """Have the writer apply ``sites`` as the next generation; wait until nginx serves it."""
        self.generation += 1
        self.writer.tell(ApplyNginx(generation=self.generation, sites=sites))
        reply = self.reports.get(timeout=30)
        assert reply == NginxApplied(generation=self.generation), reply

    def stop(self) -> None:
        """Stop the writer (nginx itself is the fixture's to stop)."""
        self.writer.stop()
        self.writer.join(timeout=15)


@pytest.fixture
def private_nginx(tmp_path: Path) -> Iterator[PrivateNginx]:
    """A started private nginx, stopped (with all its processes) on teardown."""
    nginx = PrivateNginx(tmp_path / "nginx")
    nginx.start()
    try:
        yield nginx
    finally:
        nginx.stop()
