"""The supervisor: the one place that decides what is deployed.

It owns the components (watcher, unpacker, process monitor, nginx writer,
switch, postgres provisioner, backups, acme, stats, status: see
``keter.supervisor.components``) and every app's state. Components report facts
into its inbox; it decides and sends them commands. ``dispatch(message)`` is
the whole behaviour: a function of (state, message) that changes the state and
``tell``s components. Nothing here blocks, sleeps or starts a thread, so
``tests/test_supervisor.py`` drives it with scripted messages and fake
components; ``keter.daemon`` runs it for real.

A deploy of one bundle version walks the stages of ``keter.deploys`` (read
that module's table first), each step finished by a component's reply:

    UNPACKING     -> BundleUnpacked   (unpacker)
    PROVISIONING  -> DatabaseReady    (postgres provisioner, only for postgres: true)
    BACKING_UP    -> BackupTaken      (backups, only with a release and postgres: true)
    RELEASING     -> RunFinished      (process monitor, only with a release: keter.release)
    STARTING      -> ProcessHealthy   (process monitor, once for every web app)
    POINTING      -> ServicesPointed  (switch: the kernel leads its stable addresses to it)
    SWITCHING     -> NginxApplied     (nginx writer: written, tested, reloaded, confirmed)
    SERVING          the old version drains: Drained (switch) or drain-seconds, then retires

In kernel mode (``keter.switch``) nginx proxies each web app to a stable
address for as long as its routes stay the same; a redeploy with the same
routes is POINTING alone, without an nginx reload. A first deploy, or one that
changes routes, gets stable addresses of its own and then an nginx generation.
Without the kernel mode (no nftables, or ``switch: reload``) every switch is
an nginx generation with the version's own ports, as in the original Keter.

Any failure on the way stops the new version and removes its folder; the
version that was serving is never touched. An app has at most one version
serving and one on its way (``next``); a newer bundle supersedes ``next``,
except while the kernel or nginx is already switching to it, or its release
runs: then the newer bundle waits for that to finish (only the latest waiting
bundle is kept).

Background workers are processes of their deploy like its web apps, each
with an id of its own from the same counter as deploy ids. A version's
workers start once it serves and stop with it; a worker that crashed more
often than its ``restart-count`` is stopped for good.

Failures of keter itself (``ComponentFailed``, or a bug in a handler here)
fail only the deploy the failing message was about; a component is restarted
(one-for-one, with backoff); only repeated failures make keter stop.

One module per concern; ``core`` is the ``Supervisor`` class, the others each
add one part of it (a mixin over the state in ``state``):

    core        the loop's API (start, dispatch, timers) and the one ``match``
    state       what it holds: apps, deploys by id, ports, hosts, bookkeeping
    components  the components it owns (``Components``, ``Teller``)
    timers      messages it sends itself after a delay (drains, restarts, moves, retries)
    intake      bundles arrive or go: begin, supersede, remove; checks after unpacking
    conflicts   hosts other apps claim; a bundle refused for one waits, then deploys
    preparing   settings and ports, backup before a release, the release itself
    starting    spawning web apps and workers; a web app whose port was taken
    processes   the process monitor's facts: healthy, failed, crashed, stopped
    switching   leading traffic to a healthy deploy (kernel or nginx), SERVING
    routing     nginx generations: what nginx routes, one generation in flight
    rollout     watched rollout: a version that made things worse goes back
    endings     failing, abandoning, draining, retiring, ending; app removal
    restarts    failures of keter itself: component restarts, handler bugs
    reports     what the status component hears: snapshots, events, outcomes
    database    a deploy retried while the database server is down (nothing serving);
                an operator's ``keter db backup`` / ``restore`` requests
"""

from keter.supervisor.components import Components, Teller
from keter.supervisor.core import Supervisor
from keter.supervisor.restarts import RESTART_LIMIT, RESTART_WINDOW

__all__ = ["RESTART_LIMIT", "RESTART_WINDOW", "Components", "Supervisor", "Teller"]
