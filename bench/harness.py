"""What every benchmark shares: a private keter and nginx, bundles, probes, wrk, figures.

Everything runs on 127.0.0.1 under one work folder: the nginx instances are
private (own prefix, own free port, the tests' ``PrivateNginx``), keter is the
real daemon (``python -m keter ROOT``, the tests' ``KeterDaemon``), and the app
is ``bench/app.sh`` (nginx as a single process, so the figures are keter's and
not the app's).

Timing: every measured wait polls at a fixed short interval (``POLL``), the
resolution of the figure. Every wait has a deadline, so no run can hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# Where a run's work folder goes: outside /tmp, as a production ROOT, so that its apps get
# their private /tmp (keter.processes.private) and their starts cost what they cost there.
WORK_PARENT = "/var/lib"
# The tests' helpers are the package tests/support/; the benchmarks reuse them as they are.
sys.path.insert(0, str(REPO / "tests"))

from support.daemon import KeterDaemon, is_unpacking_worker, keter_settings  # noqa: E402
from support.net import free_port  # noqa: E402
from support.nginx import WORKERS as NGINX_WORKERS  # noqa: E402
from support.nginx import PrivateNginx  # noqa: E402
from support.wait import wait_for  # noqa: E402

T = TypeVar("T")

APP_SCRIPT = BENCH / "app.sh"
WRK = "/usr/bin/wrk"
WRK_REPORT = BENCH / "wrk_report.lua"
NGINX = "/usr/sbin/nginx"
# What keter gives every app (keter.environment.BASE_PATH).
APP_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

POLL = 0.005  # how often a measured wait looks: the resolution of a deploy or downtime figure
START_POLL = 0.0005  # an app's own start takes milliseconds: look far more often

# keter_settings() shortens keter's timers for the tests; benchmarks run keter's defaults.
KETER_DEFAULTS = {"health-check-timeout": 30, "drain-seconds": 2, "stop-timeout": 10}


# -- settings and results -----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How one run of the suite is sized, and where it keeps its files."""

    quick: bool
    workdir: Path
    plot: bool = False  # draw the figures' plots (bench/*.png; needs the bench extra)

    def pick(self, full: T, quick: T) -> T:
        """``full`` for the real run, ``quick`` for the --quick smoke run."""
        return quick if self.quick else full


@dataclass(frozen=True)
class Row:
    """One line of the final table."""

    benchmark: str
    figure: str
    reference: str
    target: str
    met: bool | None  # None: the issue sets no target, the figure is reported only


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ms(seconds: float) -> str:
    """Milliseconds, with a decimal only where it means something."""
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def spread(values: list[float], fmt: Callable[[float], str] = ms) -> str:
    """``median (n=N, min .. max)`` for a figure's detail."""
    return f"{fmt(median(values))} (n={len(values)}, {fmt(min(values))} .. {fmt(max(values))})"


# -- waiting --------------------------------------------------------------------------------


def poll(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = POLL
) -> tuple[T, float]:
    """Call ``predicate`` every ``interval`` s until it is truthy: (its value, when it was seen).

    The time is taken right after the successful call, so a figure includes the
    probe's own round trip and is never flattered.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        seen = time.monotonic()
        if value:
            return value, seen
        if seen >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)  # the poll interval is the figure's resolution


# -- talking to nginx and apps ------------------------------------------------------------


def fetch(port: int, host: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """GET / on 127.0.0.1:``port`` with this Host on a fresh connection: (status, body).

    None when nothing answers. A raw HTTP/1.0 request keeps the probe far
    cheaper than http.client, which matters while it polls every few ms.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None
    return status, body


@dataclass(frozen=True)
class Answer:
    """What bench/app.sh says: its VERSION, its deploy folder and its pid."""

    version: str
    folder: str
    pid: int


def answer(port: int, host: str) -> Answer | None:
    """The app's answer through nginx, or None (no answer, or not a 200 from the app)."""
    reply = fetch(port, host)
    if reply is None or reply[0] != 200:
        return None
    fields = reply[1].decode(errors="replace").split()
    if len(fields) != 3 or not fields[2].isdigit():
        return None
    return Answer(fields[0], fields[1], int(fields[2]))


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- bundles ----------------------------------------------------------------------------------


def host_of(app: str) -> str:
    return f"{app}.bench.test"


def build_bundle(
    path: Path, app: str, version: str, *, pad_bytes: int = 0, env: dict | None = None
) -> Path:
    """Write ``path``: a bundle of bench/app.sh for ``app``, plus ``pad_bytes`` of random data.

    The padding is incompressible (random) and the same on every run (seeded),
    so a big bundle costs the same to unpack each time.
    """
    config = {
        "exec": "../bin/app",
        "host": host_of(app),
        "env": {"VERSION": version, **(env or {})},
    }
    members = [
        ("config/keter.yaml", yaml.safe_dump(config).encode(), 0o644),
        ("bin/app", APP_SCRIPT.read_bytes(), 0o755),
    ]
    if pad_bytes:
        members.append(("pad.bin", random.Random(7).randbytes(pad_bytes), 0o644))
    part = path.with_name(path.name + ".part")
    with tarfile.open(part, "w:gz", compresslevel=6) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    os.replace(part, path)
    return path


# -- a private keter behind a private nginx ---------------------------------------------------


class Stack:
    """A running keter daemon, its nginx, and the bench's view of the apps."""

    def __init__(self, base: Path, nginx: PrivateNginx, keter: KeterDaemon) -> None:
        self.base = base
        self.nginx = nginx
        self.keter = keter
        self.bundles = base / "bundles"
        self.bundles.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.keter.proc is not None
        return self.keter.proc.pid

    def answer(self, app: str) -> Answer | None:
        return answer(self.nginx.port, host_of(app))

    def bundle(self, app: str, version: str, **kwargs) -> Path:
        return build_bundle(self.bundles / f"{app}-{version}.keter", app, version, **kwargs)

    def drop(self, bundles: dict[str, Path]) -> float:
        """Copy each app's bundle in under a hidden name, then rename them all in.

        Returns the time of the first rename: the moment the deploys begin.
        """
        parts = {}
        for app, bundle in bundles.items():
            parts[app] = self.keter.incoming / f".{app}.keter.part"
            shutil.copyfile(bundle, parts[app])
        began = time.monotonic()
        for app, part in parts.items():
            os.replace(part, self.keter.incoming / f"{app}.keter")
        return began

    def remove(self, apps: Iterable[str]) -> None:
        for app in apps:
            (self.keter.incoming / f"{app}.keter").unlink()

    def last_deploy_id(self) -> int:
        """The highest deploy id among the unpacked versions (0 when there are none).

        keter names each version's folder ``NAME-ID`` with ids that only grow,
        so an answer from a folder with a higher id comes from a later deploy.
        Comparing with the answer seen before a drop would not do: for about
        100 ms after a reload, nginx's old workers still answer with the old
        routing.
        """
        ids = [_deploy_id(entry.name) for entry in (self.keter.root / "temp").iterdir()]
        return max(ids, default=0)

    def wait_new(self, apps: Iterable[str], after: int, timeout: float = 60) -> float:
        """Wait until every app answers through nginx from a deploy later than ``after``.

        Returns when the last one was first seen answering. Apps are checked in
        order and a look stops at the first that does not answer yet: polling
        all of 100 apps every few ms would take a core away from keter on a
        small machine. Once that app answers, the rest are checked at once, so
        the figure is late by at most the few ms those checks take.
        """
        pending = list(apps)
        last = time.monotonic()

        def look() -> bool:
            nonlocal last
            while pending:
                reply = self.answer(pending[0])
                if reply is None or _deploy_id(reply.folder) <= after:
                    return False
                pending.pop(0)
                last = time.monotonic()
            return True

        poll(look, timeout, f"{len(pending)} app(s) to answer with a new version")
        return last

    def deploy(self, bundles: dict[str, Path], timeout: float = 60) -> float:
        """Drop these bundles at once; seconds until the last new version answers through nginx."""
        after = self.last_deploy_id()
        began = self.drop(bundles)
        return self.wait_new(bundles, after, timeout) - began

    def app_processes(self) -> list[psutil.Process]:
        """keter's app processes (every one runs from a folder under ROOT/temp)."""
        temp = str(self.keter.root / "temp")
        found = []
        for child in self.keter.children():
            with contextlib.suppress(psutil.Error):
                if temp in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def settle(self, apps: int, timeout: float = 60) -> None:
        """Wait until exactly ``apps`` versions run and are unpacked, and nginx has one config.

        Old versions are then stopped and removed, and no old nginx worker is
        still shutting down: for about 100 ms after a reload those keep taking
        new connections with the previous routing (a first deploy's host gets
        404 there), which is not what a measurement that starts now should see.
        """
        temp = self.keter.root / "temp"
        wait_for(
            lambda: (
                len(self.app_processes()) == apps
                and len(list(temp.iterdir())) == apps
                and self._nginx_settled()
            ),
            timeout,
            f"keter to settle on {apps} app(s)",
        )

    def _nginx_settled(self) -> bool:
        assert self.nginx.pid is not None
        # Right after a reload the old workers still run as plain workers (nginx tells
        # them to stop ~100 ms later), then rename themselves "... is shutting down":
        # settled is exactly WORKERS workers and none of them shutting down.
        workers = psutil.Process(self.nginx.pid).children()
        titles = [" ".join(worker.cmdline()) for worker in workers]
        return len(titles) == NGINX_WORKERS and not any("shutting down" in t for t in titles)

    def log_since(self, offset: int) -> str:
        return self.keter.log()[offset:]

    def log_size(self) -> int:
        return len(self.keter.log())


def _deploy_id(folder: str) -> int:
    """The deploy id in a version folder's name (``NAME-ID``); -1 for anything else."""
    suffix = folder.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


@contextlib.contextmanager
def keter_stack(settings: Settings, name: str, **overrides) -> Iterator[Stack]:
    """A private nginx and a keter daemon on a fresh ROOT; everything is stopped afterwards."""
    base = settings.workdir / name
    nginx = PrivateNginx(base / "nginx")
    nginx.start()
    keter = KeterDaemon(base / "root", keter_settings(nginx, **{**KETER_DEFAULTS, **overrides}))
    try:
        keter.start()
        yield Stack(base, nginx, keter)
    finally:
        try:
            _stop_keter(keter)
        finally:
            nginx.stop()


def _stop_keter(keter: KeterDaemon) -> None:
    """SIGTERM keter (it stops its apps); if it will not go, kill it and what it started."""
    if keter.proc is None:
        return
    children = keter.children()
    try:
        keter.stop(timeout=30)
    except subprocess.TimeoutExpired:
        keter.kill()
    for child in children:
        # Apps lead their own process group (keter starts them in a new session).
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if child.is_running():
                os.killpg(child.pid, signal.SIGKILL)


# -- an app started by hand, for its own start time ------------------------------------------


def app_start_times(workdir: Path, reps: int) -> list[float]:
    """Seconds from exec of bench/app.sh until its port accepts, ``reps`` times.

    The reference every deploy and restart figure subtracts or adds: the part
    of a deploy that is the app's own and no deployer can remove.
    """
    folder = workdir / "direct-app"
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_SCRIPT, folder / "bin" / "app")
    os.chmod(folder / "bin" / "app", 0o755)
    times = []
    for _ in range(reps):
        port = free_port()
        env = {"PATH": APP_PATH, "PORT": str(port), "VERSION": "direct", "HOME": "/"}
        began = time.monotonic()
        proc = subprocess.Popen(
            [str(folder / "bin" / "app")],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _, seen = poll(lambda port=port: port_accepts(port), 10, "the app", START_POLL)
            times.append(seen - began)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
    return times


# -- wrk ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    """wrk's totals (from bench/wrk_report.lua)."""

    requests: int
    seconds: float
    connect: int
    read: int
    write: int
    timeout: int
    non2xx: int  # wrk counts every status >= 400 here ("Non-2xx or 3xx responses")
    p50: float  # seconds
    p99: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def failed(self) -> int:
        return self.socket_errors + self.non2xx


def wrk_command(
    port: int,
    host: str,
    *,
    seconds: int,
    threads: int = 2,
    connections: int = 64,
    close: bool = False,
) -> list[str]:
    command = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(WRK_REPORT),
        "-H",
        f"Host: {host}",
    ]
    if close:
        command += ["-H", "Connection: close"]
    return [*command, f"http://127.0.0.1:{port}/"]


def parse_wrk(output: str) -> WrkResult:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            break
    else:
        raise RuntimeError(f"wrk printed no report:\n{output}")
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        connect=data["connect"],
        read=data["read"],
        write=data["write"],
        timeout=data["timeout"],
        non2xx=data["status"],
        p50=data["p50_us"] / 1e6,
        p99=data["p99_us"] / 1e6,
    )


def run_wrk(port: int, host: str, *, seconds: int, **kwargs) -> WrkResult:
    """Run wrk for ``seconds`` and return its totals."""
    command = wrk_command(port, host, seconds=seconds, **kwargs)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return parse_wrk(done.stdout)


class WrkInBackground:
    """wrk running until ``stop()``: load for the whole of an operation of unknown length."""

    LONGEST = 600  # seconds; wrk ends by itself after this even if never stopped

    def __init__(self, port: int, host: str, **kwargs) -> None:
        command = wrk_command(port, host, seconds=self.LONGEST, **kwargs)
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> WrkResult:
        """SIGINT makes wrk stop at once and still print its totals."""
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        return parse_wrk(out + err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- a process's cost ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """A process's cost over a window, sampled about once a second."""

    samples: tuple[tuple[float, float, int], ...]  # (seconds into the window, CPU seconds, RSS)

    @property
    def seconds(self) -> float:
        return self.samples[-1][0]

    @property
    def cpu_percent(self) -> float:
        """CPU over the window, in percent of one core."""
        (_, cpu0, _), (seconds, cpu1, _) = self.samples[0], self.samples[-1]
        return 100 * (cpu1 - cpu0) / seconds

    @property
    def rss_max(self) -> int:
        return max(rss for _, _, rss in self.samples)


def _unpacking_workers(keter: psutil.Process) -> list[psutil.Process]:
    """keter's unpacking worker (keter.incoming.worker): a part of keter, counted with it."""
    return [child for child in keter.children() if is_unpacking_worker(child)]


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def keter_cpu(keter: psutil.Process) -> float:
    """CPU seconds keter has used so far: its threads and its unpacking worker."""
    return _cpu(keter) + sum(_cpu(worker) for worker in _unpacking_workers(keter))


def keter_memory(keter: psutil.Process) -> int:
    """keter's memory in bytes: its RSS plus the memory its unpacking worker has alone
    (USS: the pages it shares with keter, the interpreter's, count once)."""
    own = keter.memory_info().rss
    return own + sum(worker.memory_full_info().uss for worker in _unpacking_workers(keter))


def observe(pid: int, seconds: float, every: float = 1.0) -> Usage:
    """CPU and memory of keter (``pid``, with its unpacking worker) over ``seconds``."""
    proc = psutil.Process(pid)
    began = time.monotonic()

    def sample() -> tuple[float, float, int]:
        return (time.monotonic() - began, keter_cpu(proc), keter_memory(proc))

    samples = [sample()]
    while (left := began + seconds - time.monotonic()) > 0:
        time.sleep(min(every, left))  # the measuring window itself, not a wait for an outcome
        samples.append(sample())
    return Usage(tuple(samples))


def rss_mb(pid: int) -> float:
    """keter's memory in MB (``keter_memory``: its RSS and its worker's own pages)."""
    return keter_memory(psutil.Process(pid)) / 2**20


@dataclass(frozen=True)
class CpuSpent:
    """CPU seconds spent over an operation: the whole machine's, keter's own (its threads
    and its unpacking worker) and its reaped children's (``nginx -t``, the start chain's
    shells)."""

    machine: float
    process: float
    children: float

    def since(self, before: CpuSpent) -> CpuSpent:
        return CpuSpent(
            self.machine - before.machine,
            self.process - before.process,
            self.children - before.children,
        )


def cpu_spent(pid: int) -> CpuSpent:
    """The totals so far: subtract two of these (``since``) for an operation's cost."""
    busy = psutil.cpu_times()
    keter = psutil.Process(pid)
    cpu = keter.cpu_times()
    return CpuSpent(
        # The machine's own work: not idle, iowait or steal (the hypervisor's), and not
        # guest, which Linux counts inside user and nice already.
        machine=busy.user + busy.nice + busy.system + busy.irq + busy.softirq,
        process=keter_cpu(keter),
        children=cpu.children_user + cpu.children_system,
    )
