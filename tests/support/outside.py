"""The suite writes nothing outside its own folders: a check around the whole run.

Every fixture keeps its files under pytest's temporary folders (nginx, PostgreSQL,
keter's root, ...). A test that forgets to, e.g. by leaving nginx's config file at its
default under /etc/nginx, passes on a machine where that folder happens to exist and
writes into the machine's own configuration. The run snapshots the machine's folders
keter could plausibly write to, and fails when any of them changed.
"""

from __future__ import annotations

import os

import pytest

# Where a keter that ignored its root would write: nginx's and systemd's configuration,
# the setup script's install folders, web roots, the operator's home.
WATCHED = ("/etc", "/opt", "/srv", "/usr/local/bin", "/usr/local/sbin", "/var/www", "/home")

Snapshot = dict[str, tuple[int, int, int]]


def snapshot(roots: tuple[str, ...] = WATCHED) -> Snapshot:
    """Every entry under ``roots``: its mode, size and modification time (links not followed)."""
    found: Snapshot = {}
    stack = [root for root in roots if os.path.isdir(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            found[entry.path] = (info.st_mode, info.st_size, info.st_mtime_ns)
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return found


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs between two snapshots, one line per path, sorted."""
    lines = [f"new: {path}" for path in after.keys() - before.keys()]
    lines += [f"removed: {path}" for path in before.keys() - after.keys()]
    lines += [
        f"changed: {path}" for path in before.keys() & after.keys() if before[path] != after[path]
    ]
    return sorted(lines)


_KEY = pytest.StashKey[Snapshot]()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # an xdist worker: the controller checks once


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        session.config.stash[_KEY] = snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_worker(session.config) or _KEY not in session.config.stash:
        return
    found = changes(session.config.stash[_KEY], snapshot())
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = "the tests wrote outside their own folders:\n  " + "\n  ".join(found[:40])
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("=", "writes outside the tests' folders", red=True)
        reporter.write_line(text)
    else:
        print(text)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
