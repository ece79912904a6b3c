"""Keter 0.4's flat format: the web app's keys at the top, plus ``static-hosts``,
``redirects`` and ``ssl``.

A flat config means what Keter 0.4 meant: its ``static-hosts`` list their
folders (``directory-listing: true``) and its ``redirects`` send every path to
the other host with a 301.
"""

from __future__ import annotations

import dataclasses

from keter.bundle import v10
from keter.bundle.model import BundleConfig, Redirect, RedirectAction, StaticFiles
from keter.bundle.plugins import read_postgres
from keter.bundle.values import Values, warn_overridden_env
from keter.yamlcheck import describe, key_name, unknown_key

FLAT_EXTRA_KEYS = ("static-hosts", "redirects", "ssl")
FLAT_KEYS = (*v10.WEBAPP_KEYS, *v10.BUNDLE_KEYS, *FLAT_EXTRA_KEYS)
# Stanza keys that guard a site. Ignored like other unknown keys, they would publish
# the site without what they ask for (a password, localhost only, a rate limit, HTTPS),
# so a flat config that carries one is refused: its author meant it.
GUARDS = ("middleware", "requires-secure")


def read(data: dict, app: str, v: Values) -> BundleConfig:
    """A flat config; problems and warnings go to ``v.check``."""
    check = v.check
    for key in data:
        if key in GUARDS:
            check.problem(
                key_name(key),
                "read only in a stanza: write the app as `stanzas: [{type: webapp, ...}]` "
                "(ignoring it would serve the site unguarded)",
            )
        elif key not in FLAT_KEYS:
            check.warn(key_name(key), unknown_key(key, FLAT_KEYS) + "; ignored")
    webapp_data = {key: data[key] for key in (*v10.WEBAPP_KEYS, "ssl") if key in data}
    webapp = v10.webapp(webapp_data, "", v, flat=True)
    statics = static_hosts(data["static-hosts"], v) if "static-hosts" in data else []
    redirects = old_redirects(data["redirects"], v) if "redirects" in data else []
    v10.check_shared_hosts([("", webapp), *statics, *redirects], v)
    if webapp is None and not statics and not redirects and not check.problems:
        check.warn("exec", "missing, so this bundle runs no web app")
    postgres, server = read_postgres(data, check)
    warn_overridden_env([("", webapp)], postgres, check)
    config = BundleConfig(
        app=app,
        watch_seconds=v10.watch_seconds(data, v),
        webapps=(webapp,) if webapp is not None else (),
        postgres=postgres,
        postgres_server=server,
        static_files=tuple(stanza for _, stanza in statics),
        redirects=tuple(stanza for _, stanza in redirects),
    )
    return dataclasses.replace(config, warnings=tuple(check.warnings))


def static_hosts(value: object, v: Values) -> list[tuple[str, StaticFiles]]:
    """``static-hosts: [{host, root}]``: Keter 0.4 listed their folders."""
    if not isinstance(value, list):
        v.check.problem(
            "static-hosts",
            f"expected a list like [{{host: h, root: ..}}], got {describe(value)}",
        )
        return []
    found = []
    for i, item in enumerate(value):
        where = f"static-hosts[{i}]"
        if not isinstance(item, dict):
            v.check.problem(where, f"expected a mapping with host and root, got {describe(item)}")
            continue
        for key in item:
            if key not in ("host", "root"):
                v.check.problem(f"{where}.{key_name(key)}", unknown_key(key, ("host", "root")))
        stanza = v10.static_files(item, f"{where}.", v, listing=True)
        if stanza is not None:
            found.append((f"{where}.", stanza))
    return found


def old_redirects(value: object, v: Values) -> list[tuple[str, Redirect]]:
    """``redirects: [{from, to}]``: every path of ``from`` to ``to``, with a 301."""
    if not isinstance(value, list):
        v.check.problem(
            "redirects", f"expected a list like [{{from: a, to: b}}], got {describe(value)}"
        )
        return []
    found = []
    for i, item in enumerate(value):
        where = f"redirects[{i}]"
        if not isinstance(item, dict) or set(item) != {"from", "to"}:
            v.check.problem(where, f"expected a mapping with from and to, got {describe(item)}")
            continue
        source = v.host(item["from"], f"{where}.from")
        target = v.host(item["to"], f"{where}.to", wildcard=False)
        if source and target:
            action = RedirectAction(host=target)
            found.append((f"{where}.", Redirect(hosts=(source,), status=301, actions=(action,))))
    return found
