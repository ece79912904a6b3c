"""keter's own copies of every file nginx reads besides the config.

nginx rereads every file its config names at each reload, and refuses the
whole config when one is missing or bad. So the live config never names a
file that a bundle, its next version or the outside world may change or
delete: certificates, keys, chains, htpasswd files and response pages are
copied here when a site (or keter) is set up, and only the copies are named.
The one exception is the folder the operator declares for shared
certificates (``nginx.shared-certificates``, e.g. ``/etc/letsencrypt/live``):
a certificate and key there are named in place, so renewals reach nginx.

Layout of the support folder, a hidden folder beside keter's config file
(hidden, because Debian's ``include sites-enabled/*`` would read anything
else there as config)::

    .keter.d/apps/<app>/    one app's site file and its copies, removed with the app
    .keter.d/global/        copies of the listener certificates and response pages
    .keter.d/keter.lock     held by the keter that writes this config (keter.cli)

Every file is named after a hash of its content, so a site's new files never
replace the files its live version uses; files no live site names are pruned
after each successful apply. The folders are setgid to the group nginx's
workers run as: htpasswd files and pages (0640) are readable by root and
nginx's workers only, keys (0600) by root (nginx's master) only.

Sources are read as root from paths a bundle names, so reading is careful:
regular files only, opened without blocking (a FIFO cannot hang keter),
bounded in size, and only the PEM blocks of the expected kind are copied (a
bundle cannot have keter copy an arbitrary file where nginx's workers can
read it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from keter import names
from keter.fsutil import atomic_write
from keter.messages import BasicAuth, Site, TlsFiles
from keter.nginx.render import (
    ACME_CHALLENGES,
    ListenerLike,
    ProxyOptions,
    is_tls,
    upstream_name,
)

COMMAND_TIMEOUT = 30.0
MAX_PEM_BYTES = 1 << 20  # a certificate with its chain, or a key
MAX_CA_BYTES = 8 << 20  # the system's CA bundle
MAX_PAGE_BYTES = 1 << 20  # a response page
RESOLV_CONF = Path("/etc/resolv.conf")
APPS = "apps"
GLOBAL = "global"
LOCK = "keter.lock"

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]{1,40})-----\r?\n([A-Za-z0-9+/=\r\n]{1,1048576}?)-----END \1-----"
)


@dataclass(frozen=True)
class Localized:
    """A site as nginx will read it: every file it names is keter's copy or shared."""

    site: Site
    files: frozenset[Path]  # every file nginx reads for it


class SupportFiles:
    """Makes and prunes the copies in one support folder."""

    def __init__(
        self, support: Path, auth_group: str | None, shared_certificates: Path | None = None
    ) -> None:
        """``auth_group`` is the group of nginx's workers (Debian's www-data); when no
        such group exists, the files keep root's group. ``shared_certificates`` is the
        operator's folder of certificates named in place."""
        self.support = Path(support)
        self.auth_group = auth_group
        self.shared = Path(os.path.normpath(shared_certificates)) if shared_certificates else None
        # Hashes by sha256(user, password): unchanged passwords keep their hash
        # (and salt), so an unchanged htpasswd file keeps its name.
        self._hashes: dict[bytes, str] = {}
        # The CA bundle as read and its certificates: every apply reads the file again
        # (it may change), and finding its ~150 blocks cost 3 ms each time.
        self._ca: tuple[bytes, bytes] | None = None

    @property
    def roots(self) -> tuple[Path, ...]:
        """The folders files named in keter's config may lie in."""
        return (self.support,) if self.shared is None else (self.support, self.shared)

    def app_dir(self, app: str) -> Path:
        return self.support / APPS / upstream_name(app)

    # -- copies ------------------------------------------------------------------------

    def localize(self, site: Site) -> Localized:
        """Copy what ``site`` needs into its app's folder; the site naming the copies.

        Raises ValueError (or OSError) with a reason that names the file.
        """
        folder = self.app_dir(site.app)
        files: set[Path] = set()
        routes = []
        for route in site.all_routes:
            changes: dict[str, object] = {}
            if (own := route.tls) is not None:
                tls = self._certificate(folder, own.certificate, own.key, own.chain)
                changes["tls"] = tls
                files |= {tls.certificate, tls.key}
            if (auth := route.basic_auth) is not None:
                user_file = self._write(folder, self._htpasswd(auth), ".htpasswd", 0o640)
                changes["basic_auth"] = dataclasses.replace(auth, user_file=user_file)
                files.add(user_file)
            routes.append(dataclasses.replace(route, **changes) if changes else route)
        # Site(hosts, port) routes are folded in: the copy is described by routes alone.
        local = Site(app=site.app, routes=tuple(routes), version=site.version)
        return Localized(site=local, files=frozenset(files))

    def localize_globals(
        self, listeners: Sequence[ListenerLike], options: ProxyOptions
    ) -> tuple[tuple[ListenerLike, ...], ProxyOptions, frozenset[Path]]:
        """The listeners and options with every file they name copied to ``global/``."""
        folder = self.support / GLOBAL
        files: set[Path] = set()
        local_listeners = []
        for listener in listeners:
            if is_tls(listener):
                chain = tuple(getattr(listener, "chain", ()))
                tls = self._certificate(folder, listener.certificate, listener.key, chain)
                files |= {tls.certificate, tls.key}
                listener = dataclasses.replace(
                    listener, certificate=tls.certificate, key=tls.key, chain=()
                )
            local_listeners.append(listener)
        pages = {}
        for field in ("unknown_host_file", "missing_host_file", "proxy_exception_file"):
            source = getattr(options, field)
            if source is not None:
                data = read_source(source, MAX_PAGE_BYTES)
                pages[field] = self._write(folder, data, ".html", 0o640)
                files.add(pages[field])
        raw = read_source(options.ca_file, MAX_CA_BYTES)
        if self._ca is None or self._ca[0] != raw:
            self._ca = (raw, _pem_blocks(raw, options.ca_file, "CERTIFICATE"))
        ca_file = self._write(folder, self._ca[1], ".crt", 0o640)
        files.add(ca_file)
        if options.acme_challenges is not None:
            self._make_folder(self.support)
            self._make_folder(options.acme_challenges)
        local = dataclasses.replace(
            options,
            ca_file=ca_file,
            file_roots=self.roots,
            resolver=resolvers(options.resolver),
            **pages,
        )
        return tuple(local_listeners), local, frozenset(files)

    def write_site(self, app: str, text: str) -> Path:
        """An app's rendered site as a file of its folder."""
        return self._write(self.app_dir(app), text.encode(), ".conf", 0o640)

    def prune(
        self,
        live: Mapping[str, frozenset[Path]],
        global_files: frozenset[Path],
        apps: Iterable[str] | None = None,
    ) -> None:
        """Remove every file no live site names: a removed app's folder goes whole.

        Only the folders of ``apps`` are looked at (those whose site changed), or
        every folder when None; ``live`` maps each of those apps that nginx
        serves to the files it reads (its site file included). Files directly in
        the support folder are an older keter's and go too.
        """
        keep = {self.app_dir(app): used for app, used in live.items()}
        if apps is None:
            folders = _children(self.support / APPS)
        else:
            folders = [self.app_dir(app) for app in apps]
        for folder in folders:
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for path in _children(folder):
                if path not in keep[folder]:
                    _remove(path)
        for path in _children(self.support / GLOBAL):
            if path not in global_files:
                _remove(path)
        for path in _children(self.support):
            if path.name not in (APPS, GLOBAL, ACME_CHALLENGES, LOCK):
                _remove(path)

    # -- parts -------------------------------------------------------------------------

    def _certificate(
        self, folder: Path, certificate: Path, key: Path, chain: Sequence[Path]
    ) -> TlsFiles:
        """The copies of a certificate (its chain joined after it) and of its key.

        A certificate and key in the shared folder, without a chain to join, stay where
        they are.
        """
        if not chain and self._is_shared(certificate) and self._is_shared(key):
            return TlsFiles(certificate=Path(certificate), key=Path(key))
        parts = [_pem_blocks(read_source(file, MAX_PEM_BYTES), file, "CERTIFICATE")
                 for file in (certificate, *chain)]  # fmt: skip
        key_data = _pem_blocks(read_source(key, MAX_PEM_BYTES), key, "PRIVATE KEY", only=True)
        return TlsFiles(
            certificate=self._write(folder, b"".join(parts), ".crt", 0o640),
            key=self._write(folder, key_data, ".key", 0o600),
        )

    def _is_shared(self, path: Path) -> bool:
        if self.shared is None:
            return False
        return Path(os.path.normpath(path)).is_relative_to(self.shared)

    def _htpasswd(self, auth: BasicAuth) -> bytes:
        lines = []
        for user, password in auth.credentials:
            if not user or ":" in user or any(ord(c) < 0x21 or ord(c) == 0x7F for c in user):
                raise ValueError(f"invalid basic-auth user name {names.log_text(user)}")
            digest = hashlib.sha256(f"{user}\0{password}".encode(errors="replace")).digest()
            if digest not in self._hashes:
                self._hashes[digest] = hash_password(password)
            lines.append(f"{user}:{self._hashes[digest]}\n")
        return "".join(lines).encode()

    def _write(self, folder: Path, data: bytes, suffix: str, mode: int) -> Path:
        """``data`` as the file of ``folder`` named by its hash (written unless there)."""
        path = folder / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
        with contextlib.suppress(OSError):
            if path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == mode:
                return path
        for each in (self.support, folder.parent, folder):
            self._make_folder(each)
        atomic_write(path, data, mode=mode, durable=False)
        return path

    def _make_folder(self, folder: Path) -> None:
        folder.mkdir(mode=0o750, exist_ok=True)
        gid = -1
        if self.auth_group is not None:
            with contextlib.suppress(KeyError):
                gid = grp.getgrnam(self.auth_group).gr_gid
        info = folder.stat()
        if stat.S_IMODE(info.st_mode) != 0o2750 or (gid != -1 and info.st_gid != gid):
            os.chown(folder, -1, gid)
            # setgid: files created inside take the folder's group, already at creation.
            os.chmod(folder, 0o2750)


def read_source(path: Path, limit: int) -> bytes:
    """A file a bundle or the operator names, read safely; raises ValueError.

    Opened without blocking and without becoming a controlling terminal; only
    a regular file of at most ``limit`` bytes is read.
    """
    shown = names.log_text(str(path))
    try:
        names.validate_file_path(str(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {shown}: {_why(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{shown} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{shown} is larger than {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {shown}: {_why(exc)}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{shown} is larger than {limit} bytes")
    return data


def resolvers(configured: tuple[str, ...] | None) -> tuple[str, ...]:
    """The name servers nginx gets: ``nginx.resolver`` as configured (``()``: none), or
    when it is unset those of ``/etc/resolv.conf``, read now."""
    return system_resolvers() if configured is None else configured


def system_resolvers(resolv_conf: Path = RESOLV_CONF) -> tuple[str, ...]:
    """The name servers of ``/etc/resolv.conf`` that nginx can use (no IPv6 zone ids)."""
    try:
        text = read_source(resolv_conf, MAX_PAGE_BYTES).decode(errors="replace")
    except ValueError:
        return ()
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                servers.append(names.validate_ip(words[1]))
    return tuple(f"[{ip}]" if ":" in ip else ip for ip in dict.fromkeys(servers))


def _pem_blocks(data: bytes, source: Path, kind: str, *, only: bool = False) -> bytes:
    """The PEM blocks of ``kind`` in ``data`` (a label ending in it), one per line group.

    ``only``: exactly one block (a key file). Raises ValueError naming ``source``.
    """
    blocks = [
        match.group(0).replace(b"\r\n", b"\n") + b"\n"
        for match in _PEM_BLOCK.finditer(data)
        if match.group(1).decode().endswith(kind)
    ]
    shown = names.log_text(str(source))
    if not blocks:
        raise ValueError(f"{shown} holds no PEM {kind.lower()}")
    if only and len(blocks) > 1:
        raise ValueError(f"{shown} holds {len(blocks)} PEM {kind.lower()} blocks; expected one")
    return b"".join(blocks)


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
    except (OSError, subprocess.TimeoutExpired, UnicodeError) as exc:
        raise ValueError(f"cannot hash a basic-auth password with openssl: {exc}") from None
    hashed = result.stdout.strip()
    if result.returncode != 0 or not hashed.startswith("$6$"):
        raise ValueError(f"openssl passwd failed: {names.log_text(result.stderr.strip(), 200)}")
    return hashed


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
