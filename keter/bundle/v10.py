"""Keter 1.0's format: ``stanzas:``, a list of typed stanzas, plus ``plugins``.

Stanza types: ``webapp`` (several are fine: each runs as its own process on its
own port), ``background``, ``static-files``, ``redirect`` and ``reverse-proxy``.
Each stanza's reader here is also what the 0.4 reader uses for the parts the two
formats share (a web app, a static folder).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

from keter import names
from keter.bundle.middleware import parse_middleware
from keter.bundle.model import (
    KETER_RESTART_DELAY,
    REDIRECT_STATUSES,
    Background,
    BundleConfig,
    Redirect,
    RedirectAction,
    ReverseProxy,
    StaticFiles,
    WebApp,
)
from keter.bundle.plugins import read_postgres
from keter.bundle.values import Values, warn_overridden_env
from keter.yamlcheck import describe, key_name, parse_env, unknown_key

# The keys a web app reads in either format.
WEBAPP_KEYS = (
    "exec", "args", "host", "hosts", "extra-hosts", "env", "health-check-path", "release",
    "release-timeout", "limits",
)  # fmt: skip
# Keys of the whole bundle, beside the stanzas (or the 0.4 keys).
BUNDLE_KEYS = ("postgres", "plugins", "watch-seconds")
# Keys every stanza may carry besides its own.
COMMON_STANZA_KEYS = ("type", "requires-secure")
STANZA_KEYS = {
    "webapp": (
        "exec", "args", "env", "forward-env", "host", "hosts", "ssl", "port-env-vars",
        "ensure-alive-time-bound", "connection-time-bound", "health-check-path", "middleware",
        "client-max-body-size", "proxy-buffering",
        "release", "release-timeout", "limits",
    ),
    "background": (
        "exec", "args", "env", "forward-env", "restart-count", "restart-delay-seconds",
        "limits",
    ),
    "static-files": (
        "root", "host", "hosts", "directory-listing", "ssl", "middleware",
        "connection-time-bound",
    ),
    "redirect": ("host", "hosts", "status", "actions", "ssl"),
    "reverse-proxy": (
        "reversed-host", "reversed-port", "reversed-ssl", "reversing-host", "preserve-host",
        "timeout", "ssl", "middleware", "connection-time-bound", "rewrite-request",
        "rewrite-response", "client-max-body-size", "proxy-buffering",
    ),
}  # fmt: skip


def read(data: dict, app: str, v: Values) -> BundleConfig:
    """A ``stanzas:`` config; problems and warnings go to ``v.check``."""
    check = v.check
    for key in data:
        if key not in ("stanzas", *BUNDLE_KEYS):
            known = ("stanzas", *BUNDLE_KEYS)
            check.warn(key_name(key), unknown_key(key, known) + "; ignored")
    stanzas = data["stanzas"]
    if not isinstance(stanzas, list) or not stanzas:
        check.problem(
            "stanzas",
            f"expected a list of stanzas like [{{type: webapp}}], got {describe(stanzas)}",
        )
        stanzas = []
    parsed: dict[str, list] = {kind: [] for kind in STANZA_KEYS}
    for i, stanza in enumerate(stanzas):
        prefix = f"stanzas[{i}]."
        kind = stanza_type(stanza, f"stanzas[{i}]", v)
        if kind is None:
            continue
        for key in stanza:
            if key not in (*COMMON_STANZA_KEYS, *STANZA_KEYS[kind]):
                known = (*COMMON_STANZA_KEYS, *STANZA_KEYS[kind])
                check.warn(f"{prefix}{key_name(key)}", unknown_key(key, known) + "; ignored")
        result = _READERS[kind](stanza, prefix, v)
        if result is not None:
            parsed[kind].append((prefix, result))
    postgres, server = read_postgres(data, check)
    config = BundleConfig(
        app=app,
        watch_seconds=watch_seconds(data, v),
        webapps=tuple(item for _, item in parsed["webapp"]),
        postgres=postgres,
        postgres_server=server,
        backgrounds=tuple(item for _, item in parsed["background"]),
        static_files=tuple(item for _, item in parsed["static-files"]),
        redirects=tuple(item for _, item in parsed["redirect"]),
        reverse_proxies=tuple(item for _, item in parsed["reverse-proxy"]),
    )
    entries = [entry for entries in parsed.values() for entry in entries]
    check_shared_hosts(entries, v)
    warn_overridden_env(entries, postgres, check)
    return dataclasses.replace(config, warnings=tuple(check.warnings))


def watch_seconds(data: dict, v: Values) -> float | None:
    """``watch-seconds``: how long keter watches a new version of this app (0: never)."""
    return v.seconds(data["watch-seconds"], "watch-seconds") if "watch-seconds" in data else None


def stanza_type(stanza: object, where: str, v: Values) -> str | None:
    if not isinstance(stanza, dict):
        v.check.problem(where, f"expected a mapping with a type, got {describe(stanza)}")
        return None
    kind = stanza.get("type")
    if isinstance(kind, str) and kind in STANZA_KEYS:
        return kind
    if kind is None:
        v.check.problem(f"{where}.type", f"missing; one of {', '.join(STANZA_KEYS)}")
    elif isinstance(kind, str):
        hint = unknown_key(kind, tuple(STANZA_KEYS)).removeprefix("unknown key")
        v.check.problem(f"{where}.type", f"unknown stanza type {describe(kind)}{hint}")
    else:
        v.check.problem(
            f"{where}.type", f"expected one of {', '.join(STANZA_KEYS)}, got {describe(kind)}"
        )
    return None


def check_shared_hosts(stanzas: list[tuple[str, object]], v: Values) -> None:
    """No host may belong to two stanzas: nginx could route it to only one."""
    owners: dict[str, str] = {}
    for prefix, stanza in stanzas:
        where = prefix.rstrip(".") or "host"
        for host in getattr(stanza, "hosts", ()):
            first = owners.setdefault(host, where)
            if first != where:
                v.check.problem(where, f"host {host} is already claimed by {first}")


# -- stanzas -----------------------------------------------------------------------------


def webapp(data: dict, prefix: str, v: Values, *, flat: bool = False) -> WebApp | None:
    """The web-app keys of ``data``; ``prefix`` ("" or "stanzas[0].") starts key paths."""
    check = v.check
    if "exec" not in data:
        present = [key for key in data if key in WEBAPP_KEYS]
        if not flat:
            check.problem(f"{prefix}exec", "missing; a webapp stanza needs the program to run")
        elif present:
            check.problem(f"{prefix}exec", f"missing, but {', '.join(present)} given for a web app")
        return None
    before = len(check.problems)
    host_keys = ("host", "hosts", "extra-hosts") if flat else ("host", "hosts")
    app = WebApp(
        exec=v.exec(data["exec"], f"{prefix}exec") or Path(),
        args=v.args(data.get("args", []), f"{prefix}args"),
        hosts=v.hosts(data, prefix, host_keys),
        env=parse_env(data.get("env", {}), f"{prefix}env", check) or MappingProxyType({}),
        health_check_path=v.health_path(
            data.get("health-check-path"), f"{prefix}health-check-path"
        ),
        forward_env=v.names(data.get("forward-env", []), f"{prefix}forward-env"),
        port_env_vars=v.names(data.get("port-env-vars", []), f"{prefix}port-env-vars"),
        ssl=v.ssl(data.get("ssl", False), f"{prefix}ssl"),
        requires_secure=v.flag(data, "requires-secure", prefix),
        ensure_alive=v.microseconds(
            data.get("ensure-alive-time-bound"), f"{prefix}ensure-alive-time-bound"
        ),
        time_bound=v.time_bound(data, prefix),
        middleware=parse_middleware(data.get("middleware"), f"{prefix}middleware", check),
        max_body_size=v.body_size(data, prefix),
        proxy_buffering=v.flag(data, "proxy-buffering", prefix, default=True),
        release=v.release(data, prefix),
        limits=v.limits(data, prefix),
    )
    return app if len(check.problems) == before else None


def background(data: dict, prefix: str, v: Values) -> Background | None:
    check = v.check
    if "exec" not in data:
        check.problem(f"{prefix}exec", "missing; a background stanza needs the program to run")
        return None
    before = len(check.problems)
    worker = Background(
        exec=v.exec(data["exec"], f"{prefix}exec") or Path(),
        args=v.args(data.get("args", []), f"{prefix}args"),
        env=parse_env(data.get("env", {}), f"{prefix}env", check) or MappingProxyType({}),
        forward_env=v.names(data.get("forward-env", []), f"{prefix}forward-env"),
        restart_count=v.restart_count(data.get("restart-count", "unlimited"), prefix),
        restart_delay=v.seconds(
            data.get("restart-delay-seconds", KETER_RESTART_DELAY),
            f"{prefix}restart-delay-seconds",
        ),
        limits=v.limits(data, prefix),
    )
    return worker if len(check.problems) == before else None


def static_files(
    data: dict, prefix: str, v: Values, *, listing: bool = False
) -> StaticFiles | None:
    check = v.check
    before = len(check.problems)
    if "connection-time-bound" in data:
        check.warn(f"{prefix}connection-time-bound", "has no effect on files nginx serves; ignored")
    root = None
    if "root" not in data:
        check.problem(f"{prefix}root", "missing; the bundle folder to serve")
    else:
        root = v.root(data["root"], f"{prefix}root")
    stanza = StaticFiles(
        root=root or Path(),
        hosts=v.hosts(data, prefix, ("host", "hosts")),
        directory_listing=v.flag(data, "directory-listing", prefix, listing),
        requires_secure=v.flag(data, "requires-secure", prefix),
        ssl=v.ssl(data.get("ssl", False), f"{prefix}ssl"),
        middleware=parse_middleware(data.get("middleware"), f"{prefix}middleware", check),
    )
    return stanza if len(check.problems) == before else None


def redirect(data: dict, prefix: str, v: Values) -> Redirect | None:
    check = v.check
    before = len(check.problems)
    status = data.get("status", 303)
    if isinstance(status, bool) or status not in REDIRECT_STATUSES:
        shown = ", ".join(map(str, REDIRECT_STATUSES))
        check.problem(f"{prefix}status", f"expected one of {shown}, got {describe(status)}")
    actions = data.get("actions")
    parsed: list[RedirectAction] = []
    if not isinstance(actions, list) or not actions:
        check.problem(
            f"{prefix}actions",
            f"expected a list like [{{host: example.com}}], got {describe(actions)}",
        )
    else:
        for i, item in enumerate(actions):
            action = redirect_action(item, f"{prefix}actions[{i}]", v)
            if action is not None:
                parsed.append(action)
    stanza = Redirect(
        hosts=v.hosts(data, prefix, ("host", "hosts")),
        status=status if isinstance(status, int) else 303,
        actions=tuple(parsed),
        requires_secure=v.flag(data, "requires-secure", prefix),
        ssl=v.ssl(data.get("ssl", False), f"{prefix}ssl"),
    )
    return stanza if len(check.problems) == before else None


def redirect_action(item: object, where: str, v: Values) -> RedirectAction | None:
    check = v.check
    if not isinstance(item, dict):
        check.problem(where, f"expected a mapping like {{host: example.com}}, got {describe(item)}")
        return None
    before = len(check.problems)
    known = ("path", "url", "host", "secure", "port")
    for key in item:
        if key not in known:
            check.problem(f"{where}.{key_name(key)}", unknown_key(key, known))
    path = item.get("path")
    if path is not None:
        try:
            names.validate_url_path(path)
        except ValueError as exc:
            check.problem(f"{where}.path", str(exc))
    url, host, port = item.get("url"), item.get("host"), item.get("port")
    if url is not None and host is not None:
        check.problem(where, "give url or host, not both")
    elif url is not None:
        try:
            names.validate_url(url)
        except ValueError as exc:
            check.problem(f"{where}.url", str(exc))
    elif host is not None:
        host = v.host(host, f"{where}.host", wildcard=False)
    else:
        check.problem(where, "missing url or host: where to redirect to")
    if port is not None:
        port = v.port(port, f"{where}.port")
    secure = v.flag(item, "secure", f"{where}.")
    if len(check.problems) > before:
        return None
    return RedirectAction(path=path, url=url, host=host, secure=secure, port=port)


def reverse_proxy(data: dict, prefix: str, v: Values) -> ReverseProxy | None:
    check = v.check
    before = len(check.problems)
    for key in ("rewrite-request", "rewrite-response"):
        if key in data:
            check.warn(f"{prefix}{key}", "header rewriting is not supported; skipped")
    reversed_host = v.upstream_host(data.get("reversed-host"), f"{prefix}reversed-host")
    port = v.port(data.get("reversed-port"), f"{prefix}reversed-port")
    hosts: tuple[str, ...] = ()
    if "reversing-host" not in data:
        check.problem(f"{prefix}reversing-host", "missing; the host this proxy answers for")
    else:
        host = v.host(data["reversing-host"], f"{prefix}reversing-host")
        hosts = (host,) if host else ()
    timeout = v.microseconds(data.get("timeout"), f"{prefix}timeout")
    stanza = ReverseProxy(
        hosts=hosts,
        reversed_host=reversed_host or "",
        reversed_port=port or 0,
        reversed_ssl=v.flag(data, "reversed-ssl", prefix),
        preserve_host=v.flag(data, "preserve-host", prefix),
        timeout=timeout if timeout is not None else v.time_bound(data, prefix),
        requires_secure=v.flag(data, "requires-secure", prefix),
        ssl=v.ssl(data.get("ssl", False), f"{prefix}ssl"),
        middleware=parse_middleware(data.get("middleware"), f"{prefix}middleware", check),
        max_body_size=v.body_size(data, prefix),
        proxy_buffering=v.flag(data, "proxy-buffering", prefix, default=True),
    )
    return stanza if len(check.problems) == before else None


_READERS = {
    "webapp": webapp,
    "background": background,
    "static-files": static_files,
    "redirect": redirect,
    "reverse-proxy": reverse_proxy,
}
