"""The fault suites' shared parts: reading keter's ERROR records, what may change on disk,
and the ``Rig`` (one keter serving one good app, at which bad bundles are dropped)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from support.bundles import make_bundle, webapp_config
from support.daemon import KeterDaemon, keter_settings
from support.net import app_port_range, body, served
from support.nginx import PrivateNginx
from support.wait import wait_for

GOOD = "good.test"
# keter's log without the journal's priority prefixes: one timestamp per record.
NO_JOURNAL = {"JOURNAL_STREAM": ""}
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+")


# -- reading keter's log ---------------------------------------------------------------


def error_records(text: str) -> list[str]:
    """The ERROR and CRITICAL records of a stretch of keter's log, continuation lines joined.

    The supervisor's ``APP: last output:`` record, which only carries the app's
    output for the failure line logged just before it, is left out.
    """
    records: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = _RECORD.match(line)
        if match:
            records.append((match.group(1), line[match.end() :]))
        elif records:
            level, message = records[-1]
            records[-1] = (level, f"{message}\n{line}")
    return [
        message
        for level, message in records
        if level in ("ERROR", "CRITICAL") and not re.match(r"[\w.-]+: last output:", message)
    ]


def assert_one_error(text: str, name: str, *fragments: str) -> str:
    """Exactly one ERROR record, one physical line starting with ``name:``, holding every
    fragment (the rule that was broken); returns it."""
    errors = error_records(text)
    assert len(errors) == 1, errors
    [line] = errors
    assert line.startswith(f"{name}: "), line
    assert "\n" not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# -- what may change on disk -------------------------------------------------------------


def snapshot(base: Path, skip: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """(size, mtime, mode) of everything under ``base`` except the relative paths in ``skip``."""
    found = {}
    for folder, dirs, files in os.walk(base):
        rel_folder = os.path.relpath(folder, base)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_folder, d)) not in skip]
        for name in [*dirs, *files]:
            rel = os.path.normpath(os.path.join(rel_folder, name))
            if rel in skip:
                continue
            st = os.lstat(os.path.join(folder, name))
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            found[rel] = (size, st.st_mtime_ns, st.st_mode)
    return found


# -- nginx and ports ---------------------------------------------------------------------


def settled_generation(nginx: PrivateNginx) -> int:
    """The generation in nginx's config file, once nginx serves it and no older one.

    Right after a reload nginx's old workers still answer for a moment with the
    previous generation, so a single look at /generation can see either.
    """
    generation = int(re.search(r"^# generation (\d+)$", nginx.config_file.read_text(), re.M)[1])
    nginx.wait_generation(generation)
    return generation


# -- one keter serving one good app, shared by a module's cases ----------------------------


class Rig:
    """A private nginx and a keter on ``base``, serving GOOD; bad bundles are dropped at it."""

    # Keter's own folders (written freely), the nginx's logs, and the test's own bundles.
    OWN = ("root", "root-keter.log", "nginx/logs", "nginx/temp", "bundles")

    def __init__(self, base: Path, *, wrapper: tuple[str, ...] = (), **settings: object) -> None:
        self.base = base
        self.bundles = base / "bundles"
        self.bundles.mkdir()
        self.nginx = PrivateNginx(base / "nginx")
        settings = {"port-range": app_port_range(), **settings}
        self.keter = KeterDaemon(
            base / "root", keter_settings(self.nginx, **settings), wrapper=wrapper
        )
        try:
            self.nginx.start()
            self.keter.start(env=NO_JOURNAL)
            good = make_bundle(self.bundles / "good.keter", config=webapp_config(GOOD, "g1"))
            self.keter.drop(good)
            served(self.nginx, GOOD, "g1")
            wait_for(lambda: "good: deploy #1 now serving" in self.keter.log(), 10, "good")
        except BaseException as exc:
            # No fixture will close a rig that was never made: leave no process behind.
            exc.add_note(f"keter's log:\n{self.keter.log()[-4000:]}")
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.keter.proc is not None and self.keter.proc.poll() is None:
                self.keter.stop()
        finally:
            self.nginx.stop()

    # -- one case ------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """What must not change while a bad bundle is refused."""
        return {
            "log": len(self.keter.log()),
            "config": self.nginx.config_file.read_bytes(),
            "generation": settled_generation(self.nginx),
            "outside": snapshot(self.base, self.OWN),
            "etc": (self.keter.root / "etc" / "keter-config.yaml").read_bytes(),
        }

    def log_since(self, checkpoint: dict) -> str:
        return self.keter.log()[checkpoint["log"] :]

    def drop(self, name: str, data: bytes) -> Path:
        path = self.bundles / name
        path.write_bytes(data)
        return self.keter.drop(path)

    def refused(self, checkpoint: dict, app: str, *fragments: str, marker: str = "") -> str:
        """Wait for ``app``'s refusal, check the invariants, remove its bundle; the error line."""
        wait_for(
            lambda: re.search(rf"^.*ERROR\s+{re.escape(app)}: ", self.log_since(checkpoint), re.M),
            30,
            f"{app} to be refused",
        )
        line = assert_one_error(self.log_since(checkpoint), app, *fragments)
        self.assert_unchanged(checkpoint, marker)
        (self.keter.incoming / f"{app}.keter").unlink(missing_ok=True)
        return line

    def assert_unchanged(self, checkpoint: dict, marker: str = "") -> None:
        assert body(self.nginx, GOOD) == b"g1\n"
        assert self.nginx.config_file.read_bytes() == checkpoint["config"]
        self.nginx.wait_generation(checkpoint["generation"])
        assert snapshot(self.base, self.OWN) == checkpoint["outside"]
        assert (self.keter.root / "etc" / "keter-config.yaml").read_bytes() == checkpoint["etc"]
        wait_for(
            lambda: [p.name for p in (self.keter.root / "temp").iterdir()] == ["good-1"],
            10,
            "only the good app's folder in temp/",
        )
        if marker:
            # Wherever a link could have led a write: the test's tree, /tmp and ROOT's parents.
            places = [Path("/tmp"), *self.keter.root.parents]
            assert [p for p in places if (p / marker).exists()] == []
            assert list(self.base.rglob(f"*{marker}*")) == []


# -- an app's process -------------------------------------------------------------------------


def limits_of(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits as {name: (soft, hard)}."""
    limits = {}
    with open(f"/proc/{pid}/limits") as f:
        next(f)
        for line in f:
            match = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
            if match:
                limits[match[1]] = (match[2], match[3])
    return limits
