"""The state machine of one deploy's process, and the pure rules around it.

Every state change of a deploy goes through ``check_transition``: a change
that is not in ``TRANSITIONS`` is a bug in the monitor and raises. The table
is the whole life of a process; read it top to bottom::

    EXITED --spawn--> STARTING --answers--> RUNNING
                         |  \\                  |
                         |   `--restart fails--+--crash--> BACKOFF --timer--> STARTING
                         |                                    |
                         `--stop / first start fails--> STOPPING <--stop--'
                                                           |
                                            group gone --> EXITED (stopped) or FATAL
"""

from __future__ import annotations

import signal

from keter.messages import ProcessState

S = ProcessState

TRANSITIONS: dict[tuple[ProcessState, ProcessState], str] = {
    # The first start: the program is spawned and its health check begins.
    (S.EXITED, S.STARTING): "first start: spawned",
    # The first start could not even spawn (exec error, unknown user, port taken):
    # nothing runs, so there is nothing to stop.
    (S.EXITED, S.FATAL): "first start: could not even spawn (exec error, unknown user, ...)",
    # It answered its health check (or has none): traffic may go to it.
    (S.STARTING, S.RUNNING): "answered the health check, or has none",
    # A stop was requested, or the first start failed: its group is being stopped.
    (S.STARTING, S.STOPPING): "stop requested, or the first start failed (it gets stopped)",
    # A restart (not a first start) exited or never answered: try again later. Or a
    # stranger answered on its port: wait (no timer) for the supervisor's MoveProcess.
    (S.STARTING, S.BACKOFF): "a restart exited, never answered, or its port was taken",
    # A running version died: it is restarted on the same port after a backoff.
    (S.RUNNING, S.BACKOFF): "crashed: restart after a backoff",
    # A stop was requested (or it crashed while one was pending).
    (S.RUNNING, S.STOPPING): "stop requested, or crashed while a stop was pending",
    # The backoff is over: the same spec is spawned again on the same port.
    (S.BACKOFF, S.STARTING): "backoff over: respawned with the same spec and port",
    # The respawn itself failed (exec error): wait longer and retry. Or a stranger holds
    # its port: wait (no timer) for the supervisor's MoveProcess to a fresh port.
    (S.BACKOFF, S.BACKOFF): "the respawn itself failed, or a stranger holds its port",
    # A stop was requested while waiting: the pending restart is cancelled.
    (S.BACKOFF, S.STOPPING): "stop requested: the pending restart is cancelled",
    # Final: the whole group is gone after a requested stop.
    (S.STOPPING, S.EXITED): "the whole group is gone after a requested stop",
    # Final: the whole group of a failed first start is gone; it is not retried.
    (S.STOPPING, S.FATAL): "the whole group of a failed first start is gone",
}


class IllegalTransition(RuntimeError):
    """A state change that TRANSITIONS does not allow: a bug in the monitor."""


def check_transition(old: ProcessState, new: ProcessState) -> str:
    """Why ``old -> new`` is allowed; raises ``IllegalTransition`` if it is not."""
    try:
        return TRANSITIONS[(old, new)]
    except KeyError:
        raise IllegalTransition(f"{old.value} -> {new.value}") from None


def backoff_delay(failures: int, base: float, cap: float, jitter: float) -> float:
    """Delay before restart number ``failures + 1`` of a crash loop.

    ``base * 2**failures`` capped at ``cap``, scaled into its upper half by
    ``jitter`` (0..1) so apps that crash together do not restart in lockstep.
    """
    delay = min(cap, base * 2 ** min(failures, 64))
    return delay * (0.5 + 0.5 * jitter)


def describe_exit(returncode: int) -> str:
    """``exited with status 3`` or ``killed by SIGKILL``, from a Popen returncode."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"
