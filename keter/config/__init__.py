"""The operator's config, ``ROOT/etc/keter-config.yaml``, and the one way to read it.

    model      ``KeterConfig`` and its sections (listeners, nginx, postgres, acme)
    reader     ``load_config`` / ``parse_config``: the table of keys, every problem at once
    values     parsers of single values many keys share (seconds, counts, files, ...)
    listeners  ``listeners``: plain and TLS addresses nginx listens on
    services   the ``nginx``, ``postgres`` and ``acme`` sections
    status     the operator's side: status API and dashboard keys, kept from being open
    ports      where ports could collide (port-range, ephemeral range, listeners), and
               that every address listened on is this machine's
    compat     Keter's own keys: accepted with a warning, or read as Keter reads them

The YAML reading and value checks it shares with ``keter.bundle`` live in
``keter.yamlcheck``; names and hosts are checked by ``keter.names``.
"""

from keter.config.compat import KETER_ONLY_KEYS
from keter.config.model import (
    AcmeSettings,
    ConfigError,
    KeterConfig,
    Listener,
    NginxSettings,
    PostgresSettings,
    SwitchSetting,
)
from keter.config.ports import read_ephemeral_range
from keter.config.reader import CONFIG_NAME, load_config, parse_config

__all__ = [
    "CONFIG_NAME",
    "KETER_ONLY_KEYS",
    "AcmeSettings",
    "ConfigError",
    "KeterConfig",
    "Listener",
    "NginxSettings",
    "PostgresSettings",
    "SwitchSetting",
    "load_config",
    "parse_config",
    "read_ephemeral_range",
]
