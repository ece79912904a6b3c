"""Settings changed without rebuilding a bundle (``keter env``): ``ROOT/etc/env/APP.json``.

One file per app, a JSON object of ``NAME: value``, mode 0600 in a 0700
folder, always replaced atomically (readers see the old or the new file). The
status component writes it (``update``); the supervisor reads it once per
deploy (``load``) and gives the values to every process of that version.
Where they rank among the other variables is ``keter.environment``'s job.

Values are secrets: nothing here logs them, and the only function that
returns them is ``load``. What leaves keter (the status API, the dashboard,
the history, the metrics, keter's own log) carries names at most; the values
reach the app's processes and ``keter env --show``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from keter.fsutil import atomic_write
from keter.names import validate_arg, validate_env_name

MAX_SETTINGS = 256
# Bytes of one value in UTF-8, as the kernel counts a variable (NAME=VALUE at most 128 KiB,
# MAX_ARG_STRLEN): in characters, 32 Ki 4-byte ones passed it and the app could never start.
MAX_VALUE = 32 * 1024
MAX_FILE = 2 * 1024 * 1024  # bytes; a bigger file is refused unread
# Set by keter for every process, always winning: storing them could never take effect.
KETER_OWNED = ("PORT", "APPROOT", "KETER_DATA_DIR")

_lock = threading.Lock()  # one read-modify-write at a time


_MEND = " (mend it by hand, or delete it and set the app's settings again)"


class SettingsError(ValueError):
    """A setting or the file is unusable; the message never shows a value.

    ``errno`` is set when the file could not be read (EACCES: not root).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def settings_path(etc_dir: Path, app: str) -> Path:
    return Path(etc_dir) / "env" / f"{app}.json"


def load(etc_dir: Path, app: str) -> dict[str, str]:
    """The app's settings ({} when it has none); raises SettingsError if the file is bad."""
    path = settings_path(etc_dir, app)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror or exc}", exc.errno) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise SettingsError(f"{path} is larger than {MAX_FILE} bytes")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        # Its text may hold secrets: not quoted. keter env cannot mend what it cannot
        # read, so the way out is said.
        raise SettingsError(f"{path} is not JSON{_MEND}") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{path} is not a JSON object of NAME: value{_MEND}")
    return check(value, where=str(path))


def check(settings: Mapping[object, object], where: str = "settings") -> dict[str, str]:
    """Names and values checked (names shell-style, values text without NUL); a copy."""
    if len(settings) > MAX_SETTINGS:
        raise SettingsError(f"{where}: more than {MAX_SETTINGS} settings")
    checked = {}
    for name, value in settings.items():
        checked[check_name(name)] = _check_value(name, value, where)
    return checked


def check_name(name: object) -> str:
    try:
        name = validate_env_name(name)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if name in KETER_OWNED:
        raise SettingsError(f"{name} is set by keter for every app; it cannot be changed")
    return name


def _check_value(name: object, value: object, where: str) -> str:
    # The messages name the variable, never its value.
    if not isinstance(value, str):
        raise SettingsError(f"{where}: the value of {name} is not a string")
    try:
        value = validate_arg(value)
    except ValueError:
        raise SettingsError(f"{where}: the value of {name} holds NUL or unencodable text") from None
    if value_size(value) > MAX_VALUE:
        raise SettingsError(f"{where}: the value of {name} is longer than {MAX_VALUE} bytes")
    return value


def value_size(value: str) -> int:
    """Bytes of ``value`` as the app's environment will hold it (UTF-8)."""
    return len(value.encode("utf-8", "surrogateescape"))


def update(
    etc_dir: Path, app: str, changes: Mapping[str, str], removals: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Set ``changes`` and remove ``removals``; returns (names set, names removed).

    Names removed that were not set are not an error (and not listed).
    """
    changes = check(changes)
    removals = [check_name(name) for name in removals]
    with _lock:
        settings = load(etc_dir, app)
        settings.update(changes)
        removed = [name for name in removals if settings.pop(name, None) is not None]
        check(settings)  # the limits hold for the result too
        path = settings_path(etc_dir, app)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        data = encoded(settings)
        if len(data) > MAX_FILE:  # load() would refuse it, and every deploy of the app with it
            raise SettingsError(
                f"the settings of {app} would take {len(data)} bytes, more than {MAX_FILE}; "
                "unset some first"
            )
        atomic_write(path, data, mode=0o600)
    return sorted(changes), removed


def encoded(settings: Mapping[str, str]) -> bytes:
    """``settings`` as APP.json holds them: what ``MAX_FILE`` bounds."""
    text = json.dumps(dict(settings), indent=2, sort_keys=True, ensure_ascii=False)
    return (text + "\n").encode()


def parse_assignments(words: Iterable[str], where: str = "the command line") -> dict[str, str]:
    """``KEY=VALUE`` words (the CLI's) as a mapping; raises SettingsError. ``where`` they
    came from: "the command line", or "stdin" (``keter env set --stdin``)."""
    settings = {}
    for word in words:
        name, equals, value = word.partition("=")
        if not equals:
            raise SettingsError(f"expected NAME=VALUE, but a word on {where} has no '='")
        settings[check_name(name)] = _check_value(name, value, where)
    return settings
