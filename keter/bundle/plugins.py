"""A bundle's database: Keter's ``plugins: {postgres: ...}`` (and 0.4's ``postgres: true``).

``postgres: true`` asks for a database on the server keter provisions on.
Keter 1.0's server list, ``plugins: {postgres: [{server: HOST, port: PORT}]}``,
names the server; as in Keter only the first entry counts. Whether keter may
provision there is the operator's policy (``PostgresSettings.server_problem``
in ``keter.config``), checked where the operator's config is known.
"""

from __future__ import annotations

from keter import names
from keter.bundle.model import PostgresServer
from keter.yamlcheck import Checker, describe, key_name, unknown_key

DEFAULT_PORT = 5432  # Keter's default for a server entry's port
SERVER_KEYS = ("server", "port")


def read_postgres(data: dict, check: Checker) -> tuple[bool, PostgresServer | None]:
    """Whether the bundle wants a database, and on which server (None: keter's own)."""
    wanted: dict[str, bool] = {}
    server: PostgresServer | None = None
    if "postgres" in data:
        value = data["postgres"]
        if isinstance(value, bool):
            wanted["postgres"] = value
        else:
            check.problem("postgres", f"expected true or false, got {describe(value)}")
    plugins = data.get("plugins")
    if isinstance(plugins, dict):
        for key, value in plugins.items():
            where = f"plugins.{key_name(key)}"
            if key != "postgres":
                check.warn(where, unknown_key(key, ("postgres",)) + "; ignored")
            elif isinstance(value, bool):
                wanted[where] = value
            elif isinstance(value, list):
                server = _server_list(value, where, check)
                wanted[where] = True
            else:
                check.problem(
                    where,
                    f"expected true, false or a list like [{{server: db.example, port: 5432}}], "
                    f"got {describe(value)}",
                )
    elif plugins is not None:
        check.problem(
            "plugins", f"expected a mapping like {{postgres: true}}, got {describe(plugins)}"
        )
    if len(set(wanted.values())) > 1:
        check.problem("postgres", "postgres and plugins.postgres disagree")
    return any(wanted.values()), server


def _server_list(value: list, where: str, check: Checker) -> PostgresServer | None:
    if not value:
        check.problem(where, "expected at least one {server: HOST, port: PORT}")
        return None
    if len(value) > 1:
        check.warn(where, f"{len(value)} servers listed; as in Keter only the first is used")
    entry, at = value[0], f"{where}[0]"
    if not isinstance(entry, dict):
        check.problem(
            at, f"expected a mapping like {{server: HOST, port: PORT}}, got {describe(entry)}"
        )
        return None
    before = len(check.problems)
    for key in entry:
        if key not in SERVER_KEYS:
            check.problem(f"{at}.{key_name(key)}", unknown_key(key, SERVER_KEYS))
    host = None
    if "server" not in entry:
        check.problem(f"{at}.server", "missing; the database server's host name or address")
    else:
        try:
            host = names.validate_upstream_host(entry["server"])
        except ValueError as exc:
            check.problem(f"{at}.server", str(exc))
    port = entry.get("port", DEFAULT_PORT)
    try:
        port = names.validate_port(port)
    except ValueError as exc:
        check.problem(f"{at}.port", str(exc))
    if len(check.problems) > before or host is None:
        return None
    return PostgresServer(host=host, port=port)
