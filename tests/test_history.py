"""The deploy history file: bounded whatever bundles put in it, and loaded whatever its state.

Issue 10.5: a 195 KiB config once made a 4 MiB failure reason that history.json
kept (three such bundles made the file too big to load). Every entry's reason
is capped, the file has a byte budget, and a file that is too big, cut short
or damaged loads what it can and never stops keter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keter.history import REASON_LIMIT, DeployHistory, capped_text
from keter.messages import DeployFinished, FailureKind, Outcome

FIELDS = {"seq", "at", "version", "sha256", "bundle_mtime", "outcome", "kind", "reason"}
FIELDS |= {"duration", "watch"}


def finished(app: str = "hello", outcome: str = "serving", reason: str = "", **fields):
    sha256 = hashlib.sha256(f"{app} {time.monotonic()}".encode()).hexdigest()
    values = {
        "version": sha256[:12],
        "sha256": sha256,
        "bundle_mtime": 1_700_000_000.0,
        "duration": 0.8,
        "at": time.time(),
    }
    values.update(fields)
    return DeployFinished(app=app, outcome=Outcome(outcome), reason=reason, **values)


def well_formed(history: DeployHistory) -> list[dict]:
    """Every entry in memory, checked against the schema the API promises."""
    entries = [e for app in list(history._apps) for e in history.entries(app)]
    for entry in entries:
        assert set(entry) == FIELDS
        assert isinstance(entry["seq"], int) and 0 < entry["seq"] <= history.seq
        numbers = ("at", "bundle_mtime", "duration", "watch")
        assert all(isinstance(entry[k], float | int) for k in numbers)
        assert all(isinstance(entry[k], str) for k in ("version", "sha256", "outcome", "reason"))
        assert entry["reason"].isprintable() and len(entry["reason"]) <= REASON_LIMIT + 40
    return entries


def test_history_keeps_the_last_entries_per_app(tmp_path):
    history = DeployHistory(tmp_path / "history.json", per_app=3, max_apps=2)
    for i in range(5):
        history.record(finished(app="a", reason=str(i)))
    history.record(finished(app="b"))
    history.record(finished(app="c"))
    assert [e["reason"] for e in history.entries("a")] == []  # the app seen longest ago left
    loaded = DeployHistory(tmp_path / "history.json", per_app=3, max_apps=2)
    loaded.load()
    assert loaded.seq == 7
    assert "a" not in loaded and "b" in loaded and "c" in loaded
    history = DeployHistory(tmp_path / "other.json", per_app=3)
    for i in range(5):
        history.record(finished(app="a", reason=str(i)))
    assert [e["reason"] for e in history.entries("a")] == ["2", "3", "4"]


def test_an_entry_keeps_the_failure_kind(tmp_path):
    history = DeployHistory(tmp_path / "history.json")
    entry = history.record(finished(outcome="failed", reason="x", kind=FailureKind.HEALTH_CHECK))
    assert (entry["outcome"], entry["kind"]) == ("failed", "health-check")
    loaded = DeployHistory(tmp_path / "history.json")
    loaded.load()
    assert loaded.last("hello") == entry


def test_a_huge_reason_is_capped_and_made_safe(tmp_path):
    history = DeployHistory(tmp_path / "history.json")
    problems = "; ".join(f"webapp.k{i}: unknown key" for i in range(200_000))  # about 4 MiB
    entry = history.record(finished(outcome="failed", reason=problems))
    assert len(entry["reason"]) < REASON_LIMIT + 40
    assert entry["reason"].startswith("webapp.k0: unknown key; webapp.k1")
    assert entry["reason"].endswith(f"({len(problems) - REASON_LIMIT} more characters)")
    assert (tmp_path / "history.json").stat().st_size < 3 * REASON_LIMIT

    escapes = history.record(finished(outcome="failed", reason="\x1b]0;pwned\x07\x1b[2J\nforged"))
    assert escapes["reason"] == "\\x1b]0;pwned\\x07\\x1b[2J\\nforged"


def test_text_escaped_upstream_is_not_escaped_twice():
    once = capped_text("bad \x1b[31m", 100)
    assert once == "bad \\x1b[31m"
    assert capped_text(once, 100) == once
    assert capped_text("x" * 50, 10) == "x" * 10 + "... (40 more characters)"


def test_the_file_keeps_to_its_budget_dropping_the_oldest_entries(tmp_path, caplog):
    budget = 64 * 1024
    history = DeployHistory(tmp_path / "history.json", budget=budget)
    with caplog.at_level(logging.WARNING):
        for i in range(100):
            history.record(finished(app=f"app{i % 7}", outcome="failed", reason="y" * 5000))
    assert (tmp_path / "history.json").stat().st_size <= budget
    assert history.seq == 100
    assert all(history.last(f"app{n}") for n in range(7))  # every app keeps its last entry
    newest = sorted(e["seq"] for e in well_formed(history))
    assert newest == list(range(newest[0], 101))  # the oldest went first
    assert "dropped its" in caplog.text


def test_a_damaged_history_file_is_set_aside(tmp_path, caplog):
    path = tmp_path / "history.json"
    path.write_text("{not json")
    history = DeployHistory(path)
    with caplog.at_level(logging.ERROR):
        history.load()
    assert history.seq == 0
    assert (tmp_path / "history.json.damaged").read_text() == "{not json"
    assert "history.json is damaged" in caplog.text


def test_a_history_file_cut_short_keeps_what_came_before_the_cut(tmp_path, caplog):
    source = DeployHistory(tmp_path / "whole.json")
    for i in range(30):
        source.record(finished(app=f"app{i % 3}", reason=f"reason {i}"))
    whole = (tmp_path / "whole.json").read_bytes()
    originals = {e["seq"]: e for app in ("app0", "app1", "app2") for e in source.entries(app)}
    path = tmp_path / "history.json"
    path.write_bytes(whole[: int(len(whole) * 0.8)])
    history = DeployHistory(path)
    with caplog.at_level(logging.ERROR):
        history.load()
    kept = well_formed(history)
    assert 15 <= len(kept) < 30
    assert all(originals[e["seq"]] == e for e in kept)  # nothing invented, nothing altered
    assert history.seq >= max(e["seq"] for e in kept)
    assert "kept the" in caplog.text and (tmp_path / "history.json.damaged").exists()
    history.record(finished(app="app0"))  # numbers never repeat
    assert history.last("app0")["seq"] not in originals or history.seq > 30


def test_a_huge_history_from_an_older_keter_loads_capped_and_is_rewritten(tmp_path):
    """Three bundles' 4 MiB reasons, as an older keter kept them: loaded, capped, rewritten."""
    path = tmp_path / "history.json"
    reason = "webapp.x: unknown key; " * 190_000  # 4.2 MiB
    entries = [
        {
            "seq": n,
            "at": 1.0,
            "version": "0123456789ab",
            "sha256": "",
            "bundle_mtime": 1.0,
            "outcome": "failed",
            "reason": reason,
            "duration": 0.1,
        }
        for n in (1, 2, 3)
    ]
    path.write_text(json.dumps({"seq": 3, "apps": {"big": entries}}))
    assert path.stat().st_size > 12 << 20  # over the 4 MiB budget and 3x the cap
    history = DeployHistory(path)
    history.load()
    assert [e["seq"] for e in well_formed(history)] == [1, 2, 3]
    assert history.last("big")["kind"] is None
    assert path.stat().st_size < 4 * REASON_LIMIT * 3


def test_a_history_beyond_the_read_limit_loads_its_beginning(tmp_path):
    source = DeployHistory(tmp_path / "whole.json")
    for _ in range(100):
        source.record(finished(app="a", reason="r" * 1000))
    path = tmp_path / "history.json"
    path.write_bytes((tmp_path / "whole.json").read_bytes())
    history = DeployHistory(path, read_limit=40_000)
    history.load()
    assert 10 < len(well_formed(history)) < 50
    assert (tmp_path / "history.json.damaged").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"null",
        b"[]",
        b'{"seq": "x", "apps": []}',
        b'{"seq": 5, "apps": {"../etc": [{"seq": 1}], "ok": [{"seq": 2, "reason": 7}]}}',
        b'{"seq": 1e999, "apps": {"ok": [{"seq": true}, {"seq": 3, "at": NaN}]}}',
        b'{"seq": ' + b"9" * 5000 + b', "apps": {}}',
        b"\xff\xfe\x00garbage",
        b'{"seq": 2, "apps": {"a": [{"seq": 1, "reason": "\\u001b[2J\\ud800"}',
    ],
)
def test_odd_history_files_never_stop_keter(tmp_path, content):
    path = tmp_path / "history.json"
    path.write_bytes(content)
    history = DeployHistory(path)
    history.load()
    well_formed(history)
    assert "../etc" not in history
    history.record(finished(app="ok"))
    assert history.last("ok")["seq"] == history.seq


# No deadline: each example writes and fsyncs a file; 299 ms was seen on a loaded machine.
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=30,
    ),
    st.integers(0, 400),
)
def test_any_history_json_loads_what_it_can(tmp_path: Path, apps, cut: int):
    data = json.dumps({"seq": 3, "apps": {"a": [{"seq": 1}, apps], "b": apps}})
    path = tmp_path / "history.json"
    path.write_text(data[: cut or None])
    history = DeployHistory(path)
    history.load()
    well_formed(history)


def test_the_app_forgotten_is_the_one_deployed_longest_ago(tmp_path):
    history = DeployHistory(tmp_path / "history.json", max_apps=2)
    for app in ("a", "b", "a", "c"):  # a deployed again after b: b is the oldest now
        history.record(finished(app=app))
    assert "a" in history and "b" not in history and "c" in history
    # A loaded file keeps that order: the newest first to stay.
    loaded = DeployHistory(tmp_path / "history.json", max_apps=1)
    loaded.load()
    assert "c" in loaded and "a" not in loaded


def test_a_host_with_a_thousand_apps_keeps_every_apps_history(tmp_path):
    history = DeployHistory(tmp_path / "history.json")
    for round_ in range(2):
        for n in range(1000):
            history.record(finished(app=f"app{n:04d}", reason=str(round_)), save=False)
    history.flush()
    loaded = DeployHistory(tmp_path / "history.json")
    loaded.load()
    assert all(len(loaded.entries(f"app{n:04d}")) == 2 for n in range(1000))


def test_the_file_is_the_json_of_every_apps_entries(tmp_path):
    """Entries are kept as text in memory; the file is still exactly the JSON document
    {"seq": N, "apps": {APP: [ENTRY, ...]}}, whatever the entries hold."""
    history = DeployHistory(tmp_path / "history.json")
    for i in range(30):
        history.record(finished(app=f"a{i % 4}", reason="é\x1b[2J\n" * (i % 3)))
    expected = {"seq": 30, "apps": {f"a{n}": history.entries(f"a{n}") for n in (2, 3, 0, 1)}}
    raw = (tmp_path / "history.json").read_bytes()
    assert raw == json.dumps(expected, separators=(",", ":")).encode()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    apps=st.lists(st.sampled_from("abc"), min_size=1, max_size=40),
    per_app=st.integers(1, 6),
    budget=st.sampled_from([700, 2000, 1 << 20]),
    after=st.integers(0, 45),
)
def test_the_entries_kept_packed_read_back_as_a_plain_list_would(
    tmp_path, apps, per_app, budget, after
):
    """Older entries are kept compressed, the newest plain: what ``entries`` and ``last``
    give, for any ``after``, is what a plain list of every app's entries gives, through
    dropping for the budget and a reload."""
    history = DeployHistory(tmp_path / "history.json", per_app=per_app, budget=budget)
    for n, app in enumerate(apps):
        history.record(finished(app=app, reason=f"r{n}"))
    loaded = DeployHistory(tmp_path / "history.json", per_app=per_app, budget=budget)
    loaded.load()
    on_file = json.loads((tmp_path / "history.json").read_bytes())["apps"]
    for kept in (history, loaded):
        for app in set(apps):
            plain = on_file[app]
            assert 1 <= len(plain) <= per_app
            assert kept.entries(app, after) == [e for e in plain if e["seq"] > after]
            assert kept.last(app) == plain[-1]
            reasons = [f"r{n}" for n, a in enumerate(apps) if a == app]
            if budget == 1 << 20:  # nothing dropped for the budget
                assert [e["reason"] for e in plain] == reasons[-per_app:]
            else:  # the oldest dropped first, the newest always kept
                assert [e["reason"] for e in plain] == reasons[len(reasons) - len(plain) :]
