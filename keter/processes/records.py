"""``ROOT/run/processes.json``: which app processes keter started, so that the
next keter can stop them if this one is killed (SIGKILL, OOM, a crash).

The monitor rewrites the file on every spawn and stop; at start it reads the
file a previous keter left and stops every group still alive, unless its
leader's pid now belongs to another program (told apart by its start time).
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from keter.fsutil import atomic_write
from keter.processes.groups import group_members, signal_group, stop_groups

log = logging.getLogger(__name__)

RECORDS_FILE = "processes.json"


@dataclass(frozen=True, kw_only=True)
class Record:
    """One running app process, as the file keeps it."""

    pid: int
    pgid: int
    create_time: float  # psutil's, to tell a reused pid from ours
    app: str
    deploy_id: int


class RecordsFile:
    """Saves the list of running processes; stops the leftovers of a killed keter."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / RECORDS_FILE
        self._saved: list[Record] | None = None
        self._unsaved = False  # the last save failed (and was logged)

    def save(self, records: list[Record]) -> None:
        """Write ``records`` unless the file already says exactly this."""
        if records == self._saved:
            return
        data = json.dumps([asdict(r) for r in records], indent=1).encode()
        try:
            # It only has to outlive keter, not the machine (a power cut ends the
            # apps too), so no fsync.
            atomic_write(self.path, data, durable=False)
        except OSError as exc:
            # A full disk must not stop the monitor, and with it every app: the old
            # file stays whole, and the next change tries again.
            if not self._unsaved:
                log.error(
                    "processes: cannot save %s: %s; apps started from now on are not "
                    "recorded, so a killed keter could not stop them at its next start",
                    self.path,
                    exc.strerror or exc,
                )
                self._unsaved = True
            return
        self._saved = records
        self._unsaved = False

    def kill_saved(self) -> None:
        """SIGKILL every group the last save listed (safe from any thread: keter must stop now)."""
        for record in self._saved or []:
            signal_group(record.pgid, signal.SIGKILL)

    def stop_leftovers(self, stop_timeout: float) -> None:
        """Stop processes a previous keter started and could not stop (it was killed)."""
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

    def _load(self) -> list[Record]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("processes: ignoring unreadable %s: %s", self.path, exc)
            return []
        records = []
        for item in raw if isinstance(raw, list) else []:
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
                log.warning("processes: ignoring malformed record %r in %s", item, self.path)
        return records
