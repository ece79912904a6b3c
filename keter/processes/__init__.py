"""App processes: everything keter does to run an app's programs.

The package's one entry point is the ``ProcessMonitor`` actor; its parts, each
with a small API:

* ``states``  -- the state machine (``TRANSITIONS``) and the restart backoff;
* ``monitor`` -- the actor: starts, health-checks, restarts and stops deploys;
* ``spawn``   -- what a process runs as (user, limits) and the spawn itself;
* ``mailbox`` -- how other threads wake the reader's and the prober's selector;
* ``reader``  -- reads every app's output into its log and notices exits;
* ``applog``  -- per-app log files, rotated by size;
* ``health``  -- HTTP health probes, all in one thread;
* ``groups``  -- process groups: signalling, waiting until one is gone;
* ``records`` -- ``run/processes/``, to stop a killed keter's leftovers;
* ``ports``   -- the supervisor's port pool and "who holds this port".
"""

from keter.processes.monitor import ProcessMonitor

__all__ = ["ProcessMonitor"]
