"""A bundle's own config, ``config/keter.yaml``: Keter's two formats, one model.

* ``model``: the validated result, ``BundleConfig`` and its stanza types;
* ``reader``: finding and reading the file, choosing the format;
* ``v04``: Keter 0.4's flat format (``exec``, ``host``, ``static-hosts``, ...);
* ``v10``: Keter 1.0's ``stanzas:`` (webapp, background, static-files,
  redirect, reverse-proxy) and the stanza readers both formats share;
* ``values``: the checks for single values (paths, hosts, numbers, TLS files);
* ``middleware``: Keter's middleware list;
* ``plugins``: the database a bundle asks for (``postgres``, ``plugins.postgres``).
* ``budget``: how much of the shared parts (processes, nginx) one bundle may take.

Everything a bundle says is untrusted: host names, URLs and header values end
up in the nginx config, paths are served or run, so all of them are checked
tightly (names by the shared grammar, ``keter.names``). Keter features nginx
cannot provide (most middleware) are warnings and are skipped.
"""

from __future__ import annotations

from keter.bundle.model import (
    AcmeTls,
    AutoheadConfig,
    Background,
    BasicAuthConfig,
    BundleConfig,
    BundleConfigError,
    HeadersConfig,
    LocalConfig,
    Middleware,
    RateAlgorithm,
    RateIdentifier,
    RateLimiterConfig,
    RateZone,
    Redirect,
    RedirectAction,
    Release,
    ReverseProxy,
    Ssl,
    StaticFiles,
    Throttle,
    TlsConfig,
    WebApp,
)
from keter.bundle.reader import parse_bundle_config, parse_bundle_data
from keter.names import validate_app_name, validate_host

__all__ = [
    "AcmeTls",
    "AutoheadConfig",
    "Background",
    "BasicAuthConfig",
    "BundleConfig",
    "BundleConfigError",
    "HeadersConfig",
    "LocalConfig",
    "Middleware",
    "RateAlgorithm",
    "RateIdentifier",
    "RateLimiterConfig",
    "RateZone",
    "Redirect",
    "RedirectAction",
    "Release",
    "ReverseProxy",
    "Ssl",
    "StaticFiles",
    "Throttle",
    "TlsConfig",
    "WebApp",
    "parse_bundle_config",
    "parse_bundle_data",
    "validate_app_name",
    "validate_host",
]
