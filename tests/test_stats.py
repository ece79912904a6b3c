"""Traffic statistics, access logs and the watched rollout (issue 14).

The pure parts (record format, histogram, windows, spool) get fast unit tests
and property tests; the tests of record run the real daemon behind a private
nginx and compare keter's numbers with what the test's own clients sent and
received.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import math
import os
import queue
import random
import re
import socket
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from subprocess import CompletedProcess

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.bundles import make_bundle, webapp_config
from support.daemon import keter_cli, status_api
from support.net import served
from support.spool import spool_line
from support.wait import wait_for

from keter.config import KeterConfig
from keter.messages import AppGone, VersionServing, VersionUnhealthy, WatchVerdict, WatchVersion
from keter.names import validate_app_name
from keter.stats import component as stats_component
from keter.stats import spool
from keter.stats.component import FORGET_WATCH, StatsCollector, _Watch
from keter.stats.histogram import (
    BUCKETS,
    FLOOR,
    GROWTH,
    RELATIVE_ERROR,
    Histogram,
    bucket,
)
from keter.stats.record import (
    access_log_directive,
    log_format_directive,
    log_format_name,
    parse,
    status_class,
)
from keter.stats.slot import Slot, packed_records
from keter.stats.traffic import (
    FINE,
    KEEP,
    MINUTE,
    MINUTES,
    SLOT,
    SLOTS,
    Traffic,
)

# -- helpers ---------------------------------------------------------------------------------


def send(port: int, host: str, paths: list[str], clients: int = 4) -> tuple[Counter, list[float]]:
    """GET every path through nginx (keep-alive clients): statuses seen, and each latency."""
    statuses: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    queue = list(paths)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                if not queue:
                    break
                path = queue.pop()
            began = time.perf_counter()
            connection.request("GET", path, headers={"Host": host})
            response = connection.getresponse()
            response.read()
            took = time.perf_counter() - began
            with lock:
                statuses[response.status // 100] += 1
                latencies.append(took)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses, latencies


def version_classes(stats: dict, version: str) -> dict[str, int]:
    """The last hour's counts of one version, by status class (zeros left out)."""
    for entry in stats["versions"]:
        if entry["version"] == version:
            return {k: n for k, n in entry["windows"][-1]["classes"].items() if n}
    return {}


def deploy(keter, client, nginx, tmp_path: Path, name: str, version: str, **config) -> str:
    """Deploy through incoming/ and wait (through the API, never through the app's host, so
    every request the app gets is the test's) until nginx serves it; its version."""
    bundle = make_bundle(
        tmp_path / f"{name}.keter", config=webapp_config(f"{name}.test", version, **config)
    )
    before = (
        len(client.app(name)["history"])
        if name in [a["name"] for a in client.status()["apps"]]
        else 0
    )
    keter.drop(bundle)
    entry = wait_for(
        lambda: len(client.app(name)["history"]) > before and client.app(name)["history"][0],
        20,
        f"{name} {version} to be deployed",
    )
    assert entry["outcome"] == "serving", entry
    nginx.wait_settled()
    return entry["version"]


# -- the record format -----------------------------------------------------------------------


def test_a_record_becomes_an_access_line():
    record = parse(spool_line(status=404, sent=12, upstream="0.002, 0.004"))
    assert record is not None
    assert (record.app, record.version, record.status, record.bytes_sent) == (
        "hello",
        "0123456789ab",
        404,
        12,
    )
    assert math.isclose(record.upstream_time, 0.006)
    assert record.line == (
        b'127.0.0.1 - - [30/Nov/2026:03:40:25 +0000] "GET / HTTP/1.1" 404 12 "-" "curl/7.88" '
        b"hello.test 0.005 0.002, 0.004 0123456789ab"
    )
    assert parse(spool_line(upstream="-")).upstream_time is None


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"garbage",
        spool_line(status=1000),
        spool_line(status=-1),
        spool_line().replace(b"k2", b"k3", 1),
        spool_line().replace(b"k2", b"k1", 1),  # the old tag, with the new field count
        spool_line() + b"\textra",
        spool_line().replace(b"200", b"2x0", 1),
        spool_line(upstream="nope"),
        spool_line(at=math.nan),
        spool_line(at=math.inf),
        spool_line(at=-math.inf),
        "\t".join(["k2", "h\u00e9llo"] + ["1"] * 14).encode(),
    ],
)
def test_a_line_that_is_not_a_record_is_skipped(line):
    assert parse(line) is None


def test_a_line_of_the_format_before_is_still_read():
    # k1 had no $upstream_addr: a keter upgraded with records left in its spool.
    old = spool_line(upstream="0.004", upstream_addr="DROP").replace(b"\tDROP", b"", 1)
    record = parse(old.replace(b"k2", b"k1", 1))
    assert record is not None and record.upstream_time == 0.004
    assert record.line == parse(spool_line(upstream="0.004")).line


@pytest.mark.parametrize(
    ("addr", "reached"),
    [
        ("127.0.0.1:40001", True),
        ("[::1]:40001", True),
        ("unix:/run/app.sock", True),
        ("keter_up_hello", False),  # max_conns all taken: nginx's own 502 at once
        ("127.0.0.1:40001, keter_up_hello", False),  # the last try found none
        ("keter_up_hello, 127.0.0.1:40001", True),
        ("127.0.0.1:40001 : keter_up_other", False),  # after an internal redirect
        ("-", False),
    ],
)
def test_an_answer_is_the_apps_only_if_nginx_reached_an_address(addr, reached):
    record = parse(spool_line(status=502, upstream="0.000", upstream_addr=addr))
    assert (record.upstream_time is not None) is reached
    assert record.line.endswith(b" 0.000 0123456789ab" if reached else b" - 0123456789ab")


@pytest.mark.parametrize(
    ("status", "index"), [(0, 4), (101, 0), (204, 1), (399, 2), (404, 3), (599, 4), (999, 4)]
)
def test_a_status_outside_http_counts_as_a_server_error_and_is_never_left_out(status, index):
    record = parse(spool_line(status=status))
    assert record is not None and record.status == status  # its access line is written
    assert status_class(status) == index


def _valid_app(name: str) -> bool:
    try:
        validate_app_name(name)
    except ValueError:
        return False
    return True


APP_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(_valid_app)


@given(st.lists(APP_NAMES, min_size=2))
def test_no_two_apps_log_formats_are_one_to_nginx(apps):
    # nginx finds an access_log's format ignoring case: "Foo" and "foo" were one format.
    named = {log_format_name(app).lower() for app in set(apps)}
    assert len(named) == len(set(apps))


def test_apps_whose_names_differ_in_case_have_their_own_traffic(keter, private_nginx, tmp_path):
    # foo's requests went to access-Foo.log and were counted as Foo's.
    for name, host in (("Foo", "upper.test"), ("foo", "lower.test")):
        folder = tmp_path / name
        folder.mkdir()
        keter.drop(make_bundle(folder / f"{name}.keter", config=webapp_config(host, name)))
        served(private_nginx, host, name)
    client = status_api(keter)
    logs = keter.root / "log"

    def hosts(app: str) -> list[str]:
        path = logs / f"access-{app}.log"
        text = path.read_text() if path.exists() else ""
        return [line.rsplit('"', 1)[1].split()[0] for line in text.splitlines()]

    assert send(private_nginx.port, "lower.test", ["/"] * 5)[0] == {2: 5}
    wait_for(lambda: hosts("foo").count("lower.test") >= 5, 10, "foo's requests in its log")
    assert set(hosts("foo")) == {"lower.test"} and set(hosts("Foo")) <= {"upper.test"}
    assert wait_for(lambda: client.get("/api/apps/foo/stats")["windows"][0]["requests"], 10)


def test_the_renderer_lines_name_the_app_and_version_literally():
    directive = log_format_directive("my-app.x", "0123456789ab")
    assert directive.startswith(
        "log_format keter_log_my_2dapp_2ex 'k2\\tmy-app.x\\t0123456789ab\\t"
    )
    assert log_format_directive("a", "unknown") != log_format_directive("a", "0123")
    assert "\\t-\\t$msec" in log_format_directive("a", "unknown")
    assert access_log_directive("/r/run/access.spool", "a") == (
        'access_log "/r/run/access.spool" keter_log_a buffer=64k flush=1s;'
    )
    # Any ROOT keter takes: a space, a ; or a letter beyond ASCII made every deploy fail.
    assert access_log_directive('/r é/a;b"c/s', "a").startswith('access_log "/r é/a;b\\"c/s" ')
    for bad in ("/r/$run/spool", "/r/a\nb", "relative"):
        with pytest.raises(ValueError):
            access_log_directive(bad, "a")
    with pytest.raises(ValueError):
        log_format_directive("a'b", "0123")


def test_the_renderer_logs_apps_with_a_version_and_nothing_else():
    from keter.config import Listener
    from keter.messages import Site
    from keter.nginx import ProxyOptions
    from keter.nginx.render import render

    sites = [
        Site(app="a", hosts=("a.test",), port=4001, version="0123456789ab"),
        Site(app="keter-dashboard", hosts=("dash.test",), port=4002),  # keter's own: no version
    ]
    listeners = [Listener("127.0.0.1", 8080)]
    on = render(sites, listeners, 1, ProxyOptions(access_spool=Path("/r/run/access.spool")))
    assert on.count("log_format ") == 1 and "'k2\\ta\\t0123456789ab\\t" in on
    assert on.count('access_log "/r/run/access.spool" keter_log_a buffer=64k flush=1s;') == 1
    off = render(sites, listeners, 1, ProxyOptions())
    assert "log_format" not in off and "access_log" not in off


# -- the histogram ---------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    st.lists(st.floats(min_value=0, max_value=600, allow_nan=False), min_size=1, max_size=400),
    st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]),
)
def test_percentiles_are_within_the_documented_error(values: list[float], q: float):
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    exact = sorted(values)[max(1, math.ceil(q * len(values))) - 1]
    found = histogram.quantile(q)
    if exact <= FLOOR:
        assert found <= FLOOR
    else:
        assert abs(found - exact) <= exact * RELATIVE_ERROR + 1e-12


_NUMBERISH = st.one_of(
    st.floats().map(repr),
    st.integers().map(str),
    st.sampled_from(["-", "", "inf", "-inf", "nan", "1e400", "9" * 400, "0.001, 0.002 : -"]),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.floats(1.6e9, 1.8e9).map(repr), _NUMBERISH),  # $msec
            st.one_of(st.integers(100, 599).map(str), _NUMBERISH),  # $status
            st.one_of(st.integers(0, 10**6).map(str), _NUMBERISH),  # $body_bytes_sent
            _NUMBERISH,  # $upstream_response_time
        ),
        max_size=20,
    )
)
def test_no_spool_line_breaks_the_statistics(fields):
    """Whatever a (damaged) spool says for a record's time, status, bytes and upstream
    time, reading it never raises: it is counted, or skipped."""
    traffic = Traffic()
    for at, status, sent, upstream in fields:
        line = spool_line().split(b"\t")
        line[3], line[4], line[5], line[7] = (
            x.encode("utf-8", "replace") for x in (at, status, sent, upstream)
        )
        record = parse(b"\t".join(line))
        if record is not None:
            traffic.add(record)
            traffic.prune(record.at)
            traffic.summary("hello", record.at, 3600)


@given(st.floats())
def test_every_latency_a_spool_line_can_say_has_a_bucket(seconds: float):
    """inf, 1e308, nan, negatives: nginx never writes them, a damaged spool might."""
    assert 0 <= bucket(seconds) < BUCKETS
    if seconds > FLOOR and seconds / FLOOR < math.inf:  # the formula has a value: the same
        exact = math.ceil(math.log(seconds / FLOOR) / math.log(GROWTH))
        assert bucket(seconds) == min(BUCKETS - 1, exact)
    traffic = Traffic()
    template = parse(spool_line())
    template.upstream_time = seconds
    traffic.add(template)
    assert traffic.summary("hello", template.at, 60).requests == 1


def counted(at: float, now: float, seconds: int) -> bool:
    """Whether a record made at ``at`` counts in the window of ``seconds`` before ``now``,
    once pruned at ``now``: its slot (10 seconds, or its minute once FINE old) overlaps
    the window and is not forgotten."""
    start, length = at // SLOT * SLOT, SLOT
    if start < now - FINE:  # joined its minute
        start, length = at // MINUTE * MINUTE, MINUTE
    return now - seconds - length < start <= now and start >= now - KEEP - MINUTE


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),  # app
            st.sampled_from(["v1", "v2", "v3"]),  # version
            st.integers(min_value=0, max_value=2 * KEEP),  # seconds after the first record
            st.sampled_from([200, 302, 404, 503]),
            st.booleans(),  # whether the collector prunes (at that moment) before it
        ),
        max_size=60,
    )
)
def test_windows_are_the_records_still_in_the_hour_whatever_was_pruned(records):
    """Every window equals a count of the records themselves (by app, version, status class),
    after any prunes in between: pruning forgets exactly the slots that left the hour."""
    base = 1_700_000_000
    template = parse(spool_line())
    traffic = Traffic()
    clock = base
    for app, version, offset, status, prune_first in sorted(records, key=lambda r: r[2]):
        # The collector prunes every second, so its horizon never lags an hour behind.
        clock = max(clock, base + offset - KEEP // 2)
        traffic.prune(clock)
        if prune_first:
            traffic.prune(base + offset)
        template.app, template.version, template.status = app, version, status
        template.at = base + offset
        traffic.add(template)
    now = base + 2 * KEEP
    traffic.prune(now)
    for app in ("a", "b", "c"):
        for version in (None, "v1", "v2", "v3"):
            for seconds in (60, 300, 3600):
                summary = traffic.summary(app, now, seconds, version)
                expected = [0, 0, 0, 0, 0]
                for a, v, offset, status, _ in records:
                    if a == app and version in (None, v) and counted(base + offset, now, seconds):
                        expected[status // 100 - 1] += 1
                assert list(summary.classes) == expected, (app, version, seconds)
        kept = {v for v in ("v1", "v2", "v3") if traffic.summary(app, now, KEEP + SLOT, v).requests}
        assert set(traffic.versions(app)) == kept


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2 * KEEP),  # the record's time, any order
            st.sampled_from([200, 404, 503]),
            st.integers(min_value=0, max_value=900),  # how far the clock moves first
        ),
        max_size=60,
    )
)
def test_late_records_and_backlogs_land_in_the_windows_once(records):
    """Records in any order (late ones, backlogs): each counts once in every window that
    overlaps its slot, whether it landed in a 10-second slot, a minute, or a packed minute
    that had to be taken back out."""
    base = 1_700_000_000
    template = parse(spool_line())
    traffic = Traffic()
    clock = base
    kept = []
    for offset, status, advance in records:
        clock += advance
        traffic.prune(clock)
        template.at, template.status = base + offset, status
        traffic.add(template)
        if (base + offset) // SLOT * SLOT <= clock + KEEP:  # else a clock gone wild: refused
            kept.append((base + offset, status))
    now = max(clock, base + 2 * KEEP) + 30
    traffic.prune(now)
    for seconds in (60, 300, 3600):
        expected = [0, 0, 0, 0, 0]
        for at, status in kept:
            if counted(at, now, seconds):
                expected[status // 100 - 1] += 1
        assert list(traffic.summary("hello", now, seconds).classes) == expected, seconds
    # Packed runs stay in start order, so forgetting (which drops a run's head) leaves
    # nothing older than the hour behind.
    for run in traffic._minutes.packed.get("hello", {}).values():
        starts = [start for start, *_ in packed_records(run.records)]
        assert starts == sorted(starts) and starts[-1] == run.newest
        assert starts[0] >= now - KEEP - MINUTE


def test_memory_stays_flat_under_a_million_requests():
    """Issue 14 of record, the pure half: no per-request storage. What grows is counted: a
    slot per version and 10 seconds, a counter per latency bucket used; a million requests
    make barely more of them than two hundred thousand in the same ten minutes."""
    traffic = Traffic()
    rng = random.Random(14)
    # Whole seconds into a minute, so that the oldest slot the ten minutes reach is 5 s
    # of them (10-second slots) or 15 s (minutes): the first feed surely fills it. At
    # any time.time() its share could be a millisecond, which 200,000 requests could
    # miss and the next 800,000 fill (41 slots, then 42).
    now = float(int(time.time()) // 60 * 60 + 35)
    template = parse(spool_line())

    def feed(count: int) -> None:
        for _ in range(count):
            template.version = rng.choice(("aaaa", "bbbb"))
            template.at = now - rng.uniform(0, 590)  # the last ten minutes
            template.status = rng.choice((200, 200, 200, 302, 404, 500))
            template.upstream_time = round(rng.expovariate(20), 3)  # nginx's milliseconds
            traffic.add(template)

    def size() -> tuple[int, int]:
        slots = [slot for _, slot in traffic._slots("hello", None, 0, math.inf)]
        return len(slots), sum(len(slot.counts) for slot in slots)

    feed(200_000)
    traffic.prune(now)
    slots, buckets = size()
    feed(800_000)
    traffic.prune(now)
    assert traffic.summary("hello", now, 3600).requests == 1_000_000
    # Per version: the last FINE seconds in 10-second slots, the rest of the ten minutes
    # in minutes.
    assert size()[0] == slots <= 2 * ((FINE // SLOT + 1) + (600 // MINUTE + 1))
    assert size()[1] < buckets * 1.25  # the rarest latencies fill a few more buckets


def packed_minutes(traffic: Traffic, app: str) -> int:
    """How many of the app's minutes are packed (``Slot.freeze``), all versions."""
    runs = traffic._minutes.packed.get(app, {}).values()
    return sum(len(list(packed_records(run.records))) for run in runs)


def test_an_hour_of_uptime_checks_keeps_minutes_not_ten_second_slots():
    """Issue 16's host: 1000 apps, each asked by a monitor every 10 seconds. A slot per
    app and 10 seconds for an hour was 361 slots an app (about 200 MB for 1000 apps);
    10-second slots join their minute once FINE old, so an app keeps about 75, and every
    window and the per-minute series still count each request once."""
    traffic = Traffic()
    template = parse(spool_line())
    end = 1_700_003_640  # on a minute: windows longer than FINE have minute edges
    apps = [f"a{i}" for i in range(20)]
    for at in range(end - KEEP + 5, end, SLOT):  # one check per app every 10 s, for an hour
        for app in apps:
            template.app, template.at = app, at
            traffic.add(template)
        traffic.prune(at)  # the collector prunes every second
    traffic.prune(end)
    for app in apps:
        kept = list(traffic._slots(app, None, 0, math.inf))
        assert len(kept) <= (FINE // SLOT + 2) + (KEEP // MINUTE + 1), len(kept)
        assert packed_minutes(traffic, app) >= KEEP // MINUTE - 3
        assert traffic.summary(app, end, 60).requests == 6
        assert traffic.summary(app, end, 300).requests == 30
        assert traffic.summary(app, end, KEEP).requests == KEEP // SLOT
        assert [requests for _, requests, _, _ in traffic.minutes(app, end)][:-1] == [6] * 59
        # Off the minute, a window takes in the whole minute at its far edge: at most a
        # minute's requests more.
        assert 30 < traffic.summary(app, end - 20, 300).requests <= 30 + 6


def test_an_hour_read_at_once_is_packed_at_the_next_prune():
    """A backlog (keter busy, or stopped while nginx logged) brings old minutes after
    newer ones were packed: they are packed too, at the next prune."""
    traffic = Traffic()
    template = parse(spool_line())
    end = 1_700_003_640
    traffic.prune(end - 5)  # the collector ran before the backlog came
    for at in range(end - KEEP + 5, end, SLOT):
        template.at = at
        traffic.add(template)
    traffic.prune(end)
    assert packed_minutes(traffic, "hello") >= KEEP // MINUTE - 3
    assert traffic.summary("hello", end, KEEP).requests == KEEP // SLOT


@pytest.mark.parametrize("frozen", [False, True])
def test_a_record_arriving_after_its_slot_joined_its_minute_is_counted_there(frozen):
    traffic = Traffic()
    template = parse(spool_line())
    now = 1_700_000_000
    template.at = now - 5
    traffic.add(template)
    later = now + FINE + SLOT  # its 10-second slot has joined its minute
    if frozen:
        later += 2 * MINUTE  # and the minute is complete: packed
    traffic.prune(later)
    assert packed_minutes(traffic, "hello") == (1 if frozen else 0)
    template.at = now - 1  # late: the same 10 seconds
    traffic.add(template)
    assert traffic.summary("hello", later, 600).requests == 2
    assert [slot.count for _, slot in traffic._slots("hello", None, 0, math.inf)] == [2]
    traffic.prune(later + KEEP + MINUTE + SLOT)
    assert traffic.apps() == []


@settings(max_examples=200)
@given(
    st.lists(st.integers(min_value=0, max_value=10**6), min_size=5, max_size=5),
    st.integers(min_value=-(2**63), max_value=2**63),  # bytes: what a spool line says
    st.lists(st.floats(min_value=0, max_value=10**6, allow_nan=False), max_size=50),
)
def test_a_frozen_slot_thaws_to_the_same_counts(classes, size, latencies):
    slot = Slot()
    slot.classes, slot.bytes = list(classes), size
    for latency in latencies:
        slot.add(latency)
    thawed = Slot.thaw(slot.freeze())
    assert (thawed.classes, thawed.bytes) == (slot.classes, slot.bytes)
    assert (thawed.counts, thawed.count) == (slot.counts, slot.count)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=False, allow_infinity=False),  # a record's time: any clock
            st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),  # a prune before it
        ),
        max_size=40,
    )
)
def test_no_record_time_and_no_clock_breaks_the_statistics(records):
    """Times from a clock gone wild (1970, the far future, jumps back) never raise and
    never keep more than a version's bound of slots."""
    traffic = Traffic()
    template = parse(spool_line())
    for at, pruned in records:
        if pruned is not None:
            traffic.prune(pruned)
        template.at = at
        traffic.add(template)
        traffic.summary("hello", at, 3600)
    kept = list(traffic._slots("hello", None, -math.inf, math.inf))
    assert len(kept) <= SLOTS + MINUTES
    assert sum(slot.count for _, slot in kept) <= len(records)


def count_calls(monkeypatch, owner: object, name: str, key) -> Counter:
    """Count the calls of ``owner.name`` by ``key(first argument)``, still making them."""
    calls: Counter = Counter()
    original = getattr(owner, name)

    def counting(first, *args, **kwargs):
        calls[key(first)] += 1
        return original(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_a_query_its_asker_gave_up_on_is_not_worked_out(tmp_path, monkeypatch):
    """Queries wait their turn in the actor's inbox; one whose HTTP thread stopped
    waiting was still worked out (17 ms each for an app with an hour of traffic), so a
    flood of them kept the actor from the spool and the watches."""
    monkeypatch.setattr(stats_component, "QUERY_TIMEOUT", 0.05)
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    worked = count_calls(monkeypatch, stats, "details", key=str)
    with pytest.raises(concurrent.futures.TimeoutError):
        stats.query("hello")  # the actor is not running: nobody answers in time
    [queued] = list(stats.inbox.queue)
    stats.handle(queued)
    assert queued.reply.cancelled() and not worked
    answered = stats_component.TrafficQuery(app="hello")
    stats.handle(answered)
    assert answered.reply.result(timeout=1)["app"] == "hello" and worked == {"hello": 1}
    stats.on_stop()


def test_a_clock_set_back_does_not_stop_the_reports_or_the_watches(tmp_path, monkeypatch):
    """The interval between reports was measured on the wall clock: set back an hour
    (NTP, a virtual machine resumed), it stopped the reports and the checks of watched
    versions (their automatic rollback) for that hour."""
    clock = {"wall": time.time(), "mono": time.monotonic()}
    fake = type("Clock", (), {})()
    fake.time, fake.monotonic = (lambda: clock["wall"]), (lambda: clock["mono"])
    monkeypatch.setattr(stats_component, "time", fake)
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    monkeypatch.setattr(stats, "schedule", lambda delay, message: None)
    checked = count_calls(monkeypatch, stats, "_check_watches", key=lambda now: now)
    stats._tick()
    assert list(checked) == [clock["wall"]]
    clock["wall"] -= 3600  # set back
    clock["mono"] += stats_component.REPORT_EVERY
    stats._tick()
    assert list(checked) == [clock["wall"] + 3600, clock["wall"]]
    stats.on_stop()


def test_a_record_made_before_the_clock_was_set_back_holds_up_no_other(tmp_path, monkeypatch):
    # It waited to settle until the wall clock caught up with it, an hour, and every
    # record behind it (every app the kernel switches) waited, in memory, uncounted.
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    monkeypatch.setattr(stats, "schedule", lambda delay, message: None)
    now = time.time()
    with stats.spool_path.open("ab") as out:
        out.write(spool_line("hello", "-", at=now + 3600) + b"\n")
        out.write(b"".join(spool_line("other", "-", at=now - 5) + b"\n" for _ in range(100)))
    stats._tick()  # read
    stats._tick()  # settled
    assert len(stats._unsettled) == 0
    assert (tmp_path / "root" / "log" / "access-other.log").read_text().count("\n") == 100
    stats.on_stop()


@pytest.mark.parametrize("cleanup", ["cut short", "removed"])
def test_a_spool_cut_short_or_removed_by_hand_is_followed(tmp_path, monkeypatch, caplog, cleanup):
    # Its length only grows, which invites a clean-up. Cut short, it was never read again
    # (keter waited at the length it knew); removed, nginx made it again readable by
    # every local user at its next reload, and keter read the old one for good.
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    monkeypatch.setattr(stats, "schedule", lambda delay, message: None)
    monkeypatch.setattr(stats_component, "REPORT_EVERY", 0.0)
    path = stats.spool_path
    access = tmp_path / "root" / "log" / "access-hello.log"

    def write(count: int, to: Path = path) -> None:
        with to.open("ab") as out:
            out.write(b"".join(spool_line("hello") + b"\n" for _ in range(count)))

    def logged() -> int:
        for _ in range(5):  # ticks: what keter reads, follows and switches to
            stats._tick()
        return access.read_text().count("\n")

    write(50)
    assert logged() == 50
    nginx_has = os.open(path, os.O_WRONLY | os.O_APPEND)  # as nginx holds it, until a reload
    try:
        if cleanup == "cut short":
            os.truncate(path, 0)
        else:
            path.unlink()
        assert logged() == 50
        assert f"{path} was {cleanup}" in caplog.text
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        os.write(nginx_has, b"".join(spool_line("hello") + b"\n" for _ in range(5)))
        assert logged() == 55  # what nginx writes until its reload is counted
    finally:
        os.close(nginx_has)
    write(10)  # nginx reloaded: it writes to the spool at the path
    assert logged() == 65
    stats.on_stop()


def test_a_quiet_keter_adds_up_no_app_and_reports_nothing(tmp_path, monkeypatch):
    """Idle costs nothing per app (issue 16.5): after 1000 apps' last requests, each app
    is added up once more (when their slot leaves the minute, its rate falls to 0);
    otherwise a second adds up no app and sends no report; an hour later one report
    says they are gone."""
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    start = (int(time.time()) // 60) * 60 + 1.0  # just after a slot began
    apps = [f"app{i:04d}" for i in range(1000)]
    with stats.spool_path.open("ab") as out:
        out.write(b"".join(spool_line(app, at=start - 0.5) + b"\n" for app in apps))
    stats._read(time.monotonic() + 30)
    added_up = count_calls(monkeypatch, stats.traffic, "summary", key=str)
    first = stats.traffic_report(start)
    assert first is not None and [a.app for a in first.apps] == apps
    assert all(a.rate > 0 for a in first.apps)
    assert stats.traffic_report(start + 1) is None  # nothing new, no slot left the minute
    added_up.clear()
    reports = [stats.traffic_report(start + s) for s in range(2, 200)]
    zeroed = [r for r in reports if r is not None]
    # The rates fall to 0 once the requests' slot leaves the minute: one report says so.
    assert len(zeroed) == 1 and [a.rate for a in zeroed[0].apps] == [0.0] * 1000
    assert set(added_up.values()) == {1}  # once: when the slot of their requests left
    added_up.clear()
    assert all(stats.traffic_report(start + s) is None for s in range(200, 3600))
    assert not stats.traffic.prune(start + 3600)
    assert not added_up  # a quiet hour: no app added up
    # Their minute ended an hour ago: forgotten.
    assert stats.traffic.prune(start + 3600 + MINUTE) == set(apps)
    stats._gone |= set(apps)
    gone = stats.traffic_report(start + 3600 + MINUTE)
    assert gone is not None and gone.gone == tuple(apps) and not gone.apps
    stats.on_stop()


def test_a_removed_app_is_forgotten_and_its_late_records_only_written(tmp_path):
    """nginx flushes its buffers up to a second late (its retiring workers as they
    exit): such records of a removed app had reopened its access log for an hour and
    brought its series back into /metrics, which keeps none of an app that is gone."""
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()

    def read(n: int) -> None:
        with stats.spool_path.open("ab") as out:
            out.write(b"".join(spool_line("hello") + b"\n" for _ in range(n)))
        stats._read(time.monotonic() + 30)

    read(3)
    first = stats.traffic_report(time.time())
    assert first is not None and [a.app for a in first.apps] == ["hello"]
    access = stats.config.log_dir / "access-hello.log"
    stats.handle(AppGone(app="hello"))
    assert "hello" not in stats._logs and "hello" not in stats.traffic.totals
    gone = stats.traffic_report(time.time())
    assert gone is not None and gone.gone == ("hello",) and not gone.apps
    read(2)  # late
    assert len(access.read_bytes().splitlines()) == 5  # written
    assert "hello" not in stats._logs  # not held open
    assert "hello" not in stats.traffic.totals and stats.traffic_report(time.time()) is None
    stats.handle(VersionServing(app="hello", version="0123456789ab", since=time.time()))
    read(1)  # deployed again: counted again
    again = stats.traffic_report(time.time())
    assert again is not None and [a.app for a in again.apps] == ["hello"]
    assert again.apps[0].versions[0].classes == (0, 1, 0, 0, 0)  # only the new one
    stats.on_stop()


HELLO_WATCH = WatchVersion(
    app="hello",
    version="0123456789ab",
    previous="ba9876543210",
    seconds=60,
    max_error_ratio=0.05,
    min_requests=20,
)


def test_quiet_watched_versions_cost_nothing_until_their_window_ends(tmp_path, monkeypatch):
    """1000 versions watched at once, without traffic (issue 16.5: idle): a second's
    check looks at none of them and the report is not rebuilt; each passes once at its
    window's end, then is forgotten FORGET_WATCH later. A request wakes only its app."""
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    apps = [f"app{i:04d}" for i in range(1000)]
    for app in apps:
        stats.handle(dataclasses.replace(HELLO_WATCH, app=app))
    start = min(w.started for w in stats._watches.values())
    looked_at = count_calls(monkeypatch, stats.traffic, "summary", key=str)
    states = count_calls(monkeypatch, _Watch, "state", key=lambda watch: watch.order.app)
    first = stats.traffic_report(start)
    assert first is not None and len(first.watches) == 1000
    states.clear()
    for second in range(1, 59):
        stats._check_watches(start + second)
        assert stats.traffic_report(start + second) is None
    assert not looked_at and not states  # nobody looked at a quiet watch

    with stats.spool_path.open("ab") as out:
        out.write(spool_line("app0007", at=time.time()) + b"\n")
    stats._read(time.monotonic() + 30)
    stats._check_watches(start + 59)
    assert set(looked_at) == {"app0007"}  # its baseline, and only its
    report = stats.traffic_report(start + 59)
    assert report is not None and dict((w.app, w.requests) for w in report.watches)["app0007"] == 1

    stats._check_watches(start + 61)
    assert {w.verdict for w in stats._watches.values()} == {WatchVerdict.PASSED}
    assert stats.traffic_report(start + 61) is not None
    stats._check_watches(start + 61 + FORGET_WATCH)
    assert not stats._watches
    stats.on_stop()


def test_a_verdict_is_said_again_when_the_version_serves_again_in_its_window(tmp_path):
    """The supervisor lets a verdict pass while a deploy is on its way, and a restart of
    the watched version (keter env set) is one: the bad version stayed for good."""
    reports: queue.Queue = queue.Queue()
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"), report_to=reports)
    stats.on_start()
    order = HELLO_WATCH
    stats.handle(order)
    [watch] = stats._watches.values()
    with stats.spool_path.open("ab") as out:
        out.write(b"".join(spool_line(status=500, upstream="0.001") + b"\n" for _ in range(30)))
    stats._read(time.monotonic() + 30)
    stats._check_watches(watch.started + 1)
    first = reports.get_nowait()
    assert isinstance(first, VersionUnhealthy) and first.version == order.version
    stats.handle(VersionServing(app="hello", version="ffffffffffff", since=time.time()))
    assert reports.empty()  # another version: the verdict is not its
    stats.handle(VersionServing(app="hello", version=order.version, since=time.time()))
    assert reports.get_nowait() == first
    stats.on_stop()


def test_answers_nginx_gave_itself_do_not_judge_a_watched_version(tmp_path):
    """Any client can have nginx answer 501 or 400 itself (a bogus Transfer-Encoding, a
    malformed request) on the app's host: no upstream time, and not the version's doing.
    Counted, 30 of them had a healthy version rolled back."""
    stats = StatsCollector(KeterConfig(root=tmp_path / "root"))
    stats.on_start()
    stats.handle(HELLO_WATCH)
    [watch] = stats._watches.values()
    with stats.spool_path.open("ab") as out:
        for _ in range(30):
            out.write(spool_line(status=501, upstream="-", request="POST / HTTP/1.1") + b"\n")
        for _ in range(5):
            out.write(spool_line(status=502, upstream="0.000") + b"\n")  # the app was asked
    stats._read(time.monotonic() + 30)
    stats._check_watches(watch.started + 1)
    assert (watch.requests, watch.errors, watch.verdict) == (5, 5, WatchVerdict.WATCHING)
    stats.on_stop()


# -- the spool -------------------------------------------------------------------------------


def test_the_spool_gives_back_what_was_read_and_resumes_after_a_restart(tmp_path):
    path = tmp_path / "access.spool"
    spool.create(path)
    writer = open(path, "ab", buffering=0)  # noqa: SIM115 - nginx's side
    lines = [spool_line(at=1e9 + i) for i in range(40_000)]
    writer.write(b"\n".join(lines) + b"\n")
    reader = spool.Spool(path)
    read: list[bytes] = []
    while chunk := reader.read_lines():
        read.extend(chunk)
    assert read == lines
    writer.write(lines[0] + b"\npartial")
    reader.close()
    assert os.stat(path).st_blocks * 512 < 64 * 1024  # the disk holds what is unread only
    again = spool.Spool(path)
    assert again.read_lines() == [lines[0]]
    writer.write(b" end\n")
    assert again.read_lines() == [b"partial end"]
    again.close()
    assert spool.Spool(path).read_lines() == []


# -- against real nginx and the real daemon --------------------------------------------------


def test_counts_per_status_class_are_exact_per_version(keter, private_nginx, tmp_path):
    """Issue 14, of record: what keter counts is exactly what clients sent and received."""
    client = status_api(keter)
    v1 = deploy(keter, client, private_nginx, tmp_path, "traf", "v1")
    paths = ["/"] * 40 + ["/answer/404"] * 9 + ["/answer/500"] * 6 + ["/answer/302"] * 3
    random.shuffle(paths)
    first, _ = send(private_nginx.port, "traf.test", paths)
    assert first == {2: 40, 4: 9, 5: 6, 3: 3}
    v2 = deploy(keter, client, private_nginx, tmp_path, "traf", "v2")
    second, _ = send(private_nginx.port, "traf.test", ["/"] * 25 + ["/answer/503"] * 4)
    assert second == {2: 25, 5: 4}

    def counted() -> dict:
        stats = client.get("/api/apps/traf/stats")
        total = sum(stats["windows"][-1]["classes"].values())
        return stats if total >= 87 else None

    stats = wait_for(counted, 10, "nginx's records to reach keter")
    assert version_classes(stats, v1) == {"2xx": 40, "3xx": 3, "4xx": 9, "5xx": 6}
    assert version_classes(stats, v2) == {"2xx": 25, "5xx": 4}
    assert stats["windows"][0]["requests"] == 87  # the last minute

    access = (keter.root / "log" / "access-traf.log").read_text().splitlines()
    assert len(access) == 87  # one line per request
    assert Counter(line.split('"')[2].split()[0] for line in access) == Counter(
        {"200": 65, "404": 9, "500": 6, "302": 3, "503": 4}
    )
    assert access[-1].endswith(f" {v2}") and 'HTTP/1.1" ' in access[-1]

    # /metrics and keter status show the report the stats component sends every second.
    count = 'keter_http_upstream_latency_seconds_count{app="traf"} 87.0'
    metrics = wait_for(lambda: count in (m := client.text("/metrics")) and m, 5, "the report")
    assert f'keter_http_requests_total{{app="traf",status="5xx",version="{v1}"}} 6.0' in metrics
    assert f'keter_http_requests_total{{app="traf",status="2xx",version="{v2}"}} 25.0' in metrics
    [app] = client.status()["apps"]
    assert app["traffic"]["rate"] > 0 and app["traffic"]["error_ratio"] > 0

    # The operator's side: keter stats, keter status, keter logs --access.
    shown = keter_cli(keter.root, "stats", "traf")
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()[2:]]
    assert rows[0][:8] == ["all", "1m", "87", rows[0][3], "65", "3", "9", "10"]
    assert [row[0] for row in rows if len(row) == 13] == ["all", v2, v1]  # newest version first
    table = keter_cli(keter.root, "status").stdout.splitlines()
    assert table[0].split()[-4:] == ["REQ/S", "5XX", "LAST", "DEPLOY"]
    assert "11.5%" in table[1]  # 10 of 87
    tail = keter_cli(keter.root, "logs", "traf", "--access", "-n", "2")
    assert tail.stdout.splitlines() == access[-2:]

    # Once the app is removed keter lets go of its access log at once (it had kept it
    # open for an hour: an operator deleting it got its disk space back only then).
    log_file = keter.root / "log" / "access-traf.log"
    assert holds(keter, log_file)
    (keter.incoming / "traf.keter").unlink()
    wait_for(lambda: not holds(keter, log_file), 10, "keter to close the access log")
    # Its series go with it.
    wait_for(lambda: 'app="traf"' not in client.text("/metrics"), 10, "its series to go")


def holds(keter, path: Path) -> bool:
    """Whether keter has ``path`` open."""
    return any(Path(f.path) == path for f in psutil.Process(keter.proc.pid).open_files())


def test_latency_percentiles_match_the_clients_own(keter, private_nginx, tmp_path):
    """Issue 14, of record: p50/p95/p99 within the histogram's documented error (1%) of
    the load generator's own, plus what nginx's millisecond clock adds.

    Each request asks the app to sleep a known time, so the percentiles are bounded on
    both sides: never above what the clients measured (which adds nginx, the loopback
    and their own scheduling), never below the sleeps asked for (nginx's upstream time
    of each request is at least its sleep)."""
    client = status_api(keter)
    deploy(keter, client, private_nginx, tmp_path, "slow", "v1")
    rng = random.Random(7)
    sleeps = [round(rng.uniform(0.01, 0.12), 4) for _ in range(300)]
    paths = [f"/answer/200?sleep={sleep:.4f}" for sleep in sleeps]
    statuses, latencies = send(private_nginx.port, "slow.test", paths, clients=8)
    assert statuses == {2: 300}
    stats = wait_for(
        lambda: (s := client.get("/api/apps/slow/stats"))["windows"][0]["requests"] == 300 and s,
        10,
        "the records",
    )
    latencies.sort()
    sleeps.sort()
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        rank = max(1, math.ceil(q * len(latencies))) - 1
        theirs, asked = latencies[rank], sleeps[rank]
        ours = stats["windows"][0]["latency"][name]
        assert ours <= theirs * (1 + RELATIVE_ERROR) + 0.001, (name, ours, theirs)
        assert ours >= asked * (1 - RELATIVE_ERROR) - 0.001, (name, ours, asked)


# -- the watched rollout ---------------------------------------------------------------------


class Clients:
    """Keep-alive clients through nginx until stopped; every answer and failure is kept."""

    def __init__(self, port: int, host: str, clients: int = 4) -> None:
        self.port, self.host = port, host
        self.answers: Counter = Counter()  # (status, body)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        connection = None
        while not self.stop.is_set():
            reused = connection is not None
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("GET", "/", headers={"Host": self.host})
                response = connection.getresponse()
                answer = (response.status, response.read())
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                connection.close()
                connection = None
                if not reused:  # a keep-alive connection closed as it was reused: retried
                    with self.lock:
                        self.failures.append(repr(exc))
                continue
            except OSError as exc:
                connection.close()
                connection = None
                with self.lock:
                    self.failures.append(repr(exc))
                continue
            with self.lock:
                self.answers[answer] += 1
            time.sleep(0.002)  # pacing a client, not waiting for an outcome

    def finish(self) -> Counter:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
        return self.answers


WATCH = {"watch-seconds": 8, "watch-min-requests": 20}


def deploy_failing_v2(keter, tmp_path, app: str) -> CompletedProcess:
    """`keter deploy --watch` of a v2 of ``app`` that answers 500 to every other request."""
    bad = webapp_config(f"{app}.test", "v2", args=["--fail-every", "2"])
    (tmp_path / "v2").mkdir()
    bundle = make_bundle(tmp_path / "v2" / f"{app}.keter", config=bad)
    return keter_cli(keter.root, "deploy", str(bundle), "--watch", timeout=90)


def test_a_version_that_fails_real_traffic_is_rolled_back_without_losing_a_request(
    keter_factory, private_nginx, tmp_path
):
    """Issue 14.4, of record: v2 answers 500 to every other request while its health check
    passes; keter rolls it back within watch-seconds, and the rollback itself fails no
    request (every answer is v1's 200, or v2's own 200 or 500)."""
    keter = keter_factory(**WATCH)
    client = status_api(keter)
    deploy(keter, client, private_nginx, tmp_path, "watched", "v1")
    clients = Clients(private_nginx.port, "watched.test")
    try:
        result = deploy_failing_v2(keter, tmp_path, "watched")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "watching real traffic for 8s" in result.stderr
        # About half: keter's own health checks of / (straight to the app, so never
        # counted) take turns in v2's every-other count; 8 of 27 was seen.
        reason = r"rolled back: 5xx [1-6]\d\.\d% of \d+ requests vs 0\.0% before"
        assert re.search(reason, result.stderr), result.stderr
        wait_for(lambda: len(client.app("watched")["history"]) == 4, 20, "v1 back")
        private_nginx.wait_settled()
        served_v1 = clients.answers[(200, b"v1\n")]
        wait_for(lambda: clients.answers[(200, b"v1\n")] > served_v1 + 100, 10, "v1 answering")
    finally:
        answers = clients.finish()
    back, rolled, v2, v1 = client.app("watched")["history"]
    assert [e["outcome"] for e in (back, rolled, v2, v1)] == [
        "serving",
        "rolled-back",
        "serving",
        "serving",
    ]
    assert rolled["sha256"] == v2["sha256"] and back["sha256"] == v1["sha256"]
    assert rolled["at"] - v2["at"] <= 8  # within watch-seconds
    assert clients.failures == []
    assert set(answers) == {
        (200, b"v1\n"),
        (200, b"v2\n"),
        (500, b"failing every few requests\n"),
    }, answers
    assert answers[(200, b"v1\n")] > 0
    events = [e["text"] for e in client.status()["events"] if e["kind"] == "deploy-rolled-back"]
    assert events and "5xx" in events[0]


def test_a_healthy_version_passes_its_watch(keter_factory, private_nginx, tmp_path):
    keter = keter_factory(**{"watch-seconds": 3, "watch-min-requests": 20})
    client = status_api(keter)
    deploy(keter, client, private_nginx, tmp_path, "fine", "v1")
    clients = Clients(private_nginx.port, "fine.test", clients=2)
    try:
        (tmp_path / "v2").mkdir()
        good = make_bundle(tmp_path / "v2" / "fine.keter", config=webapp_config("fine.test", "v2"))
        result = keter_cli(keter.root, "deploy", str(good), "--watch", timeout=90)
    finally:
        answers = clients.finish()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed its watch" in result.stdout
    assert [e["outcome"] for e in client.app("fine")["history"]] == ["serving", "serving"]
    assert clients.failures == [] and {status for status, _ in answers} == {200}
    assert client.app("fine")["watch"]["verdict"] == "passed"


def test_nginx_answering_for_a_full_connection_cap_judges_no_version(
    keter_factory, private_nginx, tmp_path
):
    """Any client that holds an app's connections (a slow page, a long poll) has nginx answer
    every other request 502 itself ("no live upstreams"), with an upstream time of 0.000.
    Counted, 30 of them had a healthy watched version rolled back."""
    keter = keter_factory(
        **{"watch-seconds": 60, "watch-min-requests": 20, "app-max-connections": 1}
    )
    client = status_api(keter)
    deploy(keter, client, private_nginx, tmp_path, "capped", "v1")
    (tmp_path / "v2").mkdir()
    v2 = make_bundle(tmp_path / "v2" / "capped.keter", config=webapp_config("capped.test", "v2"))
    keter.drop(v2)
    wait_for(
        lambda: (client.app("capped").get("watch") or {}).get("verdict") == "watching",
        30,
        "v2 to be watched",
    )
    private_nginx.wait_settled()
    held = []
    try:
        for _ in range(private_nginx.workers):  # each worker's one connection to the app
            connection = socket.create_connection(("127.0.0.1", private_nginx.port))
            connection.sendall(b"GET /slow?60 HTTP/1.1\r\nHost: capped.test\r\n\r\n")
            held.append(connection)
        wait_for(lambda: private_nginx.request("capped.test")[0] == 502, 10, "the cap full")
        statuses = [private_nginx.request("capped.test")[0] for _ in range(30)]
        assert set(statuses) == {502}
        access = keter.root / "log" / "access-capped.log"
        wait_for(
            lambda: access.exists() and access.read_text().count('" 502 ') >= 31,
            10,
            "the 502s read",
        )
        # Its access lines say so: no upstream time ("-") before the version.
        ours = [line for line in access.read_text().splitlines() if '" 502 ' in line]
        assert all(re.search(r" capped\.test [\d.]+ - [0-9a-f]+$", line) for line in ours), ours
    finally:
        for connection in held:
            connection.close()
    # One request that reaches v2, read after the 502s: the watch has counted those by then.
    wait_for(lambda: private_nginx.request("capped.test")[0] == 200, 10, "the cap free")
    watch = wait_for(
        lambda: (w := client.app("capped")["watch"])["requests"] >= 1 and w, 10, "v2's answer"
    )
    assert (watch["verdict"], watch["errors"]) == ("watching", 0), watch


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exec: ../bin/app\nhost: a.test\n", None),
        ("exec: ../bin/app\nhost: a.test\nwatch-seconds: 0\n", 0),
        ("stanzas:\n  - {type: webapp, exec: ../bin/app, host: a.test}\nwatch-seconds: 30\n", 30),
    ],
)
def test_a_bundle_may_set_its_own_watch_seconds(tmp_path, text, expected):
    from keter.bundle import parse_bundle_config

    (tmp_path / "config").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "app").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "app").chmod(0o755)
    (tmp_path / "config" / "keter.yaml").write_text(text)
    assert parse_bundle_config(tmp_path, "a").watch_seconds == expected


def test_a_rollback_with_nothing_archived_to_go_back_to_is_not_reported_as_one(
    keter_factory, private_nginx, tmp_path
):
    # archive-keep: 1 prunes v1 as v2 switches: the rollback could not take place, yet
    # history said "rolled-back" and `keter deploy --watch` said so too.
    keter = keter_factory(**WATCH, **{"archive-keep": 1})
    client = status_api(keter)
    deploy(keter, client, private_nginx, tmp_path, "kept", "v1")
    clients = Clients(private_nginx.port, "kept.test")
    try:
        result = deploy_failing_v2(keter, tmp_path, "kept")
    finally:
        clients.finish()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "made things worse (5xx" in result.stderr and "and stays:" in result.stderr
    assert "is not archived" in result.stderr, result.stderr
    assert [e["outcome"] for e in client.app("kept")["history"]] == ["serving", "serving"]
    assert "made things worse" in keter.log() and "rolled back" not in keter.log()
