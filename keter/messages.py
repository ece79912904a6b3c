"""Every message that crosses a thread boundary in keter.

Components talk only through ``queue.Queue`` inboxes carrying these frozen,
keyword-only dataclasses (the original Keter's Chan design). Facts are named in
the past tense (``BundleArrived``); commands are imperative (``StartProcess``).

``deploy_id`` identifies one attempt to deploy one bundle version. The
supervisor hands out increasing ids, and every reply carries the id back so a
late answer about a superseded deploy can be recognised and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

message = dataclass(frozen=True, kw_only=True, slots=True)


# -- value types carried by messages -------------------------------------------------


@message
class HealthCheck:
    """How the process monitor decides a new version really answers."""

    host: str  # sent as the Host header
    path: str = "/"
    # For "/" any answer below 500 is healthy; an explicit health-check-path
    # must answer 2xx or 3xx.
    strict: bool = False


@message
class ProcessSpec:
    """Everything needed to start (and restart) one app process."""

    command: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(repr=False)  # may hold database passwords
    log_path: Path
    port: int | None = None  # None for processes that serve no HTTP
    health: HealthCheck | None = None
    user: str | None = None  # global `setuid`


@message
class DbInfo:
    """One app's database credentials (Keter's postgres.yaml entry)."""

    name: str
    user: str
    password: str = field(repr=False)
    host: str
    port: int


@message
class Site:
    """One app's entry in the nginx config: these hosts go to this port."""

    app: str
    hosts: tuple[str, ...]
    port: int


# -- lifecycle -----------------------------------------------------------------------


@message
class Stop:
    """Ends an actor's loop."""


@message
class ComponentFailed:
    """A component thread died on an unexpected exception."""

    component: str
    error: str
    traceback: str = field(repr=False, default="")


@message
class ShutdownRequested:
    """SIGTERM or SIGINT arrived; stop every app and exit."""

    signal_name: str


@message
class RescanRequested:
    """SIGHUP arrived; compare incoming/ with what is deployed."""


# -- incoming watcher ----------------------------------------------------------------


@message
class BundleArrived:
    """A bundle in incoming/ is new or changed and completely written."""

    app: str
    path: Path
    mtime_ns: int
    size: int


@message
class BundleRemoved:
    """A bundle disappeared from incoming/."""

    app: str


@message
class BundleIgnored:
    """A file in incoming/ cannot be a bundle (bad name); said once per file."""

    filename: str
    reason: str


@message
class ScanCompleted:
    """The watcher has reported every bundle that was in incoming/."""


@message
class Rescan:
    """Command to the watcher: report every bundle in incoming/ again."""


# -- unpacker ------------------------------------------------------------------------


@message
class UnpackBundle:
    app: str
    deploy_id: int
    bundle: Path
    dest: Path  # a fresh folder under ROOT/temp that must not exist yet


@message
class BundleUnpacked:
    app: str
    deploy_id: int
    folder: Path
    config: object  # keter.bundle.BundleConfig
    warnings: tuple[str, ...] = ()


@message
class UnpackFailed:
    app: str
    deploy_id: int
    reason: str


@message
class RemoveFolder:
    """Delete an unpacked version's folder (it is no longer running)."""

    path: Path


# -- postgres provisioner ------------------------------------------------------------


@message
class ProvisionDatabase:
    app: str
    deploy_id: int


@message
class DatabaseReady:
    app: str
    deploy_id: int
    db: DbInfo


@message
class DatabaseFailed:
    app: str
    deploy_id: int
    reason: str


# -- process monitor -----------------------------------------------------------------


@message
class StartProcess:
    app: str
    deploy_id: int
    spec: ProcessSpec


@message
class StopProcess:
    """Stop a deploy's process after ``delay`` seconds (the drain period)."""

    app: str
    deploy_id: int
    delay: float = 0.0


@message
class ProcessStarted:
    app: str
    deploy_id: int
    pid: int
    port: int | None


@message
class ProcessHealthy:
    app: str
    deploy_id: int


@message
class ProcessFailed:
    """A new version never became healthy; it has been stopped."""

    app: str
    deploy_id: int
    reason: str
    output_tail: tuple[str, ...] = ()


@message
class ProcessStateChanged:
    """A deployed process moved in its state machine (crash, backoff, restart)."""

    app: str
    deploy_id: int
    state: str
    detail: str = ""


@message
class ProcessStopped:
    """Every process of the deploy's group is gone; its port is free again."""

    app: str
    deploy_id: int


# -- nginx writer --------------------------------------------------------------------


@message
class ApplyNginx:
    """Make nginx route exactly these sites. Later generations supersede earlier."""

    generation: int
    sites: tuple[Site, ...]


@message
class NginxApplied:
    """nginx now serves ``generation`` (and so every earlier one is obsolete)."""

    generation: int


@message
class NginxFailed:
    """``generation`` was not applied; nginx still serves the previous config."""

    generation: int
    reason: str
