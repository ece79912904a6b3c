"""Each app's deploy history, kept in ``ROOT/etc/history.json`` across keter restarts.

Every finished deploy attempt becomes one entry with a sequence number that
never repeats (it is stored too), so a client can ask "what finished after
entry N" and never mistake an old verdict for the one it waits for.

Everything is bounded, whatever a bundle puts in its failure reason: an
entry's reason is capped (``REASON_LIMIT``), the file keeps the last
``per_app`` entries of at most ``max_apps`` apps and stays under
``FILE_BUDGET`` (the oldest entries go first). A file that is too big, cut
short or damaged (an older keter, a full disk, a hand edit) never stops
keter: ``load`` keeps every entry it can read, in bounded memory.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path
from typing import NamedTuple

from keter.fsutil import atomic_write
from keter.messages import DeployFinished
from keter.names import cut_text, log_text, validate_app_name

log = logging.getLogger(__name__)

PER_APP = 50
# Apps, serving or removed, whose history is kept: more than any host runs (the issue's
# 1000 apps keep all of theirs); the budget bounds the bytes whatever the number.
MAX_APPS = 5000
REASON_LIMIT = 2048  # characters of one entry's reason (TEAM.md decision 5: a few KiB)
FILE_BUDGET = 4 << 20  # bytes history.json may take; the oldest entries make room
READ_LIMIT = 32 << 20  # bytes of a (too big) file load reads; the rest is lost
_TEXT_FIELDS = {"version": 64, "sha256": 64, "outcome": 32, "kind": 32}
_NUMBER_FIELDS = ("at", "bundle_mtime", "duration", "watch")


def _last_seq(entries: list[dict]) -> int:
    return entries[-1]["seq"] if entries else 0


def _compact(entry: dict) -> str:
    return json.dumps(entry, separators=(",", ":"))


class _Kept(NamedTuple):
    """One app's entries in memory: compact JSON texts, the older ones compressed.

    Text rather than dicts: a dict of eleven fields took five times what its text
    does. The older entries compressed together, one text a line (json.dumps escapes
    every newline): a host with 1000 apps keeps tens of thousands of entries, the
    biggest thing in keter's memory that grew with every deploy (about 4 MiB of text
    at the file's budget; an app's entries compress to about a quarter). The newest
    stays plain: the status view shows it for every app, and a client waiting for a
    verdict asks for it. A record costs one decompression and one compression of
    one app's entries (~0.2 ms for 50).
    """

    seqs: tuple[int, int]  # the sequence numbers of the newest and the one before (0: none)
    newest: str
    older: bytes  # oldest first; b"": none

    @classmethod
    def of(cls, seqs: list[int], texts: list[str]) -> _Kept:
        """The entries ``texts`` (oldest first, at least one); ``seqs`` ends with the
        sequence numbers of the entry before the newest (if any) and of the newest."""
        older = zlib.compress("\n".join(texts[:-1]).encode()) if len(texts) > 1 else b""
        return cls((seqs[-1], seqs[-2] if len(seqs) > 1 else 0), texts[-1], older)

    def texts(self) -> list[str]:
        older = zlib.decompress(self.older).decode().split("\n") if self.older else []
        return [*older, self.newest]


def capped_text(text: object, limit: int) -> str:
    """Text from a bundle or an app, safe to show and at most about ``limit`` characters.

    Printable text (already escaped text included) is only cut, with
    "... (N more characters)"; anything else goes through ``names.log_text``,
    which escapes control characters and escape sequences. So text escaped
    once upstream is never escaped twice.
    """
    if not isinstance(text, str) or not text.isprintable():
        return log_text(text, limit)
    return cut_text(text, limit)


class DeployHistory:
    """The history file's content in memory; every ``record`` rewrites the file atomically.

    Not thread-safe: the status component calls it from its own thread and
    guards readers with its lock.
    """

    def __init__(
        self,
        path: Path,
        *,
        per_app: int = PER_APP,
        max_apps: int = MAX_APPS,
        budget: int = FILE_BUDGET,
        read_limit: int = READ_LIMIT,
    ) -> None:
        self.path = Path(path)
        self.per_app = per_app
        self.max_apps = max_apps
        self.budget = budget
        self.read_limit = read_limit
        self.seq = 0  # the number of the newest entry
        self.unsaved = False  # recorded in memory, not yet in the file
        self._apps: dict[str, _Kept] = {}  # every app kept has at least one entry

    def load(self) -> None:
        """Read the file if there is one, keeping every entry that can be read.

        A file that cannot be read whole (damaged, cut short, beyond
        ``read_limit``) is kept beside as ``history.json.damaged``, with one
        log line saying how many entries were saved from it.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read(self.read_limit + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("keter: cannot read %s (%s); starting a new history", self.path, exc)
            return
        text = raw[: self.read_limit].decode("utf-8", "replace")
        seq, apps, problem = _parse(text)
        if problem is None and len(raw) > self.read_limit:
            problem = f"larger than {self.read_limit} bytes"
        # Kept in the order of each app's last deploy, the longest ago first.
        loaded = 0  # entries kept, for the log line below
        for name, entries in sorted(apps.items(), key=lambda item: _last_seq(item[1])):
            entries = entries[-self.per_app :]
            self._apps[name] = _Kept.of([e["seq"] for e in entries], [_compact(e) for e in entries])
            loaded += len(entries)
        self.seq = max([seq, *(kept.seqs[0] for kept in self._apps.values())])
        self._forget_oldest_apps()
        if problem is not None:
            aside = self.path.with_name(self.path.name + ".damaged")
            try:
                self.path.replace(aside)
            except OSError as exc:
                aside = f"not set aside: {exc}"
            log.error(
                "keter: %s is damaged (%s); kept the %d entries that could be read, "
                "the old file is kept as %s",
                self.path,
                problem,
                loaded,
                getattr(aside, "name", aside),
            )
        if problem is not None or len(raw) > self.budget:
            self.save()  # the file keter keeps from now on is bounded again

    def record(self, finished: DeployFinished, *, save: bool = True) -> dict:
        """Add one finished deploy, save (or, with ``save=False``, leave that to
        ``flush``), and return its entry."""
        self.seq += 1
        entry = {
            "seq": self.seq,
            "at": finished.at,
            "version": finished.version,
            "sha256": finished.sha256,
            "bundle_mtime": finished.bundle_mtime,
            "outcome": str(finished.outcome),
            "kind": str(finished.kind) if finished.kind is not None else None,
            "reason": capped_text(finished.reason, REASON_LIMIT),
            "duration": round(finished.duration, 3),
            "watch": finished.watch_seconds,  # serving: watched this long (0: not watched)
        }
        # Moved to the end: the app deployed longest ago is always the first key.
        kept = self._apps.pop(finished.app, None)
        texts = [*(kept.texts() if kept is not None else []), _compact(entry)]
        before = kept.seqs[0] if kept is not None else 0
        self._apps[finished.app] = _Kept.of([before, self.seq], texts[-self.per_app :])
        self._forget_oldest_apps()
        if save:
            self.save()
        else:
            self.unsaved = True
        return entry

    def flush(self) -> None:
        """Save what ``record(save=False)`` added since the last save, if anything."""
        if self.unsaved:
            self.unsaved = False
            self.save()

    def save(self) -> None:
        """Write the file; a failure (full disk) is logged and the history stays in memory."""
        data = self._dump()
        if len(data) > self.budget:
            # A quarter of the budget more than needed: the next saves fit without
            # sorting every entry again.
            self._drop_oldest(len(data) - self.budget + self.budget // 4)
            data = self._dump()
        try:
            atomic_write(self.path, data, mode=0o600)
        except OSError as exc:
            log.error("keter: cannot save the deploy history to %s: %s", self.path, exc)

    def entries(self, app: str, after: int = 0) -> list[dict]:
        """The app's entries newer than sequence number ``after``, oldest first."""
        kept = self._apps.get(app)
        if kept is None or kept.seqs[0] <= after:
            return []
        if kept.seqs[1] <= after:  # a client waiting for its verdict: no decompression
            return [json.loads(kept.newest)]
        return [entry for text in kept.texts() if (entry := json.loads(text))["seq"] > after]

    def last(self, app: str) -> dict | None:
        kept = self._apps.get(app)
        return json.loads(kept.newest) if kept is not None else None

    def __contains__(self, app: str) -> bool:
        return app in self._apps

    def _forget_oldest_apps(self) -> None:
        while len(self._apps) > self.max_apps:
            del self._apps[next(iter(self._apps))]  # the app deployed longest ago

    def _dump(self) -> bytes:
        # What json.dumps of {"seq": ..., "apps": {app: [entry, ...]}} writes, compact.
        apps = ",".join(
            f"{json.dumps(app)}:[{','.join(kept.texts())}]" for app, kept in self._apps.items()
        )
        return f'{{"seq":{self.seq},"apps":{{{apps}}}}}'.encode()

    def _drop_oldest(self, excess: int) -> None:
        """Drop the oldest entries worth ``excess`` bytes of the file (each app keeps its last)."""
        texts = {app: kept.texts() for app, kept in self._apps.items()}
        seqs = {app: [json.loads(text)["seq"] for text in ts] for app, ts in texts.items()}
        older = sorted(
            (seq, len(text))
            for app, ts in texts.items()
            for seq, text in zip(seqs[app][:-1], ts[:-1], strict=True)
        )
        dropped = set()
        for seq, size in older:
            if excess <= 0:
                break
            dropped.add(seq)
            excess -= size + 1  # ASCII: json.dumps escapes everything else
        for app, ts in texts.items():
            left = [
                (seq, text) for seq, text in zip(seqs[app], ts, strict=True) if seq not in dropped
            ]
            self._apps[app] = _Kept.of([seq for seq, _ in left], [text for _, text in left])
        log.warning(
            "keter: the deploy history would pass %d bytes; dropped its %d oldest entries",
            self.budget,
            len(dropped),
        )


# -- reading a file that may be damaged -------------------------------------------------


def _parse(text: str) -> tuple[int, dict[str, list[dict]], str | None]:
    """(seq, entries per app, what was wrong or None) from a history file's text.

    The file is read as JSON when it is whole; else entry by entry, keeping
    everything before the damage. Each entry is checked and cleaned (``_entry``).
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        seq, apps = _salvage(text)
        return seq, apps, f"not valid JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("apps"), dict):
        return 0, {}, "unexpected layout"
    seq = data.get("seq")
    apps: dict[str, list[dict]] = {}
    problem = None if _is_int(seq) else "no sequence number"
    for name, raw_entries in data["apps"].items():
        raw_list = raw_entries if isinstance(raw_entries, list) else []
        entries = _entries(name, raw_list)
        if entries is None or len(entries) != len(raw_list) or raw_list is not raw_entries:
            problem = problem or "unexpected entries"
        if entries:
            apps[name] = entries
    return (seq if _is_int(seq) else 0), apps, problem


def _salvage(text: str) -> tuple[int, dict[str, list[dict]]]:
    """The entries before the first damage in ``{"seq":N,"apps":{"APP":[{...},...],...}}``."""
    decoder = json.JSONDecoder()
    apps: dict[str, list[dict]] = {}
    seq = 0
    at = text.find('"seq"')
    if at >= 0:
        try:
            value, _ = decoder.raw_decode(text, _skip(text, at + 5, ":"))
            seq = value if _is_int(value) else 0
        except (ValueError, IndexError):
            pass
    at = text.find('"apps"')
    if at < 0:
        return seq, apps
    try:
        pos = _skip(text, _skip(text, at + 6, ":"), "{")
        while text[_ws(text, pos)] != "}":
            name, pos = decoder.raw_decode(text, _ws(text, pos))
            pos = _skip(text, _skip(text, pos, ":"), "[")
            found: list[object] = []
            try:
                while text[_ws(text, pos)] != "]":
                    value, pos = decoder.raw_decode(text, _ws(text, pos))
                    found.append(value)
                    pos = _ws(text, pos)
                    if text[pos] == ",":
                        pos += 1
                pos = _ws(text, pos) + 1
            finally:  # the entries before the damage count, even in a list cut short
                entries = _entries(name, found) if isinstance(name, str) else None
                if entries:
                    apps[name] = entries
            pos = _ws(text, pos)
            if text[pos] == ",":
                pos += 1
    except (ValueError, IndexError):
        pass
    return seq, apps


def _ws(text: str, pos: int) -> int:
    while text[pos] in " \t\r\n":
        pos += 1
    return pos


def _skip(text: str, pos: int, char: str) -> int:
    pos = _ws(text, pos)
    if text[pos] != char:
        raise ValueError(f"expected {char!r} at {pos}")
    return pos + 1


def _entries(app: object, raw: list[object]) -> list[dict] | None:
    """The app's valid entries in sequence order; None if the app's name is not valid."""
    try:
        validate_app_name(app)
    except ValueError:
        return None
    entries = [entry for item in raw if (entry := _entry(item)) is not None]
    return sorted(entries, key=lambda e: e["seq"])


def _entry(raw: object) -> dict | None:
    """A stored entry checked field by field, its texts capped; None without a sequence number."""
    if not isinstance(raw, dict) or not _is_int(raw.get("seq")) or raw["seq"] <= 0:
        return None
    entry: dict[str, object] = {"seq": raw["seq"]}
    for key in _NUMBER_FIELDS:
        value = raw.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        entry[key] = value if ok else 0.0
    for key, limit in _TEXT_FIELDS.items():
        value = raw.get(key)
        entry[key] = capped_text(value, limit) if isinstance(value, str) else None
    entry["version"] = entry["version"] or ""
    entry["sha256"] = entry["sha256"] or ""
    entry["outcome"] = entry["outcome"] or "unknown"
    reason = raw.get("reason")
    entry["reason"] = capped_text(reason, REASON_LIMIT) if isinstance(reason, str) else ""
    return entry


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
