"""The complete environment an app process gets (nothing else leaks from keter's own).

Precedence, lowest first: a fixed base (PATH, LANG, HOME), the global ``env``,
the ``forward-env`` names keter's own environment has, the bundle's ``env``,
then keter's own variables, which always win: ``PORT`` (also under every
``port-env-vars`` name), ``APPROOT`` and the database variables. keter's must win
because the health check probes the port keter chose.
"""

from __future__ import annotations

import os
import pwd

from keter.bundle import Background, WebApp
from keter.config import KeterConfig
from keter.messages import DbInfo
from keter.postgres import db_env
from keter.routes import approot

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def app_environment(
    config: KeterConfig, webapp: WebApp, port: int, db: DbInfo | None
) -> dict[str, str]:
    """A web app's environment."""
    env = _base_environment(config, webapp.forward_env)
    env.update(webapp.env)
    for name in ("PORT", *webapp.port_env_vars):
        env[name] = str(port)
    secure = webapp.ssl is not False
    env["APPROOT"] = approot(webapp.hosts[0], secure=secure, settings=config)
    if db is not None:
        env.update(db_env(db))
    return env


def worker_environment(
    config: KeterConfig, worker: Background, db: DbInfo | None
) -> dict[str, str]:
    """A background worker's environment: as an app's, without PORT and APPROOT."""
    env = _base_environment(config, worker.forward_env)
    env.update(worker.env)
    if db is not None:
        env.update(db_env(db))
    return env


def _base_environment(config: KeterConfig, forward: tuple[str, ...]) -> dict[str, str]:
    home = "/"
    if config.setuid:
        home = pwd.getpwnam(config.setuid).pw_dir
    env = {"PATH": BASE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": home}
    env.update(config.env)
    # Only what the bundle names: the rest of keter's environment stays out.
    env.update({name: os.environ[name] for name in forward if name in os.environ})
    return env
