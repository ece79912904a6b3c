"""The global config: defaults, every key, every kind of mistake, Keter's sample file."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.samples import keter_sample
from support.tls import make_certificate

from keter.config import (
    KETER_ONLY_KEYS,
    ConfigError,
    KeterConfig,
    Listener,
    NginxSettings,
    SwitchSetting,
    load_config,
    parse_config,
    read_ephemeral_range,
)
from keter.config.model import conninfo, first_server
from keter.config.reader import _FIELDS
from keter.yamlcheck import load_yaml, read_yaml_file

ROOT = Path("/srv/keter")
EPHEMERAL = (32768, 60999)
SAMPLE = keter_sample("keter-config.yaml")


def parse(text: str, **kwargs: object) -> KeterConfig:
    kwargs.setdefault("ephemeral_range", EPHEMERAL)
    return parse_config(load_yaml(text), root=ROOT, base=ROOT / "etc", **kwargs)


def problems(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, **kwargs)
    return info.value.problems


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


# -- defaults and valid values ---------------------------------------------------------


def test_empty_document_gives_keters_defaults() -> None:
    config = parse("# every line commented out\n")
    assert config == KeterConfig(root=ROOT)
    assert config.listeners == (Listener("*", 80),)
    assert config.nginx == NginxSettings(
        config_file=Path("/etc/nginx/sites-enabled/keter"),
        test_command=("nginx", "-t"),
        reload_command=("nginx", "-s", "reload"),
        error_log=Path("/var/log/nginx/error.log"),  # Debian's
    )
    assert parse("nginx: {error-log: null}").nginx.error_log is None
    assert config.port_range == (4000, 4999)
    assert (config.health_check_timeout, config.drain_seconds, config.stop_timeout) == (30, 2, 10)
    assert dict(config.env) == {}
    assert config.postgres_admin_dsn == ""
    assert config.setuid is None
    assert (config.log_max_bytes, config.log_backups) == (10 * 2**20, 5)
    assert (config.max_unpacked_bytes, config.max_members) == (2 * 2**30, 100_000)
    assert config.warnings == ()


def test_folder_properties() -> None:
    config = parse("{}")
    assert config.incoming_dir == ROOT / "incoming"
    assert config.temp_dir == ROOT / "temp"
    assert config.log_dir == ROOT / "log"
    assert config.etc_dir == ROOT / "etc"
    assert config.run_dir == ROOT / "run"


def test_every_key_is_read() -> None:
    config = parse(
        """
        listeners:
          - {host: "*", port: 8080}
          - {host: "*4", port: 8081}
          - {host: "*6"}
          - {host: "127.0.0.1", port: 8082}
          - {host: "0:0::1", port: 8082}
        nginx:
          config-file: nginx/keter.conf
          test-command: [/usr/sbin/nginx, -t, -c, /x/nginx.conf]
          reload-command: [/usr/sbin/nginx, -s, reload]
          error-log: log/nginx-error.log
        port-range: [20000, 20099]
        health-check-timeout: 7.5
        drain-seconds: 0
        stop-timeout: 3
        switch: reload
        env: {MODE: production, WORKERS: 4, RATIO: 0.5, DEBUG: false}
        postgres:
          {admin-dsn: "host=/run/pg port=5433 user=postgres", retry-seconds: 4, connection-limit: 7}
        setuid: root
        log-max-bytes: 1024
        log-backups: 0
        max-unpacked-bytes: 5000000
        max-members: 10
        root: /var/keter
        """
    )
    assert config.listeners == (
        Listener("*", 8080),
        Listener("0.0.0.0", 8081),  # Keter's "*4": every IPv4 address
        Listener("::", 80),  # Keter's "*6": every IPv6 address
        Listener("127.0.0.1", 8082),
        Listener("::1", 8082),  # canonical spelling, so nginx sees one address
    )
    assert config.nginx.config_file == ROOT / "etc/nginx/keter.conf"  # relative to the file
    assert config.nginx.test_command == ("/usr/sbin/nginx", "-t", "-c", "/x/nginx.conf")
    assert config.nginx.reload_command == ("/usr/sbin/nginx", "-s", "reload")
    assert config.nginx.error_log == ROOT / "etc/log/nginx-error.log"
    assert config.port_range == (20000, 20099)
    assert config.health_check_timeout == 7.5
    assert config.drain_seconds == 0
    assert config.stop_timeout == 3
    # Read once into the enum: whoever uses it matches members, not spellings.
    assert config.switch is SwitchSetting.RELOAD
    assert dict(config.env) == {
        "MODE": "production",
        "WORKERS": "4",
        "RATIO": "0.5",
        "DEBUG": "false",
    }
    assert config.postgres_admin_dsn == "host=/run/pg port=5433 user=postgres"
    assert (config.postgres.retry_seconds, config.postgres.connection_limit) == (4, 7)
    assert config.setuid == "root"
    assert (config.log_max_bytes, config.log_backups) == (1024, 0)
    assert (config.max_unpacked_bytes, config.max_members) == (5_000_000, 10)
    assert config.root == Path("/var/keter")
    assert config.warnings == ()


def test_config_is_immutable() -> None:
    config = parse("env: {A: b}")
    with pytest.raises(AttributeError):
        config.stop_timeout = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.env["A"] = "c"  # type: ignore[index]


def test_secrets_stay_out_of_repr() -> None:
    config = parse('env: {API_KEY: hunter2}\npostgres: {admin-dsn: "password=s3cret"}')
    assert "hunter2" not in repr(config)
    assert "s3cret" not in repr(config)


def test_relative_root_is_relative_to_the_config_folder() -> None:
    assert parse("root: ..").root == ROOT
    assert parse("root: ../../other").root == Path("/srv/other")


NULLABLE = [
    *(f"{key}:" for key in (*_FIELDS, "root", "graceful-drain-micros", "host", "port", "ssl")),
    *(
        f"nginx: {{{key}: null}}"
        for key in ("config-file", "test-command", "reload-command", "resolver")
    ),
    "nginx: {shared-certificates: null}",
    *(f"acme: {{{key}: null}}" for key in ("directory", "email", "eab", "ca-bundle")),
    *(f"postgres: {{{key}: null}}" for key in ("admin-dsn", "retry-seconds", "connection-limit")),
    "listeners: [{host: null, port: null, certificate: null, key: null}]",
    # Empty where the default is empty.
    "dashboard-users: {}",
    "ip-from-header: []",
    "acme: {eab: {}}",
]


@pytest.mark.parametrize("text", NULLABLE)
def test_null_is_the_default(text: str) -> None:
    # README's table of defaults writes "key: null" for a key whose default is none:
    # copied as it is, it must be the default, not refused.
    assert parse(text) == KeterConfig(root=ROOT)


def test_null_error_log_keeps_its_own_meaning() -> None:
    assert parse("nginx: {error-log: null}").nginx.error_log is None  # nginx's log not read


@pytest.mark.parametrize("key", KETER_ONLY_KEYS)
def test_keter_keys_without_meaning_warn_once(key: str) -> None:
    config = parse(f"{key}: 1")
    [warning] = config.warnings
    assert warning.startswith(f"{key}: accepted for compatibility with Keter; ")
    assert "no effect" not in warning  # it says what keter does instead


def test_port_range_may_touch_but_not_overlap_the_ephemeral_range() -> None:
    assert parse("port-range: [1024, 32767]").port_range == (1024, 32767)
    assert parse("port-range: [61000, 65535]").port_range == (61000, 65535)
    assert parse("port-range: [4000, 4000]").port_range == (4000, 4000)


# -- mistakes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "port-range: [5000, 10]",
            "port-range: expected [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535, got [5000, 10]",
        ),
        ("port-range: [80, 90]", "port-range: expected [LOW, HIGH] with 1024"),
        ("port-range: [4000, 70000]", "port-range: expected [LOW, HIGH]"),
        ("port-range: [4000]", "port-range: expected [LOW, HIGH]"),
        ("port-range: [true, 5000]", "port-range: expected [LOW, HIGH]"),
        (
            "port-range: 4000-4999",
            'port-range: expected [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535, got "4000-4999"',
        ),
        (
            "listeners: [{port: 80}, {port: eighty}]",
            'listeners[1].port: expected an integer 1-65535, got "eighty"',
        ),
        ("listeners: [{port: 0}]", "listeners[0].port: expected an integer 1-65535, got 0"),
        ("listeners: [{port: 65536}]", "listeners[0].port: expected an integer 1-65535"),
        ("listeners: [{port: true}]", "listeners[0].port: expected an integer 1-65535, got true"),
        ("listeners: [{port: 80.0}]", "listeners[0].port: expected an integer 1-65535, got 80.0"),
        ("listeners: [{host: localhost}]", 'listeners[0].host: expected "*", "*4", "*6", "!4"'),
        ("listeners: [{host: '!5'}]", 'listeners[0].host: expected "*", "*4", "*6", "!4"'),
        ("listeners: [{host: 1}]", "listeners[0].host: expected"),
        ("listeners: [{prot: 80}]", "listeners[0].prot: unknown key (did you mean port?)"),
        ("listeners: [80]", 'listeners[0]: expected a mapping like {host: "*", port: 80}, got 80'),
        ("listeners: []", "listeners: expected a list"),
        ("listeners: {host: '*'}", "listeners: expected a list"),
        ("listeners: [{port: 80}, {host: '*'}]", "listeners[1]: * port 80 repeats listeners[0]"),
        (
            "listeners: [{port: 81}, {host: '*4', port: 81}]",
            "listeners[1]: 0.0.0.0 port 81 repeats",
        ),
        ("listeners: [{host: '::1'}, {host: '0::1'}]", "listeners[1]: ::1 port 80 repeats"),
        (
            "listeners: [{port: 8443, session: true}]",
            "listeners[0].session: only a TLS listener (certificate and key) has sessions",
        ),
        (
            "nginx: /etc/nginx",
            'nginx: expected a mapping like {config-file: ...}, got "/etc/nginx"',
        ),
        ("nginx: {config-file: 5}", "nginx.config-file: expected a file path, got 5"),
        ("nginx: {config-file: ''}", 'nginx.config-file: expected a file path, got ""'),
        ("nginx: {test-command: nginx -t}", "nginx.test-command: expected a non-empty list"),
        ("nginx: {reload-command: []}", "nginx.reload-command: expected a non-empty list"),
        ("nginx: {reload-command: [nginx, 1]}", "nginx.reload-command: expected a non-empty list"),
        ("nginx: {config_file: x}", "nginx.config_file: unknown key (did you mean config-file?)"),
        ("nginx: {error-log: [a]}", 'nginx.error-log: expected a file path, got ["a"]'),
        (
            "health-check-timeout: '30'",
            'health-check-timeout: expected a number of seconds > 0, got "30"',
        ),
        (
            "health-check-timeout: 0",
            "health-check-timeout: expected a number of seconds > 0, got 0",
        ),
        (
            "health-check-timeout: true",
            "health-check-timeout: expected a number of seconds > 0, got true",
        ),
        ("health-check-timeout: .inf", "health-check-timeout: expected a number of seconds > 0"),
        ("health-check-timeout: .nan", "health-check-timeout: expected a number of seconds > 0"),
        ("drain-seconds: -1", "drain-seconds: expected a number of seconds >= 0, got -1"),
        ("stop-timeout: [10]", "stop-timeout: expected a number of seconds > 0, got [10]"),
        ("switch: kernel", 'switch: expected one of auto, reload, got "kernel"'),
        ("switch: [auto]", 'switch: expected one of auto, reload, got ["auto"]'),
        ("env: [A=b]", 'env: expected a mapping of NAME: value, got ["A=b"]'),
        ("env: {A: [1]}", "env.A: expected a string, number or boolean, got a list"),
        ("env: {A: }", "env.A: expected a string, number or boolean, got nothing (null)"),
        ("env: {1A: x}", "env.1A: expected a variable name"),
        ("env: {ON: x}", "env.true: YAML reads this name as a boolean; quote it"),
        ("env: {'A=B': x}", 'env."A=B": expected a variable name'),
        ("postgres: true", 'postgres: expected a mapping like {admin-dsn: ""}, got true'),
        (
            "postgres: {admin-dsn: 5}",
            "postgres.admin-dsn: expected a libpq connection string, got a number",
        ),
        ("postgres: {admin_dsn: ''}", "postgres.admin_dsn: unknown key (did you mean admin-dsn?)"),
        (
            "postgres: {retry-seconds: -1}",
            "postgres.retry-seconds: expected a number of seconds > 0, got -1",
        ),
        (
            "postgres: {connection-limit: -1}",
            "postgres.connection-limit: expected an integer >= 0, got -1",
        ),
        ("setuid: 3999999", "setuid: no user with uid 3999999 on this machine"),
        ("setuid: [root]", 'setuid: expected a user name or uid, got ["root"]'),
        ("log-max-bytes: 0", "log-max-bytes: expected an integer >= 1, got 0"),
        ("log-max-bytes: 1.5", "log-max-bytes: expected an integer >= 1, got 1.5"),
        ("log-backups: -1", "log-backups: expected an integer >= 0, got -1"),
        ("log-backups: false", "log-backups: expected an integer >= 0, got false"),
        ("max-unpacked-bytes: 2G", 'max-unpacked-bytes: expected an integer >= 1, got "2G"'),
        ("max-members: {}", "max-members: expected an integer >= 1, got {}"),
        ("root: [a]", 'root: expected a folder path, got ["a"]'),
        (
            "helth-check-timeout: 3",
            "helth-check-timeout: unknown key (did you mean health-check-timeout?)",
        ),
        ("listener: []", "listener: unknown key (did you mean listeners?)"),
        ("zzz: 1", "zzz: unknown key"),
        ("1: 1", "1: unknown key: keys must be strings, got a number"),
        ('"evil\\nkey": 1', '"evil\\nkey": unknown key'),
    ],
)
def test_each_mistake_is_named_with_its_key_path(text: str, expected: str) -> None:
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]
    assert "\n" not in found[0]  # a hostile value cannot forge a second log line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # dash refuses `export OPTIND=abc`: every process of every app failed to start.
        ("env: {OPTIND: abc}", "env.OPTIND: OPTIND is the shell's own"),
        # One variable past the kernel's bound: every app failed "Argument list too long".
        (f"env: {{BIG: {'x' * 200_000}}}", "env.BIG: the value is longer than 32768 bytes"),
        ("env: {" + ", ".join(f"A{i}: x" for i in range(257)) + "}", "env: more than 256"),
        (
            "env: {" + ", ".join(f"A{i}: {'x' * 30_000}" for i in range(80)) + "}",
            "env: takes 2",  # bytes, more than 2 MiB in all, as an app's settings file
        ),
    ],
)
def test_the_global_env_is_held_to_the_rules_of_keter_env(text: str, expected: str) -> None:
    [found] = problems(text)
    assert found.startswith(expected), found
    assert "xxx" not in found  # a value may be a secret


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        """
        port-range: [5000, 10]
        listeners: [{port: eighty}, {host: x}]
        helth-check-timeout: 3
        stop-timeout: "10"
        nginx: {test-command: nginx -t}
        env: {A: [1]}
        """
    )
    assert [p.split(":")[0] for p in found] == [
        "port-range",
        "listeners[0].port",
        "listeners[1].host",
        "helth-check-timeout",
        "stop-timeout",
        "nginx.test-command",
        "env.A",
    ]
    with pytest.raises(ConfigError) as info:
        parse("port-range: [5000, 10]\nstop-timeout: x")
    assert str(info.value).splitlines() == info.value.problems


def test_port_range_overlapping_the_ephemeral_range_is_refused_with_the_reason() -> None:
    (found,) = problems("port-range: [30000, 40000]", ephemeral_range=(32768, 60999))
    assert found.startswith("port-range: [30000, 40000] overlaps the kernel's ephemeral port range")
    assert "32768-60999" in found
    assert "race outgoing connections" in found
    # the default range is checked too
    (found,) = problems("{}", ephemeral_range=(4500, 5000))
    assert found.startswith("port-range: [4000, 4999] overlaps")


def test_ephemeral_range_is_read_from_proc_when_not_given() -> None:
    live = read_ephemeral_range()
    if live is None:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range here")
    low = live[0]
    with pytest.raises(ConfigError, match="overlaps the kernel's ephemeral"):
        parse_config({"port-range": [low, low]}, root=ROOT, base=ROOT)


def test_read_ephemeral_range(tmp_path: Path) -> None:
    assert read_ephemeral_range(write(tmp_path / "ok", "32768\t60999\n")) == (32768, 60999)
    assert read_ephemeral_range(write(tmp_path / "bad", "32768\n")) is None
    assert read_ephemeral_range(tmp_path / "missing") is None


def test_unreadable_ephemeral_range_is_a_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("keter.config.ports.EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    config = parse_config({}, root=ROOT, base=ROOT)
    assert config.warnings == (
        f"port-range: cannot read {tmp_path / 'missing'}; overlap with it not checked",
    )


def test_listener_port_inside_the_app_port_range_is_refused() -> None:
    (found,) = problems("listeners: [{port: 80}, {port: 4500}]")
    assert found == (
        "listeners[1].port: 4500 is inside port-range [4000, 4999], "
        "so keter could give it to an app"
    )


def test_tls_listeners_have_certificates_relative_to_the_config_file(tmp_path: Path) -> None:
    make_certificate(tmp_path / "etc", "certificate", "example.com")
    make_certificate(tmp_path / "etc/chain", "middle", "ca.example.com")
    config = parse_config(
        load_yaml(
            'listeners: [{host: "*4"}, {host: "*4", key: certificate.key,'
            " certificate: certificate.crt, chain-certificates: [chain/middle.crt],"
            " session: true}]"
        ),
        root=tmp_path,
        base=tmp_path / "etc",
        ephemeral_range=EPHEMERAL,
    )
    plain, tls = config.listeners
    assert plain == Listener("0.0.0.0", 80) and not plain.tls
    assert tls == Listener(
        "0.0.0.0",
        443,  # Keter's default port for a TLS listener
        certificate=tmp_path / "etc/certificate.crt",
        key=tmp_path / "etc/certificate.key",
        chain=(tmp_path / "etc/chain/middle.crt",),
        session=True,
    )
    assert tls.tls
    assert config.warnings == ()


def test_tls_listener_mistakes(tmp_path: Path) -> None:
    certificate, key = make_certificate(tmp_path / "etc", "certificate", "example.com")

    def found(text: str) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse_config(load_yaml(text), root=tmp_path, base=tmp_path / "etc")
        return info.value.problems

    assert found("listeners: [{port: 80}, {port: 443, key: certificate.key}]") == [
        "listeners[1]: a TLS listener needs both certificate and key"
    ]
    assert found("listeners: [{port: 80}, {certificate: nope.crt, key: certificate.crt}]") == [
        f"listeners[1].certificate: {tmp_path}/etc/nope.crt cannot be read: "
        "No such file or directory",
        f"listeners[1].key: {certificate} is not a PEM private key",
    ]
    assert found(
        "listeners: [{port: 80}, {certificate: certificate.crt, key: certificate.key,"
        " chain-certificates: certificate.crt, session: 1}]"
    ) == [
        "listeners[1].chain-certificates: expected a list of certificate files, "
        'got "certificate.crt"',
        "listeners[1].session: expected true or false, got 1",
    ]
    # keter confirms every reload over plain HTTP.
    assert found("listeners: [{certificate: certificate.crt, key: certificate.key}]") == [
        "listeners: at least one plain HTTP listener (without a certificate) is needed"
    ]
    assert key.exists()


def test_unknown_setuid_user_is_refused() -> None:
    name = "keter-no-such-user"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    assert problems(f"setuid: {name}") == [f'setuid: no user named "{name}" on this machine']


def test_bad_admin_dsn_is_refused_without_showing_it() -> None:
    (found,) = problems('postgres: {admin-dsn: "password=s3cret host"}')
    assert found.startswith("postgres.admin-dsn: not a valid libpq connection string")
    assert "s3cret" not in found
    assert parse('postgres: {admin-dsn: "postgresql://u@h:5/db"}').postgres_admin_dsn
    for port in ("s3cret", "0", "65536", "5432x,5433"):
        (found,) = problems(f'postgres: {{admin-dsn: "password=s3cret host=h port={port}"}}')
        assert found == (
            "postgres.admin-dsn: the port is not a port number "
            "(value not shown: it may hold a password)"
        )


def test_keter_provisions_on_the_first_server_a_dsn_lists() -> None:
    """libpq's lists (servers to try in turn): the config's check of a bundle's server and
    the provisioner (what apps are given) both take the first."""
    dsn = "host=db1.example,db2.example port=6543,6544 user=admin"
    config = parse(f'postgres: {{admin-dsn: "{dsn}"}}')
    assert config.postgres.server() == ("db1.example", 6543) == first_server(conninfo(dsn))
    assert config.postgres.server_problem("db1.example", 6543) is None
    assert config.postgres.server_problem("db2.example", 6544) is not None


def test_root_key_must_agree_with_a_root_given_on_the_command_line() -> None:
    assert parse("root: ..", root_given=True).root == ROOT
    (found,) = problems("root: /elsewhere", root_given=True)
    assert found.startswith(
        "root: points to /elsewhere, but keter was started with ROOT /srv/keter"
    )


# -- files -----------------------------------------------------------------------------


def test_load_config_from_a_root_without_a_config_file(tmp_path: Path) -> None:
    config = load_config(tmp_path, ephemeral_range=EPHEMERAL)
    assert config == KeterConfig(root=tmp_path)


def test_load_config_from_a_root_reads_etc(tmp_path: Path) -> None:
    write(tmp_path / "etc/keter-config.yaml", "stop-timeout: 4\nnginx: {config-file: k.conf}\n")
    config = load_config(str(tmp_path), ephemeral_range=EPHEMERAL)
    assert config.root == tmp_path
    assert config.stop_timeout == 4
    assert config.nginx.config_file == tmp_path / "etc/k.conf"


def test_load_config_from_a_file_defaults_root_to_its_folders_parent(tmp_path: Path) -> None:
    path = write(tmp_path / "opt/keter/etc/keter-config.yaml", "stop-timeout: 4\n")
    assert load_config(path, ephemeral_range=EPHEMERAL).root == tmp_path / "opt/keter"
    write(path, "root: ../data\n")
    assert load_config(path, ephemeral_range=EPHEMERAL).root == tmp_path / "opt/keter/data"


def test_load_config_relative_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "etc/keter-config.yaml", "root: ..\n")
    assert load_config(".", ephemeral_range=EPHEMERAL).root == tmp_path


def test_load_config_names_the_file_in_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "etc/keter-config.yaml", "stop-timeout: x\nlog-backups: y\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, ephemeral_range=EPHEMERAL)
    assert str(info.value).splitlines() == [
        f'{path}: stop-timeout: expected a number of seconds > 0, got "x"',
        f'{path}: log-backups: expected an integer >= 0, got "y"',
    ]


def test_load_config_root_conflict(tmp_path: Path) -> None:
    write(tmp_path / "etc/keter-config.yaml", "root: /somewhere/else\n")
    with pytest.raises(ConfigError, match="root: points to /somewhere/else"):
        load_config(tmp_path, ephemeral_range=EPHEMERAL)


def test_load_config_missing_target(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope")
    assert info.value.problems == [f"{tmp_path / 'nope'}: no such file or folder"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("- just\n- a list\n", 'expected a mapping of settings, got ["just", "a list"]'),
        ("just text\n", 'expected a mapping of settings, got "just text"'),
        ("listeners: [\n", "not valid YAML at line 2, column 1"),
        ("a: 1\n---\nb: 2\n", "not valid YAML at line 2, column 1: expected a single document"),
        ("x: &a [1, 2]\ny: *a\n", "uses YAML anchors/aliases (line 1), which keter refuses"),
        ("x: &a 1\n", "uses YAML anchors/aliases (line 1)"),
        (
            "stop-timeout: 1\nstop-timeout: 2\n",
            'not valid YAML at line 2, column 1: duplicate key "stop-timeout"',
        ),
        ("x: !!python/object/apply:os.system [id]\n", "not valid YAML at line 1, column 4"),
        ("[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),
        (b"env: {A: \xff}\n", "not UTF-8 (bad byte at offset 9)"),
        ("x" * (2**20 + 1), "is larger than 1048576 bytes"),
    ],
)
def test_a_bad_file_is_one_clear_problem(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    path = write(tmp_path / "etc/keter-config.yaml", content)
    with pytest.raises(ConfigError) as info:
        load_config(path, ephemeral_range=EPHEMERAL)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected), info.value.problems
    assert str(info.value).startswith(f"{path}: {expected}")


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(ValueError, match="anchors/aliases"):
        load_yaml("\n".join(lines))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a regular file"):
        read_yaml_file(tmp_path)  # a folder
    with pytest.raises(ValueError, match="cannot be read: No such file"):
        read_yaml_file(tmp_path / "missing")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "etc/keter-config.yaml", "\ufeffstop-timeout: 4\n")
    assert load_config(path, ephemeral_range=EPHEMERAL).stop_timeout == 4


# -- Keter's own sample ----------------------------------------------------------------


@pytest.mark.skipif(not SAMPLE.exists(), reason="shared Keter fixtures are not here")
def test_keters_sample_config_is_accepted_with_warnings(tmp_path: Path) -> None:
    # The sample names key.pem and certificate.pem beside it; keter checks they exist.
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc/keter-config.yaml"
    path.write_bytes(SAMPLE.read_bytes())
    certificate, key = make_certificate(tmp_path / "etc", "sample", "example.com")
    certificate.rename(tmp_path / "etc/certificate.pem")
    key.rename(tmp_path / "etc/key.pem")
    config = load_config(path, ephemeral_range=EPHEMERAL)
    assert config.root == tmp_path  # `root: ..`
    assert config.listeners == (
        Listener("0.0.0.0", 80),
        Listener(
            "0.0.0.0",
            443,
            certificate=tmp_path / "etc/certificate.pem",
            key=tmp_path / "etc/key.pem",
            session=True,
        ),
    )
    assert config.warnings == (
        "rotate-logs: accepted for compatibility with Keter; keter always rotates app logs "
        "(log-max-bytes, log-backups)",
    )


@pytest.mark.skipif(not SAMPLE.exists(), reason="shared Keter fixtures are not here")
def test_keters_sample_config_in_place_names_its_missing_certificate_files() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SAMPLE, ephemeral_range=EPHEMERAL)
    assert info.value.problems == [
        f"listeners[1].key: {SAMPLE.parent}/key.pem cannot be read: No such file or directory",
        f"listeners[1].certificate: {SAMPLE.parent}/certificate.pem cannot be read: "
        "No such file or directory",
    ]


def test_keters_proxy_keys_are_read(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for name in ("unknown.html", "missing.html", "exception.html"):
        (tmp_path / "etc" / name).write_text("<p>sorry</p>")
    config = parse_config(
        load_yaml(
            """
            ip-from-header: true
            external-http-port: 8080
            external-https-port: 450
            healthcheck-path: /keter-health
            unknown-host-response-file: unknown.html
            missing-host-response-file: ./missing.html
            proxy-exception-response-file: exception.html
            connection-time-bound: 0
            cli-port: 1234
            """
        ),
        root=tmp_path,
        base=tmp_path / "etc",
        ephemeral_range=EPHEMERAL,
    )
    assert "127.0.0.0/8" in config.ip_from_header and "10.0.0.0/8" in config.ip_from_header
    assert (config.external_http_port, config.external_https_port) == (8080, 450)
    assert config.healthcheck_path == "/keter-health"
    assert config.unknown_host_response_file == tmp_path / "etc/unknown.html"
    assert config.missing_host_response_file == tmp_path / "etc/missing.html"
    assert config.proxy_exception_response_file == tmp_path / "etc/exception.html"
    assert config.connection_time_bound == 0
    [warning] = config.warnings
    assert warning.startswith("cli-port: accepted for compatibility with Keter; ")


def test_keters_proxy_key_defaults() -> None:
    config = parse("{}")
    assert config.ip_from_header == ()
    assert (config.external_http_port, config.external_https_port) == (None, None)
    assert config.healthcheck_path is None
    assert config.unknown_host_response_file is None
    assert config.connection_time_bound == 300_000  # Keter's five minutes, in milliseconds
    assert parse("ip-from-header: false").ip_from_header == ()
    assert parse("ip-from-header: [10.1.2.3, 192.168.0.0/24]").ip_from_header == (
        "10.1.2.3/32",
        "192.168.0.0/24",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ip-from-header: yes-please", "ip-from-header: expected true, false or a list"),
        ("ip-from-header: [10.0.0.0/33]", 'ip-from-header[0]: expected an address or network'),
        ("external-http-port: 0", "external-http-port: expected an integer 1-65535, got 0"),
        ("external-https-port: '443'", "external-https-port: expected an integer 1-65535"),
        ("healthcheck-path: health", 'healthcheck-path: expected a URL path like "/keter-health"'),
        ("healthcheck-path: '/a b'", "healthcheck-path: expected a URL path"),
        ("healthcheck-path: '/$x'", "healthcheck-path: expected a URL path"),
        ("unknown-host-response-file: nope.html",
         "unknown-host-response-file: /srv/keter/etc/nope.html is not a file"),
        ("connection-time-bound: -1", "connection-time-bound: expected an integer >= 0, got -1"),
    ],
)  # fmt: skip
def test_keters_proxy_key_mistakes(text: str, expected: str) -> None:
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


# -- properties ------------------------------------------------------------------------


@given(low=st.integers(-5, 70000), high=st.integers(-5, 70000))
def test_port_range_property(low: int, high: int) -> None:
    """Any accepted range is well-formed and clear of the ephemeral range and port 80."""
    try:
        config = parse_config(
            {"port-range": [low, high]}, root=ROOT, base=ROOT, ephemeral_range=EPHEMERAL
        )
    except ConfigError as exc:
        assert all(p.startswith("port-range") for p in exc.problems)
        assert not (1024 <= low <= high <= 65535) or (low <= EPHEMERAL[1] and EPHEMERAL[0] <= high)
    else:
        assert config.port_range == (low, high)
        assert 1024 <= low <= high < EPHEMERAL[0] or EPHEMERAL[1] < low <= high <= 65535


# -- the operator's side: status socket, dashboard, archive ------------------------------


def test_status_keys_default_to_socket_only() -> None:
    config = parse("{}")
    assert config.status_listen is None
    assert config.status_group is None
    assert config.archive_keep == 3
    assert config.dashboard_host is None
    assert config.archive_dir == ROOT / "archive"


def test_status_keys_are_read() -> None:
    config = parse(
        """
        status-listen: "127.0.0.1:8999"
        status-group: daemon
        archive-keep: 5
        dashboard-host: Keter.Example.com
        dashboard-users: {admin: pw}
        """
    )
    assert config.status_listen == ("127.0.0.1", 8999)
    assert config.status_group == "daemon"
    assert config.archive_keep == 5
    assert config.dashboard_host == "keter.example.com"
    assert config.warnings == (PLAIN_DASHBOARD,)  # no listener has a certificate
    assert parse('status-listen: "[::1]:8999"').status_listen == ("::1", 8999)


ELSEWHERE = "203.0.113.77"  # TEST-NET-3: no interface of a test machine has it


def test_an_address_of_another_machine_is_refused_at_start() -> None:
    # It passed, then every deploy failed at nginx's bind.
    [problem] = problems(f"listeners: [{{host: '*', port: 8080}}, {{host: {ELSEWHERE}}}]")
    assert problem.startswith(f"listeners[1].host: {ELSEWHERE} is not an address of this machine")
    text = f'status-listen: "{ELSEWHERE}:8999"\ndashboard-users: {{ops: pw}}'
    [problem] = problems(text)
    assert problem.startswith(f"status-listen: {ELSEWHERE} is not an address of this machine")
    # Every address of a family, and this machine's own, are fine.
    listeners = "[{host: '*'}, {host: '*6', port: 81}, {host: 127.0.0.1, port: 82}]"
    assert len(parse(f"listeners: {listeners}").listeners) == 3


@pytest.mark.parametrize(
    ("listeners", "listen"),
    [
        (None, "127.0.0.1:80"),  # the default listener, *:80
        ("[{host: 127.0.0.1, port: 8080}]", "127.0.0.1:8080"),
        ("[{host: '*', port: 8080}, {host: '*6', port: 8999}]", "[::1]:8999"),
    ],
)
def test_the_status_listener_takes_no_port_nginx_listens_on(listeners, listen) -> None:
    text = f'status-listen: "{listen}"' + (f"\nlisteners: {listeners}" if listeners else "")
    [problem] = problems(text)
    assert problem.startswith("status-listen: port "), problem
    assert "where nginx listens" in problem


@pytest.mark.parametrize(
    ("listeners", "listen"),
    [
        (None, "[::1]:80"),  # nginx's *:80 is IPv4 only
        ("[{host: 127.0.0.1, port: 8999}]", "[::1]:8999"),
        ("[{host: 127.0.0.2, port: 8999}]", "127.0.0.1:8999"),
    ],
)
def test_the_status_listener_may_share_a_port_on_another_address(listeners, listen) -> None:
    text = f'status-listen: "{listen}"' + (f"\nlisteners: {listeners}" if listeners else "")
    assert parse(text).status_listen is not None


def test_a_status_listener_beyond_loopback_needs_dashboard_users() -> None:
    for address in ("0.0.0.0", "[::]", "192.0.2.7"):
        [problem] = problems(f'status-listen: "{address}:8999"')
        assert problem.startswith("status-listen: ") and "not a loopback address" in problem
        assert "set dashboard-users" in problem
    config = parse('status-listen: "0.0.0.0:8999"\ndashboard-users: {ops: pw}')
    assert config.status_listen == ("0.0.0.0", 8999)
    assert config.warnings == ()
    # On loopback the token file under ROOT/etc is enough.
    assert parse('status-listen: "127.0.0.1:8999"').warnings == ()


def test_status_hosts_are_names_or_addresses() -> None:
    config = parse("status-hosts: [Keter.LAN, 192.0.2.7, '[2001:db8::1]']")
    assert config.status_hosts == ("keter.lan", "192.0.2.7", "2001:db8::1")
    assert parse("{}").status_hosts == ()
    assert problems("status-hosts: keter.lan") == [
        'status-hosts: expected a list of host names, got "keter.lan"'
    ]
    found = problems("status-hosts: ['*.lan', 'a b', 5]")
    assert [p.split(":")[0] for p in found] == [
        "status-hosts[0]",
        "status-hosts[1]",
        "status-hosts[2]",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("status-listen: 8999", 'status-listen: expected "ADDRESS:PORT"'),
        ("status-listen: 'localhost:8999'", 'status-listen: expected "ADDRESS:PORT"'),
        ("status-listen: '127.0.0.1:0'", 'status-listen: expected "ADDRESS:PORT"'),
        ("status-listen: '127.0.0.1:x'", 'status-listen: expected "ADDRESS:PORT"'),
        ("status-listen: '::1:8999'", "status-listen: expected"),
        ("status-listen: '127.0.0.1:4500'", "status-listen: port 4500 is inside port-range"),
        ("status-group: no-such-group-here", 'status-group: no group named "no-such-group-here"'),
        ("status-group: 5", "status-group: expected a group name, got 5"),
        ("archive-keep: 0", "archive-keep: expected an integer >= 1, got 0"),
        ("dashboard-host: 'a b'", 'dashboard-host: the host name contains " "'),
        ("dashboard-host: '*.example.com'", "dashboard-host: expected one host name"),
        ("dashboard-host: 10.0.0.1", "dashboard-host: an IP address is not a host name"),
        ("archiv-keep: 1", "archiv-keep: unknown key (did you mean archive-keep?)"),
    ],
)
def test_status_key_mistakes_are_named(text: str, expected: str) -> None:
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


PLAIN_DASHBOARD = (
    "dashboard-host: is served over plain HTTP (no listener has a certificate): its "
    "password and the page that restarts apps cross the network in clear"
)


def test_dashboard_host_needs_a_tcp_status_listener_and_users() -> None:
    assert problems("dashboard-host: dash.example.com") == [
        'dashboard-host: needs status-listen (e.g. "127.0.0.1:8999"): '
        "nginx reaches the dashboard over TCP",
        "dashboard-host: needs dashboard-users ({user: password}): "
        "nginx asks for them (basic auth)",
    ]
    config = parse(
        "dashboard-host: dash.example.com\n"
        'status-listen: "127.0.0.1:8999"\n'
        "dashboard-users: {admin: hunter2}\n"
    )
    assert config.dashboard_users == (("admin", "hunter2"),)
    assert "hunter2" not in repr(config)
    # No listener with a certificate: its password crosses the network in clear.
    assert config.warnings == (PLAIN_DASHBOARD,)


@pytest.mark.parametrize(
    ("names", "warned"),
    [(("apps.example.com",), True), (("dash.example.com",), False), (("*.example.com",), False)],
)
def test_a_dashboard_host_no_tls_certificate_names_is_warned_of(
    tmp_path: Path, names: tuple[str, ...], warned: bool
) -> None:
    """Plain HTTP to it is redirected to HTTPS: with a certificate for other names,
    browsers refused the page the operator had used."""
    make_certificate(tmp_path / "etc", "tls", *names)
    config = parse_config(
        load_yaml(
            "listeners: [{port: 80}, {port: 443, certificate: tls.crt, key: tls.key}]\n"
            "dashboard-host: dash.example.com\n"
            'status-listen: "127.0.0.1:8999"\n'
            "dashboard-users: {admin: hunter2}\n"
        ),
        root=tmp_path,
        base=tmp_path / "etc",
        ephemeral_range=EPHEMERAL,
    )
    expected = (
        "dashboard-host: no TLS listener's certificate names dash.example.com: browsers "
        "will refuse the HTTPS page plain HTTP is redirected to"
    )
    assert config.warnings == ((expected,) if warned else ())


def test_dashboard_users_are_checked_without_showing_passwords() -> None:
    found = problems("dashboard-users: {'a b': x, ops: 5}")
    assert found == [
        "dashboard-users.\"a b\": expected a user name of letters, digits, '.', '_' or '-'",
        "dashboard-users.ops: expected a password (a string), got a number",
    ]


def test_traffic_stats_is_on_unless_turned_off() -> None:
    assert parse("{}").traffic_stats is True
    assert parse("traffic-stats: false").traffic_stats is False
    assert problems("traffic-stats: 'no'") == ['traffic-stats: expected true or false, got "no"']


def test_watch_keys_are_read_and_checked() -> None:
    config = parse("{}")
    assert (config.watch_seconds, config.watch_max_error_ratio, config.watch_min_requests) == (
        60.0,
        0.05,
        20,
    )
    config = parse("watch-seconds: 0\nwatch-max-error-ratio: 0.2\nwatch-min-requests: 5")
    assert (config.watch_seconds, config.watch_max_error_ratio, config.watch_min_requests) == (
        0.0,
        0.2,
        5,
    )
    assert problems("watch-max-error-ratio: 1.5") == [
        "watch-max-error-ratio: expected a ratio from 0 to 1 (0.05 is 5%), got 1.5"
    ]
    assert problems("watch-seconds: -1")[0].startswith("watch-seconds: expected a number")
    assert problems("watch-min-requests: 0")[0].startswith("watch-min-requests: expected")
