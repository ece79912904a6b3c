"""README.md and ARCHITECTURE.md stay true to the code (fast: no daemons, no I/O but reads).

A newcomer trusts the docs to find a behaviour in one module; a doc naming a
module that moved, a stage that was renamed or a message that is gone sends
them astray. So every name the docs make a claim with is checked here:

* every ``keter/...`` path in README.md and ARCHITECTURE.md exists;
* every dotted ``keter.x.y`` name in ARCHITECTURE.md imports (module or attribute);
* every number it gives as ```NAME` = value`` is that constant's value in the code;
* ARCHITECTURE.md's deploy stage table lists exactly ``keter.deploys.Stage`` and
  its moves table exactly ``keter.deploys.TRANSITIONS``;
* its process state table lists exactly ``ProcessState`` and its process
  transitions table exactly ``keter.processes.states.TRANSITIONS``;
* every message in its "Who sends what" diagram is a class of ``keter.messages``,
  every class of ``keter.messages`` is named in it somewhere, and every
  ``Component`` has a row in its components table;
* README.md's table of the config's defaults is taken by ``load_config`` and is
  exactly the defaults.

Each table is found under its heading, so a failure names the section to fix.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from keter import deploys, messages
from keter.config import CONFIG_NAME, KeterConfig, load_config
from keter.incoming.unpack import bundle_limit
from keter.messages import Component, ProcessState
from keter.processes import states

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ARCHITECTURE = REPO / "ARCHITECTURE.md"

# A path into the package: not part of a longer path (/opt/keter/run, snoyberg/keter/...).
PATH = re.compile(r"(?<![\w./:-])keter/[\w./-]*[\w/]|(?<![\w./:-])keter/")
# A dotted name in backquotes; file names that merely start with "keter." are not names.
DOTTED = re.compile(r"`(keter(?:\.[A-Za-z_]\w*)+)`")
NOT_NAMES = {"keter.lock", "keter.sock", "keter.service", "keter.yaml", "keter.keter"}
CODE = re.compile(r"`([^`]+)`")
WORD = re.compile(r"\b[A-Z][a-z]\w*\b")  # a CamelCase name (all-caps words are not)
CONSTANT = re.compile(r"`([A-Z][A-Z0-9_]+)` = (\d+(?:\.\d+)?)")


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(doc: str, heading: str) -> str:
    """The text under ``heading`` (a Markdown heading's words) up to the next heading of
    the same or a higher level."""
    lines = doc.splitlines()
    starts = [
        (i, len(found.group(1)))
        for i, line in enumerate(lines)
        if (found := re.fullmatch(r"(#+) (.*)", line)) and found.group(2).strip() == heading
    ]
    if not starts:
        pytest.fail(f"ARCHITECTURE.md has no section {heading!r}")
    start, level = starts[0]
    body = []
    for line in lines[start + 1 :]:
        found = re.match(r"(#+) ", line)
        if found and len(found.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


def table(body: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``body``, header and rule left out."""
    rows: list[list[str]] = []
    for line in body.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    if len(rows) < 3:
        pytest.fail(f"no table found in:\n{body[:300]}")
    return rows[2:]


def first_code(cell: str) -> str:
    found = CODE.search(cell)
    assert found, f"no `name` in table cell {cell!r}"
    return found.group(1)


def code_block(body: str) -> str:
    found = re.search(r"```text\n(.*?)```", body, re.S)
    assert found, "no ```text block in the section"
    return found.group(1)


# -- the config's defaults --------------------------------------------------------------


def test_the_readme_table_of_config_defaults_is_the_defaults(tmp_path: Path) -> None:
    """README's "these are the defaults" block, copied verbatim into keter-config.yaml, is
    taken and is exactly the defaults (it once had nulls keter refused)."""
    body = section(text(README), "Global config: `ROOT/etc/keter-config.yaml`")
    found = re.search(r"```yaml\n(.*?)```", body, re.S)
    assert found, "no ```yaml block in the section"
    config_file = tmp_path / "etc" / CONFIG_NAME
    config_file.parent.mkdir()
    config_file.write_text(found.group(1))
    # Given, so that this machine's own ephemeral range cannot refuse port-range.
    config = load_config(tmp_path, ephemeral_range=(32768, 60999))
    assert config.warnings == ()
    assert config == KeterConfig(root=tmp_path)


def test_the_bundle_size_cap_the_readme_gives_is_the_defaults() -> None:
    limit = bundle_limit(KeterConfig.max_unpacked_bytes, KeterConfig.max_members)
    assert f"{limit:,} bytes with the defaults" in " ".join(text(README).split())


# -- paths and names ----------------------------------------------------------------------


@pytest.mark.parametrize("doc", [README, ARCHITECTURE], ids=lambda p: p.name)
def test_every_module_path_the_docs_name_exists(doc: Path) -> None:
    named = sorted(set(PATH.findall(text(doc))))
    assert named, f"{doc.name} names no keter/ path: the pattern is broken"
    missing = [path for path in named if not (REPO / path).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_dotted_name_in_architecture_resolves() -> None:
    named = set(DOTTED.findall(text(ARCHITECTURE))) - NOT_NAMES
    missing = sorted(name for name in named if not resolves(name))
    assert not missing, f"ARCHITECTURE.md names what does not exist: {missing}"


def test_every_constant_the_doc_quotes_has_that_value() -> None:
    """The doc quotes numbers as ```NAME` = value``; NAME is found where it is defined."""
    quoted = CONSTANT.findall(text(ARCHITECTURE))
    assert len(quoted) >= 5, "the doc quotes hardly any constant: the pattern is broken"
    sources = {
        path: path.read_text(encoding="utf-8") for path in sorted((REPO / "keter").rglob("*.py"))
    }
    for name, value in quoted:
        defined = re.compile(rf"^{name}\b.*=", re.M)
        where = [path for path, source in sources.items() if defined.search(source)]
        assert len(where) == 1, f"ARCHITECTURE.md quotes {name}, defined in {where or 'no module'}"
        dotted = ".".join(where[0].relative_to(REPO).with_suffix("").parts)
        actual = getattr(importlib.import_module(dotted.removesuffix(".__init__")), name)
        assert float(value) == actual, f"ARCHITECTURE.md: {name} = {value}, {dotted}: {actual}"


# -- the deploy state machine --------------------------------------------------------------


def test_the_stage_table_is_keter_deploys_stage() -> None:
    rows = table(section(text(ARCHITECTURE), "Deploy stages"))
    listed = [first_code(row[0]) for row in rows]
    unknown = [name for name in listed if name not in deploys.Stage.__members__]
    assert not unknown, f"the stage table lists stages that do not exist: {unknown}"
    assert sorted(listed) == sorted(deploys.Stage.__members__), (
        "the stage table must list every Stage exactly once: "
        f"missing {sorted(set(deploys.Stage.__members__) - set(listed))}"
    )


def moves(heading: str, names: dict) -> list[tuple]:
    """(from, to) of each row of the table under ``heading``, as members of ``names``."""
    found = []
    for row in table(section(text(ARCHITECTURE), heading)):
        old, new = first_code(row[0]), first_code(row[1])
        assert old in names and new in names, f"{heading}: unknown state in {old} -> {new}"
        found.append((names[old], names[new]))
    return found


def test_the_moves_table_is_keter_deploys_transitions() -> None:
    listed = moves("Allowed moves", deploys.Stage.__members__)
    assert len(listed) == len(set(listed)), "the moves table lists a move twice"
    invented = [f"{a.name} -> {b.name}" for a, b in listed if (a, b) not in deploys.TRANSITIONS]
    assert not invented, f"the moves table lists moves TRANSITIONS does not allow: {invented}"
    left_out = [f"{a.name} -> {b.name}" for a, b in deploys.TRANSITIONS if (a, b) not in listed]
    assert not left_out, f"the moves table leaves out transitions: {left_out}"


def test_every_message_a_table_says_a_move_happens_on_exists() -> None:
    for heading in ("Deploy stages", "Allowed moves"):
        for row in table(section(text(ARCHITECTURE), heading)):
            for cell in row[1:]:
                for name in CODE.findall(cell):
                    if re.fullmatch(r"[A-Z][a-z]\w*", name):
                        assert inspect.isclass(getattr(messages, name, None)), (
                            f"{heading}: {name} is not a class of keter.messages"
                        )


# -- the process state machine -------------------------------------------------------------


def test_the_process_state_table_is_process_state() -> None:
    rows = table(section(text(ARCHITECTURE), "Process states"))
    listed = [first_code(row[0]) for row in rows]
    assert sorted(listed) == sorted(ProcessState.__members__), (
        f"the process state table lists {sorted(listed)}, "
        f"ProcessState has {sorted(ProcessState.__members__)}"
    )


def test_the_process_transitions_table_is_the_monitors_table() -> None:
    listed = moves("Process transitions", ProcessState.__members__)
    assert len(listed) == len(set(listed)), "the process transitions table lists a move twice"
    assert set(listed) == set(states.TRANSITIONS), (
        "the process transitions table differs from keter.processes.states.TRANSITIONS: "
        f"invented {sorted(f'{a} -> {b}' for a, b in set(listed) - set(states.TRANSITIONS))}, "
        f"left out {sorted(f'{a} -> {b}' for a, b in set(states.TRANSITIONS) - set(listed))}"
    )


# -- components and messages ---------------------------------------------------------------


def message_classes() -> set[str]:
    return {
        name
        for name, value in vars(messages).items()
        if inspect.isclass(value) and value.__module__ == messages.__name__
    }


def test_every_message_in_the_diagram_exists() -> None:
    diagram = code_block(section(text(ARCHITECTURE), "Who sends what"))
    named = set(WORD.findall(diagram))
    assert len(named) > 20, "the diagram names hardly any message: the pattern is broken"
    unknown = sorted(named - message_classes())
    assert not unknown, f"the diagram names classes keter.messages lacks: {unknown}"


def test_every_class_of_keter_messages_is_in_the_doc() -> None:
    words = set(re.findall(r"\w+", text(ARCHITECTURE)))
    left_out = sorted(message_classes() - words)
    assert not left_out, (
        f"keter/messages.py defines {left_out}, which ARCHITECTURE.md never names: add each "
        "to the 'Who sends what' diagram (a message) or to 'What messages carry' (a value)"
    )


def test_every_component_has_a_row() -> None:
    rows = table(section(text(ARCHITECTURE), "The components"))
    listed = {CODE.findall(row[0])[0] for row in rows if CODE.findall(row[0])}
    assert listed == {c.value for c in Component}, (
        f"the components table lists {sorted(listed)}; Component has "
        f"{sorted(c.value for c in Component)}"
    )
