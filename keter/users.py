"""One uid and gid per app (TEAM decision 6, issue 11), in the manner of
systemd's DynamicUser: numbers without a passwd entry, allocated by keter
from a range it owns, stable across deploys and keter restarts.

The range's default lies in the gap systemd documents as unused
(1879048192-2147483647: above its container range, below 2^31): far above
Debian's system (0-999) and human (1000-59999) ranges and its reserved ones
(policy 9.2.2), and above the subordinate ranges ``useradd`` hands out
(``/etc/subuid`` from 100000, 65536 each). Every number actually used is
checked too: one that ``/etc/passwd``/``/etc/group`` know, or that lies in
an ``/etc/subuid``/``/etc/subgid`` range, is skipped.

The allocation is recorded in ``ROOT/etc/app-users.json`` (``{"app": uid}``,
gid = uid), written atomically before the number is first used, so an app
keeps its uid for good: its files, data and anything it left stay its own.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import pwd
import stat
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

from keter.fsutil import atomic_write

log = logging.getLogger(__name__)

NGINX_GROUP = "www-data"  # Debian's nginx workers run as www-data

USERS_FILE = "app-users.json"
DEFAULT_RANGE = (1_900_000_000, 1_900_999_999)


class NoFreeUid(Exception):
    pass


def subordinate_ranges(paths: tuple[str, ...] = ("/etc/subuid", "/etc/subgid")) -> list[range]:
    """The ``/etc/subuid`` and ``/etc/subgid`` ranges (``name:first:count`` lines)."""
    ranges = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                first, count = int(parts[1]), int(parts[2])
                ranges.append(range(first, first + count))
    return ranges


NO_UID = (1 << 32) - 1  # (uid_t)-1: "leave it unchanged" to setresuid, setpriv and Popen


def _known(uid: int) -> bool:
    """Whether the system already uses ``uid`` as a user or group id."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def tools_key(app: str) -> str:
    """The name under which ``AppUsers`` keeps the uid of the programs keter runs for
    ``app`` but apart from it (its database tools, keter.backups). "/" is in no app name."""
    return f"{app}/tools"


class UsersFileError(Exception):
    """etc/app-users.json cannot be trusted: keter does not start (one line says why)."""


class AppUsers:
    """Allocates and remembers each app's uid (= its gid), and its tools'. Thread-safe."""

    def __init__(self, etc_dir: Path, uid_range: tuple[int, int] = DEFAULT_RANGE) -> None:
        self.path = Path(etc_dir) / USERS_FILE
        self.low, self.high = uid_range
        self._lock = threading.Lock()
        self._uids: dict[str, int] = self._load()

    def uid(self, app: str) -> int:
        """The app's uid (and gid), allocated and recorded on first use."""
        with self._lock:
            uid = self._uids.get(app)
            if uid is not None:
                return uid
            uid = self._free_uid()
            uids = {**self._uids, app: uid}
            # Recorded before first use: a crash after this never hands it out twice.
            atomic_write(self.path, json.dumps(uids, indent=1, sort_keys=True).encode(), mode=0o600)
            self._uids = uids
            log.info("%s: runs as uid %d and gid %d of its own", app, uid, uid)
            return uid

    def known(self) -> dict[str, int]:
        with self._lock:
            return dict(self._uids)

    def _free_uid(self) -> int:
        used = set(self._uids.values())
        avoid = subordinate_ranges()
        for uid in range(self.low, self.high + 1):
            if uid in used or any(uid in r for r in avoid) or _known(uid):
                continue
            return uid
        raise NoFreeUid(f"no free uid in {self.low}-{self.high} ({len(used)} apps have one)")

    def _load(self) -> dict[str, int]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Refusing to start is better than handing an app another app's files.
            raise UsersFileError(f"cannot read {self.path}: {exc}") from None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in raw.items()
        ):
            raise UsersFileError(f"{self.path}: expected a mapping of app names to uids")
        owners: dict[int, str] = {}
        for name, uid in sorted(raw.items()):
            # Root's, none at all, or (uid_t)-1, which setresuid reads as "unchanged":
            # an app given it ran as root.
            if not 0 < uid < NO_UID:
                raise UsersFileError(f"{self.path}: {name} has uid {uid}")
            if _known(uid):  # the app could read and change what that user owns
                raise UsersFileError(f"{self.path}: {name}'s uid {uid} is the system's")
            if uid in owners:  # two apps would read and change each other's files
                raise UsersFileError(f"{self.path}: {owners[uid]} and {name} share uid {uid}")
            owners[uid] = name
        return raw


def app_users(etc_dir: Path, uid_range: tuple[int, int], *, setuid: str | None, as_root: bool):
    """Who apps run as, from keter-config.yaml: AppUsers (the default), or None when
    ``setuid`` names one user for all apps or the operator opted in to root."""
    if setuid:
        log.info("keter: every app runs as %s (setuid): apps can read each other's files", setuid)
        return None
    if as_root:
        log.warning(
            "keter: apps run as root (run-apps-as-root): any app can read and change every "
            "other app, keter and the machine; remove the key to give each app its own user"
        )
        return None
    return AppUsers(etc_dir, uid_range)


def secure_folder(folder: Path, gid: int) -> None:
    """Make an unpacked bundle readable by its app alone (issue 11.2).

    Everything becomes root-owned with the app's group: the group gets the
    owner's read and execute bits, never write, and "other" gets nothing, so
    neither another app nor a local user can read its config, secrets or code.
    Symbolic links are re-owned, never followed.
    """
    os.lchown(folder, 0, gid)
    os.chmod(folder, 0o750)
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            os.lchown(path, 0, gid)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue
            owner = mode & 0o700
            os.chmod(path, owner | ((owner & 0o500) >> 3))


def publish_static(folder: Path, roots: Iterable[Path], nginx_group: str = NGINX_GROUP) -> None:
    """Open a bundle's static roots (made the app's alone by ``secure_folder``) to nginx's
    workers: they run as a user of their own (Debian's www-data), and answered 403 for
    every file. A POSIX ACL gives their group read on the roots' folders and files and
    passage through the folders on the way from the bundle's top, nothing else: a root
    behind basic-auth or ``local`` stays unreadable to other apps and local users. Links
    are never followed (nginx serves none: ``disable_symlinks``).

    Where the file system has no ACLs, or the group is missing, "other" gets those bits
    instead, said once: then every local user reads the roots."""
    top = Path(os.path.realpath(folder))
    try:
        gid: int | None = grp.getgrnam(nginx_group).gr_gid
    except KeyError:
        gid = None
        log.warning(
            "unpacker: no group %s (nginx's workers): static roots are opened to every local user",
            nginx_group,
        )
    # Each path once, with every bit any root asks for: an ACL is written whole, so a
    # root nested in another, handled after it, took back the outer root's listing (r).
    wanted: dict[Path, int] = {}
    for root in roots:
        root = Path(root)
        if root != top and top not in root.parents:
            raise ValueError(f"static root {root} is outside {top}")
        for path in [top, *(top / part for part in _parts_between(top, root))]:
            wanted[path] = wanted.get(path, 0) | 0o1
        for parent, _dirs, files in os.walk(root):  # links to folders: not walked
            wanted[Path(parent)] = wanted.get(Path(parent), 0) | 0o5
            for name in files:
                wanted[Path(parent) / name] = wanted.get(Path(parent) / name, 0) | 0o4
    for path, bits in wanted.items():
        gid = _open_to(path, gid, bits)


def _parts_between(top: Path, root: Path) -> list[Path]:
    """``top``'s descendants down to ``root`` (included), as paths relative to ``top``."""
    relative = root.relative_to(top).parts
    return [Path(*relative[: n + 1]) for n in range(len(relative))]


# struct posix_acl_xattr_header and _entry (linux/posix_acl_xattr.h), little-endian.
_ACL_VERSION = 2
_USER_OBJ, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _open_to(path: Path, gid: int | None, bits: int) -> int | None:
    """``bits`` (r=4, x=1) for group ``gid`` on ``path`` by an ACL, unless it is a link;
    for "other" where ACLs cannot be (then None: the rest goes the same way)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return gid
    if gid is not None:
        owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
        entries = (
            (_USER_OBJ, owner, _NO_ID),
            (_GROUP_OBJ, group, _NO_ID),
            (_GROUP, bits, gid),
            (_MASK, group | bits, _NO_ID),  # the mask (the mode's group bits) keeps group's
            (_OTHER, other, _NO_ID),
        )
        acl = struct.pack("<I", _ACL_VERSION)
        acl += b"".join(struct.pack("<HHI", *entry) for entry in entries)
        try:
            os.setxattr(path, "system.posix_acl_access", acl, follow_symlinks=False)
            return gid
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            log.warning(
                "unpacker: %s has no POSIX ACLs: static roots are opened to every local user",
                path,
            )
    os.chmod(path, stat.S_IMODE(mode) | bits)
    return None
