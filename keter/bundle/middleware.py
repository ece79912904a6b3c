"""Keter's middleware list (``middleware:`` of a webapp, static-files or reverse-proxy
stanza), read into what nginx carries out.

``basic-auth``, ``headers``, ``local``, ``rate-limiter`` (nginx's limit_req) and
``autohead`` become nginx directives. The others (``jsonp``, ``accept-override``,
``method-override``, ``method-override-post``) cannot be carried out by nginx
here, and refuse the bundle: a site never goes live with less than its bundle
asked for. An unknown name is refused too: a misspelt ``basic-auth`` would
publish what it was meant to protect.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from keter import names
from keter.bundle.model import (
    KETER_LOCAL_MESSAGE,
    KETER_LOCAL_STATUS,
    KETER_REALM,
    AutoheadConfig,
    BasicAuthConfig,
    HeadersConfig,
    LocalConfig,
    Middleware,
    RateAlgorithm,
    RateIdentifier,
    RateLimiterConfig,
    RateZone,
    Throttle,
)
from keter.yamlcheck import Checker, describe, is_int, key_name, type_name, unknown_key

# Keter middleware keter cannot carry out with nginx: refused, with the reason.
REFUSED_MIDDLEWARE = {
    "accept-override": "nginx cannot decode the _accept query parameter into the Accept header",
    "jsonp": "nginx cannot wrap a JSON answer in the callback",
    "method-override": "keter does not let a query parameter change the request method",
    "method-override-post": "nginx cannot read _method from a request body",
}
SUPPORTED_MIDDLEWARE = ("basic-auth", "headers", "local", "rate-limiter", "autohead")
MAX_THROTTLES = 16
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
        if name in REFUSED_MIDDLEWARE:
            check.problem(
                where,
                f"{name} cannot be carried out by keter ({REFUSED_MIDDLEWARE[name]}); "
                "remove it rather than serve the site without it",
            )
        elif name == "autohead":
            found.append(AutoheadConfig())
        elif name in SUPPORTED_MIDDLEWARE and isinstance(item, dict):
            found.extend(_PARSERS[name](body, f"{where}.{name}", check))
        elif name in SUPPORTED_MIDDLEWARE:  # a bare "local": Keter reads these as mappings
            check.problem(where, f"{name} takes its settings as a mapping: {{{name}: {{...}}}}")
        elif isinstance(name, str):
            # Refused rather than skipped: a misspelt basic-auth would publish
            # what it was meant to protect.
            known = (*SUPPORTED_MIDDLEWARE, *REFUSED_MIDDLEWARE)
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
        names.validate_realm(realm)
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
    if not isinstance(message, str) or not message.isprintable():
        check.problem(f"{path}.message", f"expected printable text, got {describe(message)}")
        return []
    try:
        names.nginx_quote(message)  # nginx answers with it: it must fit one nginx string
    except ValueError as exc:
        check.problem(f"{path}.message", str(exc))
        return []
    return [LocalConfig(status=status, message=message)]


def _rate_limiter(body: object, path: str, check: Checker) -> list[Middleware]:
    """Keter's rate-limiter: ``zone_by`` and ``throttles`` (keter-rate-limiting-plugin)."""
    if not isinstance(body, dict):
        check.problem(path, f"expected a mapping with zone_by and throttles, got {describe(body)}")
        return []
    for key in body:
        if key not in ("zone_by", "throttles"):
            check.problem(f"{path}.{key_name(key)}", unknown_key(key, ("zone_by", "throttles")))
    before = len(check.problems)
    zone, zone_header = _rate_choice(
        body.get("zone_by", "default"), f"{path}.zone_by", RateZone, {"header": RateZone.HEADER},
        check,
    )  # fmt: skip
    throttles = body.get("throttles")
    if not isinstance(throttles, list) or not throttles or len(throttles) > MAX_THROTTLES:
        check.problem(
            f"{path}.throttles", f"expected a list of 1 to {MAX_THROTTLES} throttles, "
            f"got {describe(throttles)}",
        )  # fmt: skip
        return []
    parsed = [_throttle(item, f"{path}.throttles[{i}]", check) for i, item in enumerate(throttles)]
    if len(check.problems) > before or zone is None or None in parsed:
        return []
    return [RateLimiterConfig(zone=zone, zone_header=zone_header, throttles=tuple(parsed))]


def _throttle(item: object, path: str, check: Checker) -> Throttle | None:
    known = ("name", "limit", "period", "algorithm", "identifier_by", "token_bucket_ttl")
    if not isinstance(item, dict):
        check.problem(path, f"expected a throttle mapping, got {describe(item)}")
        return None
    for key in item:
        if key not in known:
            check.problem(f"{path}.{key_name(key)}", unknown_key(key, known))
    for key in ("name", "limit", "period", "algorithm", "identifier_by"):
        if key not in item:
            check.problem(f"{path}.{key}", "missing")
    if any(key not in item for key in ("name", "limit", "period", "algorithm", "identifier_by")):
        return None
    name, limit, period = item["name"], item["limit"], item["period"]
    ok = True
    if not (isinstance(name, str) and name.isprintable() and 0 < len(name) <= 100):
        check.problem(f"{path}.name", f"expected a short name, got {describe(name)}")
        ok = False
    for key, value in (("limit", limit), ("period", period)):
        if not (is_int(value) and 1 <= value <= 10**9):
            check.problem(f"{path}.{key}", f"expected a whole number 1-10^9, got {describe(value)}")
            ok = False
    algorithm = {each.value: each for each in RateAlgorithm}.get(item["algorithm"])
    if algorithm is None:
        choices = ", ".join(each.value for each in RateAlgorithm)
        check.problem(
            f"{path}.algorithm", f"expected one of {choices}, got {describe(item['algorithm'])}"
        )
        ok = False
    identifier, identifier_name = _rate_choice(
        item["identifier_by"], f"{path}.identifier_by", RateIdentifier,
        {"header": RateIdentifier.HEADER, "cookie": RateIdentifier.COOKIE,
         "header+ip": RateIdentifier.HEADER_IP},
        check,
    )  # fmt: skip
    if not ok or identifier is None:
        return None
    return Throttle(
        name=name,
        limit=limit,
        period=period,
        algorithm=algorithm,
        identifier=identifier,
        identifier_name=identifier_name,
    )


def _rate_choice(value, path, kinds, named, check):  # type: ignore[no-untyped-def]
    """A plain choice ("ip") or a one-key mapping naming a header or cookie ({header: X})."""
    plain = {each.value: each for each in kinds if each not in named.values()}
    if isinstance(value, str) and value in plain:
        return plain[value], None
    if isinstance(value, dict) and len(value) == 1:
        [(key, name)] = value.items()
        # nginx reads a cookie as $cookie_NAME: no '-' in its name.
        pattern = _COOKIE_NAME if key == "cookie" else _RATE_NAME
        if key in named and isinstance(name, str) and pattern.fullmatch(name):
            return named[key], name
    choices = ", ".join([*plain, *(f"{{{key}: NAME}}" for key in named)])
    check.problem(
        path, f"expected one of {choices} (a header or cookie name of letters, digits, '-' "
        f"and '_'), got {describe(value)}",
    )  # fmt: skip
    return None, None


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
    "rate-limiter": _rate_limiter,
}
# Header and cookie names nginx can read as variables ($http_x_api_key, $cookie_session).
_RATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_COOKIE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,63}")
