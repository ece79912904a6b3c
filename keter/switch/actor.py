"""The switch component: owns keter's nftables table and watches old versions drain.

Told by the supervisor only (``PointServices``, ``ReleaseServices``,
``WatchDrain``, ``GrantPorts``, ``RevokePorts``), it answers with facts
(``SwitchReady``, ``ServicesPointed``, ``PointFailed``, ``Drained``). What it does:

* At start it replaces whatever an earlier run left in this ROOT's table with an
  empty one (an earlier keter killed mid-switch leaves rules pointing at ports
  whose processes are gone) and reports the mode: ``kernel``, or ``reload``
  when nft is missing, not permitted, or switched off (``switch: reload``).
  It says which, once. At a clean stop it deletes the table. Should anyone else
  delete it (``nft flush ruleset`` when the nftables service restarts), a thread
  that hears the kernel's announcements (``TableWatch``) has the component make it
  again with every stable address, and say so.
* ``PointServices``: one nf_tables transaction changes the map for every command
  queued at that moment (1000 apps redeployed at once cost one transaction).
  Then, for each stable port, it connects through it and asks the kernel
  whether that very connection was accepted on the new version's port; if not,
  the previous targets are put back and the deploy fails. When the ports led
  somewhere before, the report waits until nginx can no longer put a new
  request on a connection it pooled to the previous version: those ports hold
  no connection, or ``pool_seconds`` passed (nginx closes pooled upstream
  connections that old: see ``keter.nginx.render``).
* ``WatchDrain``: reports ``Drained`` when the ports hold no live connection;
  after ``seconds`` it stops looking (the supervisor's own timer ends the drain).
* ``GrantPorts`` / ``RevokePorts``: the isolation set (``keter.switch.nft``) holds
  (the app's uid . port) for every port keter gave an app and has not taken
  back, so apps reach their own ports and no other app's. Made empty at start
  (what a killed keter left runs no more: the monitor stops its leftovers before
  any deploy), filled as deploys get their ports; made again with the table.
  Only with apps of their own uids (``users``): under ``setuid`` or
  ``run-apps-as-root`` apps share one user and there is nothing to tell apart.

Both waits share one poll: a single sock_diag dump over keter's port range
every ``POLL`` seconds while anything waits, every ``SWITCH_POLL`` while a
switch does (``keter.sockdiag``), less often when dumps are slow
(``poll_delay``).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from keter import sockdiag
from keter.actor import Actor
from keter.messages import (
    Component,
    Drained,
    GrantPorts,
    PointFailed,
    PointServices,
    ReleaseServices,
    RevokePorts,
    ServicesPointed,
    SwitchMode,
    SwitchReady,
    WatchDrain,
    message,
)
from keter.switch import nft
from keter.switch.nfnetlink import NetlinkError, TableWatch
from keter.threadnames import name_this_thread

if TYPE_CHECKING:
    from keter.users import AppUsers

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at the connections of draining versions
SWITCH_POLL = 0.01  # ... while a switch waits for nginx's pool (a verdict waits on it)
# The share of a core the dumps may take. A dump walks the kernel's whole connection
# table, TIME_WAIT entries included: a few hundred µs on a quiet host, several ms while
# 1000 apps are redeployed at once (every probe, confirmation and pooled connection of
# the last minute is still there), when polling every SWITCH_POLL took half of keter's CPU.
POLL_SHARE = 0.2
CONFIRM_TIMEOUT = 1.0  # seconds a confirming connection may take
CONFIRM_TRIES = 3  # connections through a stable port before it counts as led elsewhere


def poll_delay(base: float, spent: float) -> float:
    """Seconds until the next look at the ports: ``base``, or longer when the look just
    made took ``spent`` seconds of CPU, so that looking takes at most ``POLL_SHARE`` of a
    core (a verdict then waits a few ms more; keter's other work goes on)."""
    return max(base, spent * (1 - POLL_SHARE) / POLL_SHARE)


@message
class _Poll:
    """Private timer: look at the watched ports again."""


@message
class _TableGone:
    """Private, from the hearing thread: the kernel may have deleted the table."""


@dataclass(kw_only=True, eq=False)
class _Wait:
    """Ports to see empty (or a deadline), then a report."""

    ports: frozenset[int]
    deadline: float
    report: object  # sent when the ports are empty (or, for a switch, at the deadline)
    at_deadline: bool  # report at the deadline too (a switch), or just stop looking (a drain)


class Switch(Actor):
    """See the module docstring. ``port_range`` is keter's app port range (watched ports)."""

    def __init__(
        self,
        *,
        root: Path,
        port_range: tuple[int, int],
        pool_seconds: float,
        report_to: queue.Queue | None,
        kernel: bool = True,
        nft_program: str | None = None,
        users: AppUsers | None = None,
        closed_ports: tuple[int, ...] = (),
    ) -> None:
        super().__init__(Component.SWITCH, report_to)
        self.table = nft.Table.for_root(root)
        self.port_range = port_range
        self.pool_seconds = pool_seconds
        self.wanted = kernel  # False: the operator chose the reload switch
        self.nft = nft_program
        self.mode = SwitchMode.RELOAD
        self.mapping: dict[int, int] = {}  # stable port -> app port, as the kernel holds it
        self.writer = self.table.writer()
        # Apps kept off each other's ports: only when each has a uid of its own.
        self.users = users
        self.isolation = (
            nft.Isolation(uids=(users.low, users.high), ports=port_range, closed=closed_ports)
            if users is not None
            else None
        )
        self.isolating = False  # the isolation table is made (kernel mode, and nft took it)
        self.owned: dict[int, int] = {}  # app port -> its app's uid, as the kernel's set holds
        self.own_writer = self.table.own_writer()
        self._waits: dict[tuple[str, int], _Wait] = {}  # by (kind, deploy id)
        self._polling = False
        self._table_watch: TableWatch | None = None
        self._hearing: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def on_start(self) -> None:
        reason = self._create()
        if reason is None:
            self.mode = SwitchMode.KERNEL
            log.info(
                "keter: switching versions in the kernel: nftables table %s, "
                "stable addresses on %s; nginx reloads only when routes change; %s",
                self.table.name,
                self.table.address,
                self._isolation_said(),
            )
            self._hear()
            self.report(SwitchReady(mode=self.mode, address=self.table.address))
        else:
            log.warning(
                "keter: switching versions by reloading nginx: %s. "
                "Keep-alive clients may see a reset on each switch, and apps can connect "
                "to each other's ports (no nftables isolation).",
                reason,
            )
            self.report(SwitchReady(mode=self.mode, reason=reason))

    def _isolation_said(self) -> str:
        """The start line's words on isolation."""
        if self.isolating:
            return "apps cannot connect to each other's ports"
        if self.isolation is None:
            return (
                "apps share one user (setuid or run-apps-as-root) and can connect to "
                "each other's ports"
            )
        return "apps can connect to each other's ports (see the warning above)"

    def _create(self) -> str | None:
        """Make this ROOT's tables afresh; None, or why the kernel mode cannot be used.

        The isolation table is part of the same transaction; a kernel that refuses it
        (no reject for inet, say) gets the kernel mode without it, and a warning."""
        if self.nft is None:
            self.nft = nft.find_nft()
        if not self.wanted:
            self._delete_leftovers()
            return "keter-config.yaml sets switch: reload"
        if self.nft is None:
            return "nft is not installed (Debian's nftables package)"
        refused: dict[tuple[bool, bool], nft.NftError] = {}
        # With the conntrack timeout policy if the kernel has them, with isolation if
        # it takes it: the first script nft accepts (see keter.switch.nft).
        for short_close in (True, False):
            for isolation in dict.fromkeys((self.isolation, None)):
                script = self.table.create_script(short_close=short_close, isolation=isolation)
                try:
                    nft.apply(script, self.nft)
                except nft.NftError as exc:
                    refused[short_close, isolation is not None] = exc
                    continue
                self.isolating = isolation is not None
                if not short_close:
                    log.warning(
                        "keter: closed connections through the stable addresses stay in "
                        "conntrack for the kernel's default time: %s",
                        refused[True, False],
                    )
                if self.isolation is not None and not self.isolating:
                    log.warning(
                        "keter: apps can connect to each other's ports: nft cannot create "
                        "table inet %s: %s",
                        self.table.name,
                        refused[short_close, True],
                    )
                return None
        self._delete_leftovers()
        return f"nft cannot create table {self.table.name}: {refused[False, False]}"

    def _delete_leftovers(self) -> None:
        """Reload mode: a killed keter's tables go (its map, and its isolation set,
        which would reset an app's connections to its own new port)."""
        if self.nft is None:
            return  # no nft, no tables (nft is how keter makes them)
        try:
            nft.apply(self.table.delete_script(), self.nft)
        except nft.NftError as exc:
            log.error("keter: cannot delete nftables table %s: %s", self.table.name, exc)

    def _hear(self) -> None:
        """Start the thread that tells this actor when the table may have been deleted."""
        try:
            self._table_watch = TableWatch(self.table.name)
        except OSError as exc:
            log.warning(
                "keter: cannot hear nftables changes (%s): if someone deletes table %s, "
                "keter makes it again only at its next start",
                exc.strerror or exc,
                self.table.name,
            )
            return
        self._hearing = threading.Thread(
            target=self._listen, args=(self._table_watch,), name="keter-switch-hear", daemon=True
        )
        self._hearing.start()

    def _listen(self, watch: TableWatch) -> None:
        """The hearing thread: it only tells the actor, which does everything else."""
        name_this_thread()
        try:
            while watch.wait():
                self.tell(_TableGone())
        except OSError as exc:
            log.error("keter: stopped hearing nftables changes: %s", exc.strerror or exc)

    def on_stop(self) -> None:
        if self._table_watch is not None and self._hearing is not None:
            self._table_watch.stop()
            self._hearing.join(5)
            self._table_watch.close()
        if self.mode is SwitchMode.KERNEL and self.nft is not None:
            try:
                nft.apply(self.table.delete_script(), self.nft)
            except nft.NftError as exc:
                log.error("keter: cannot delete nftables table %s: %s", self.table.name, exc)
        self.writer.close()
        self.own_writer.close()

    # -- messages --------------------------------------------------------------------

    def handle(self, message: object) -> None:
        match message:
            case PointServices():
                self._point([message, *self.take_queued(PointServices)])
            case ReleaseServices():
                self._release([message, *self.take_queued(ReleaseServices)])
            case WatchDrain(app=app, deploy_id=deploy_id, ports=ports, seconds=seconds):
                self._watch(
                    ("drain", deploy_id),
                    _Wait(
                        ports=frozenset(ports),
                        deadline=time.monotonic() + seconds,
                        report=Drained(app=app, deploy_id=deploy_id),
                        at_deadline=False,
                    ),
                )
            case GrantPorts() | RevokePorts():
                self._own([message, *self.take_queued((GrantPorts, RevokePorts))])
            case _Poll():
                self._poll()
            case _TableGone():
                self._make_again()
            case _:
                self.unexpected(message)

    def _look_again(self) -> bool:
        """After a refused change: whether the kernel's table differed from keter's
        picture of it (now made right: the table made again, or the picture read)."""
        if self._make_again():
            return True
        try:
            held = self.table.read(self.nft)
        except (nft.NftError, ValueError, KeyError) as exc:
            log.error("keter: cannot read nftables table %s: %s", self.table.name, exc)
            return False
        if held == self.mapping:
            return False
        log.warning(
            "keter: the map of nftables table %s was changed by someone else; "
            "keter follows the kernel's (%d stable addresses, %d in keter's picture)",
            self.table.name,
            len(held),
            len(self.mapping),
        )
        self.mapping = held
        return True

    def _make_again(self) -> bool:
        """The table may be gone: if it is, make it again and lead every stable port
        where it led (connections made in between were refused). Whether it did."""
        if self.mode is not SwitchMode.KERNEL or self._tables_exist():
            return False
        reason = self._create()
        if reason is None:
            try:
                self.writer.change([], sorted(self.mapping.items()))
                if self.isolating:
                    self.own_writer.change([], sorted((u, p) for p, u in self.owned.items()))
                else:
                    self.owned = {}
            except NetlinkError as exc:
                reason = f"its stable addresses cannot be added: {exc.strerror}"
        if reason is not None:
            log.error(
                "keter: nftables table %s was deleted and cannot be made again (%s): "
                "apps are unreachable through nginx until keter restarts",
                self.table.name,
                reason,
            )
            return False
        log.warning(
            "keter: nftables table %s was deleted by someone else (nft flush ruleset? "
            "the nftables service restarting?): made it again, %d stable addresses",
            self.table.name,
            len(self.mapping),
        )
        return True

    def _tables_exist(self) -> bool:
        if not self.table.exists(self.nft):
            return False
        return not self.isolating or self.table.exists(self.nft, "inet")

    # -- pointing --------------------------------------------------------------------

    def _point(self, commands: list[PointServices], *, again: bool = False) -> None:
        if self.mode is not SwitchMode.KERNEL:
            for command in commands:
                self._failed(command, "keter switches by reloading nginx")
            return
        wanted = {stable: port for command in commands for stable, port in command.targets}
        # Taken before: a request the new version answers ends after this (keter.stats).
        changed = time.time()
        try:
            self._change(wanted)
        except NetlinkError as exc:
            if len(commands) > 1:  # find the one at fault: each alone
                for command in commands:
                    self._point([command])
                return
            # keter's picture of the map may be wrong (someone changed the map, or deleted
            # the table): refused for that, the change is worth one more try.
            if not again and self._look_again():
                self._point(commands, again=True)
                return
            # The transaction changed nothing: the stable ports lead where they did.
            self._failed(commands[0], f"the kernel refused the change: {exc.strerror}")
            return
        for command in commands:
            problem = self._confirm(command.targets)
            pointed = ServicesPointed(app=command.app, deploy_id=command.deploy_id, at=changed)
            if problem is not None:
                self._restore(command)
                self._failed(command, problem)
            elif command.previous:
                self._watch(
                    ("switch", command.deploy_id),
                    _Wait(
                        ports=frozenset(port for _, port in command.previous),
                        deadline=time.monotonic() + self.pool_seconds,
                        report=pointed,
                        at_deadline=True,
                    ),
                )
            else:
                self.report(pointed)

    def _change(self, wanted: dict[int, int]) -> None:
        """Make the kernel's map hold ``wanted`` (0: no element); raises NetlinkError."""
        self.writer.change(*self.table.changes(self.mapping, wanted))
        for stable, port in wanted.items():
            if port:
                self.mapping[stable] = port
            else:
                self.mapping.pop(stable, None)

    def _confirm(self, targets: tuple[tuple[int, int], ...]) -> str | None:
        """Connect through each stable port: None if each lands on its new port, else why.

        A connection is looked up on the new port by its source port, which the
        kernel's NAT may change when its tuple clashes with a conntrack entry of an
        earlier connection (busy hosts reuse ephemeral ports within conntrack's two
        minutes); so a port gets ``CONFIRM_TRIES`` connections before it counts as
        led elsewhere. A map that leads elsewhere fails every one of them.
        """
        for stable, port in targets:
            for _ in range(CONFIRM_TRIES):
                try:
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                        probe.settimeout(CONFIRM_TIMEOUT)
                        probe.bind(("127.0.0.1", 0))
                        probe.connect((self.table.address, stable))
                        landed = sockdiag.accepted_on(port, probe.getsockname()[1])
                except OSError as exc:
                    return f"a connection to {self.table.address}:{stable} failed: {exc}"
                if landed:
                    break
            else:
                return f"a connection to {self.table.address}:{stable} did not reach port {port}"
        return None

    def _restore(self, command: PointServices) -> None:
        """Lead the command's stable ports back where they led before (or nowhere)."""
        back = {stable: 0 for stable, _ in command.targets}
        back.update(dict(command.previous))
        try:
            self._change(back)
        except NetlinkError as exc:
            log.error("%s: cannot restore the stable addresses: %s", command.app, exc.strerror)

    def _failed(self, command: PointServices, reason: str) -> None:
        self.report(PointFailed(app=command.app, deploy_id=command.deploy_id, reason=reason))

    def _release(self, commands: list[ReleaseServices]) -> None:
        if self.mode is not SwitchMode.KERNEL:
            return
        gone = {stable: 0 for command in commands for stable in command.ports}
        try:
            self._change(gone)
        except NetlinkError as exc:
            apps = ", ".join(sorted({command.app for command in commands}))
            log.error("%s: cannot remove stable addresses: %s", apps, exc.strerror)

    # -- keeping apps off each other's ports ------------------------------------------

    def _own(self, commands: list[GrantPorts | RevokePorts], *, again: bool = False) -> None:
        """Make the isolation set hold (uid . port) for the ports granted, none for those
        revoked, in the order told (a port revoked from one app may go to another)."""
        if not self.isolating:
            return
        wanted: dict[int, int] = {}
        for command in commands:
            uid = 0
            if isinstance(command, GrantPorts):
                uid = self._uid(command.app)
                if uid is None:
                    continue
            wanted.update(dict.fromkeys(command.ports, uid))
        try:
            self.own_writer.change(*self.table.own_changes(self.owned, wanted))
        except NetlinkError as exc:
            # keter's picture of the set may be wrong (changed by hand, the table deleted):
            # read the kernel's and try once more.
            if not again and self._read_own():
                self._own(commands, again=True)
                return
            apps = ", ".join(sorted({command.app for command in commands}))
            log.error("%s: cannot change which ports the apps may reach: %s", apps, exc.strerror)
            return
        for port, uid in wanted.items():
            if uid:
                self.owned[port] = uid
            else:
                self.owned.pop(port, None)

    def _uid(self, app: str) -> int | None:
        """The app's uid (allocated now if the process monitor has not yet, the same one)."""
        assert self.users is not None
        try:
            return self.users.uid(app)
        except Exception as exc:  # NoFreeUid, or app-users.json unwritable: its spawn fails too
            log.error("%s: its ports stay closed to it: no uid: %s", app, exc)
            return None

    def _read_own(self) -> bool:
        """After a refused change: whether the kernel's set differed from keter's picture
        (now made right: the table made again, or the picture read)."""
        if self._make_again():
            return True
        try:
            held = self.table.read_own(self.nft)
        except (nft.NftError, ValueError, KeyError, TypeError) as exc:
            log.error("keter: cannot read nftables table inet %s: %s", self.table.name, exc)
            return False
        if held == self.owned:
            return False
        log.warning(
            "keter: the set %s of nftables table inet %s was changed by someone else; "
            "keter follows the kernel's",
            nft.OWN,
            self.table.name,
        )
        self.owned = held
        return True

    # -- waiting for ports to empty ----------------------------------------------------

    def _watch(self, key: tuple[str, int], wait: _Wait) -> None:
        self._waits[key] = wait
        if not self._polling:
            self._polling = True
            self._poll()

    def _poll(self) -> None:
        now = time.monotonic()
        low, high = self.port_range
        began = time.thread_time()  # this thread's CPU, the kernel's walk included
        try:
            counts = sockdiag.connections(low, high)
        except OSError as exc:
            log.debug("keter: cannot count connections: %s", exc)
            counts = None  # unknown: only the deadlines end the waits
        spent = time.thread_time() - began
        for key, wait in list(self._waits.items()):
            empty = counts is not None and not any(counts[port] for port in wait.ports)
            if empty or now >= wait.deadline:
                del self._waits[key]
                if empty or wait.at_deadline:
                    self.report(wait.report)
        self._polling = bool(self._waits)
        if self._polling:
            switching = any(wait.at_deadline for wait in self._waits.values())
            self.schedule(poll_delay(SWITCH_POLL if switching else POLL, spent), _Poll())
