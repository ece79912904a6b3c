"""The nginx writer: the component that makes nginx serve what the supervisor asks.

A deploy switches traffic by rewriting keter's include file and reloading
nginx: the master starts new workers with the new upstreams while the old
workers finish the requests they already hold, so no request is lost.

nginx checks the whole config as it reloads, and keeps the one it runs when it
refuses (saying why in its error log): so an apply reloads nginx at once, and
runs ``nginx -t`` only when nginx refused, to find out which site it was (or
before every reload when keter does not know nginx's error log).

One app's site never sinks the others. Each app's site is its own file
(``keter.nginx.files``), and the writer remembers the last site of each app
that nginx took. When a site fails to render, its files cannot be copied, or
``nginx -t`` fails on it (nginx names the file), that app alone keeps its
previous site, or is withdrawn if it has none or if that one fails too (a file
changed outside keter); every other app is served as asked, and the reply
names each refused app (``NginxApplied.refused``). Only when keter's config
fails without any site at all is nginx itself broken: then nothing changes and
the reply is ``NginxFailed``.

``nginx -s reload`` only sends a signal; nginx may still reject the new config
(a listen port already taken) and keep the old one. The writer therefore only
reports success once nginx's status server answers with the new generation,
and fails at once when nginx's error log shows it refused the reload
(``keter.nginx.errorlog``). When nginx does not take it, the writer puts the
previous file back and reloads nginx once more with it: a busy nginx may
still take the refused reload late.
Once it knows nginx's master (from the workers that answer), it sends that
signal itself instead of running ``nginx -s reload``, which reads and checks
the whole config just to find the pid file: with 1000 sites, 0.1 s of CPU on
every generation, beside the master's own reading after it. A reload command of
the operator's own (``systemctl reload nginx``, a wrapper) always runs as it is.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from keter import names
from keter.actor import Actor
from keter.fsutil import atomic_write
from keter.messages import ApplyNginx, Component, NginxApplied, NginxFailed, Site, SiteRefused
from keter.nginx import blame
from keter.nginx.errorlog import ErrorLog
from keter.nginx.files import Localized, SupportFiles
from keter.nginx.probe import probe
from keter.nginx.render import (
    ListenerLike,
    ProxyOptions,
    generation_of,
    hosts_of,
    in_wildcard_order,
    include_line,
    is_tls,
    render_main,
    render_site,
    status_address,
    support_dir,
)
from keter.nginx.workers import Retiring
from keter.shortrun import run_short
from keter.users import NGINX_GROUP

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0
CONFIRM_INTERVAL = 0.03
RETIRE_INTERVAL = 0.01  # old workers close their listening sockets ~100 ms after a reload
# nginx -t's complaint when nginx.conf sets the bucket for host names that keter sets too.
_NAMES_BUCKET_TWICE = '"server_names_hash_bucket_size" directive is duplicate'
WITHDRAWN_KEPT = 16  # refused sites remembered per app not serving


@dataclass(frozen=True)
class Rendered:
    """One app's site as nginx serves it, or would."""

    site: Site  # as the supervisor asked for it: an unchanged site is not redone
    local: Localized  # the same site naming keter's copies
    file: Path  # its rendered site file
    hosts: tuple[str, ...]
    wildcards: tuple[tuple[str, Path], ...] = ()  # each wildcard host's servers: (host, file)

    # Asked for at every generation, for every app nginx serves: worked out once.
    @functools.cached_property
    def files(self) -> frozenset[Path]:
        """Every file nginx reads for this site, its own files included."""
        return self.local.files | {self.file} | {file for _, file in self.wildcards}

    @functools.cached_property
    def include(self) -> str:
        """The main file's line that has nginx read the site's own file."""
        return include_line(self.file)


@dataclass(frozen=True, kw_only=True)
class _Missed:
    """Why nginx does not serve a generation it was to reload to."""

    reason: str
    sent: bool = True  # False: the reload command failed, nginx was not told
    emerg: str | None = None  # nginx's own words: it refused the reload
    # The reload command ran and said no (``nginx -s reload`` reads the config first and
    # refuses one nginx would refuse), rather than hanging or not starting at all.
    answered: bool = False
    # nginx's status server answered meanwhile (with another generation): nginx is
    # alive, so its silence in the error log says something; a paused nginx's does not.
    heard: bool = False


class _Taken(enum.Enum):
    """How an untested reload went (``NginxWriter._untested``)."""

    YES = "nginx serves it"
    REFUSED = "nginx refused it (or was not asked): test the sites, then reload"
    NO = "it failed otherwise, and the failure is reported"


class NginxBroken(Exception):
    """keter's config fails ``nginx -t`` even without any site."""


class _Hung(NginxBroken):
    """An nginx command did not finish in time: no use running it again in this apply."""


class NginxWriter(Actor):
    """Applies ``ApplyNginx`` messages: copy, render, ``nginx -t``, reload, confirm.

    Reports ``NginxApplied`` once nginx serves the new generation (naming the
    apps whose new site it refused), otherwise ``NginxFailed`` with the old
    config restored (nginx keeps serving it).
    """

    def __init__(
        self,
        *,
        listeners: Sequence[ListenerLike],
        config_file: Path,
        test_command: Sequence[str],
        reload_command: Sequence[str],
        report_to: queue.Queue | None,
        confirm_timeout: float = 10.0,
        error_log: Path | None = None,
        options: ProxyOptions | None = None,
        auth_group: str | None = NGINX_GROUP,
    ) -> None:
        """``error_log``, if given, is nginx's error log; its new ``[emerg]``
        lines explain a reload nginx did not take. ``options`` are the global
        proxy settings (``ProxyOptions.from_config``). ``auth_group`` is the
        group of nginx's workers (Debian's www-data)."""
        super().__init__(Component.NGINX, report_to)
        self.listeners = tuple(listeners)
        self.options = options or ProxyOptions()
        self.config_file = Path(config_file)
        self.support = support_dir(self.config_file)
        self.files = SupportFiles(self.support, auth_group, self.options.shared_certificates)
        self.test_command = tuple(test_command)
        self.reload_command = tuple(reload_command)
        self.confirm_timeout = confirm_timeout
        self.error_log = Path(error_log) if error_log is not None else None
        # False once a reload was not taken with no [emerg] there (see _untested).
        self._error_log_speaks = True
        self._told = False  # this apply's untested config was sent to nginx (see _put_back)
        # Set by stop() so a shutdown does not wait out a whole confirm timeout.
        self._stopping = threading.Event()
        # What nginx serves: each app's site, and keter's main file as written.
        self.live: dict[str, Rendered] = {}
        self._live_main: bytes | None = None  # None: there was no file
        self._main_read = False  # the file nginx runs was read (at the first apply)
        self._pruned = False  # every app folder was looked at since the last failure
        self._master: int | None = None  # nginx's master, learnt from its workers
        # keter sets nginx's bucket for host names unless nginx.conf does (render_main).
        self._names_bucket = True
        self._warned_unknown_master = False
        # The listeners and options as nginx reads them (files copied) and their files.
        self._globals: tuple[tuple[ListenerLike, ...], ProxyOptions, frozenset[Path]] | None = None
        # Sites refused with nothing of the app left serving: not tried again (the
        # supervisor may still ask for one) until the app asks for another (a new deploy).
        self.withdrawn: dict[str, list[Site]] = {}

    def stop(self) -> None:
        """Queue Stop and cut short a confirmation that is waiting on nginx."""
        self._stopping.set()
        super().stop()

    def handle(self, message: object) -> None:
        match message:
            case ApplyNginx():
                self._apply(message)
            case _:
                self.unexpected(message)

    # -- one apply -----------------------------------------------------------------------

    def _apply(self, command: ApplyNginx) -> None:
        generation = command.generation
        if not self._main_read:
            try:
                self._live_main = self.config_file.read_bytes()
            except FileNotFoundError:
                self._live_main = None  # nothing to restore: removed on failure
            except OSError as exc:
                self._fail(generation, f"cannot read {self.config_file}: {exc}")
                return
            self._main_read = True
        refused: dict[str, str] = {}
        try:
            self._refresh_globals(refused)
        except (OSError, ValueError) as exc:
            self._fail(generation, f"cannot copy the files nginx needs: {exc}")
            return
        try:
            chosen = self._candidates(command.sites, refused)
        except OSError as exc:  # keter's own folder, not a bundle's file (a full disk)
            self._fail(generation, f"cannot write the files nginx needs: {exc}")
            return
        self._told = False
        try:
            chosen = dict(chosen)
            self._settle_hosts(chosen, refused)
            taken = self._untested(chosen, generation)
            if taken is _Taken.NO:
                return  # failed, and said so
            if taken is _Taken.REFUSED:
                chosen = self._tested(chosen, refused, generation)
        except NginxBroken as exc:
            self._fail(generation, f"nginx rejected the config: {exc}{self._put_back()}")
            return
        except OSError as exc:
            self._fail(generation, f"cannot write {self.config_file}: {exc}{self._put_back()}")
            return
        except BaseException:  # a bug: disk and the running nginx must agree all the same
            self._put_back()
            raise
        main = self._main_text(chosen, generation).encode()
        if taken is _Taken.REFUSED and not self._reload(generation):
            return
        # Folders to prune: sites that changed or went, and refused ones (their new files).
        every = chosen.keys() | self.live.keys()
        changed = {app for app in every if chosen.get(app) is not self.live.get(app)}
        changed |= refused.keys()
        self.live, self._live_main = chosen, main
        for site in command.sites:
            if site.app in chosen:
                self.withdrawn.pop(site.app, None)
            elif site.app in refused:
                kept = self.withdrawn.setdefault(site.app, [])
                kept[:] = [*kept[-(WITHDRAWN_KEPT - 1) :], site]
        # The first apply looks at every folder: an earlier run may have left some.
        if self._pruned:
            live = {app: chosen[app].files for app in changed if app in chosen}
            self.files.prune(live, self._globals[2], changed)
        else:
            self.files.prune({app: r.files for app, r in chosen.items()}, self._globals[2])
        self._pruned = True
        log.info(
            "nginx: generation %d applied (%d sites%s)",
            generation,
            len(chosen),
            f", {len(refused)} refused" if refused else "",
        )
        refusals = tuple(SiteRefused(app=app, reason=why) for app, why in sorted(refused.items()))
        self.report(NginxApplied(generation=generation, refused=refusals))

    def _fail(self, generation: int, reason: str) -> None:
        log.error("nginx: generation %d failed: %s", generation, reason)
        self._pruned = False  # this attempt may have left files: the next prune looks everywhere
        self.report(NginxFailed(generation=generation, reason=reason))

    # -- choosing each app's site ------------------------------------------------------

    def _refresh_globals(self, refused: dict[str, str]) -> None:
        """Copy the listeners' certificates and the response pages again.

        A source that has gone since the last apply is not fatal: the earlier copies
        stay in use. When the copies changed, every live site is rendered again (one
        that no longer renders is ``refused``).
        """
        try:
            fresh = self.files.localize_globals(self.listeners, self.options)
        except (OSError, ValueError) as exc:
            if self._globals is None:
                raise
            log.warning("nginx: keeping the earlier copies of keter's own files: %s", exc)
            return
        if self._globals is not None and fresh[:2] == self._globals[:2]:
            return
        previous, self._globals = self._globals, fresh
        live = {}
        try:
            for app, rendered in self.live.items():
                try:
                    live[app] = self._render(rendered.site, rendered.local)
                except ValueError as exc:
                    refused[app] = names.log_text(str(exc), 2000)
                    log.warning("nginx: %s: site refused, the app is not served: %s", app, exc)
        except OSError:
            self._globals = previous  # all or nothing: the next apply tries again
            raise
        self.live = live

    def _candidates(self, sites: Iterable[Site], refused: dict[str, str]) -> dict[str, Rendered]:
        """Each app's site to try: the one asked for, else its live one, else none.

        Raises OSError when keter's own folder cannot be written.
        """
        chosen: dict[str, Rendered] = {}
        for site in sites:
            app = site.app
            live = self.live.get(app)
            if app in chosen:
                refused[app] = "the app appears twice in one generation"
            elif live is not None and live.site == site:
                chosen[app] = live
            elif site in self.withdrawn.get(app, ()):
                continue  # refused already, with its reason; a new deploy tries again
            else:
                # ValueError is the site's own (a bad value, a file it names that cannot be
                # read); OSError writing keter's folder is not, and fails the generation.
                try:
                    chosen[app] = self._render(site, self.files.localize(site))
                except ValueError as exc:
                    self._refuse(app, str(exc), refused, chosen)
        return chosen

    def _render(self, site: Site, local: Localized) -> Rendered:
        listeners, options, _ = self._globals
        text = render_site(local.site, listeners, options)
        file = self.files.write_site(site.app, text.text)
        wildcards = tuple(
            (host, self.files.write_site(site.app, servers)) for host, servers in text.wildcards
        )
        return Rendered(
            site=site, local=local, file=file, hosts=hosts_of(site), wildcards=wildcards
        )

    def _refuse(
        self, app: str, reason: str, refused: dict[str, str], chosen: dict[str, Rendered]
    ) -> None:
        """Take ``app``'s candidate back: its live site, unless that is what failed.

        Logged as a warning: the supervisor's line about the app is the error.
        """
        reason = names.log_text(reason, 2000)
        live, tried = self.live.get(app), chosen.pop(app, None)
        refused.setdefault(app, reason)
        if live is not None and tried is not live:
            chosen[app] = live
            log.warning("nginx: %s: new site refused, its previous site stays: %s", app, reason)
        else:
            log.warning("nginx: %s: site refused, the app is not served: %s", app, reason)

    def _settle_hosts(self, chosen: dict[str, Rendered], refused: dict[str, str]) -> None:
        """Refuse new sites that claim a host another app serves (nginx would only warn).

        Live sites claim first, then new ones in app order; a refused app falls back
        to its live site, which is checked like the others.
        """
        while True:
            owners: dict[str, str] = {}
            order = sorted(chosen, key=lambda app: (chosen[app] is not self.live.get(app), app))
            clash = None
            for app in order:
                taken = [host for host in chosen[app].hosts if host in owners]
                if taken:
                    clash = (app, f"host {taken[0]} already belongs to {owners[taken[0]]}")
                    break
                owners.update(dict.fromkeys(chosen[app].hosts, app))
            if clash is None:
                return
            self._refuse(*clash, refused, chosen)

    # -- testing -------------------------------------------------------------------------

    def _tested(
        self, chosen: dict[str, Rendered], refused: dict[str, str], generation: int
    ) -> dict[str, Rendered]:
        """The candidates minus every site ``nginx -t`` fails on; the main file written.

        Each round blames the sites nginx's errors name (or finds one by halving
        when they name none) and takes them back. Raises NginxBroken when keter's
        config fails with no site at all.
        """
        chosen = dict(chosen)
        self._settle_hosts(chosen, refused)
        for _ in range(2 * len(chosen) + 2):
            error = self._test(chosen, generation)
            if error is None:
                return chosen
            culprits = blame.apps_named(error, {app: r.files for app, r in chosen.items()})
            if not culprits:
                culprit = self._search(chosen, generation)
                if culprit is None:
                    raise NginxBroken(error)
                culprits = {culprit}
            for app in sorted(culprits):
                self._refuse(app, f"nginx -t failed: {error}", refused, chosen)
            self._settle_hosts(chosen, refused)
        raise NginxBroken("nginx -t kept failing after every site was taken back")

    def _search(self, chosen: Mapping[str, Rendered], generation: int) -> str | None:
        """One app whose site makes ``nginx -t`` fail, found by halving; None if even
        keter's config without sites fails."""
        if self._test({}, generation) is not None:
            return None
        suspects = sorted(chosen)
        while len(suspects) > 1:
            half = suspects[: len(suspects) // 2]
            if self._test({app: chosen[app] for app in half}, generation) is not None:
                suspects = half
            else:
                suspects = suspects[len(suspects) // 2 :]
        return suspects[0] if suspects else None

    def _test(self, chosen: Mapping[str, Rendered], generation: int) -> str | None:
        """Write the main file including these sites and run ``nginx -t``."""
        self._write_main(chosen, generation)
        try:
            error = _run(self.test_command)
        except OSError as exc:
            error = f"cannot run {_shell(self.test_command)}: {exc}"
        if error is not None and self._names_bucket and _NAMES_BUCKET_TWICE in error:
            # The operator's nginx.conf sets it: theirs stands, and names too long for it
            # fail their own site (nginx says which), not every apply.
            self._names_bucket = False
            log.warning(
                "nginx: nginx.conf sets server_names_hash_bucket_size, so keter leaves it "
                "alone: host names longer than it allows will be refused"
            )
            return self._test(chosen, generation)
        return error

    def _write_main(self, chosen: Mapping[str, Rendered], generation: int) -> None:
        """keter's main file, including these sites, where nginx reads it."""
        atomic_write(self.config_file, self._main_text(chosen, generation).encode(), mode=0o644)

    def _main_text(self, chosen: Mapping[str, Rendered], generation: int) -> str:
        listeners, options, _ = self._globals
        includes = [chosen[app].include for app in sorted(chosen)]
        wildcards = in_wildcard_order(
            wildcard for rendered in chosen.values() for wildcard in rendered.wildcards
        )
        includes += [include_line(file) for _, file in wildcards]
        return render_main(
            includes, listeners, generation, options, names_bucket=self._names_bucket
        )

    def _put_back(self) -> str:
        """``_restore``, and if nginx was told of the untested config this apply (it may
        have taken it: an unrelated [emerg], a slow nginx), reload nginx back to it too."""
        restored = self._restore()
        return restored or (self._back_to_live() if self._told else "")

    def _restore(self) -> str:
        """Put back the main file nginx is still running, so disk and nginx agree.

        Returns "" or, if that fails too, a note to append to the failure reason.
        """
        try:
            if self._live_main is None:
                self.config_file.unlink(missing_ok=True)
            else:
                atomic_write(self.config_file, self._live_main, mode=0o644)
        except OSError as exc:
            return f" (and restoring the previous {self.config_file} failed: {exc})"
        return ""

    # -- reload and confirmation -----------------------------------------------------------

    def _untested(self, chosen: Mapping[str, Rendered], generation: int) -> _Taken:
        """Reload nginx with every candidate site before any ``nginx -t``.

        nginx checks the whole config as it reloads and keeps the one it runs when it
        refuses (an ``[emerg]`` in its error log, seen at once): ``nginx -t`` first
        read the same config once more on every apply, 0.2 s of CPU with 1000 sites,
        for the rare apply a site of which nginx refuses. Then (REFUSED) the tested
        path finds that site. Without nginx's error log a refusal would be seen only at
        the confirmation's timeout: then every apply is tested first (REFUSED at once).
        """
        if self.error_log is None or not self._error_log_speaks:
            return _Taken.REFUSED
        self._write_main(chosen, generation)
        missed = self._take(generation)
        if missed is None:
            return _Taken.YES
        self._told = missed.sent or missed.answered  # nginx may have taken it yet
        if self._stopping.is_set():
            # What is on disk was never tested: put back what nginx ran, so that nginx's
            # next start (a reboot) reads a config that passes. keter applies its own
            # again when it starts.
            reason = "keter stopped before nginx confirmed the reload"
            self._fail(generation, reason + self._restore())
            return _Taken.NO
        if not missed.sent:
            if missed.answered:
                # The command read the config and refused it (the first apply, before
                # keter knows nginx's master, or a command of the operator's own): the
                # tested path finds the site, as for a refusal nginx logs.
                return _Taken.REFUSED
            self._missed(generation, missed)
            return _Taken.NO
        if not missed.emerg and not missed.heard:
            # nginx did not answer at all (paused, swamped): its silence says nothing of
            # the error log. The tested path reloads again and waits once more.
            return _Taken.REFUSED
        if not missed.emerg:
            # Not taken, and no word of it where keter reads nginx's errors: nginx's own
            # config sends them elsewhere (or to a terminal). Without that word a refused
            # site would fail every apply after the timeout: test first from now on.
            self._error_log_speaks = False
            log.warning(
                "nginx: generation %d was not taken and %s says nothing of it: every apply "
                "is tested before its reload from now on (is nginx.error-log where nginx "
                "writes its errors?)",
                generation,
                self.error_log,
            )
        return _Taken.REFUSED

    def _reload(self, generation: int) -> bool:
        """Reload nginx, confirm it serves ``generation`` and that its old workers have
        stopped accepting; on failure, report it."""
        missed = self._take(generation)
        if missed is None:
            return True
        self._missed(generation, missed)
        return False

    def _missed(self, generation: int, missed: _Missed) -> None:
        """nginx does not serve ``generation``: report why, and put the previous file back."""
        if self._stopping.is_set():
            # nginx was told to load this config and may well have done so:
            # leave the file as it is rather than guess.
            self._fail(generation, "keter stopped before nginx confirmed the reload")
            return
        if not missed.sent:
            self._fail(generation, f"nginx reload failed: {missed.reason}{self._restore()}")
            return
        if missed.emerg:
            kept = "and kept the previous configuration"
            reason = f"nginx refused generation {generation} {kept}: {missed.emerg}"
        else:
            reason = f"{missed.reason}; it kept the previous configuration"
        restored = self._restore()
        self._fail(generation, reason + (restored or self._back_to_live()))

    def _back_to_live(self) -> str:
        """Reload nginx with the restored main file and confirm it serves it again.

        nginx may take a reload keter gave up on: on a busy machine it can read the
        new file and bind its ports seconds later. Without a second reload it would
        then serve the generation keter reported as refused. Returns "" or a note
        for the failure reason.
        """
        live = generation_of(self._live_main)
        if live is None:
            return ""  # not keter's file (or none): nothing nginx can be asked to confirm
        # nginx's [emerg] lines may be the refused reload's yet (it tries to bind a
        # taken port again for 2.5 s): only new workers serving ``live``, or the
        # timeout, tell.
        missed = self._take(live, refusals=False)
        if missed is None or self._serves(live):
            return ""  # taken; or refused too (the operator's own file?), ``live`` serving
        why = missed.emerg or missed.reason
        return f" (and nginx did not come back to generation {live}: {why})"

    def _serves(self, generation: int) -> bool:
        """Whether nginx's status server answers ``generation`` now."""
        listener = next(each for each in self.listeners if not is_tls(each))
        answer = probe(status_address(listener), listener.port)
        return answer is not None and answer[0] == str(generation)

    def _take(self, generation: int, *, refusals: bool = True) -> _Missed | None:
        """Have nginx reload and serve ``generation``, its old workers retired.

        None once it does, else what went wrong. A new ``[emerg]`` line in nginx's
        error log means nginx refused the reload (it logs one and keeps its running
        config): no use waiting for the confirmation's timeout then (unless not
        ``refusals``: then such lines are not read).
        """
        if self._stopping.is_set():  # nginx must not take a config keter will not confirm
            return _Missed(reason="keter is stopping", sent=False)
        errors = ErrorLog(self.error_log if refusals else None)
        retiring = Retiring.before_reload(self._master, {each.port for each in self.listeners})
        if not retiring.known:
            self._wait_until(retiring.in_a_later_tick, time.monotonic() + 1)
        missed = self._send_reload(retiring)
        if missed is not None:
            return missed
        deadline = time.monotonic() + self.confirm_timeout
        if retiring.known:
            # Watching the workers is quicker than asking: while old workers still
            # accept, half the questions would reach them.
            self._wait_until(lambda: retiring.replaced() or errors.refused(), deadline)
        worker, heard = self._confirm(generation, deadline, errors, retiring)
        if worker is None:
            reason = f"nginx did not serve generation {generation} within {self.confirm_timeout:g}s"
            return _Missed(reason=reason, emerg=errors.last_emerg(), heard=heard)
        retiring.after_reload(worker or None)
        self._master = retiring.master
        self._wait_retired(retiring, generation)
        return None

    def _send_reload(self, retiring: Retiring) -> _Missed | None:
        """Tell nginx to reload: SIGHUP to its master when keter's reload command is
        nginx's own ``-s reload`` and the master is known (see the module docstring),
        else the command. None on success, else why not."""
        command = self.reload_command
        plain = os.path.basename(command[0]) == "nginx" and tuple(command[-2:]) == ("-s", "reload")
        if plain and retiring.master is not None:
            try:
                os.kill(retiring.master, signal.SIGHUP)
                return None
            except OSError:
                pass  # gone since it was looked at: the command finds nginx's new master
        try:
            error = _run(command)
        except _Hung as exc:
            return _Missed(reason=str(exc), sent=False)
        except OSError as exc:
            return _Missed(reason=f"cannot run {_shell(command)}: {exc}", sent=False)
        return None if error is None else _Missed(reason=error, sent=False, answered=True)

    def _confirm(
        self, generation: int, deadline: float, errors: ErrorLog, retiring: Retiring
    ) -> tuple[int | None, bool]:
        """Poll the status server until a worker started by this reload reports
        ``generation``: (its pid, 0 if nginx did not say; whether nginx answered at all).

        The pid is None on timeout or once nginx logs that it refused the reload. What
        nginx ran before may carry the same number (put back by ``_back_to_live``, or
        an earlier keter run's): a worker from before the reload answering it is no yes.
        """
        listener = next(each for each in self.listeners if not is_tls(each))
        host, port = status_address(listener), listener.port
        expected = str(generation)
        heard = False
        while True:
            answer = probe(host, port)
            heard = heard or answer is not None
            if answer is not None and answer[0] == expected and not retiring.older(answer[1] or 0):
                return answer[1] or 0, True
            if time.monotonic() >= deadline or errors.refused():
                return None, heard
            # An Event wait, not a sleep: stop() cuts the wait short.
            if self._stopping.wait(CONFIRM_INTERVAL):
                return None, heard

    def _wait_retired(self, retiring: Retiring, generation: int) -> None:
        """Wait until no worker from before the reload accepts connections any more.

        Until then a fresh connection may still reach a retiring worker and the old
        config (issue 16: "now serving" must be true for every new connection).
        """
        if not retiring.known:
            if not self._warned_unknown_master:
                self._warned_unknown_master = True
                log.warning(
                    "nginx: cannot find nginx's master process; right after a switch a "
                    "new connection may still reach the previous configuration for a moment"
                )
            return
        deadline = time.monotonic() + self.confirm_timeout
        if not self._wait_until(lambda: not retiring.still_accepting(), deadline):
            log.warning(
                "nginx: generation %d: old workers %s still accept connections after %gs",
                generation,
                retiring.still_accepting(),
                self.confirm_timeout,
            )

    def _wait_until(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Check ``condition`` every few ms until it holds (True) or the deadline or a
        stop comes (False). An Event wait, not a sleep: stop() cuts it short."""
        while not condition():
            if time.monotonic() >= deadline or self._stopping.wait(RETIRE_INTERVAL):
                return False
        return True


def last_generation(config_file: Path) -> int:
    """The generation keter's main file carries from an earlier run (0 if none): the
    supervisor numbers this run's generations after it (keter.supervisor.state)."""
    try:
        with open(config_file, "rb") as f:
            head = f.read(4096)  # the number is on the second line
    except OSError:
        return 0
    return generation_of(head) or 0


def _run(command: Sequence[str]) -> str | None:
    """Run an nginx command; None on success, else a reason quoting nginx's errors.
    Raises _Hung if it did not finish in time (it and its children are killed), OSError
    if it cannot be started."""
    ran = run_short(command, COMMAND_TIMEOUT)
    if ran.returncode is None:
        raise _Hung(f"{_shell(command)} did not finish within {COMMAND_TIMEOUT:g}s")
    if ran.returncode == 0:
        return None
    output = ran.output.strip().splitlines()
    # nginx says why in its [emerg] lines; the rest ("test failed") adds nothing.
    detail = [line for line in output if "[emerg]" in line] or output[-3:]
    text = "; ".join(detail) or "no output"
    # The full command line (with -p/-c paths) is in the config; the program's name is enough here.
    return f"{os.path.basename(command[0])} exited with status {ran.returncode}: {text}"


def _shell(command: Sequence[str]) -> str:
    return " ".join(command)
