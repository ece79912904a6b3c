"""Bundle configs (config/keter.yaml), app names and host names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from support.bundles import make_bundle
from support.samples import keter_sample

from keter.bundle import (
    BundleConfig,
    BundleConfigError,
    WebApp,
    budget,
    parse_bundle_config,
    parse_bundle_data,
)
from keter.bundle.middleware import MAX_THROTTLES
from keter.yamlcheck import WARNINGS_KEPT, load_yaml

FOO_V04 = keter_sample("foo-v04.keter.yaml")


def unpacked(tmp_path: Path, config: str | bytes | None, name: str = "keter.yaml") -> Path:
    """An unpacked bundle folder with an executable ``hello`` beside ``config/``."""
    return make_bundle(
        tmp_path / "bundle",
        config=config,
        config_name=name,
        folders=["config"],
        executables=["hello"],
        app_source=None,
        unpacked=True,
    )


def parse(tmp_path: Path, config: str) -> BundleConfig:
    return parse_bundle_config(unpacked(tmp_path, config), "app")


def problems(tmp_path: Path, config: str) -> list[str]:
    with pytest.raises(BundleConfigError) as info:
        parse(tmp_path, config)
    return info.value.problems


# -- host names in a bundle (the grammar itself: tests/test_names.py) --------------------


@pytest.mark.parametrize(
    "host", ["foo1_0", "a_b.example.com", "*.example.com", "foo.*.example.com", "example.*"]
)
def test_bundle_hosts_follow_the_shared_grammar(tmp_path: Path, host: str) -> None:
    config = parse(tmp_path, f"exec: ../hello\nhost: '{host}'\n")
    assert config.webapp is not None and config.webapp.hosts == (host,)


@pytest.mark.parametrize("host", ["_a.example.com", "a.b*.example.com", "*", "*.*"])
def test_bundle_hosts_refused(tmp_path: Path, host: str) -> None:
    [problem] = problems(tmp_path, f'exec: ../hello\nhost: "{host}"\n')
    assert problem.startswith("host: ")


# -- config/keter.yaml -----------------------------------------------------------------


def test_minimal_flat_config(tmp_path: Path) -> None:
    config = parse(tmp_path, "exec: ../hello\nhost: Example.COM\n")
    folder = (tmp_path / "bundle").resolve()
    assert config == BundleConfig(
        app="app",
        webapps=(WebApp(exec=folder / "hello", args=(), hosts=("example.com",), env={}),),
        postgres=False,
        warnings=(),
    )
    assert config.webapp is not None
    assert config.webapp.health_check_path is None


def test_every_flat_key(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        """
        exec: ../hello
        args: [--port, 8080, 1.5, "two words"]
        host: a.example
        hosts: [b.example, "*.c.example"]
        extra-hosts: [d]
        env: {MODE: prod, N: 3, "ON": true}
        health-check-path: /healthz?full=1
        postgres: true
        """,
    )
    webapp = config.webapp
    assert webapp is not None
    assert webapp.args == ("--port", "8080", "1.5", "two words")
    assert webapp.hosts == ("a.example", "b.example", "*.c.example", "d")
    assert dict(webapp.env) == {"MODE": "prod", "N": "3", "ON": "true"}
    assert webapp.health_check_path == "/healthz?full=1"
    assert config.postgres is True
    assert config.warnings == ()


def test_config_is_immutable(tmp_path: Path) -> None:
    config = parse(tmp_path, "exec: ../hello\nhost: a\nenv: {A: b}\n")
    with pytest.raises(AttributeError):
        config.postgres = True  # type: ignore[misc]
    assert config.webapp is not None
    with pytest.raises(TypeError):
        config.webapp.env["A"] = "c"  # type: ignore[index]


def test_keter_yml_is_read_too(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, "exec: ../hello\nhost: a\n", name="keter.yml")
    assert parse_bundle_config(folder, "app").webapp is not None


def test_repeated_hosts_are_listed_once_with_a_warning(tmp_path: Path) -> None:
    config = parse(tmp_path, "exec: ../hello\nhost: a\nhosts: [b, A]\n")
    assert config.webapp is not None
    assert config.webapp.hosts == ("a", "b")
    assert config.warnings == ("hosts[1]: a repeats host; listed once",)


def test_plugins_postgres_is_keters_spelling(tmp_path: Path) -> None:
    assert parse(tmp_path, "plugins: {postgres: true}\n").postgres is True


def test_no_exec_means_no_web_app(tmp_path: Path) -> None:
    config = parse(tmp_path, "postgres: false\nplugins:\n")
    assert config.webapp is None
    assert config.warnings == ("exec: missing, so this bundle runs no web app",)


def test_unknown_keys_are_warnings(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        """
        exec: ../hello
        host: a
        hots: [b]
        forward-env: [HOME]
        static-hosts: [{host: s, root: ..}]
        redirects: [{from: r, to: a}]
        ssl: true
        plugins: {postgress: true}
        """,
    )
    assert config.webapp is not None
    # Keter 0.4's extras are read (see test_stanzas.py); v1.0 keys are not flat keys.
    assert config.warnings == (
        "hots: unknown key (did you mean hosts?); ignored",
        "forward-env: unknown key; ignored",
        "plugins.postgress: unknown key (did you mean postgres?); ignored",
    )


def test_a_flood_of_unknown_keys_is_a_few_warnings_and_a_count(tmp_path: Path) -> None:
    # 60,000 unknown keys were 60,000 log lines a deploy: past journald's rate limit,
    # which then drops keter's lines about every other app.
    keys = "".join(f"k{i}: 0\n" for i in range(5000))
    stanza = "".join(f"    s{i}: 0\n" for i in range(50))
    config = parse(
        tmp_path,
        f"stanzas:\n  - type: webapp\n    exec: ../hello\n    host: a\n{stanza}{keys}",
    )
    assert config.webapp is not None
    assert len(config.warnings) == WARNINGS_KEPT + 1
    assert config.warnings[0] == "k0: unknown key; ignored"
    assert config.warnings[-1] == f"... and {5050 - WARNINGS_KEPT} more warnings"


def test_a_bare_middleware_name_that_takes_settings_says_how_to_write_it(tmp_path: Path) -> None:
    text = "stanzas:\n- type: webapp\n  exec: ../hello\n  host: a\n  middleware: [local]\n"
    assert problems(tmp_path, text) == [
        "stanzas[0].middleware[0]: local takes its settings as a mapping: {local: {...}}"
    ]


@pytest.mark.parametrize(
    "guard",
    ["middleware: [{basic-auth: {creds: {u: p}}}]", "middleware: [local]", "requires-secure: true"],
)
def test_a_flat_config_with_a_stanzas_guard_is_refused_not_served_unguarded(
    tmp_path: Path, guard: str
) -> None:
    """Ignored like other stanza keys, these would publish the site without the password,
    the localhost limit or the HTTPS they ask for."""
    [problem] = problems(tmp_path, f"exec: ../hello\nhost: a\n{guard}\n")
    key = guard.split(":")[0]
    assert problem.startswith(f"{key}: read only in a stanza: write the app as `stanzas:"), problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exec: ../hello", "host: missing; at least one host is needed"),
        ("host: a", "exec: missing, but host given for a web app"),
        ("exec: 5\nhost: a", "exec: expected a path to the app's executable, got 5"),
        ("exec: ''\nhost: a", "exec: expected a path"),
        ("exec: ../../x\nhost: a", 'exec: "../../x" escapes the bundle folder'),
        ("exec: /bin/sh\nhost: a", 'exec: "/bin/sh" escapes the bundle folder'),
        ("exec: ../nope\nhost: a", 'exec: "../nope" does not exist in the bundle'),
        ("exec: ..\nhost: a", 'exec: ".." is not a regular file'),
        ("exec: keter.yaml\nhost: a", 'exec: "keter.yaml" is not executable (no x permission bit)'),
        (
            "exec: ../hello\nhost: a b",
            'host: "a b" is not a valid host name: the host name contains " "',
        ),
        ("exec: ../hello\nhost: 5", "host: expected a host name, got 5"),
        ("exec: ../hello\nhosts: a", 'hosts: expected a list of host names, got "a"'),
        ("exec: ../hello\nhosts: [a, 1.2.3.4]", 'hosts[1]: "1.2.3.4" is not a valid host name'),
        ("exec: ../hello\nhosts: []", "host: missing"),
        ("exec: ../hello\nhost: a\nextra-hosts: [_y]", 'extra-hosts[0]: "_y" is not a valid'),
        ("exec: ../hello\nhost: a\nargs: --flag", 'args: expected a list of strings, got "--flag"'),
        (
            "exec: ../hello\nhost: a\nargs: [x, yes]",
            "args[1]: expected a string (quote it), got true",
        ),
        (
            "exec: ../hello\nhost: a\nargs: [[x]]",
            'args[0]: expected a string (quote it), got ["x"]',
        ),
        ("exec: ../hello\nhost: a\nenv: [A]", 'env: expected a mapping of NAME: value, got ["A"]'),
        ("exec: ../hello\nhost: a\nenv: {A: {}}", "env.A: expected a string, number or boolean"),
        # README says a bundle's env refuses it as keter env does: dash would not start it.
        ("exec: ../hello\nhost: a\nenv: {OPTIND: '1'}", "env.OPTIND: OPTIND is the shell's own"),
        (
            "exec: ../hello\nhost: a\nhealth-check-path: health",
            "health-check-path: expected a URL path",
        ),
        (
            "exec: ../hello\nhost: a\nhealth-check-path: /a b",
            "health-check-path: expected a URL path",
        ),
        ("exec: ../hello\nhost: a\nhealth-check-path: 5", "health-check-path: expected a URL path"),
        ('exec: ../hello\nhost: a\nhealth-check-path: "/a\\x01"', "health-check-path: expected"),
        ("postgres: yes please", 'postgres: expected true or false, got "yes please"'),
        ("postgres: 1", "postgres: expected true or false, got 1"),
        ("plugins: [postgres]", "plugins: expected a mapping like {postgres: true}"),
        ("plugins: {postgres: 1}", "plugins.postgres: expected true, false or a list"),
        ("plugins: {postgres: []}", "plugins.postgres: expected at least one"),
        ("plugins: {postgres: [{server: 'a b'}]}", "plugins.postgres[0].server: "),
        ("plugins: {postgres: [{server: db, port: 0}]}", "plugins.postgres[0].port: "),
        ("plugins: {postgres: [{server: db, hots: 1}]}", "plugins.postgres[0].hots: unknown key"),
        (
            "postgres: true\nplugins: {postgres: false}",
            "postgres: postgres and plugins.postgres disagree",
        ),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(BundleConfigError) as info:
        parse(tmp_path, "exec: ../../x\nhosts: [ok, 'bad host', _b]\nargs: [true]\npostgres: 2\n")
    keys = [problem.split(":")[0] for problem in info.value.problems]
    assert keys == ["exec", "args[0]", "hosts[1]", "hosts[2]", "postgres"]
    assert str(info.value) == "; ".join(info.value.problems)


def test_exec_through_a_symlink_out_of_the_bundle_is_refused(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, "exec: ../link\nhost: a\n")
    (folder / "link").symlink_to("/bin/sh")
    with pytest.raises(
        BundleConfigError, match=re.escape('exec: "../link" escapes the bundle folder')
    ):
        parse_bundle_config(folder, "app")


def test_exec_through_a_symlink_inside_the_bundle_is_resolved(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, "exec: ../link\nhost: a\n")
    (folder / "link").symlink_to("hello")
    webapp = parse_bundle_config(folder, "app").webapp
    assert webapp is not None
    assert webapp.exec == (folder / "hello").resolve()


def test_exec_symlink_loop_is_refused(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, "exec: ../loop\nhost: a\n")
    (folder / "loop").symlink_to("loop")
    with pytest.raises(BundleConfigError, match=r'exec: "\.\./loop"'):
        parse_bundle_config(folder, "app")


def test_sibling_folder_with_the_same_prefix_is_outside(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, "exec: ../../bundle2/hello\nhost: a\n")
    sibling = tmp_path / "bundle2"
    sibling.mkdir()
    (sibling / "hello").write_text("#!/bin/sh\n")
    (sibling / "hello").chmod(0o755)
    with pytest.raises(BundleConfigError, match="escapes the bundle folder"):
        parse_bundle_config(folder, "app")


# -- the file itself -------------------------------------------------------------------


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(BundleConfigError) as info:
        parse_bundle_config(unpacked(tmp_path, None), "app")
    assert info.value.problems == ["missing config/keter.yaml"]


def test_both_yaml_and_yml_is_ambiguous(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, "exec: ../hello\nhost: a\n")
    (folder / "config/keter.yml").write_text("exec: ../hello\nhost: b\n")
    with pytest.raises(
        BundleConfigError, match=re.escape("both config/keter.yaml and config/keter.yml")
    ):
        parse_bundle_config(folder, "app")


def test_config_linked_out_of_the_bundle_is_not_read(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, None)
    secret = tmp_path / "secret"
    secret.write_text("password: hunter2 {\n")
    (folder / "config/keter.yaml").symlink_to(secret)
    with pytest.raises(BundleConfigError) as info:
        parse_bundle_config(folder, "app")
    assert info.value.problems == ["config/keter.yaml: is a link to a file outside the bundle"]


def test_config_that_is_a_folder(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, None)
    (folder / "config/keter.yaml").mkdir()
    with pytest.raises(
        BundleConfigError, match=re.escape("config/keter.yaml: is not a regular file")
    ):
        parse_bundle_config(folder, "app")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "config/keter.yaml: expected a mapping with keys like exec and host, got nothing"),
        (
            "- exec\n",
            'config/keter.yaml: expected a mapping with keys like exec and host, got ["exec"]',
        ),
        ("exec: [\n", "config/keter.yaml: not valid YAML at line 2"),
        (
            "exec: ../hello\nexec: ../hello\n",
            'config/keter.yaml: not valid YAML at line 2, column 1: duplicate key "exec"',
        ),
        ("a: &x [1]\nb: *x\n", "config/keter.yaml: uses YAML anchors/aliases (line 1)"),
        (b"host: \xc3\x28\n", "config/keter.yaml: not UTF-8"),
        ("#" * (2**20 + 1), "config/keter.yaml: is 1048577 bytes; at most 1048576 are allowed"),
    ],
)
def test_a_bad_file_is_one_clear_problem(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    with pytest.raises(BundleConfigError) as info:
        parse_bundle_config(unpacked(tmp_path, content), "app")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected), info.value.problems


def test_parse_bundle_data_refuses_a_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(BundleConfigError, match="expected a mapping"):
        parse_bundle_data([], folder=tmp_path, config_dir=tmp_path, app="app")


# -- Keter's own sample ----------------------------------------------------------------


@pytest.mark.skipif(not FOO_V04.exists(), reason="shared Keter fixtures are not here")
def test_keters_v04_sample_is_refused_for_its_static_roots_alone(tmp_path: Path) -> None:
    # test_stanzas.py reads the sample in full; here: nothing but the two roots is wrong.
    folder = unpacked(tmp_path, FOO_V04.read_bytes())
    with pytest.raises(BundleConfigError) as info:
        parse_bundle_config(folder, "foo")
    assert [p.split(":")[0] for p in info.value.problems] == [
        "static-hosts[1].root",
        "static-hosts[2].root",
    ]


@pytest.mark.skipif(not FOO_V04.exists(), reason="shared Keter fixtures are not here")
def test_keters_v04_sample_needs_its_exec(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, FOO_V04.read_bytes())
    os.chmod(folder / "hello", 0o644)
    with pytest.raises(BundleConfigError, match=re.escape('exec: "../hello" is not executable')):
        parse_bundle_config(folder, "foo")


def test_the_stanza_format_reads_into_the_same_model(tmp_path: Path) -> None:
    folder = unpacked(tmp_path, None)
    stanzas = load_yaml("stanzas:\n  - type: webapp\n    exec: ../hello\n    hosts: [a]\n")
    flat = load_yaml("exec: ../hello\nhosts: [a]\n")
    config_dir = folder / "config"
    assert parse_bundle_data(stanzas, folder=folder, config_dir=config_dir, app="app") == (
        parse_bundle_data(flat, folder=folder, config_dir=config_dir, app="app")
    )


# -- what one bundle may take of the shared parts (keter.bundle.budget) ---------------------


def stanzas(*items: dict) -> str:
    return json.dumps({"stanzas": list(items)})  # JSON is YAML


def webapp(*hosts: str, **extra: object) -> dict:
    return {"type": "webapp", "exec": "../hello", "hosts": list(hosts), **extra}


BACKGROUND = {"type": "background", "exec": "../hello"}
THROTTLE = {
    "name": "t",
    "limit": 5,
    "period": 60,
    "algorithm": "FixedWindow",
    "identifier_by": "ip",
}
REDIRECT = {"type": "redirect", "actions": [{"host": "x.test"}]}


def rate_limited(limiters: int) -> dict:
    limiter = {"rate-limiter": {"zone_by": "default", "throttles": [THROTTLE] * MAX_THROTTLES}}
    return webapp("rl.test", middleware=[limiter] * limiters)


def test_a_bundle_takes_as_much_as_the_bounds_allow(tmp_path: Path) -> None:
    wildcards = [f"*.w{i}.test" for i in range(budget.MAX_SERVER_BLOCKS - 2)]
    plain = budget.MAX_HOSTS - len(wildcards) - 2  # a.test and rl.test are the other two
    config = parse(
        tmp_path,
        stanzas(
            # One server block for its plain hosts and one per wildcard; rl.test's is the last.
            webapp("a.test", *wildcards, *(f"h{i}.test" for i in range(plain))),
            rate_limited(budget.MAX_RATE_ZONES // MAX_THROTTLES),
            *[BACKGROUND] * (budget.MAX_PROCESSES - 2),
        ),
    )
    assert len(config.webapps) + len(config.backgrounds) == budget.MAX_PROCESSES
    assert len(config.all_hosts) == budget.MAX_HOSTS


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            stanzas(webapp("a.test"), *[BACKGROUND] * budget.MAX_PROCESSES),
            "stanzas: 65 web app and background stanzas, each a process; at most 64",
        ),
        (
            stanzas(webapp("a.test", *(f"*.w{i}.test" for i in range(budget.MAX_SERVER_BLOCKS)))),
            "stanzas: 101 nginx server blocks (one per stanza with hosts, one per wildcard "
            "host and one per ssl: acme host); at most 100",
        ),
        (
            # keter.routes makes a server block of each ssl: acme host (its own certificate).
            stanzas(
                webapp(*(f"h{i}.test" for i in range(budget.MAX_SERVER_BLOCKS + 1)), ssl="acme")
            ),
            "stanzas: 101 nginx server blocks",
        ),
        (
            stanzas(
                *(webapp(f"h{i}.test") for i in range(budget.MAX_SERVER_BLOCKS // 2 + 1)),
                *(
                    {**REDIRECT, "hosts": [f"r{i}.test"]}
                    for i in range(budget.MAX_SERVER_BLOCKS // 2)
                ),
            ),
            "stanzas: 101 nginx server blocks",
        ),
        (
            # Plain hosts share a server block but every operator view lists them.
            stanzas(
                webapp(*(f"h{i}.test" for i in range(budget.MAX_HOSTS // 2))),
                {**REDIRECT, "hosts": [f"r{i}.test" for i in range(budget.MAX_HOSTS // 2 + 1)]},
            ),
            "stanzas: 501 host names; at most 500 are allowed",
        ),
        (
            stanzas(rate_limited(budget.MAX_RATE_ZONES // MAX_THROTTLES + 1)),
            "middleware: 80 rate-limit throttles, each 1 MiB of nginx's shared memory; at most 64",
        ),
    ],
    ids=["processes", "wildcards", "acme-hosts", "stanzas", "hosts", "rate-zones"],
)
def test_a_bundle_asking_more_of_the_shared_parts_is_refused(
    tmp_path: Path, config: str, expected: str
) -> None:
    assert any(problem.startswith(expected) for problem in problems(tmp_path, config))
