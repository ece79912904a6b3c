"""Parsers of single values shared by many keys: seconds, counts, ratios, flags,
ports, URL paths, files, the user, the switch mode, trusted proxies.

Each takes ``(value, path, check, base)``, reports a problem on ``check`` and
returns None when the value is unusable.
"""

from __future__ import annotations

import ipaddress
import math
import pwd
from collections.abc import Callable
from pathlib import Path

from keter import envstore
from keter.config.model import SwitchSetting
from keter.limits import parse_app_limits
from keter.names import validate_url_path
from keter.yamlcheck import (
    MAX_INT,
    MAX_SECONDS,
    Checker,
    absolute,
    describe,
    file_path,
    integer,
    is_int,
    number,
    parse_env,
    size,
    string,
)

Parser = Callable[[object, str, Checker, Path], object]


def without_nulls(mapping: dict, *, keep: tuple[str, ...] = ()) -> dict:
    """``mapping`` without its null values: a key set to null means its default, as if it
    were absent (README's table of defaults spells them so). ``keep`` names the keys
    whose null has a meaning of its own (``nginx.error-log``: no log read)."""
    return {key: item for key, item in mapping.items() if item is not None or key in keep}


def parse_uid_range(value: object, path: str, check: Checker, base: Path) -> object:
    # Above Debian's reserved ids (policy 9.2.2: up to 65535), below 2^31 (signed 32 bits).
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(is_int(uid) for uid in value)
        and 65536 <= value[0] <= value[1] < 2**31
    ):
        return (value[0], value[1])
    check.problem(
        path, f"expected [LOW, HIGH] with 65536 <= LOW <= HIGH < 2^31, got {describe(value)}"
    )
    return None


def seconds_key(minimum: float, *, inclusive: bool) -> Parser:
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(value: object, path: str, check: Checker, base: Path) -> object:
        # Compared before float(): float() of a 400-digit integer overflows.
        real = number(value, math.inf) if not is_int(value) else value
        if real is None or not (real >= minimum if inclusive else real > minimum):
            check.problem(path, f"expected a number of seconds {bound}, got {describe(value)}")
        elif real > MAX_SECONDS:
            check.problem(path, f"{describe(value)} seconds is more than a year ({MAX_SECONDS})")
        else:
            return float(real)
        return None

    return parse


def parse_bool(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, bool):
        check.problem(path, f"expected true or false, got {describe(value)}")
        return None
    return value


def parse_size(value: object, path: str, check: Checker, base: Path) -> object:
    return size(value, path, check)


def parse_ratio(value: object, path: str, check: Checker, base: Path) -> object:
    real = number(value, math.inf) if not is_int(value) else value
    if real is None or not 0 <= real <= 1:
        check.problem(path, f"expected a ratio from 0 to 1 (0.05 is 5%), got {describe(value)}")
        return None
    return float(real)


def count_key(minimum: int, maximum: int = MAX_INT) -> Parser:
    def parse(value: object, path: str, check: Checker, base: Path) -> object:
        if is_int(value) and value > maximum:  # a 400-digit count would overflow later
            check.problem(path, f"{describe(value)} is more than {maximum}")
            return None
        return integer(value, path, check, minimum, None)

    return parse


def parse_env_key(value: object, path: str, check: Checker, base: Path) -> object:
    """The global env, held to what ``keter env`` allows an app (keter.envstore): every
    app's processes get it, so a value past the kernel's bound for one variable
    (Argument list too long) failed the start of every app, not keter's."""
    env = parse_env(value, path, check)
    if env is None:
        return None
    before = len(check.problems)
    if len(env) > envstore.MAX_SETTINGS:
        check.problem(path, f"more than {envstore.MAX_SETTINGS} variables")
    for name, item in env.items():
        if (size := envstore.value_size(item)) > envstore.MAX_VALUE:
            # The value may be a secret: its length only.
            check.problem(
                f"{path}.{name}", f"the value is longer than {envstore.MAX_VALUE} bytes ({size})"
            )
    if len(check.problems) == before and (size := len(envstore.encoded(env))) > envstore.MAX_FILE:
        check.problem(path, f"takes {size} bytes, more than {envstore.MAX_FILE}")
    return env if len(check.problems) == before else None


def parse_limits_key(value: object, path: str, check: Checker, base: Path) -> object:
    return parse_app_limits(value, path, check)


def parse_port(value: object, path: str, check: Checker, base: Path) -> object:
    return integer(value, path, check, 1, 65535)


def parse_url_path(value: object, path: str, check: Checker, base: Path) -> object:
    # It goes verbatim into an nginx location: the shared grammar's URL path.
    try:
        return validate_url_path(value)
    except ValueError:
        check.problem(path, f'expected a URL path like "/keter-health", got {describe(value)}')
        return None


def parse_response_file(value: object, path: str, check: Checker, base: Path) -> object:
    text = file_path(value, path, check)
    if text is None:
        return None
    file = absolute(base / text)
    if not file.is_file():
        check.problem(path, f"{file} is not a file")
        return None
    return file


def parse_setuid(value: object, path: str, check: Checker, base: Path) -> object:
    """A user name, or (as Keter takes it) a numeric uid, given as the user's name."""
    if is_int(value) or (isinstance(value, str) and value.isascii() and value.isdigit()):
        uid = int(value)
        try:
            return pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            check.problem(path, f"no user with uid {describe(value)} on this machine")
            return None
    return machine_name(value, path, check, "user", pwd.getpwnam, "a user name or uid")


def machine_name(
    value: object,
    path: str,
    check: Checker,
    kind: str,
    lookup: Callable[[str], object],
    expected: str,
) -> str | None:
    """A ``kind`` (user, group) name this machine knows (``lookup`` raises KeyError for
    one it does not), or None after a problem."""
    name = string(value, path, check, expected)
    if name is None:
        return None
    try:
        lookup(name)
    except KeyError:
        check.problem(path, f"no {kind} named {describe(name)} on this machine")
        return None
    return name


def parse_switch(value: object, path: str, check: Checker, base: Path) -> object:
    if isinstance(value, str) and value in tuple(SwitchSetting):
        return SwitchSetting(value)
    shown = ", ".join(SwitchSetting)
    check.problem(path, f"expected one of {shown}, got {describe(value)}")
    return None


# With `ip-from-header: true`, X-Forwarded-For is believed from these peers:
# loopback and the private ranges load balancers sit in (an AWS ELB, a local proxy).
TRUSTED_PROXIES = (
    "127.0.0.0/8",
    "::1",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


def parse_ip_from_header(value: object, path: str, check: Checker, base: Path) -> object:
    """``true`` (trust the usual proxy networks), ``false``, or a list of trusted networks."""
    if isinstance(value, bool):
        return TRUSTED_PROXIES if value else ()
    if value == []:
        return ()  # nobody trusted: the default, as false
    if isinstance(value, list):
        networks = []
        for i, item in enumerate(value):
            try:
                if not isinstance(item, str) or "%" in item:  # no booleans, no IPv6 zone ids
                    raise ValueError(item)
                networks.append(str(ipaddress.ip_network(item)))
            except ValueError:
                check.problem(
                    f"{path}[{i}]", f"expected an address or network, got {describe(item)}"
                )
        return tuple(networks) if len(networks) == len(value) else None
    check.problem(path, f"expected true, false or a list of networks, got {describe(value)}")
    return None
