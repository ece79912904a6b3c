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
from keter.nginx.render import support_dir

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
# As they really are: on a merged-/usr system /bin is /usr/bin.
_SYSTEM_REAL = frozenset(Path(os.path.realpath(p)) for p in SYSTEM_FOLDERS) | SYSTEM_FOLDERS


NOT_ROOT = (
    "keter must run as root: it runs each app as a user of its own and writes nginx's "
    "config and the kernel's rules"
)


def user_problems(*, euid: int | None = None) -> list[str]:
    """Whether keter runs as root: checked first, before it reads anything."""
    return [NOT_ROOT] if (os.geteuid() if euid is None else euid) != 0 else []


def problems(root: Path, config_file: Path, *, nginx_config: Path | None = None) -> list[str]:
    """Why keter must not run on ``root`` (a real path: ``load_config`` resolves it)
    with its ``config_file`` and nginx's ``nginx_config``; [] if it may."""
    found = []
    text = str(root)
    try:
        names.validate_nginx_file_path(text)
    except ValueError as exc:
        return [f"ROOT {names.log_text(text)}: {exc}"]
    resolved = root.resolve()
    if resolved in _SYSTEM_REAL:
        found.append(
            f"ROOT is {text}, a system folder: keter would take over its etc/, run/ and "
            "log/; give keter a folder of its own (e.g. /opt/keter)"
        )
    found += file_problems(resolved)
    for folder in KETERS_FOLDERS:
        found += _own_folder_problems(resolved / folder)
    # incoming/ may be the status-group's to write (2770), but is keter's folder.
    found += _own_folder_problems(resolved / "incoming", group_writes=True)
    if nginx_config is not None:
        # keter writes beside it as root (its support folder, a lock) and removes there.
        found += file_problems(nginx_config.parent)
        found += _own_folder_problems(support_dir(nginx_config))
    # The chains share their upper folders: a problem with one is said once.
    return list(dict.fromkeys(found + file_problems(config_file)))


def file_problems(path: Path) -> list[str]:
    """Why keter must not use ``path`` (its config, nginx's folder): it, or a folder on
    the way to it, may be changed by someone other than root. ``path`` is taken as
    it is, links and all: a link on the way is refused unless root alone may change
    the folder it lies in (the caller resolves it once and uses what it resolved)."""
    found = []
    path = Path(os.path.abspath(path))
    for part in [path, *path.parents]:
        found += _owner_problems(part, above=part != path)
        if part.is_symlink():
            found += file_problems(Path(os.path.realpath(part)))
    return found


def _own_folder_problems(path: Path, *, group_writes: bool = False) -> list[str]:
    """One of keter's folders: a folder (never a link: keter's writes as root would go
    where it leads), root's, written by no one else (but its group where ``group_writes``)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return []  # keter makes it, as root
    except OSError as exc:
        return [f"cannot check {path}: {exc.strerror}"]
    if not stat.S_ISDIR(info.st_mode):
        return [f"{path} is not a folder (a link?): keter keeps its own files there"]
    return _owner_problems(path, above=False, group_writes=group_writes)


def _owner_problems(path: Path, *, above: bool, group_writes: bool = False) -> list[str]:
    """``path`` itself (a link is not followed: its folder is what counts)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return []  # keter makes it, as root
    except OSError as exc:
        return [f"cannot check {path}: {exc.strerror}"]
    if stat.S_ISLNK(info.st_mode):
        return []  # a link's own owner and mode change nothing; its folder's do
    found = []
    if info.st_uid != 0:
        found.append(
            f"{path} is owned by uid {info.st_uid}, not root: its owner could change what "
            "keter runs as root"
        )
    writable = info.st_mode & (stat.S_IWOTH if group_writes else stat.S_IWGRP | stat.S_IWOTH)
    sticky = above and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if writable and not sticky:
        found.append(
            f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): they "
            "could change what keter runs as root"
        )
    return found
