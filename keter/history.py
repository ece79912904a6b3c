"""Each app's deploy history, kept in ``ROOT/etc/history.json`` across keter restarts.

Every finished deploy attempt becomes one entry with a sequence number that
never repeats (it is stored too), so a client can ask "what finished after
entry N" and never mistake an old verdict for the one it waits for. The file
is bounded: the last ``per_app`` entries of at most ``max_apps`` apps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from keter.fsutil import atomic_write
from keter.messages import DeployFinished

log = logging.getLogger(__name__)

PER_APP = 50
MAX_APPS = 200
MAX_FILE_BYTES = 16 << 20  # far above PER_APP * MAX_APPS entries; guards a corrupt file


class DeployHistory:
    """The history file's content in memory; every ``record`` rewrites the file atomically.

    Not thread-safe: the status component calls it from its own thread and
    guards readers with its lock.
    """

    def __init__(self, path: Path, *, per_app: int = PER_APP, max_apps: int = MAX_APPS) -> None:
        self.path = Path(path)
        self.per_app = per_app
        self.max_apps = max_apps
        self.seq = 0  # the number of the newest entry
        self._apps: dict[str, list[dict]] = {}

    def load(self) -> None:
        """Read the file if there is one; a damaged file is set aside, with one log line."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return
        try:
            if len(raw) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = json.loads(raw)
            seq = data["seq"]
            apps = data["apps"]
            if not isinstance(seq, int) or not isinstance(apps, dict):
                raise ValueError("unexpected layout")
            for entries in apps.values():
                if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("seq"), int) for e in entries
                ):
                    raise ValueError("unexpected layout")
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(self.path.name + ".damaged")
            self.path.replace(aside)
            log.error(
                "keter: %s is unreadable (%s); starting a new history, the old file is kept as %s",
                self.path,
                exc,
                aside.name,
            )
            return
        self.seq = seq
        self._apps = {name: entries[-self.per_app :] for name, entries in apps.items()}

    def record(self, finished: DeployFinished) -> dict:
        """Add one finished deploy, save, and return its entry."""
        self.seq += 1
        entry = {
            "seq": self.seq,
            "at": finished.at,
            "version": finished.version,
            "sha256": finished.sha256,
            "bundle_mtime": finished.bundle_mtime,
            "outcome": finished.outcome,
            "reason": finished.reason,
            "duration": round(finished.duration, 3),
        }
        entries = self._apps.setdefault(finished.app, [])
        entries.append(entry)
        del entries[: -self.per_app]
        self._forget_oldest_apps()
        self.save()
        return entry

    def save(self) -> None:
        """Write the file; a failure (full disk) is logged and the history stays in memory."""
        data = json.dumps({"seq": self.seq, "apps": self._apps}, separators=(",", ":"))
        try:
            atomic_write(self.path, data.encode(), mode=0o600)
        except OSError as exc:
            log.error("keter: cannot save the deploy history to %s: %s", self.path, exc)

    def entries(self, app: str, after: int = 0) -> list[dict]:
        """The app's entries newer than sequence number ``after``, oldest first."""
        return [dict(e) for e in self._apps.get(app, ()) if e["seq"] > after]

    def last(self, app: str) -> dict | None:
        entries = self._apps.get(app)
        return dict(entries[-1]) if entries else None

    def __contains__(self, app: str) -> bool:
        return app in self._apps

    def _forget_oldest_apps(self) -> None:
        if len(self._apps) <= self.max_apps:
            return
        by_age = sorted(self._apps, key=lambda name: self._apps[name][-1]["seq"])
        for name in by_age[: len(self._apps) - self.max_apps]:
            del self._apps[name]
