"""Certificates from an ACME CA for stanzas with ``ssl: acme`` (issue 12).

- ``manager``: the ``AcmeManager`` actor (which hosts, when to order or renew,
  state kept across restarts);
- ``client``: one order with the ``acme`` library, answered by HTTP-01, and the
  checks a certificate passes before nginx is given it;
- ``network``: the HTTP the library uses, each answer bounded in time and size.
"""

from keter.acme.manager import AcmeManager

__all__ = ["AcmeManager"]
