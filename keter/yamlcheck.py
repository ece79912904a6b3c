"""Reading YAML configs strictly and checking their values, for both config files.

``keter/config/`` (the operator's ``keter-config.yaml``) and ``keter/bundle/``
(a bundle's ``config/keter.yaml``) share these: the strict YAML loader, the
``Checker`` that collects every problem with its key path, the helpers that
show a value in a problem safely (``describe``, ``key_name``, ``type_name``,
``unknown_key``) and the value checks both files have (``env``, numbers,
paths, certificate files).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import yaml

from keter import names

# Configs are a few hundred bytes; the cap only stops a runaway file from
# being read into memory.
MAX_YAML_BYTES = 1 << 20
MAX_PEM_BYTES = 1 << 20
# Keter reads its numbers as Haskell Ints: anything larger Keter refuses too.
MAX_INT = 2**63 - 1
# Durations longer than this are refused: keter's timers (and Python's) take no more.
MAX_SECONDS = 365 * 24 * 3600


# Warnings kept of one document; the rest are counted. A bundle with 60,000 unknown keys
# would otherwise be 60,000 log lines a deploy, past journald's rate limit, which would
# then drop keter's lines about other apps.
WARNINGS_KEPT = 20


class Checker:
    """Collects problems (fatal) and warnings (notes) while a document is parsed."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._warnings: list[str] = []
        self._warnings_left = 0  # past WARNINGS_KEPT

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        if len(self._warnings) < WARNINGS_KEPT:
            self._warnings.append(f"{path}: {message}")
        else:
            self._warnings_left += 1

    @property
    def warnings(self) -> tuple[str, ...]:
        """The first ``WARNINGS_KEPT`` warnings, then "... and N more warnings"."""
        left = self._warnings_left
        more = (f"... and {left} more warning{'s' if left != 1 else ''}",) if left else ()
        return (*self._warnings, *more)


# -- YAML ------------------------------------------------------------------------------


class _AliasRefused(Exception):
    """Raised by the loader at the first anchor or alias; carries its line."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (alias bombs) and duplicate keys."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasRefused(event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # a list, mapping or !!set as a key
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key cannot be {type_name(key)}", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {describe(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> object:
    """Parse one YAML document strictly; raises ValueError(reason), whatever the text."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Only the position: the snippet PyYAML adds would echo file content.
        where = ""
        if exc.problem_mark is not None:
            where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        reason = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise ValueError(f"not valid YAML{where}: {names.log_text(reason, 200)}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"not valid YAML: {names.log_text(first, 200)}") from None
    except _AliasRefused as exc:
        raise ValueError(
            f"uses YAML anchors/aliases (line {exc.args[0]}), which keter refuses: "
            "they allow alias bombs"
        ) from None
    except RecursionError:
        raise ValueError("not valid YAML: nested too deeply") from None
    except ValueError as exc:
        # From a value's constructor: an integer of over 4300 digits, a date like 2024-13-45.
        raise ValueError(
            f"not valid YAML: a value cannot be read ({names.log_text(exc, 80)})"
        ) from None
    except Exception as exc:
        # PyYAML's own constructors trip on some odd values (a !!timestamp its pattern
        # does not match raises AttributeError): still just a file that cannot be read.
        raise ValueError(f"not valid YAML: a value cannot be read ({type(exc).__name__})") from None


def read_yaml_file(path: Path, max_bytes: int = MAX_YAML_BYTES) -> object:
    """Read and parse a small YAML file; raises ValueError(reason)."""
    raw = read_regular_file(path, max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (bad byte at offset {exc.start})") from None
    return load_yaml(text)


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; raises ValueError(reason).

    Never blocks: a FIFO, socket or device is refused from its ``stat`` before
    it is opened (opening some devices has effects), and the file is opened
    non-blocking and checked again on the open descriptor, so a file swapped
    for a FIFO in between cannot hang the reader either.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"is larger than {max_bytes} bytes")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror}") from None
    except UnicodeError:
        raise ValueError("cannot be read: the path is not valid Unicode") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("is not a regular file")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise ValueError(f"is larger than {max_bytes} bytes")
    return b"".join(chunks)


# -- showing values in problems ----------------------------------------------------


def type_name(value: object) -> str:
    """The YAML name of a value's type, for messages that must not show the value."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    kinds = {str: "a string", list: "a list", tuple: "a list", dict: "a mapping"}
    kinds.update({set: "a set", bytes: "binary data", type(None): "nothing (null)"})
    return kinds.get(type(value), "a date" if hasattr(value, "isoformat") else "a value")


def describe(value: object, limit: int = 60) -> str:
    """A value as it would look in JSON, shortened: safe to put in one log line.

    Bounded work whatever the value: only about ``limit`` characters of it are
    ever rendered, nesting is cut short, and a huge number is named by its size.
    """
    if value is None:
        return "nothing (null)"
    text = _json_head(value, limit + 1, 0)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_head(value: object, budget: int, depth: int) -> str:
    """The start (at least ``budget`` characters, when there are that many) of ``value``
    as ASCII JSON."""
    if depth > 4:
        return "..."
    if value is None or isinstance(value, bool | float):
        return json.dumps(value)  # null, true, NaN, Infinity, 1.5
    if isinstance(value, int):
        digits = len(str(abs(value))) if value.bit_length() > 200 else 0
        return f"a {digits}-digit number" if digits else str(value)
    if isinstance(value, str):
        return json.dumps(value[:budget], ensure_ascii=True)
    if isinstance(value, bytes | bytearray):
        return f"binary data ({len(value)} bytes)"
    if isinstance(value, dict):
        pairs = ((_json_head(k, budget, depth + 1), v) for k, v in value.items())
        items = (f"{k}: {_json_head(v, budget, depth + 1)}" for k, v in pairs)
        return _joined("{", items, "}", budget)
    if isinstance(value, list | tuple | set | frozenset):
        return _joined("[", (_json_head(v, budget, depth + 1) for v in value), "]", budget)
    return _json_head(str(value), budget, depth)  # dates and times


def _joined(start: str, items, end: str, budget: int) -> str:
    text = start
    for i, item in enumerate(items):
        text += (", " if i else "") + item
        if len(text) >= budget:
            return text + "..."
    return text + end


def key_name(key: object) -> str:
    """A mapping key as shown in a key path; odd keys are quoted so they stay one line."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.*-]{1,60}", key):
        return key
    return describe(key, limit=40)


def unknown_key(key: object, known: tuple[str, ...] | list[str]) -> str:
    """'unknown key', with a difflib suggestion when one is close."""
    if isinstance(key, str):
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f"unknown key (did you mean {close[0]}?)"
        return "unknown key"
    return f"unknown key: keys must be strings, got {type_name(key)}"


# -- values ------------------------------------------------------------------------


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(value: object, path: str, check: Checker) -> Mapping[str, str] | None:
    """An ``env:`` mapping: names are shell-style, values strings (numbers, booleans converted)."""
    if not isinstance(value, dict):
        check.problem(path, f"expected a mapping of NAME: value, got {describe(value)}")
        return None
    env: dict[str, str] = {}
    ok = True
    for name, item in value.items():
        where = f"{path}.{key_name(name)}"
        if isinstance(name, bool):  # YAML 1.1 reads ON, YES, NO... as booleans
            check.problem(where, "YAML reads this name as a boolean; quote it")
            ok = False
        elif not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            check.problem(where, "expected a variable name of letters, digits and _")
            ok = False
        elif name in names.SHELL_OWN:  # as keter env refuses it (names.validate_env_name)
            check.problem(where, f"{name} is the shell's own (it starts the app's processes)")
            ok = False
        elif isinstance(item, bool):
            env[name] = "true" if item else "false"  # as written in YAML, not Python's True
        elif isinstance(item, int | float | str) and is_arg(str(item)):
            env[name] = str(item)
        else:
            # Values may be secrets: say what kind of value was wrong, not what it was.
            check.problem(where, f"expected a string, number or boolean, got {type_name(item)}")
            ok = False
    return MappingProxyType(env) if ok else None


def string(value: object, path: str, check: Checker, what: str) -> str | None:
    """Non-empty text without NUL that a file name or a program could carry."""
    if isinstance(value, str) and value and is_arg(value):
        return value
    check.problem(path, f"expected {what}, got {describe(value)}")
    return None


def file_path(value: object, path: str, check: Checker, what: str = "a file path") -> str | None:
    """A path as ``keter.names.validate_file_path`` takes it (printable, encodable, bounded)."""
    if not isinstance(value, str) or not value:
        check.problem(path, f"expected {what}, got {describe(value)}")
        return None
    try:
        return names.validate_file_path(value)
    except ValueError as exc:
        check.problem(path, f"{describe(value)} cannot be used: {exc}")
        return None


def is_arg(text: str) -> bool:
    try:
        names.validate_arg(text)
    except ValueError:
        return False
    return True


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(
    value: object, path: str, check: Checker, minimum: int, maximum: int | None = MAX_INT
) -> int | None:
    if is_int(value) and value >= minimum and (maximum is None or value <= maximum):
        return value
    expected = f"an integer {minimum}-{maximum}" if maximum else f"an integer >= {minimum}"
    check.problem(path, f"expected {expected}, got {describe(value)}")
    return None


def number(value: object, maximum: float) -> float | None:
    """An int or float (not a boolean, NaN or infinity) of at most ``maximum``, as a float.

    Checked before converting: ``float()`` of a 400-digit integer overflows.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not -maximum <= value <= maximum:
        return None
    return float(value)


_SIZE = re.compile(r"(\d{1,15})([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_BODY_SIZE = 1 << 40  # 1 TiB: past that, "unlimited" (0) says it better


def size(value: object, path: str, check: Checker) -> int | None:
    """A size in bytes: a byte count, or nginx's size syntax ("512k", "10m", "1g")."""
    if is_int(value) and 0 <= value <= MAX_BODY_SIZE:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match:
        bytes_ = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if bytes_ <= MAX_BODY_SIZE:
            return bytes_
    check.problem(
        path,
        f'expected a size like "10m", "512k" or a byte count (0: unlimited), got {describe(value)}',
    )
    return None


def absolute(path: Path) -> Path:
    """Absolute and normalised without following symlinks, as Keter joins paths."""
    return Path(os.path.normpath(os.path.abspath(path)))


def pem_file(
    value: object, path: str, check: Checker, base: Path, kind: str = "certificate"
) -> Path | None:
    """A certificate (or, ``kind`` "key", private key) file relative to ``base``, checked."""
    text = file_path(value, path, check)
    if text is None:
        return None
    file = absolute(base / text)
    problem = pem_problem(file, kind)
    if problem:
        check.problem(path, problem)
        return None
    return file


def pem_files(value: object, path: str, check: Checker, base: Path) -> tuple[Path, ...] | None:
    """``chain-certificates``: a list of certificate files."""
    if not isinstance(value, list):
        check.problem(path, f"expected a list of certificate files, got {describe(value)}")
        return None
    files = [pem_file(item, f"{path}[{i}]", check, base) for i, item in enumerate(value)]
    return None if None in files else tuple(file for file in files if file is not None)


def pem_problem(file: Path, kind: str) -> str | None:
    """Why ``file`` cannot serve as a certificate (``kind`` "key": a private key), if it cannot.

    nginx would refuse the whole config over one bad file, so this is checked
    before nginx ever sees it. Only regular files of at most 1 MiB are read
    (never blocking on a FIFO or device), and only their PEM header is looked at.
    """
    shown = names.log_text(str(file), 200)
    try:
        head = read_regular_file(file, MAX_PEM_BYTES)
    except ValueError as exc:
        return f"{shown} {exc}"
    if kind == "key":
        ok = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", head) is not None
        what = "a PEM private key"
    else:
        ok = b"-----BEGIN CERTIFICATE-----" in head
        what = "a PEM certificate"
    return None if ok else f"{shown} is not {what}"
