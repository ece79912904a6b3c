"""Keter's middleware list (``middleware:`` of a webapp, static-files or reverse-proxy
stanza), read into what nginx carries out.

``basic-auth``, ``headers`` and ``local`` become nginx directives. The others
(``autohead``, ``jsonp``, ...) have no nginx equivalent: each is warned about
and skipped. An unknown name is a problem, not a warning: a misspelt
``basic-auth`` would publish what it was meant to protect.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from keter import names
from keter.bundle.model import (
    KETER_LOCAL_MESSAGE,
    KETER_LOCAL_STATUS,
    KETER_REALM,
    BasicAuthConfig,
    HeadersConfig,
    LocalConfig,
    Middleware,
)
from keter.yamlcheck import Checker, describe, is_int, key_name, type_name, unknown_key

# Keter middleware nginx has no equivalent for here: warned about and skipped.
SKIPPED_MIDDLEWARE = (
    "accept-override",
    "autohead",
    "jsonp",
    "method-override",
    "method-override-post",
    "rate-limiter",
)
SUPPORTED_MIDDLEWARE = ("basic-auth", "headers", "local")
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def parse_middleware(value: object, path: str, check: Checker) -> tuple[Middleware, ...]:
    """A ``middleware:`` list, each entry a name or a one-key mapping ``{name: settings}``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        check.problem(path, f"expected a list of middleware, got {describe(value)}")
        return ()
    found: list[Middleware] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        name, body = item, None
        if isinstance(item, dict) and len(item) == 1:
            [(name, body)] = item.items()
        if name in SKIPPED_MIDDLEWARE:
            check.warn(where, f"{name} has no nginx equivalent in keter; skipped")
        elif name in SUPPORTED_MIDDLEWARE and isinstance(item, dict):
            found.extend(_PARSERS[name](body, f"{where}.{name}", check))
        elif isinstance(name, str):
            # Refused rather than skipped: a misspelt basic-auth would publish
            # what it was meant to protect.
            known = (*SUPPORTED_MIDDLEWARE, *SKIPPED_MIDDLEWARE)
            hint = unknown_key(name, known).removeprefix("unknown key")
            check.problem(where, f"unknown middleware {describe(name)}{hint}")
        else:
            check.problem(
                where, f"expected a middleware name or a one-key mapping, got {describe(item)}"
            )
    return tuple(found)


def _basic_auth(body: object, path: str, check: Checker) -> list[Middleware]:
    body = {} if body is None else body
    if not isinstance(body, dict):
        check.problem(path, f"expected a mapping with realm and creds, got {type_name(body)}")
        return []
    for key in body:
        if key not in ("realm", "creds"):
            check.problem(f"{path}.{key_name(key)}", unknown_key(key, ("realm", "creds")))
    realm = body.get("realm", KETER_REALM)
    try:
        names.validate_header_value(realm)
    except ValueError as exc:
        check.problem(f"{path}.realm", str(exc))
    creds = body.get("creds") or {}
    if not isinstance(creds, dict):
        check.problem(
            f"{path}.creds", f"expected a mapping of user: password, got {type_name(creds)}"
        )
        return []
    pairs = []
    for user, password in creds.items():
        where = f"{path}.creds.{key_name(user)}"
        # htpasswd lines are "user:hash": no colon in a name, no line breaks anywhere.
        if not (isinstance(user, str) and re.fullmatch(r"[\x21-\x39\x3b-\x7e]{1,255}", user)):
            check.problem(where, "expected a user name of printable characters without ':'")
        elif isinstance(password, bool) or not isinstance(password, str | int | float):
            check.problem(where, f"expected a password string, got {type_name(password)}")
        elif not _password_ok(str(password)):
            # The password itself is never shown.
            check.problem(
                where, "the password is empty, has control characters or is not valid Unicode"
            )
        else:
            pairs.append((user, str(password)))
    if not creds:
        check.warn(path, "no creds, so nobody can get through")
    return [BasicAuthConfig(realm=realm, credentials=tuple(pairs))]


def _headers(body: object, path: str, check: Checker) -> list[Middleware]:
    if not isinstance(body, dict) or not body:
        check.problem(path, f"expected a mapping of Header-Name: value, got {describe(body)}")
        return []
    headers = []
    for name, value in body.items():
        where = f"{path}.{key_name(name)}"
        if not (isinstance(name, str) and _HEADER_NAME.fullmatch(name)):
            check.problem(where, "expected a header name of letters, digits and '-'")
        elif isinstance(value, bool) or not isinstance(value, str | int | float):
            check.problem(where, f"expected a header value, got {type_name(value)}")
        else:
            try:
                headers.append((name, names.validate_header_value(str(value))))
            except ValueError as exc:
                check.problem(where, str(exc))
    return [HeadersConfig(headers=tuple(headers))]


def _local(body: object, path: str, check: Checker) -> list[Middleware]:
    body = {} if body is None else body
    if not isinstance(body, dict):
        check.problem(path, f"expected a mapping with status and message, got {describe(body)}")
        return []
    for key in body:
        if key not in ("status", "message"):
            check.problem(f"{path}.{key_name(key)}", unknown_key(key, ("status", "message")))
    status = body.get("status", KETER_LOCAL_STATUS)
    message = body.get("message", KETER_LOCAL_MESSAGE)
    if not is_int(status) or not 200 <= status <= 599:
        check.problem(f"{path}.status", f"expected an HTTP status 200-599, got {describe(status)}")
        return []
    if not isinstance(message, str) or not message.isprintable() or len(message) > 4096:
        check.problem(
            f"{path}.message", f"expected printable text (at most 4096), got {describe(message)}"
        )
        return []
    return [LocalConfig(status=status, message=message)]


def _password_ok(password: str) -> bool:
    """Non-empty, no control characters, encodable (it is hashed into an htpasswd file)."""
    if not password or re.search(r"[\x00-\x1f\x7f]", password):
        return False
    try:
        names.validate_arg(password)
    except ValueError:
        return False
    return True


_PARSERS: dict[str, Callable[[object, str, Checker], list[Middleware]]] = {
    "basic-auth": _basic_auth,
    "headers": _headers,
    "local": _local,
}
