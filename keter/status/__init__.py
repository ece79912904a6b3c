"""The status component: what keter is doing, for operators, over HTTP.

One job per module:

- ``component``: the actor. The supervisor's facts (``AppChanged``,
  ``AppGone``, ``DeployFinished``, ``AppEvent``, keter.acme's
  ``CertificateState``) come in; it updates the board, the metrics, the
  history and the archive.
- ``views``: the ``StatusBoard`` (apps, recent events, history, certificates) and the JSON
  views the API serves from it.
- ``metrics``: the Prometheus metrics at ``/metrics``.
- ``redeploy``: restart and rollback, run in the actor's thread.
- ``servers``: the listeners, ``ROOT/run/keter.sock`` (mode 0660, group root
  or ``status-group``) and the optional TCP ``status-listen``.
- ``handler``: HTTP routing, the dashboard's pages (``keter/dashboard/``).
- ``checks``: what every request must pass (Host; a login on TCP, by
  ``dashboard-users`` or ``ROOT/etc/status-token``; the token and Origin for writes).
"""

from keter.status.checks import TOKEN_HEADER
from keter.status.component import StatusServer
from keter.status.servers import socket_path

__all__ = ["TOKEN_HEADER", "StatusServer", "socket_path"]
