"""What keter checks of itself and its ROOT before it touches anything there.

keter runs as root and takes ROOT as its own: it makes ``etc/``, ``run/`` and
``log/`` there owner-only, removes half-written files it finds in them, and runs
the commands ``ROOT/etc/keter-config.yaml`` names (``reload-command``). So ROOT
must be a folder of keter's own, and nobody but root may change what keter
reads there:

* not a system folder (``keter /root/keter-config.yaml`` makes ROOT ``/``, and
  keter made ``/etc`` 0700, breaking every other service);
* ROOT, every folder above it, ``etc/`` and the config file owned by root and
  writable by nobody else (sshd's StrictModes): whoever owns ROOT could write a
  config whose ``reload-command`` keter runs as root. A sticky folder above
  ROOT (``/tmp``) is fine: nobody else can rename what root made in it;
* a path nginx's config can name as it is (the access spool, certificates and
  static files live under ROOT): the shared grammar of file paths nginx reads
  (``names.validate_nginx_file_path``: no ``$``, ``;``, braces, quotes or backslash).

keter then runs on ROOT's real path (``os.path.realpath``, keter.cli): a link on
the way, re-pointed later by whoever may, changes nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from keter import names

# ROOT's folders keter writes as root (a link planted in one, say log/app-NAME.log, led
# keter's writes elsewhere); incoming/ is the status-group's to write when one is set.
KETERS_FOLDERS = ("etc", "log", "run", "temp", "data", "backups", "archive")

# Folders that belong to the system: keter would take over their etc/, run/ and log/.
SYSTEM_FOLDERS = frozenset(
    Path(p)
    for p in (
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/local",
        "/var",
        "/var/lib",
        "/var/tmp",
    )
)


def problems(root: Path, config_file: Path, *, euid: int | None = None) -> list[str]:
    """Why keter must not run on ``root`` (with its ``config_file``); [] if it may."""
    found = []
    if (os.geteuid() if euid is None else euid) != 0:
        found.append(
            "keter must run as root: it runs each app as a user of its own and writes "
            "nginx's config and the kernel's rules"
        )
    text = str(root)
    try:
        names.validate_nginx_file_path(text)
    except ValueError as exc:
        return [*found, f"ROOT {names.log_text(text)}: {exc}"]
    if root in SYSTEM_FOLDERS or root.resolve() in SYSTEM_FOLDERS:
        found.append(
            f"ROOT is {text}, a system folder: keter would take over its etc/, run/ and "
            "log/; give keter a folder of its own (e.g. /opt/keter)"
        )
    resolved = root.resolve()
    for folder in [resolved, *resolved.parents]:
        found += _owner_problems(folder, above=folder != resolved)
    for folder in KETERS_FOLDERS:
        found += _owner_problems(root / folder, above=False)
    return found + file_problems(config_file)


def file_problems(path: Path) -> list[str]:
    """Why keter must not read ``path`` (its config): it, or a folder on the way to
    where it really is, may be changed by someone other than root. Checked before the
    file is read, and again with ROOT's checks."""
    real = Path(os.path.realpath(path))
    found = _owner_problems(real, above=False)
    for folder in real.parents:
        found += _owner_problems(folder, above=True)
    return found


def _owner_problems(path: Path, *, above: bool) -> list[str]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return []  # keter makes it, as root
    except OSError as exc:
        return [f"cannot check {path}: {exc.strerror}"]
    found = []
    if info.st_uid != 0:
        found.append(
            f"{path} is owned by uid {info.st_uid}, not root: its owner could change what "
            "keter runs as root"
        )
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky = above and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if writable and not sticky:
        found.append(
            f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): they "
            "could change what keter runs as root"
        )
    return found
