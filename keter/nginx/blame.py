"""Which apps an ``nginx -t`` failure is about, from the files nginx names.

nginx names the file it choked on: ``... in /path/file.conf:12`` for a bad
directive, the quoted path for a file it cannot open or load (``cannot load
certificate "/path/x.crt"``, ``open() "/path/site.conf" failed``). Every
file nginx reads for a site is that site's own (its site file and its copies
in its own folder, or a shared certificate it names), so a path points at
the apps that use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

# A quoted path, or the file of "in FILE:LINE".
_PATHS = re.compile(r'"(/[^"]+)"|\bin (/\S+?):\d+')


def paths_named(error: str) -> set[Path]:
    """Every absolute file path nginx's error text names."""
    return {Path(quoted or located) for quoted, located in _PATHS.findall(error)}


def apps_named(error: str, files: Mapping[str, frozenset[Path]]) -> set[str]:
    """The apps whose files (``files[app]``, or anything in their folder) the error names."""
    named = paths_named(error)
    apps = set()
    for app, used in files.items():
        folders = {path.parent for path in used if path.suffix == ".conf"}
        if any(path in used or path.parent in folders for path in named):
            apps.add(app)
    return apps
