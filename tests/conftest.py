"""The fixtures every test module may use; their code lives in tests/support/.

pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode), so the
helpers import as the ``support`` package: ``from support.wait import wait_for``.
"""

import pytest
from support.browser import browser  # noqa: F401  (headless Chromium, for the dashboard)
from support.daemon import keter, keter_factory, open_base  # noqa: F401  (a real keter daemon)
from support.dns import private_dns  # noqa: F401  (a private DNS server)
from support.nginx import private_nginx  # noqa: F401  (a private nginx)
from support.outside import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (no writes outside)
from support.postgres import private_postgres  # noqa: F401  (a private PostgreSQL)
from support.processes import make_monitor  # noqa: F401  (real ProcessMonitors)
from support.supervisor import rig, serving  # noqa: F401  (the supervisor with fake components)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (``item.rep_call``): fixtures read it at
    teardown to show what helps with a failure (keter's log, see support.daemon)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
