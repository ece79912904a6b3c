"""Which app a request reaches (issue 15), through a real private nginx.

- several web apps of one bundle: each host reaches its own process;
- wildcard hosts in any label position: a ``*`` stands for exactly one label,
  an exact name wins over every wildcard, and between wildcards Keter's
  precedence decides (labels compared from the right, a literal label before
  ``*``), whatever the apps are called and in whatever order they deploy.
"""

from __future__ import annotations

import itertools
import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.net import Backend
from support.nginx import PrivateNginx

from keter import names
from keter.messages import ApplyNginx, NginxApplied, ProxyApp, Route, Site
from keter.nginx import NginxWriter


@dataclass(frozen=True)
class Listener:
    host: str
    port: int


class Applier:
    """One NginxWriter on the private nginx, applying numbered generations."""

    def __init__(self, nginx: PrivateNginx) -> None:
        self.nginx = nginx
        self.reports: queue.Queue = queue.Queue()
        self.generation = 0
        self.writer = NginxWriter(
            listeners=[Listener("127.0.0.1", nginx.port)],
            config_file=nginx.config_file,
            test_command=nginx.test_command,
            reload_command=nginx.reload_command,
            report_to=self.reports,
        )
        self.writer.start()

    def apply(self, *sites: Site) -> NginxApplied:
        self.generation += 1
        self.writer.tell(ApplyNginx(generation=self.generation, sites=sites))
        reply = self.reports.get(timeout=30)
        assert isinstance(reply, NginxApplied), reply
        self.nginx.wait_generation(self.generation)
        return reply

    def stop(self) -> None:
        self.writer.stop()
        self.writer.join(timeout=15)


@pytest.fixture
def applier(private_nginx: PrivateNginx) -> Iterator[Applier]:
    each = Applier(private_nginx)
    yield each
    each.stop()


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    made = {name: Backend(name) for name in ("first", "second", "third")}
    yield made
    for backend in made.values():
        backend.close()


def tagged(app: str, port: int, *hosts: str) -> Route:
    """A route to ``port`` whose answers name ``app`` (header X-App)."""
    return Route(hosts=hosts, action=ProxyApp(port=port), headers=(("X-App", app),))


def reached(nginx: PrivateNginx, host: str) -> str | None:
    """The app whose route answered ``host``, or None for keter's 404."""
    status, headers, _ = nginx.request(host)
    if status == 404 and "x-app" not in headers:
        return None
    assert status == 200, (host, status)
    return headers["x-app"]


# -- several web apps in one bundle ---------------------------------------------------------


def test_each_web_app_of_a_bundle_gets_its_own_upstream(
    private_nginx: PrivateNginx, applier: Applier, backends
) -> None:
    site = Site(
        app="shop",
        routes=(
            Route(hosts=("shop.test",), action=ProxyApp(port=backends["first"].port)),
            Route(hosts=("api.shop.test",), action=ProxyApp(port=backends["second"].port)),
            Route(hosts=("admin.shop.test",), action=ProxyApp(port=backends["third"].port)),
        ),
    )
    assert applier.apply(site).refused == ()
    for host, name in [("shop.test", "first"), ("api.shop.test", "second"),
                       ("admin.shop.test", "third")]:  # fmt: skip
        status, _, body = private_nginx.request(host)
        assert (status, json.loads(body)["name"]) == (200, name)
    config = private_nginx.served_config()
    assert "upstream keter_shop {" in config
    assert "upstream keter_shop__w1 {" in config and "upstream keter_shop__w2 {" in config


# -- wildcards: Keter's precedence -------------------------------------------------------------


def test_wildcards_in_any_position_follow_keters_precedence(
    private_nginx: PrivateNginx, applier: Applier, backends
) -> None:
    port = backends["first"].port
    # App names run against precedence, so neither name order nor deploy order can explain it.
    sites = [
        Site(app="a-any-any", routes=(tagged("a-any-any", port, "*.*.example.com"),)),
        Site(app="b-foo-any", routes=(tagged("b-foo-any", port, "foo.*.example.com"),)),
        Site(app="c-any-bar", routes=(tagged("c-any-bar", port, "*.bar.example.com"),)),
        Site(app="d-exact", routes=(tagged("d-exact", port, "foo.bar.example.com"),)),
        Site(app="e-any", routes=(tagged("e-any", port, "*.example.com", "example.*"),)),
    ]
    assert applier.apply(*sites).refused == ()
    expected = {
        "foo.bar.example.com": "d-exact",  # an exact name wins over every wildcard
        "x.bar.example.com": "c-any-bar",  # bar (literal) beats * at the second label
        "foo.baz.example.com": "b-foo-any",  # then foo beats * at the first
        "x.baz.example.com": "a-any-any",
        "x.example.com": "e-any",
        "example.org": "e-any",  # a trailing wildcard
        "example.com": "e-any",
        "FOO.Bar.Example.COM": "d-exact",  # host names are case-insensitive
        "a.b.c.example.com": None,  # each * is exactly one label
        "other.org": None,
    }
    for host, app in expected.items():
        assert reached(private_nginx, host) == app, host
    # Deploying them again in another order changes nothing.
    assert applier.apply(*reversed(sites)).refused == ()
    for host, app in expected.items():
        assert reached(private_nginx, host) == app, host


LABELS = ("a", "b", "*")
HOSTS = ["".join(labels) for n in (2, 3) for labels in itertools.product(*[("a.", "b.")] * n)]
HOSTS = [host.rstrip(".") for host in HOSTS]


def keter_choice(patterns: dict[str, str], host: str) -> str | None:
    """The app Keter's host map picks for ``host`` among ``patterns`` (pattern -> app)."""
    matching = [pattern for pattern in patterns if names.host_matches(pattern, host)]
    if not matching:
        return None
    return patterns[min(matching, key=names.host_precedence)]


patterns_strategy = st.lists(
    st.lists(st.sampled_from(LABELS), min_size=2, max_size=3)
    .map(".".join)
    .filter(lambda name: set(name.split(".")) != {"*"}),
    min_size=1,
    max_size=6,
    unique=True,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(patterns=patterns_strategy)
def test_nginx_picks_the_app_keter_would_pick(
    private_nginx: PrivateNginx, applier: Applier, backends, patterns: list[str]
) -> None:
    port = backends["first"].port
    owners = {pattern: f"app{i}" for i, pattern in enumerate(patterns)}
    sites = [Site(app=app, routes=(tagged(app, port, pattern),)) for pattern, app in owners.items()]
    assert applier.apply(*sites).refused == ()
    for host in HOSTS:
        assert reached(private_nginx, host) == keter_choice(owners, host), (host, owners)


# -- long host names ----------------------------------------------------------------------

# Valid names nginx's default bucket for host names (64 bytes) cannot hold: 55 and 253
# characters (the longest a host name may be), and a wildcard of that length.
LONGEST = ".".join(("a" * 63, "b" * 63, "c" * 63, "d" * 61))
LONG_HOSTS = ("a" * 43 + ".example.com", LONGEST, "*." + LONGEST[2:])


def test_host_names_up_to_the_longest_valid_one_are_served(
    applier: Applier, backends: dict[str, Backend]
) -> None:
    assert len(LONGEST) == names.MAX_HOST
    applier.apply(
        Site(app="long", routes=(tagged("long", backends["first"].port, *LONG_HOSTS),)),
        Site(app="short", routes=(tagged("short", backends["second"].port, "short.test"),)),
    )
    assert reached(applier.nginx, LONG_HOSTS[0]) == "long"
    assert reached(applier.nginx, LONGEST) == "long"
    assert reached(applier.nginx, "x." + LONGEST[2:]) == "long"  # through the wildcard
    assert reached(applier.nginx, "short.test") == "short"


def test_an_operators_own_bucket_for_host_names_stands(
    private_nginx: PrivateNginx, backends: dict[str, Backend], caplog: pytest.LogCaptureFixture
) -> None:
    # nginx.conf sets it (Debian's has the line, commented out): keter's own would be a
    # duplicate, which nginx refuses for the whole config.
    (private_nginx.extra_dir / "bucket.conf").write_text("server_names_hash_bucket_size 64;\n")
    applier = Applier(private_nginx)
    try:
        reply = applier.apply(
            Site(app="short", routes=(tagged("short", backends["first"].port, "short.test"),)),
            Site(app="long", routes=(tagged("long", backends["second"].port, LONG_HOSTS[0]),)),
        )
        # The long name fails its own site, as nginx says; every other site is served.
        assert [refused.app for refused in reply.refused] == ["long"]
        assert "server_names_hash_bucket_size" in reply.refused[0].reason
        assert reached(private_nginx, "short.test") == "short"
        assert "nginx.conf sets server_names_hash_bucket_size" in caplog.text
    finally:
        applier.stop()
