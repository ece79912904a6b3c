"""keter's nginx: the pure renderer, the writer component and the files nginx reads.

- ``render``: the text of keter's include file for a set of sites (pure);
- ``writer``: the ``NginxWriter`` actor (write, ``nginx -t``, reload, confirm);
- ``files``: htpasswd files and joined certificates beside the config.
"""

from keter.nginx.files import hash_password, support_dir
from keter.nginx.render import STATUS_HOST, ProxyOptions, render, upstream_name
from keter.nginx.writer import NginxWriter, fetch_generation

__all__ = [
    "STATUS_HOST",
    "NginxWriter",
    "ProxyOptions",
    "fetch_generation",
    "hash_password",
    "render",
    "support_dir",
    "upstream_name",
]
