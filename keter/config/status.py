"""The operator's side (keter.status): ``status-listen``, ``status-group``,
``status-hosts``, ``dashboard-host``, ``dashboard-users``, and the checks that
keep the dashboard and the API from being open.
"""

from __future__ import annotations

import grp
import ipaddress
import re
from pathlib import Path

from keter.certnames import dns_names
from keter.config.values import machine_name
from keter.names import host_matches, validate_host, validate_ip, validate_upstream_host
from keter.yamlcheck import Checker, describe, is_arg, key_name, string, type_name


def parse_status_listen(value: object, path: str, check: Checker, base: Path) -> object:
    expected = 'expected "ADDRESS:PORT" like "127.0.0.1:8999" or "[::1]:8999"'
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    try:
        # validate_ip refuses IPv6 zone ids; ip_address gives the version.
        address = ipaddress.ip_address(validate_ip(host.removeprefix("[").removesuffix("]")))
    except ValueError:
        address = None
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    if address is None or not digits or not 1 <= int(port) <= 65535:
        check.problem(path, f"{expected}, got {describe(value)}")
        return None
    if (address.version == 6) != host.startswith("["):
        check.problem(path, f"{expected} (IPv6 addresses in brackets), got {describe(value)}")
        return None
    return (str(address), int(port))


def parse_status_group(value: object, path: str, check: Checker, base: Path) -> object:
    return machine_name(value, path, check, "group", grp.getgrnam, "a group name")


def parse_dashboard_host(value: object, path: str, check: Checker, base: Path) -> object:
    name = string(value, path, check, "a host name")
    if name is None:
        return None
    try:
        return validate_host(name, wildcard=False)
    except ValueError as exc:
        check.problem(path, f"{exc}, got {describe(name)}")
        return None


def parse_status_hosts(value: object, path: str, check: Checker, base: Path) -> object:
    if not isinstance(value, list):
        check.problem(path, f"expected a list of host names, got {describe(value)}")
        return None
    hosts = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        name = string(item, where, check, "a host name or IP address")
        if name is None:
            continue
        try:
            # An address in canonical form (no IPv6 zone id) or one host name, no wildcard.
            hosts.append(validate_upstream_host(name))
        except ValueError as exc:
            check.problem(where, f"{exc}, got {describe(name)}")
    return tuple(hosts)


def parse_dashboard_users(value: object, path: str, check: Checker, base: Path) -> object:
    if value == {}:
        return ()  # nobody: the default
    if not isinstance(value, dict):
        check.problem(path, f"expected a mapping like {{admin: PASSWORD}}, got {describe(value)}")
        return None
    users = []
    for name, password in value.items():
        where = f"{path}.{key_name(name)}"
        if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
            check.problem(where, "expected a user name of letters, digits, '.', '_' or '-'")
        elif not isinstance(password, str) or not password or not is_arg(password):
            # The value is a password: name its type only.
            check.problem(where, f"expected a password (a string), got {type_name(password)}")
        else:
            users.append((name, password))
    return tuple(users)


_USER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_dashboard(values: dict[str, object], check: Checker) -> None:
    """The dashboard at dashboard-host restarts and rolls back apps: never open, never unlisted."""
    if values.get("dashboard_host") is None:
        if values.get("dashboard_users") and values.get("status_listen") is None:
            check.warn("dashboard-users", "has no effect without status-listen or dashboard-host")
        return
    if values.get("status_listen") is None:
        check.problem(
            "dashboard-host",
            'needs status-listen (e.g. "127.0.0.1:8999"): nginx reaches the dashboard over TCP',
        )
    if not values.get("dashboard_users"):
        check.problem(
            "dashboard-host",
            "needs dashboard-users ({user: password}): nginx asks for them (basic auth)",
        )
    listeners = values.get("listeners") or ()
    certificates = [listener.certificate for listener in listeners if listener.tls]
    host = values["dashboard_host"]
    if not certificates:
        check.warn(
            "dashboard-host",
            "is served over plain HTTP (no listener has a certificate): its password and "
            "the page that restarts apps cross the network in clear",
        )
    elif isinstance(host, str) and not any(_names(host, path) for path in certificates):
        # Plain HTTP to it is redirected to HTTPS (keter.routes.dashboard_site), where
        # browsers would refuse the listeners' certificate.
        check.warn(
            "dashboard-host",
            f"no TLS listener's certificate names {host}: browsers will refuse the HTTPS "
            "page plain HTTP is redirected to",
        )


def _names(host: str, certificate: Path) -> bool:
    """Whether ``certificate`` (PEM, its first block) names ``host``, a wildcard name
    covering one label. True when it cannot be read: other checks say why."""
    from cryptography import x509  # on demand: keter's memory without TLS stays small

    try:
        leaf = x509.load_pem_x509_certificate(certificate.read_bytes())
    except (OSError, ValueError):
        return True
    return any(host_matches(name, host) for name in dns_names(leaf))


def check_status_auth(values: dict[str, object], check: Checker) -> None:
    """The status API beyond loopback needs credentials a person can give (dashboard-users).

    Every request on TCP must authenticate; the token file under ROOT/etc only
    reaches local users, so an address others can reach needs dashboard-users.
    """
    listen = values.get("status_listen")
    if listen is None or values.get("dashboard_users"):
        return
    if not ipaddress.ip_address(listen[0]).is_loopback:
        check.problem(
            "status-listen",
            f"{listen[0]} is not a loopback address, and every request there must log in: "
            "set dashboard-users ({user: password}) or listen on 127.0.0.1",
        )
