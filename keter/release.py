"""The release phase: a bundle's ``release`` command, run once per deploy before it starts.

A web app stanza may name ``release:`` (``[path, args...]`` or a path, relative
to ``config/``) and ``release-timeout`` (seconds, default 300). For every
deploy of that bundle, after unpacking and provisioning its database and
before any of its web apps starts, keter:

1. backs up the app's database (``postgres: true`` only; ``keter.backups``), so
   whatever the release does can be undone with ``keter db restore``;
2. runs the release through the process monitor as a one-shot process
   (``RunOnce``: never restarted, no health check), in exactly the
   environment the web app will get (its ``PORT`` is reserved first, the
   database variables, ``KETER_DATA_DIR`` and the ``keter env`` settings
   included), as the app's user (``keter.appdata.app_user``), its output in
   the app's log;
3. starts the version only if the release exited with status 0. A non-zero
   exit, a timeout (TERM, then KILL after ``stop-timeout``) or a command that
   cannot run fails the deploy (``FailureKind.RELEASE``): nothing switches,
   the serving version is untouched, and the release's last lines go to
   keter's log and to the deploy's reason (which ``keter deploy`` prints).

The stages are in ``keter.deploys`` (BACKING_UP, RELEASING); the decisions in
``keter.supervisor``; the helpers here are pure.

**A newer bundle, or the bundle's removal, waits for a running release.**
keter cannot know whether a release is one transaction: a migration
interrupted half-way may leave a schema neither version understands, which
is worse than waiting. So the release is finished (it is bounded by its
``release-timeout``); then its version is dropped without starting (it is
superseded) and the newer bundle deploys, with a backup and a release of
its own. Only stopping keter itself interrupts a release (TERM, then KILL
after ``stop-timeout``); it runs again when keter starts and redeploys.

**Every deploy runs its release, restarts and rollbacks included.** A
restart (``keter restart``, ``keter env set``) and a rollback are deploys
like any other: the database is backed up and the release runs before the
version starts. A release must therefore be idempotent (migration tools are:
they apply only what is missing). A rollback runs the *older* version's
release, which cannot undo a newer schema; ``keter rollback --with-data``
restores the backup taken before the version being undone, then deploys the
older version.
"""

from __future__ import annotations

from pathlib import Path

from keter.bundle import Release

TAIL_IN_REASON = 5  # lines of the release's output quoted in the deploy's reason


def release_command(release: Release) -> tuple[str, ...]:
    return (str(release.exec), *release.args)


def failure_reason(release: Release, folder: Path, reason: str, tail: tuple[str, ...]) -> str:
    """``release bin/migrate exited with status 1; last output: ... | ...``."""
    try:
        shown = release.exec.relative_to(folder.resolve())
    except (ValueError, OSError):
        shown = release.exec
    text = f"release {shown} {reason}"
    lines = [line for line in tail if line.strip()][-TAIL_IN_REASON:]
    if lines:
        text += "; last output: " + " | ".join(lines)
    return text
