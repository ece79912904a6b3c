"""The complete environment an app process gets (nothing else leaks from keter's own).

Precedence, lowest first:

1. a fixed base (PATH, LANG, HOME);
2. the global ``env`` of keter-config.yaml;
3. the ``forward-env`` names keter's own environment has;
4. the bundle's ``env``;
5. the app's settings, ``keter env set`` (``keter.envstore``): they change
   without a new bundle, so they override what the bundle ships;
6. keter's own variables, which always win: ``PORT`` (also under every
   ``port-env-vars`` name), ``APPROOT``, ``KETER_DATA_DIR`` and the database
   variables. keter's must win because the health check probes the port keter
   chose and the database is the one keter provisioned.

A web app's release command (``release:``) gets exactly its web app's
environment, ``PORT`` included (the port is reserved before the release
runs); a background worker gets the same without ``PORT`` and ``APPROOT``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from keter.bundle import Background, WebApp
from keter.bundle.values import never_forwarded
from keter.config import KeterConfig
from keter.messages import DbInfo
from keter.postgres import db_env
from keter.routes import approot

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def app_environment(
    config: KeterConfig,
    webapp: WebApp,
    port: int,
    db: DbInfo | None,
    *,
    settings: Mapping[str, str] | None = None,
    data_dir: Path | None = None,
) -> dict[str, str]:
    """A web app's environment (and its release command's)."""
    env = _base_environment(config, webapp.forward_env)
    env.update(webapp.env)
    env.update(settings or {})
    for name in ("PORT", *webapp.port_env_vars):
        env[name] = str(port)
    secure = webapp.ssl is not False
    env["APPROOT"] = approot(webapp.hosts[0], secure=secure, settings=config)
    _keter_own(env, db, data_dir)
    return env


def worker_environment(
    config: KeterConfig,
    worker: Background,
    db: DbInfo | None,
    *,
    settings: Mapping[str, str] | None = None,
    data_dir: Path | None = None,
) -> dict[str, str]:
    """A background worker's environment: as an app's, without PORT and APPROOT."""
    env = _base_environment(config, worker.forward_env)
    env.update(worker.env)
    env.update(settings or {})
    _keter_own(env, db, data_dir)
    return env


def _keter_own(env: dict[str, str], db: DbInfo | None, data_dir: Path | None) -> None:
    if data_dir is not None:
        env["KETER_DATA_DIR"] = str(data_dir)
    if db is not None:
        env.update(db_env(db))


def _base_environment(config: KeterConfig, forward: tuple[str, ...]) -> dict[str, str]:
    home = "/"
    if config.setuid:
        home = pwd.getpwnam(config.setuid).pw_dir
    env = {"PATH": BASE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": home}
    env.update(config.env)
    # Only what the bundle names, and never keter's own secrets: the rest stays out.
    forwarded = [name for name in forward if name in os.environ and not never_forwarded(name)]
    env.update({name: os.environ[name] for name in forwarded})
    return env
