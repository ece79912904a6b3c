"""The host names a certificate is for: its subjectAltName's DNS names.

One reading for the ACME client (an issued certificate must name its host)
and the config check (a TLS listener's certificate should name
``dashboard-host``). ``cryptography`` is imported by the caller that has a
certificate: keter's memory without TLS stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509


def dns_names(leaf: x509.Certificate) -> set[str]:
    """The DNS names ``leaf`` is for, lower-cased; none without a subjectAltName (the
    subject's common name is no name browsers or keter accept)."""
    from cryptography import x509

    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {name.lower() for name in names.get_values_for_type(x509.DNSName)}
