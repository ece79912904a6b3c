"""keter's nginx: the pure renderer, the writer component and the files nginx reads.

- ``render``: config text for the sites keter serves (pure);
- ``writer``: the ``NginxWriter`` actor (copy, render, ``nginx -t``, reload,
  confirm), which refuses a failing site alone;
- ``files``: keter's own copies of every file nginx reads for a site;
- ``blame``: which sites an ``nginx -t`` failure is about;
- ``probe``: which config nginx really serves;
- ``errorlog``: the ``[emerg]`` line of a reload nginx refused.
"""

from keter.nginx.files import hash_password
from keter.nginx.probe import fetch_generation
from keter.nginx.render import STATUS_HOST, ProxyOptions, render, support_dir, upstream_name
from keter.nginx.writer import NginxWriter, last_generation

__all__ = [
    "STATUS_HOST",
    "NginxWriter",
    "ProxyOptions",
    "fetch_generation",
    "hash_password",
    "last_generation",
    "render",
    "support_dir",
    "upstream_name",
]
