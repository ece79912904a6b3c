"""The files nginx reads besides keter's config: htpasswd files and joined certificates.

They live in a hidden folder beside the config file, ``.NAME.d``: hidden,
because Debian's ``include sites-enabled/*`` would read anything else there as
config. The folder is setgid to the group nginx's workers run as, so htpasswd
files (mode 0640) are readable by root and nginx only.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from keter.fsutil import atomic_write
from keter.messages import BasicAuth, Site
from keter.nginx.render import ListenerLike, is_tls, listener_chain_file

COMMAND_TIMEOUT = 30.0


def support_dir(config_file: Path) -> Path:
    """The hidden folder beside ``config_file`` for the files its config names."""
    config_file = Path(config_file)
    return config_file.parent / f".{config_file.name}.d"


class SupportFiles:
    """Writes the files a set of sites needs and removes those no site needs any more."""

    def __init__(self, support: Path, auth_group: str | None) -> None:
        """``auth_group`` is the group of nginx's workers (Debian's www-data); when no
        such group exists, the files keep root's group."""
        self.support = support
        self.auth_group = auth_group
        # Hashes by sha256(user, password): unchanged passwords keep their hash
        # (and salt), so an unchanged htpasswd file is not rewritten.
        self._hashes: dict[bytes, str] = {}

    def write(self, sites: Sequence[Site], listeners: Sequence[ListenerLike]) -> set[Path]:
        """Write every htpasswd and joined certificate file; returns all their paths.

        Raises OSError or ValueError (a file outside the folder, a bad user name).
        """
        wanted: dict[Path, tuple[bytes, int]] = {}
        for site in sites:
            for route in site.all_routes:
                if route.basic_auth is not None:
                    data = self._htpasswd(route.basic_auth)
                    wanted[Path(route.basic_auth.user_file)] = (data, 0o640)
                if route.tls is not None and route.tls.chain:
                    files = (route.tls.certificate, *route.tls.chain)
                    wanted[Path(route.tls.combined)] = (_joined(files), 0o644)
        for listener in listeners:
            if is_tls(listener) and getattr(listener, "chain", ()):
                files = (listener.certificate, *listener.chain)
                wanted[listener_chain_file(self.support, listener)] = (_joined(files), 0o644)
        if not wanted:
            return set()
        self._make_folder()
        for path, (data, mode) in wanted.items():
            if path.parent != self.support:
                raise ValueError(f"{path} is not in {self.support}")
            with contextlib.suppress(OSError):
                if path.read_bytes() == data:
                    continue
            atomic_write(path, data, mode=mode)
        return set(wanted)

    def prune(self, wanted: set[Path]) -> None:
        """Remove files no config names any more (a removed app's htpasswd)."""
        try:
            present = list(self.support.iterdir())
        except OSError:
            return
        for path in present:
            if path not in wanted and path.suffix in (".htpasswd", ".crt"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _make_folder(self) -> None:
        self.support.mkdir(mode=0o750, exist_ok=True)
        gid = -1
        if self.auth_group is not None:
            with contextlib.suppress(KeyError):
                gid = grp.getgrnam(self.auth_group).gr_gid
        os.chown(self.support, -1, gid)
        # setgid: files created inside take the folder's group, already at creation.
        os.chmod(self.support, 0o2750)

    def _htpasswd(self, auth: BasicAuth) -> bytes:
        lines = []
        for user, password in auth.credentials:
            if not user or ":" in user or any(ord(c) < 0x21 for c in user):
                raise ValueError(f"invalid basic-auth user name {user!r}")
            digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
            if digest not in self._hashes:
                self._hashes[digest] = hash_password(password)
            lines.append(f"{user}:{self._hashes[digest]}\n")
        return "".join(lines).encode()


def hash_password(password: str) -> str:
    """The password as SHA-512 crypt (``$6$``, random salt, 5000 rounds).

    nginx checks htpasswd entries with the system's crypt(3), which reads
    ``$6$`` everywhere glibc or libxcrypt runs; its alternatives are {SSHA}
    (one salted SHA-1, far quicker to brute-force) and {PLAIN}. The openssl
    CLI makes the hash because Python's crypt module is deprecated. The
    password goes through a pipe, never the command line.
    """
    if "\n" in password or "\r" in password or not password:
        raise ValueError("a basic-auth password is empty or has a line break")
    try:
        result = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"cannot hash a basic-auth password with openssl: {exc}") from None
    hashed = result.stdout.strip()
    if result.returncode != 0 or not hashed.startswith("$6$"):
        raise ValueError(f"openssl passwd failed: {result.stderr.strip()[:200]}")
    return hashed


def _joined(files: Sequence[Path]) -> bytes:
    """Certificate files one after another, as nginx's ssl_certificate wants a chain."""
    parts = []
    for file in files:
        data = Path(file).read_bytes()
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    return b"".join(parts)
