"""keter.names, the one grammar: app and host names, wildcards and their nginx form,
addresses, ports, URLs, headers, paths, nginx quoting and log-safe text.

Fast unit and property tests, and one test of record against a private nginx: the
nginx form of wildcard names, in host_precedence order, routes every request where
Keter's host map would, and quoted hostile values reach the client byte for byte.
"""

from __future__ import annotations

import re
from itertools import product

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.wait import wait_for

from keter import names
from keter.names import (
    cap_problems,
    host_matches,
    host_precedence,
    is_wildcard,
    log_text,
    nginx_quote,
    nginx_server_name,
    validate_app_name,
    validate_file_path,
    validate_host,
    validate_ip,
    validate_port,
    validate_upstream_host,
)

# Any text at all, lone surrogates and control characters included.
any_text = st.text(st.characters(exclude_categories=()), max_size=80)
any_value = st.one_of(
    any_text,
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=10),
)

CHECKS = [
    names.validate_app_name,
    names.validate_host,
    lambda v: names.validate_host(v, wildcard=False),
    names.nginx_server_name,
    names.validate_ip,
    names.validate_upstream_host,
    names.validate_port,
    names.validate_url_path,
    names.validate_request_path,
    names.validate_url,
    names.validate_header_name,
    names.validate_header_value,
    names.validate_env_name,
    names.validate_arg,
    names.validate_file_path,
    names.nginx_quote,
]


@settings(max_examples=300)
@given(st.sampled_from(CHECKS), any_value)
@example(names.validate_upstream_host, "fe80::1%\udcff")
@example(names.validate_host, "\ud800.com")
@example(names.validate_file_path, "../\ud800")
@example(names.validate_port, 10**400)
@example(names.validate_ip, "[1.2.3.4]")
def test_checks_raise_only_value_error_with_a_one_line_reason(check, value) -> None:
    try:
        check(value)
    except ValueError as exc:
        reason = str(exc)
        assert reason and reason.isprintable() and len(reason) < 400
        reason.encode("utf-8")  # no lone surrogate in a reason


# -- app names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "foo", "Foo-bar_1.2", "0day", "x" * 64, "a.b.c", "v1.0-rc_2"]
)
def test_valid_app_names(name: str) -> None:
    assert validate_app_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters"),
        ("a..b", '".."'),
        ("..", '".."'),
        (".hidden", "must start with a letter or digit"),
        ("-flag", "must start with a letter or digit"),
        ("_x", "must start with a letter or digit"),
        ("a b", "only letters"),
        ("a/b", "only letters"),
        ("a\\b", "only letters"),
        ("app\n", "only letters"),
        ("café", "only letters"),
        ("a;b", "only letters"),
    ],
)
def test_invalid_app_names(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        validate_app_name(name)


# -- host names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", "localhost"),
        ("www.mysite.com", "www.mysite.com"),
        ("WWW.Example.COM", "www.example.com"),
        ("*.example.com", "*.example.com"),
        ("*.com", "*.com"),
        ("foo.*.example.com", "foo.*.example.com"),  # Keter's sample bundles
        ("example.*", "example.*"),
        ("*.*.example.com", "*.*.example.com"),
        ("foo1_0", "foo1_0"),  # Keter's own sample host
        ("a_b.c_d-e.com", "a_b.c_d-e.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.2.3.example", "1.2.3.example"),
        ("x" * 63 + ".com", "x" * 63 + ".com"),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
)
def test_valid_hosts(host: str, expected: str) -> None:
    assert validate_host(host) == expected


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("", "empty"),
        ("a b", 'contains " "'),
        ('a"b', "contains"),
        ("a;b", 'contains ";"'),
        ("a{b", "contains"),
        ("a$b", "contains"),
        ("a\nb", 'contains "\\n"'),
        ("a/b", "contains"),
        ("a:80", "contains"),
        ("_a", "starts with '_'"),
        ("a._b", "starts with '_'"),
        ("_keter-status", "starts with '_'"),  # keter's own nginx server name
        ("a_.test", "the label a_ ends with '_'"),
        ("a_", "ends with '_'"),
        ("a..b", "empty label"),
        (".a", "empty label"),
        ("example.com.", "ends with a dot"),
        ("-a.com", "starts or ends with '-'"),
        ("a-.com", "starts or ends with '-'"),
        ("x" * 64 + ".com", "longer than 63"),
        (".".join(["a" * 63] * 4), "at most 253"),
        ("1.2.3.4", "IP address"),
        ("127.1", "IP address"),
        ("0x7f000001", "IP address"),
        ("::1", "IP address"),
        ("[::1]", "IP address"),
        ("*", "wildcards only"),
        ("*.*", "wildcards only"),
        ("*a.com", "whole label"),
        ("a.b*.com", "whole label"),
        ("**.com", "whole label"),
        ("*.", "ends with a dot"),
        ("bücher.de", "non-ASCII"),
        ("\u212a.com", "non-ASCII"),  # KELVIN SIGN lower-cases to "k"
        ("\ud800.com", "non-ASCII"),
    ],
)
def test_invalid_hosts(host: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        validate_host(host)


def test_a_name_to_connect_to_has_no_wildcard() -> None:
    assert validate_host("Example.com", wildcard=False) == "example.com"
    with pytest.raises(ValueError, match="not a wildcard"):
        validate_host("*.example.com", wildcard=False)
    with pytest.raises(ValueError, match="not a wildcard"):
        validate_host("foo.*.example.com", wildcard=False)


@given(any_text)
@example("K.com")
@example("İ.com")
@example("a.*.b")
def test_accepted_hosts_are_plain_and_round_trip(text: str) -> None:
    try:
        host = validate_host(text)
    except ValueError:
        return
    assert re.fullmatch(r"[a-z0-9.*_-]+", host)
    assert not re.search(r"(^|\.)[_-]|[_-]($|\.)", host)  # '_' and '-' never at a label's edge
    assert all(label == "*" or "*" not in label for label in host.split("."))
    assert host == text.lower()
    assert validate_host(host) == host


_labels = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?", fullmatch=True)
# The last label starts with a letter: otherwise "10" or "0x7f" would read as IP addresses.
_tops = st.from_regex(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
_names = st.builds(
    lambda labels, top: ".".join([*labels, top]), st.lists(_labels, max_size=3), _tops
)


def _wild(name: str, positions: list[bool]) -> str:
    labels = name.split(".")
    stars = [*(positions + [False] * len(labels))[: len(labels) - 1], False]  # never the last
    starred = ["*" if star else label for label, star in zip(labels, stars, strict=True)]
    return ".".join(starred)


_hosts = st.builds(_wild, _names, st.lists(st.booleans(), max_size=4)).filter(
    lambda host: len(host) <= 253
)


@given(_hosts, st.randoms())
def test_every_name_and_wildcard_is_accepted_in_any_case(host: str, random) -> None:
    mixed = "".join(c.upper() if random.random() < 0.5 else c for c in host)
    assert validate_host(mixed) == host


@given(_hosts, st.sampled_from(" \"';{}#$~\n\r\t/\\:@!\x00\x7f\x1b\u2028\ud800"), st.data())
def test_any_forbidden_character_is_refused(host: str, bad: str, data) -> None:
    at = data.draw(st.integers(0, len(host)))
    with pytest.raises(ValueError):
        validate_host(host[:at] + bad + host[at:])


# -- wildcards: Keter's matching and precedence, nginx's form ---------------------------


def keter_route(patterns: list[str], host: str) -> str | None:
    """Which pattern Keter's host map picks for ``host``: the reference for these tests.

    Walks the labels from the top-level domain; at each level a literal label is
    tried before a ``*``, backing off to the ``*`` when the literal path finds nothing.
    """
    wanted = host.lower().split(".")[::-1]
    tables = [(p, p.split(".")[::-1]) for p in patterns]

    def walk(depth: int, candidates: list[tuple[str, list[str]]]) -> str | None:
        if depth == len(wanted):
            return next((p for p, labels in candidates if len(labels) == depth), None)
        deeper = [(p, labels) for p, labels in candidates if len(labels) > depth]
        for label in (wanted[depth], "*"):
            found = walk(depth + 1, [(p, ls) for p, ls in deeper if ls[depth] == label])
            if found is not None:
                return found
        return None

    return walk(0, tables)


def test_host_matches_one_label_per_wildcard() -> None:
    assert host_matches("*.example.com", "a.example.com")
    assert host_matches("*.example.com", "A.Example.COM.")
    assert not host_matches("*.example.com", "example.com")
    assert not host_matches("*.example.com", "a.b.example.com")
    assert host_matches("foo.*.example.com", "foo.bar.example.com")
    assert not host_matches("foo.*.example.com", "foo.example.com")
    assert host_matches("example.*", "example.org")
    assert not host_matches("*.example.com", ".example.com")


def test_precedence_examples() -> None:
    ranked = ["foo.bar.example.com", "*.bar.example.com", "foo.*.example.com", "*.*.example.com"]
    assert sorted(reversed(ranked), key=host_precedence) == ranked
    for pattern in ranked:
        assert keter_route(ranked, "foo.bar.example.com") == ranked[0]
        assert host_matches(pattern, "foo.bar.example.com")
    assert keter_route(ranked[1:], "foo.bar.example.com") == "*.bar.example.com"
    assert keter_route(ranked[2:], "foo.bar.example.com") == "foo.*.example.com"


_small_labels = st.sampled_from(["a", "b", "*"])
_patterns = (
    st.lists(_small_labels, min_size=2, max_size=4)
    .map(".".join)
    .filter(lambda p: p.replace("*", "").replace(".", ""))
)


@settings(max_examples=300)
@given(st.lists(_patterns, min_size=1, max_size=8, unique=True), st.data())
def test_the_first_match_in_precedence_order_is_kept_route(patterns, data) -> None:
    """Sorted by host_precedence, the first pattern matching a host is the one Keter picks,
    and nginx's one-label regex for each pattern matches exactly what host_matches says."""
    host = ".".join(data.draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=4)))
    ordered = sorted(patterns, key=host_precedence)
    first = next((p for p in ordered if host_matches(p, host)), None)
    assert first == keter_route(patterns, host)
    for pattern in patterns:
        form = nginx_server_name(pattern)
        regex = form[1:] if form.startswith("~") else re.escape(form) + "$"
        assert bool(re.match(regex, host, re.IGNORECASE)) == host_matches(pattern, host)


def test_nginx_forms() -> None:
    assert nginx_server_name("Example.COM") == "example.com"
    assert nginx_server_name("*.example.com") == r"~^[^.]+\.example\.com$"
    assert nginx_server_name("foo.*.example.com") == r"~^foo\.[^.]+\.example\.com$"
    assert nginx_server_name("example.*") == r"~^example\.[^.]+$"
    assert nginx_server_name("*.a_b.*") == r"~^[^.]+\.a_b\.[^.]+$"
    assert not is_wildcard("a.b") and is_wildcard("a.*.b")
    with pytest.raises(ValueError):
        nginx_server_name("evil;}")


_TOKEN_BREAKERS = set(" \t\r\n;{}\"'#\\")


@given(_hosts)
def test_nginx_forms_are_one_plain_token(host: str) -> None:
    form = nginx_server_name(host)
    assert form.isprintable() and form.isascii()
    assert not _TOKEN_BREAKERS & set(form.replace("\\.", ""))  # nginx keeps "\." as it is
    assert form == host or (form.startswith("~^") and form.endswith("$"))


# -- addresses and ports ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("FE80:0:0::1", "fe80::1"),
        ("example.com", "example.com"),
        ("Backend_1.internal", "backend_1.internal"),
    ],
)
def test_upstream_hosts(text: str, expected: str) -> None:
    assert validate_upstream_host(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("fe80::1%eth0", "zone id"),
        ("fe80::1%\udcff", "zone id"),
        ("[fe80::1%25eth0]", "zone id"),
        ("[1.2.3.4]", "IPv6"),
        ("1.2.3.4:80", "not an IP address"),
        ("*.example.com", "not a wildcard"),
        ("", "empty"),
        ("a b", "contains"),
    ],
)
def test_refused_upstream_hosts(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        validate_upstream_host(text)


@given(any_text)
def test_no_zone_id_ever_passes(text: str) -> None:
    for check in (validate_ip, validate_upstream_host, validate_host):
        try:
            value = check(text)
        except ValueError:
            continue
        assert "%" not in value and value.isascii() and value.isprintable()


def test_ports() -> None:
    assert validate_port(1) == 1 and validate_port(65535) == 65535
    for bad in (0, 65536, -1, True, "80", 80.0, None, 10**400):
        with pytest.raises(ValueError, match="expected a port"):
            validate_port(bad)


# -- URLs, headers, environment, paths ---------------------------------------------------


def test_url_paths_and_urls() -> None:
    assert names.validate_url_path("/a/b-c_d.html") == "/a/b-c_d.html"
    for bad in ("a", "/a b", "/a;b", "/a{", "/$x", '/"', "/#", "/" + "a" * 1024):
        with pytest.raises(ValueError):
            names.validate_url_path(bad)
    assert names.validate_request_path("/health?x='1'") == "/health?x='1'"
    assert names.validate_url("https://example.com/x?y=$z") == "https://example.com/x?y=$z"
    for bad in ("no-scheme", "https://a b", 'https://a"b', "https://a\\b", "https://é"):
        with pytest.raises(ValueError):
            names.validate_url(bad)


def test_headers_and_environment() -> None:
    assert names.validate_header_name("X-Frame-Options") == "X-Frame-Options"
    assert names.validate_header_value("max-age=1; includeSubDomains") is not None
    for bad in ("", "-x", "X Y", "X:Y", "X\n"):
        with pytest.raises(ValueError):
            names.validate_header_name(bad)
    for bad in ("a\nb", "a\rb", "é", "\x7f", "x" * 4097):
        with pytest.raises(ValueError):
            names.validate_header_value(bad)
    assert names.validate_env_name("_PORT2") == "_PORT2"
    for bad in ("2X", "A-B", "A B", "", "x" * 256):
        with pytest.raises(ValueError):
            names.validate_env_name(bad)
    # dash refuses `export OPTIND=abc`: every process of the app failed to start.
    with pytest.raises(ValueError, match="the shell's own"):
        names.validate_env_name("OPTIND")
    assert names.validate_arg("any text, even\nnew lines") is not None
    for bad in ("a\0b", "\ud800", 1):
        with pytest.raises(ValueError):
            names.validate_arg(bad)


@given(any_text)
@example("../\ud800")
@example("a\nb")
@example("x" * 256)
def test_accepted_file_paths_are_encodable_printable_and_bounded(text: str) -> None:
    try:
        path = validate_file_path(text)
    except ValueError:
        return
    raw = path.encode("utf-8")
    assert b"\0" not in raw and path.isprintable() and 0 < len(raw) <= 4096


# -- nginx quoting ---------------------------------------------------------------------


def nginx_unquote(token: str) -> str:
    """What nginx reads from a double-quoted string, with ${keter_dollar} as "$"."""
    assert token.startswith('"') and token.endswith('"')
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        char = body[i]
        assert char != '"', "an unescaped quote would end the string early"
        if char == "\\":
            out.append(body[i + 1])
            i += 2
        elif char == "$":
            assert body.startswith("${keter_dollar}", i), "a variable other than keter_dollar"
            out.append("$")
            i += len("${keter_dollar}")
        else:
            out.append(char)
            i += 1
    return "".join(out)


@given(any_text)
@example('a"b\\c$d;e{f}#g')
@example("\\")
def test_quoted_text_means_exactly_itself(text: str) -> None:
    try:
        quoted = nginx_quote(text)
    except ValueError as exc:
        assert "too long for nginx" in str(exc) or any(
            ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) < 0xE000 for c in text
        )
        return
    assert "\n" not in quoted and "\r" not in quoted
    assert len(quoted.encode()) <= names.NGINX_TOKEN_MAX
    assert nginx_unquote(quoted) == text


def test_text_too_long_for_one_nginx_string_is_refused_by_its_quoted_size() -> None:
    assert nginx_quote("v" * (names.NGINX_TOKEN_MAX - 2)).startswith('"v')
    with pytest.raises(ValueError, match="too long for nginx: 4001 bytes once quoted"):
        nginx_quote("v" * (names.NGINX_TOKEN_MAX - 1))
    # Each "$" is written as ${keter_dollar}: 266 fit, 267 do not.
    names.validate_header_value("$" * 266)
    with pytest.raises(ValueError, match="too long for nginx"):
        names.validate_header_value("$" * 267)
    with pytest.raises(ValueError, match="at most 3900 characters"):
        names.validate_header_value("v" * 3901)
    with pytest.raises(ValueError, match="too long for nginx"):
        names.validate_url("https://example.test/" + "$" * 300)


@given(
    st.sampled_from(
        [
            validate_host,
            names.validate_header_value,
            names.validate_url,
            names.validate_url_path,
            validate_file_path,
        ]
    ),
    any_text,
)
def test_anything_accepted_renders_safely_in_nginx_quoting(check, text: str) -> None:
    try:
        value = check(text)
    except ValueError:
        return
    assert nginx_unquote(nginx_quote(value)) == value


# -- log lines -------------------------------------------------------------------------


@given(any_value, st.integers(min_value=1, max_value=500))
@example("\x1b[2J\x1b]0;owned\x07", 100)
@example("line one\nFAKE keter: deployed\r\n", 100)
@example("\u2028\u202e\udcff\ud800", 100)
@example(10**5000, 50)
def test_log_text_is_one_bounded_printable_line(value, limit: int) -> None:
    text = log_text(value, limit)
    assert text.isprintable()  # no control, escape, line or paragraph separators
    text.encode("utf-8")  # no lone surrogates
    assert len(text) <= limit + 40


def test_log_text_examples() -> None:
    assert log_text("plain text é") == "plain text é"
    assert log_text("a\nb\x1b[31m\\") == "a\\nb\\x1b[31m\\"
    assert log_text("\udcff\u2028") == "\\udcff\\u2028"
    assert log_text("x" * 30, 10) == "x" * 10 + "... (20 more characters)"


@given(st.lists(any_text, max_size=300), st.integers(min_value=100, max_value=5000))
def test_problem_lists_are_capped(problems: list[str], limit: int) -> None:
    capped = cap_problems(problems, limit)
    assert sum(len(p) + 2 for p in capped) <= limit + 1100
    assert all(p.isprintable() for p in capped)
    if len(capped) < len(problems):
        shown = len(capped) - 1
        assert capped[-1] == f"... and {len(problems) - shown} more problem" + (
            "s" if len(problems) - shown != 1 else ""
        )
    else:
        assert len(capped) == len(problems)


# -- against a real nginx --------------------------------------------------------------

_PATTERNS = [
    "exact.example.test",
    "*.example.test",
    "foo.*.example.test",
    "*.bar.example.test",
    "*.*.example.test",
    "app.*",
    "a_b.example.test",
]
_HOSTILE = ['quote " back \\ dollar $host semi ; brace { } hash #', "é ünïcode", "$", "\\"]


def test_real_nginx_takes_the_longest_texts_keter_accepts(private_nginx) -> None:
    """nginx reads its config in 4 KiB buffers and refuses a longer token; every text
    the shared grammar accepts fits, however its quoting grows it."""
    longest = ["v" * names.MAX_HEADER_VALUE, "$" * 266, '"' * 1999, "\\" * 1999]
    for value in longest:
        names.validate_header_value(value)
    path = "/" + "/".join(["p" * 200] * 19)  # a file path close to the bound
    names.validate_nginx_file_path(path)
    lines = "".join(
        f"    add_header X-Long{i} {nginx_quote(value)} always;\n"
        for i, value in enumerate(longest)
    )
    alias = f'"{path}/"'  # as keter writes a path: quoted
    server = (
        f"server {{\n    listen 127.0.0.1:{private_nginx.port};\n    server_name long.test;\n"
        f"{lines}    location /files/ {{ alias {alias}; }}\n"
        "    return 200 ok;\n}\n"
    )
    private_nginx.config_file.write_text('geo $keter_dollar {\n    default "$";\n}\n' + server)
    private_nginx.reload()
    wait_for(lambda: private_nginx.request("long.test")[0] == 200, what="the reload")
    private_nginx.wait_settled()  # no old worker left to answer the next request
    status, headers, _ = private_nginx.request("long.test")
    assert status == 200
    assert [headers[f"x-long{i}"] for i in range(len(longest))] == longest


def test_real_nginx_routes_as_keter_and_quotes_exactly(private_nginx) -> None:
    """Every pattern gets a server answering its own name; regex names are written in
    host_precedence order, which is Keter's exact routing."""
    servers = []
    for pattern in sorted(_PATTERNS, key=host_precedence):
        name = nginx_server_name(pattern)
        servers.append(
            f"server {{\n    listen 127.0.0.1:{private_nginx.port};\n"
            f"    server_name {name};\n"
            + "".join(
                f"    add_header X-Q{i} {nginx_quote(v)} always;\n" for i, v in enumerate(_HOSTILE)
            )
            + f"    return 200 {nginx_quote(pattern)};\n}}\n"
        )
    dollar = 'geo $keter_dollar {\n    default "$";\n}\n'
    private_nginx.config_file.write_text(dollar + "".join(servers))
    private_nginx.reload()
    # The new config is in effect once a new worker answers; then no old worker accepts.
    wait_for(lambda: private_nginx.request("exact.example.test")[0] == 200, what="the reload")
    private_nginx.wait_settled()
    labels = ["exact", "foo", "bar", "app", "a_b", "x"]
    hosts = [
        ".".join((*prefix, "example", "test"))
        for n in (0, 1, 2)
        for prefix in product(labels, repeat=n)
    ] + ["app.org", "app.example", "x.y.z", "EXACT.Example.Test"]
    for host in hosts:
        expected = keter_route(_PATTERNS, host)
        status, headers, body = private_nginx.request(host)
        if expected is None:
            assert status == 503, host  # the fixture's own default server
            continue
        assert (status, body.decode()) == (200, expected), host
        for i, value in enumerate(_HOSTILE):
            assert headers[f"x-q{i}"].encode("latin-1").decode("utf-8") == value
