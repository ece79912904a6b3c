"""The package's import graph has no cycles, and every module imports on its own.

The graph is read from the source (``ast``): an edge for every ``import
keter...`` outside ``if TYPE_CHECKING:`` blocks, function-level imports
included (a lazy import is how a cycle hides). ``from keter.pkg import sub``
naming a submodule is an edge to the submodule only: Python imports it even
while ``keter.pkg`` is still initialising. Then each module is imported first
(in a separate interpreter, with every keter module unloaded before each), which
is where an order-dependent cycle would break.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import keter

PACKAGE = Path(keter.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The keter modules ``name`` imports when it is loaded."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    edges: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # only for the type checker, never run
            if isinstance(child, ast.Import):
                edges.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    module = child.module or ""
                submodules = {f"{module}.{a.name}" for a in child.names} & known.keys()
                edges.update(submodules)
                if len(submodules) < len(child.names):
                    edges.add(module)
            visit(child)

    visit(ast.parse(file.read_text(), str(file)))
    return {edge for edge in edges if edge in known and edge != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def test_the_walker_sees_a_cycle() -> None:
    """The check itself: a made-up graph with a cycle is reported, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_walker_reads_every_kind_of_import(tmp_path) -> None:
    known = {name: tmp_path for name in ("keter.a", "keter.b", "keter.c", "keter.p", "keter.p.s")}
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import keter.a\n"
        "from keter.p import s\n"
        "from . import c\n"
        "if TYPE_CHECKING:\n    from keter import b\n"
        "def f():\n    from keter.b import thing\n"
    )
    assert imports("keter.m", source, known) == {"keter.a", "keter.p.s", "keter.c", "keter.b"}


def test_no_import_cycles() -> None:
    known = modules()
    assert "keter.names" in known and "keter.bundle.model" in known
    assert "keter.supervisor.core" in known  # packages are walked too
    graph = {name: imports(name, file, known) for name, file in known.items()}
    assert cycles(graph) == []


def test_every_module_imports_when_imported_first() -> None:
    names = sorted(name for name in modules() if name != "keter.__main__")  # it runs keter
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    for loaded in [m for m in sys.modules if m == 'keter' or m.startswith('keter.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = repr(exc)\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(result.stdout) == {}


def test_the_daemon_loads_psycopg_only_when_a_database_is_needed() -> None:
    """psycopg loads libpq and its libraries (~14 MB of RSS): keter's daemon and its
    unpacking worker import it only where a database is first needed (keter.postgres,
    the config's admin-dsn), so a host whose apps use none never holds it."""
    script = (
        "import importlib, json, sys\n"
        "for name in ('keter.daemon', 'keter.cli', 'keter.incoming.worker'):\n"
        "    importlib.import_module(name)\n"
        "before = sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg')\n"
        "from keter.config.model import conninfo\n"
        "conninfo('host=/tmp port=5433')\n"
        "after = 'psycopg' in sys.modules\n"
        "print(json.dumps([before, after]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    # The check can fail: parsing a DSN does load psycopg.
    assert json.loads(result.stdout) == [[], True]
