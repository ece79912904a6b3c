"""``ROOT/run/processes/``: which app processes keter started, so that the next
keter can stop them if this one is killed (SIGKILL, OOM, a crash).

One small file per deploy (``DEPLOY_ID.json``), written when a process is
spawned and removed when its group is gone: each event costs one tiny write,
whatever the number of apps (one file listing every process would be
rewritten whole on every spawn and stop). At start, keter reads the files a
previous keter left (and the single ``processes.json`` older versions wrote)
and stops every group still alive, unless its leader's pid now belongs to
another program (told apart by its start time).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from keter.fsutil import atomic_write
from keter.processes.groups import group_members, signal_group, stop_groups

log = logging.getLogger(__name__)

RECORDS_DIR = "processes"
OLD_RECORDS_FILE = "processes.json"  # what keter wrote before the folder existed


@dataclass(frozen=True, kw_only=True)
class Record:
    """One running app process, as its file keeps it."""

    pid: int
    pgid: int
    create_time: float  # psutil's, to tell a reused pid from ours
    app: str
    deploy_id: int


class Records:
    """Records running processes one file each; stops the leftovers of a killed keter."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / RECORDS_DIR
        self._failed = False  # the last write failed (and was logged)
        # What the files say, for kill_running (read from another thread: only
        # whole-dict operations, which the GIL makes atomic).
        self._running: dict[int, Record] = {}

    def add(self, record: Record) -> None:
        """Record a spawned process (replacing its deploy's previous one)."""
        self._running[record.deploy_id] = record
        try:
            # It only has to outlive keter, not the machine (a power cut ends the
            # apps too), so no fsync.
            atomic_write(
                self._path(record.deploy_id), json.dumps(asdict(record)).encode(), durable=False
            )
        except OSError as exc:
            # A full disk must not stop the monitor, and with it every app.
            if not self._failed:
                log.error(
                    "processes: cannot record pid %d in %s: %s; a killed keter could not "
                    "stop it at its next start",
                    record.pid,
                    self.folder,
                    exc.strerror or exc,
                )
                self._failed = True
            return
        self._failed = False

    def remove(self, deploy_id: int) -> None:
        """The deploy's process group is gone."""
        self._running.pop(deploy_id, None)
        try:
            os.unlink(self._path(deploy_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("processes: cannot remove %s: %s", self._path(deploy_id), exc)

    def kill_running(self) -> None:
        """SIGKILL every recorded group (safe from any thread: keter must stop now)."""
        for record in list(self._running.values()):
            signal_group(record.pgid, signal.SIGKILL)

    def stop_leftovers(self, stop_timeout: float) -> None:
        """Stop processes a previous keter started and could not stop (it was killed).

        Afterwards no record is left: this keter records its own processes.
        """
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # apps' names and pids: keter's own
        groups: dict[int, str] = {}
        for record in self._load():
            if not group_members(record.pgid):
                continue
            try:
                leader = psutil.Process(record.pid)
                reused = leader.status() != psutil.STATUS_ZOMBIE and (
                    abs(leader.create_time() - record.create_time) > 0.01
                )
            except psutil.NoSuchProcess:
                reused = False  # the leader died; its group's leftovers are still ours
            if reused:
                log.info(
                    "%s: pid %d now belongs to another program; leaving it alone",
                    record.app,
                    record.pid,
                )
                continue
            groups[record.pgid] = (
                f"{record.app}: leftover pid {record.pid} (deploy {record.deploy_id})"
            )
        if groups:
            stop_groups(groups, stop_timeout)
            for label in groups.values():
                log.warning("%s from a previous keter run was stopped", label)
        for path in [self.run_dir / OLD_RECORDS_FILE, *self.folder.glob("*.json")]:
            path.unlink(missing_ok=True)

    def _path(self, deploy_id: int) -> Path:
        return self.folder / f"{int(deploy_id)}.json"

    def _load(self) -> list[Record]:
        items: list[object] = []
        for path in [self.run_dir / OLD_RECORDS_FILE, *sorted(self.folder.glob("*.json"))]:
            try:
                raw = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                log.warning("processes: ignoring unreadable %s: %s", path, exc)
                continue
            items.extend(raw if isinstance(raw, list) else [raw])
        records = []
        for item in items:
            try:
                records.append(
                    Record(
                        pid=int(item["pid"]),
                        pgid=int(item["pgid"]),
                        create_time=float(item["create_time"]),
                        app=str(item["app"]),
                        deploy_id=int(item.get("deploy_id", 0)),
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("processes: ignoring a malformed process record %r", item)
        return records
