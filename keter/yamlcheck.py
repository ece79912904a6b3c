"""Reading YAML configs strictly and checking their values, for both config files.

``keter/config.py`` (the operator's ``keter-config.yaml``) and ``keter/bundle/``
(a bundle's ``config/keter.yaml``) share these: the strict YAML loader, the
``Checker`` that collects every problem with its key path, the helpers that
show a value in a problem safely (``describe``, ``key_name``, ``type_name``,
``unknown_key``) and the value checks both files have (``env``, numbers,
paths, certificate files).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import yaml

# Configs are a few hundred bytes; the cap only stops a runaway file from
# being read into memory.
MAX_YAML_BYTES = 1 << 20
MAX_PEM_BYTES = 1 << 20


class Checker:
    """Collects problems (fatal) and warnings (notes) while a document is parsed."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")


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
            if isinstance(key, list | dict):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {describe(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> object:
    """Parse one YAML document strictly; raises ValueError(reason)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Only the position: the snippet PyYAML adds would echo file content.
        where = ""
        if exc.problem_mark is not None:
            where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        reason = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise ValueError(f"not valid YAML{where}: {reason}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    except _AliasRefused as exc:
        raise ValueError(
            f"uses YAML anchors/aliases (line {exc.args[0]}), which keter refuses: "
            "they allow alias bombs"
        ) from None
    except RecursionError:
        raise ValueError("not valid YAML: nested too deeply") from None


def read_yaml_file(path: Path, max_bytes: int = MAX_YAML_BYTES) -> object:
    """Read and parse a small YAML file; raises ValueError(reason)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (bad byte at offset {exc.start})") from None
    return load_yaml(text)


# -- showing values in problems ----------------------------------------------------


def type_name(value: object) -> str:
    """The YAML name of a value's type, for messages that must not show the value."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a mapping", type(None): "nothing (null)"})
    return names.get(type(value), type(value).__name__)


def describe(value: object, limit: int = 60) -> str:
    """A value as it would look in JSON, shortened: safe to put in one log line."""
    if value is None:
        return "nothing (null)"
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        elif isinstance(item, bool):
            env[name] = "true" if item else "false"  # as written in YAML, not Python's True
        elif isinstance(item, int | float | str) and "\0" not in str(item):
            env[name] = str(item)
        else:
            # Values may be secrets: say what kind of value was wrong, not what it was.
            check.problem(where, f"expected a string, number or boolean, got {type_name(item)}")
            ok = False
    return MappingProxyType(env) if ok else None


def string(value: object, path: str, check: Checker, what: str) -> str | None:
    if isinstance(value, str) and value and "\0" not in value:
        return value
    check.problem(path, f"expected {what}, got {describe(value)}")
    return None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(
    value: object, path: str, check: Checker, minimum: int, maximum: int | None
) -> int | None:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return value
    expected = f"an integer {minimum}-{maximum}" if maximum else f"an integer >= {minimum}"
    check.problem(path, f"expected {expected}, got {describe(value)}")
    return None


def absolute(path: Path) -> Path:
    """Absolute and normalised without following symlinks, as Keter joins paths."""
    return Path(os.path.normpath(os.path.abspath(path)))


def pem_file(
    value: object, path: str, check: Checker, base: Path, kind: str = "certificate"
) -> Path | None:
    """A certificate (or, ``kind`` "key", private key) file relative to ``base``, checked."""
    text = string(value, path, check, "a file path")
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
    before nginx ever sees it. Only the PEM header is looked at.
    """
    try:
        with open(file, "rb") as f:
            head = f.read(MAX_PEM_BYTES)
    except OSError as exc:
        return f"{file} cannot be read: {exc.strerror}"
    if kind == "key":
        ok = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", head) is not None
        what = "a PEM private key"
    else:
        ok = b"-----BEGIN CERTIFICATE-----" in head
        what = "a PEM certificate"
    return None if ok else f"{file} is not {what}"
