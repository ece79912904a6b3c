"""Reading an unpacked bundle's ``config/keter.yaml`` into a ``BundleConfig``.

The file is found and read carefully (inside the bundle, a regular file,
size-capped, strict YAML), then handed to the reader of its format: Keter
1.0's ``stanzas:`` (``keter.bundle.v10``) or Keter 0.4's flat keys
(``keter.bundle.v04``). Problems are collected so the uploader sees all of
them in one log line, each with its key path (``stanzas[2].root``).
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keter.bundle import v04, v10
from keter.bundle.budget import check_budget
from keter.bundle.model import BundleConfig, BundleConfigError
from keter.bundle.values import Values, inside
from keter.config import PostgresSettings
from keter.yamlcheck import describe, read_yaml_file

log = logging.getLogger(__name__)

CONFIG_NAMES = ("keter.yaml", "keter.yml")
MAX_CONFIG_BYTES = 1 << 20


def parse_bundle_config(
    folder: Path, app: str, *, postgres: PostgresSettings | None = None
) -> BundleConfig:
    """Read and validate ``folder/config/keter.yaml`` (or ``.yml``) of an unpacked bundle.

    Raises BundleConfigError and nothing else, whatever the file holds. With the
    operator's ``postgres`` settings, a database server the bundle names
    (``plugins.postgres``) must be one keter provisions on.
    """
    with _last_resort():
        config = _parse_bundle_config(Path(folder), app)
        server = config.postgres_server
        if postgres is not None and config.postgres and server is not None:
            problem = postgres.server_problem(server.host, server.port)
            if problem:
                raise BundleConfigError([f"plugins.postgres[0]: {problem}"])
        return config


def _parse_bundle_config(folder: Path, app: str) -> BundleConfig:
    config_dir = folder / "config"
    found = [config_dir / name for name in CONFIG_NAMES if (config_dir / name).exists()]
    if not found:
        raise BundleConfigError(["missing config/keter.yaml"])
    if len(found) > 1:
        raise BundleConfigError(
            ["both config/keter.yaml and config/keter.yml exist; keep only one"]
        )
    path = found[0]
    shown = f"config/{path.name}"
    problem = _config_file_problem(path, folder)
    if problem:
        raise BundleConfigError([f"{shown}: {problem}"])
    try:
        data = read_yaml_file(path, MAX_CONFIG_BYTES)
    except ValueError as exc:
        raise BundleConfigError([f"{shown}: {exc}"]) from None
    return _parse_bundle_data(data, folder=folder, config_dir=config_dir, app=app)


def _config_file_problem(path: Path, folder: Path) -> str | None:
    """Why the config file must not be read, if it must not."""
    # A symlink out of the bundle could make keter read (and quote in errors)
    # any file on the machine.
    if not inside(path, folder):
        return "is a link to a file outside the bundle"
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size > MAX_CONFIG_BYTES:
        return f"is {info.st_size} bytes; at most {MAX_CONFIG_BYTES} are allowed"
    return None


def parse_bundle_data(data: object, *, folder: Path, config_dir: Path, app: str) -> BundleConfig:
    """Validate a parsed ``config/keter.yaml`` value; raises BundleConfigError.

    ``folder`` is the unpacked bundle and ``config_dir`` the folder relative
    paths (``exec``, ``root``, certificates) are resolved against. File system
    access: checking the executables, static roots and certificate files.
    """
    with _last_resort():
        return _parse_bundle_data(data, folder=folder, config_dir=config_dir, app=app)


def _parse_bundle_data(data: object, *, folder: Path, config_dir: Path, app: str) -> BundleConfig:
    if not isinstance(data, dict):
        expected = "a mapping with keys like exec and host"
        raise BundleConfigError([f"config/keter.yaml: expected {expected}, got {describe(data)}"])
    values = Values(Path(folder), Path(config_dir))
    read = v10.read if "stanzas" in data else v04.read
    config = read(data, app, values)
    check_budget(config, values.check)
    if values.check.problems:
        raise BundleConfigError(values.check.problems)
    return config


@contextmanager
def _last_resort() -> Iterator[None]:
    """An exception nobody anticipated while reading a bundle's config fails only that
    bundle, with a reason naming the exception's type; the traceback goes to debug."""
    try:
        yield
    except BundleConfigError:
        raise
    except Exception as exc:
        log.debug("internal error while reading config/keter.yaml", exc_info=True)
        reason = f"internal error while reading config/keter.yaml: {type(exc).__name__}"
        raise BundleConfigError([reason]) from None
