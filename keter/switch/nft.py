"""keter's nftables table: one per ROOT, holding its web apps' stable addresses.

nginx proxies each web app to a stable address on a loopback IP of this
ROOT's own (``Table.address``, one port per web app) for as long as the app's
routes stay the same. The table's ``output`` NAT chain rewrites every new
connection to that address to the app version's real port on 127.0.0.1,
through the map ``services`` (stable port -> app port). Re-pointing a web app
is one element of that map, changed in one atomic transaction: new
connections reach the new version at once, while connections already
established keep the mapping conntrack gave them, so the old version drains on
its own. A connection to a stable port with no element is reset by the
``refuse`` chain, so it can never reach a process that happens to listen on
that port number on every address.

Connections over loopback (through the table, and any other: a NAT table makes
the kernel track every connection on the machine) are tracked by conntrack with
a timeout policy of the table's own (``SHORT_CLOSE``): once closed, their
entries go after a few seconds instead of the kernel's two minutes. nginx reconnects to an app
many times a second under load (its pool's age bound, ``keter.nginx.render``),
and with the default every one of them would hold an entry that long: one busy
app could fill the machine's conntrack table, and a full table drops new
connections of every program on the machine. Kernels without conntrack
timeout policies get the table without it (``create_script(short_close=False)``).
Nothing but TCP over loopback is tracked at all (the ``untracked`` chains, at
the raw priority, before conntrack): keter leads only TCP, and one app sending
UDP between loopback addresses (no descriptor per entry, each kept two
minutes once answered) had filled the machine's 262,144 entries in 4 s.

A second table of the same name, ``inet`` (IPv4 and IPv6), keeps apps off each
other's ports (``Isolation``): its ``isolate`` chain, on the output hook after
the NAT above (so it sees the port a stable address led to), resets every new
TCP connection over loopback (any local address: 127.0.0.0/8, ::1, the host's
own) from a socket owned by a uid of keter's app range to a port of keter's app
port range, unless the set ``own`` holds that (uid . port): the ports keter
gave that app. Root (keter's probes), nginx's workers and every other user are
not judged; nor are answers (only a SYN without ACK is).

The tables are made and deleted by running nft (once per run); the map's
elements, which every switch changes, and the set's, which every port keter
hands out or takes back changes, through netlink (``keter.switch.nfnetlink``).

Names are derived from ROOT (``keter_`` and 12 hex digits of its hash), so
several keters on one machine never share a table or an address; keter only
ever touches its own table. The functions here build nft scripts (pure) and
run them; ``keter.switch.actor`` decides when.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keter.switch.nfnetlink import MapWriter, SetWriter

MAP = "services"
OWN = "own"  # the isolation set: (uid . port) pairs an app may connect to
TIMEOUT = 10.0  # seconds an nft command may take
POLICY = "closed"  # the table's conntrack timeout policy
# Seconds conntrack keeps a closed connection (TIME_WAIT, CLOSE) through the table:
# enough for the last packets of a close on loopback; the default is 120 and 10.
SHORT_CLOSE = 5


class NftError(Exception):
    """nft failed (or is missing); the message says why in nft's words."""


@dataclass(frozen=True)
class Isolation:
    """What the isolation chain judges: sockets of keter's app uids (``app-uid-range``)
    connecting to keter's app ports (``port-range``), both inclusive; and keter's own
    local ports no app may connect to (``closed``: the status API's TCP port, whose 64
    connections one app could otherwise hold and keep the operators out)."""

    uids: tuple[int, int]
    ports: tuple[int, int]
    closed: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """The set's bound: keter gives each port to one app at a time, so at most one
        pair per port of the range."""
        return self.ports[1] - self.ports[0] + 1


@dataclass(frozen=True)
class Table:
    """This ROOT's table: its name and the loopback IP its stable addresses use."""

    name: str
    address: str

    @classmethod
    def for_root(cls, root: Path) -> Table:
        digest = hashlib.sha256(str(root).encode()).digest()
        # 127.0.x.x stays clear (127.0.0.1, Debian's 127.0.1.1, resolved's 127.0.0.53).
        address = f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"
        return cls(name=f"keter_{digest.hex()[:12]}", address=address)

    # -- scripts (pure) ---------------------------------------------------------------

    def create_script(self, *, short_close: bool = True, isolation: Isolation | None = None) -> str:
        """Replace whatever this table held (an earlier run's rules) with an empty map,
        and the isolation table with an empty set (or none: ``isolation`` None).

        "table X" before "delete table X" makes the delete valid when there was
        none; the whole script is one transaction, so the table is never absent.
        ``short_close``: with the conntrack timeout policy (see above).
        """
        policy, set_policy = "", ""
        if short_close:
            policy = f"""\
    ct timeout {POLICY} {{
        protocol tcp
        l3proto ip
        policy = {{ time_wait : {SHORT_CLOSE}, close : {SHORT_CLOSE} }}
    }}
"""
            # Set as the connection is first seen (a NAT chain sees only its first packet),
            # for every TCP connection over loopback, not only those to a stable address:
            # a NAT table has the kernel track every connection on the machine, and an app
            # opening and closing plain loopback connections would otherwise fill the
            # table with two minutes of them.
            set_policy = f'        oif "lo" meta l4proto tcp ct timeout set "{POLICY}"\n'
        dnat = f"dnat to 127.0.0.1 : tcp dport map @{MAP}"
        isolate = self._isolation_script(isolation) if isolation is not None else ""
        return f"""\
table inet {self.name}
delete table inet {self.name}
table ip {self.name}
delete table ip {self.name}
table ip {self.name} {{
{policy}    map {MAP} {{
        type inet_service : inet_service
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
{set_policy}        ip daddr {self.address} meta l4proto tcp {dnat}
    }}
    chain refuse {{
        type filter hook output priority 0; policy accept;
        ip daddr {self.address} meta l4proto tcp reject with tcp reset
    }}
    chain untracked_out {{
        type filter hook output priority -300; policy accept;
        oif "lo" meta l4proto != tcp notrack
    }}
    chain untracked_in {{
        type filter hook prerouting priority -300; policy accept;
        iif "lo" meta l4proto != tcp notrack
    }}
}}
{isolate}"""

    def _isolation_script(self, isolation: Isolation) -> str:
        (uid_low, uid_high), (port_low, port_high) = isolation.uids, isolation.ports
        # A new connection (its SYN; answers carry ACK) over loopback, to any local address.
        new = f'oif "lo" tcp flags & (syn | ack) == syn meta skuid {uid_low}-{uid_high}'
        judged = f"{new} tcp dport {port_low}-{port_high}"
        closed = (
            f"\n        {new} tcp dport {{ {', '.join(map(str, isolation.closed))} }} "
            "reject with tcp reset"
            if isolation.closed
            else ""
        )
        return f"""\
table inet {self.name} {{
    set {OWN} {{
        type uid . inet_service
        size {isolation.size}
    }}
    chain isolate {{
        type filter hook output priority 0; policy accept;
        {judged} meta skuid . tcp dport != @{OWN} reject with tcp reset{closed}
    }}
}}
"""

    def changes(
        self, current: Mapping[int, int], wanted: Mapping[int, int]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """What turns the map from ``current`` into ``current`` updated by ``wanted``:
        the keys to delete and the elements to add.

        ``wanted`` maps stable ports to app ports, or to 0 to remove the element.
        A changed element is deleted and added in the same transaction
        (``MapWriter.change``): no connection ever finds it missing.
        """
        gone = sorted(p for p, target in wanted.items() if p in current and current[p] != target)
        added = sorted((p, t) for p, t in wanted.items() if t and current.get(p) != t)
        return gone, added

    @staticmethod
    def own_changes(
        current: Mapping[int, int], wanted: Mapping[int, int]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """What turns the isolation set from ``current`` into ``current`` updated by
        ``wanted`` (both: app port -> the uid that owns it, 0 for none): the (uid, port)
        pairs to delete and to add, in one transaction."""
        gone = sorted((current[p], p) for p, uid in wanted.items() if current.get(p, uid) != uid)
        added = sorted((uid, p) for p, uid in wanted.items() if uid and current.get(p) != uid)
        return gone, added

    def writer(self) -> MapWriter:
        """What changes the map's elements (netlink, no nft process: see nfnetlink)."""
        return MapWriter(self.name, MAP, TIMEOUT)

    def own_writer(self) -> SetWriter:
        """What changes the isolation set's elements (netlink)."""
        return SetWriter(self.name, OWN, TIMEOUT)

    def delete_script(self) -> str:
        """Both tables (the isolation one whether or not it was made)."""
        return "".join(
            f"table {family} {self.name}\ndelete table {family} {self.name}\n"
            for family in ("ip", "inet")
        )

    # -- running nft ------------------------------------------------------------------

    def read(self, nft: str = "nft") -> dict[int, int]:
        """The map as the kernel holds it (stable port -> app port): for tests, and for
        the switch when the kernel refused a change (someone else changed the map)."""
        output = run([nft, "-j", "list", "map", "ip", self.name, MAP])
        for item in json.loads(output)["nftables"]:
            if "map" in item:
                return {int(key): int(value) for key, value in item["map"].get("elem", [])}
        return {}

    def read_own(self, nft: str = "nft") -> dict[int, int]:
        """The isolation set as the kernel holds it (app port -> uid)."""
        output = run([nft, "-j", "list", "set", "inet", self.name, OWN])
        for item in json.loads(output)["nftables"]:
            if "set" in item:
                pairs = (element["concat"] for element in item["set"].get("elem", []))
                return {int(port): int(uid) for uid, port in pairs}
        return {}

    def exists(self, nft: str = "nft", family: str = "ip") -> bool:
        """Whether the table (``ip``), or the isolation one (``inet``), is there."""
        try:
            run([nft, "list", "table", family, self.name])
        except NftError:
            return False
        return True


def apply(script: str, nft: str = "nft") -> None:
    """Run an nft script as one transaction (all of it, or nothing). Raises NftError."""
    if script:
        run([nft, "-f", "-"], script)


def run(command: list[str], stdin: str | None = None) -> str:
    try:
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            errors="replace",  # what nft says is quoted, never a reason to fail
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NftError(f"{command[0]} did not finish within {TIMEOUT:g}s") from None
    except OSError as exc:
        raise NftError(f"cannot run {command[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("Error")] or lines[-1:]
        raise NftError("; ".join(errors) or f"{command[0]} exited with {result.returncode}")
    return result.stdout


def find_nft() -> str | None:
    """The nft program (Debian's nftables package), or None."""
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
