"""Building bundles: the one ``make_bundle``, tar members for hostile archives, configs.

``make_bundle`` writes a NAME.keter gzip tarball (or, with ``unpacked=True``, the
folder keter would unpack it to) from a config, files, folders, no-op executables,
an app script and raw tar members of any type. ``bundle_bytes`` is the same
tarball in memory; ``bundle_entries`` what either holds.
"""

from __future__ import annotations

import gzip
import io
import re
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

APPS = Path(__file__).resolve().parent.parent / "apps"
# The app most tests deploy: answers its VERSION (and /env, /pid, ...).
VERSIONED_APP = APPS / "versioned_app.py"
NO_OP = b"#!/bin/sh\nexit 0\n"

Member = tuple[tarfile.TarInfo, bytes | None]


def bundle_entries(
    *,
    config: dict | str | bytes | None,
    config_name: str = "keter.yaml",
    files: Mapping[str, bytes | str] | None = None,
    executables: Iterable[str] = (),
    folders: Iterable[str] = (),
    app_source: Path | None = VERSIONED_APP,
    interpreter: str = sys.executable,
) -> dict[str, tuple[bytes | None, int]]:
    """``{path: (data, mode)}`` of a bundle; data None is a folder (see ``make_bundle``)."""
    entries: dict[str, tuple[bytes | None, int]] = {}
    for name in folders:
        entries[name] = (None, 0o755)
    if config is not None:
        if isinstance(config, dict):
            config = yaml.safe_dump(config)
        data = config.encode() if isinstance(config, str) else config
        entries[f"config/{config_name}"] = (data, 0o644)
    if app_source is not None:
        lines = app_source.read_text().split("\n", 1)
        source = lines[1] if lines[0].startswith("#!") else app_source.read_text()
        entries["bin/app"] = (f"#!{interpreter}\n{source}".encode(), 0o755)
    for name in executables:
        entries[name] = (NO_OP, 0o755)
    for name, data in (files or {}).items():
        entries[name] = (data.encode() if isinstance(data, str) else data, 0o644)
    return entries


def bundle_bytes(*, members: Iterable[Member] = (), **contents: Any) -> bytes:
    """A gzip tarball in memory; see ``make_bundle``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, (data, mode) in bundle_entries(**contents).items():
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, int(time.time())
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            # Raw members go in as they are: any type, name, mode or link.
            info.size = len(data or b"") if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data or b"") if info.isfile() else None)
    return buf.getvalue()


def make_bundle(
    path: Path, *, members: Iterable[Member] = (), unpacked: bool = False, **contents: Any
) -> Path:
    """Write a bundle at ``path``; returns ``path``.

    ``contents`` are ``bundle_entries``' keywords:

    - ``config``: config/``config_name`` (a dict is dumped as YAML; None: no config).
    - ``files``: more files (mode 0644), ``folders``: empty folders,
      ``executables``: no-op shell scripts (mode 0755), by path inside the bundle.
    - ``app_source``: copied to bin/app (0755) with ``interpreter`` (default: the
      tests' own Python) in its shebang, so the app runs with it whatever PATH
      keter gives it. None: no bin/app.

    ``members``: raw tar members (see ``member``), added last, as they are.
    ``unpacked``: write the folder keter would unpack the bundle to, not a tarball.
    """
    if not unpacked:
        path.write_bytes(bundle_bytes(members=members, **contents))
        return path
    if members:
        raise ValueError("raw tar members need a tarball, not an unpacked folder")
    path.mkdir(parents=True)
    for name, (data, mode) in bundle_entries(**contents).items():
        target = path / name
        if data is None:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
    return path


# -- raw tar members, for hostile archives ---------------------------------------------------


def member(name: str, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    """One tar member named ``name``; ``attrs`` set any TarInfo field (type, linkname, ...)."""
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def config_member(host: str = "evil.test") -> tuple[tarfile.TarInfo, bytes]:
    """config/keter.yaml of a web app on ``host`` (bin/app need not exist)."""
    return member("config/keter.yaml", f"exec: ../bin/app\nhost: {host}\n".encode())


class Zeros:
    """A file object of ``size`` zero bytes that never holds them all in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def zero_gzip(path: Path, compressed_size: int) -> Path:
    """A complete gzip file of about ``compressed_size`` bytes that inflates to about
    1000 times as many zeros: one member of deflated zeros, repeated (gzip allows
    concatenated members), so it is made in a second rather than a minute."""
    member = gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        for _ in range(max(1, compressed_size // len(member))):
            f.write(member)
    return path


# -- configs ------------------------------------------------------------------------------


# What a hostile app prints: a window title, clear screen, colours, a carriage return that
# would overwrite the line, a C1 CSI, HTML and a right-to-left override.
NOISE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\x1b[0m\rFORGED \x9b31m <b>bold</b> \u202egnp.exe"
NOISE_SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mRED\\x1b[0m\\rFORGED \\x9b31m <b>bold</b>"
TERMINAL_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def noisy_app(tmp_path: Path) -> Path:
    """tests/apps/versioned_app.py that first prints NOISE on its stdout."""
    source = (APPS / "versioned_app.py").read_text()
    future = "from __future__ import annotations\n"
    noise = f"import sys\nsys.stdout.write({NOISE!r} + '\\n')\nsys.stdout.flush()\n"
    path = tmp_path / "noisy_app.py"
    path.write_text(source.replace(future, future + noise, 1))
    return path


def webapp_config(host: str, version: str, **extra) -> dict:
    """A bundle config for tests/apps/versioned_app.py answering ``version``."""
    config = {"exec": "../bin/app", "host": host, "env": {"VERSION": version}}
    env = extra.pop("env", {})
    config["env"].update(env)
    config.update(extra)
    return config
