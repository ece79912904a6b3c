"""What the tests share, one job per module; fixtures are exposed by tests/conftest.py.

- ``wait``: ``wait_for``, waiting on a condition with a deadline.
- ``bundles``: the one ``make_bundle`` (tarball or unpacked folder), raw tar members, configs,
  ``zero_gzip`` (a gzip bomb of zeros).
- ``tars``: hypothesis strategies for hostile bundles (arbitrary tar headers under gzip).
- ``net``: ``free_port``, requests through nginx (``body``, ``served``, ``get``,
  ``https_get``), concurrent clients (``Load``), a tiny HTTP ``Backend``.
- ``daemon``: a real keter daemon (``KeterDaemon``, fixtures), its status API and CLI.
- ``nginx``, ``postgres``, ``dns``: private servers (own prefix or data dir, own port).
- ``tls``: self-signed certificates.
- ``browser``: headless Chromium driven over the DevTools pipe (the dashboard's tests).
- ``processes``: a real ProcessMonitor under a ``Harness``.
- ``supervisor``: the supervisor driven without threads (``FakeComponent``, ``Rig``).
- ``faults``: the fault suites' ERROR-record checks and their ``Rig``.
- ``samples``: Keter's own sample files.
"""
