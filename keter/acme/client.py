"""One certificate order, with the ``acme`` library (certbot's) and ``cryptography``.

The protocol is the library's: keter only keeps the account key, makes a key
and CSR per order, and answers HTTP-01 challenges by writing the key
authorization where nginx serves ``/.well-known/acme-challenge/`` from.

What the CA returns is checked before anyone sees it (``check``): nginx refuses
its whole site for a chain it cannot read or a certificate that does not match
its key, so such a certificate is a failed order, never "issued". The same
checks decide whether a stored certificate is used again at start.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keter.acme import network
from keter.certnames import dns_names
from keter.fsutil import atomic_write

USER_AGENT = "keter"
NETWORK_TIMEOUT = 30  # seconds for one whole request to the CA, its answer included
ORDER_TIMEOUT = 90  # seconds for the CA to validate and issue
ORDER_SECONDS = 300  # seconds for the whole order: a CA cannot hold the component longer
# A new certificate must be good for at least this long: an expired or nearly expired one
# would be due for renewal at once, and ordering it again at once is a retry storm.
MIN_REMAINING = 3600.0
CLOCK_SKEW = 300.0  # a new certificate may start this long after keter's clock
MAX_STORED = 1 << 20  # bytes of a stored chain or key


class BadCertificate(ValueError):
    """What the CA returned (or what is stored) is not a certificate nginx can serve for
    the host with its key."""


@dataclass(frozen=True)
class Ca:
    """Where to order and as whom (``keter.config.AcmeSettings``, the account key)."""

    directory: str
    account_key: bytes  # PEM
    email: str | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    ca_bundle: Path | None = None  # trusted for the directory's HTTPS


@dataclass(frozen=True)
class Issued:
    chain: bytes  # PEM, leaf first
    key: bytes  # PEM
    not_before: float
    not_after: float
    issuer: str
    serial: str


def new_account_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _pem(key)


def new_certificate_key() -> bytes:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


def order(ca: Ca, host: str, challenges_dir: Path, now: float) -> Issued:
    """A certificate for ``host`` by HTTP-01, checked against ``now`` (keter's clock),
    within ``ORDER_SECONDS``; raises ``acme.errors.Error``, ``BadCertificate`` or
    OSError."""
    account = jose.JWKRSA(key=serialization.load_pem_private_key(ca.account_key, None))
    verify: bool | str = str(ca.ca_bundle) if ca.ca_bundle else True
    deadline = time.monotonic() + ORDER_SECONDS
    net = network.BoundedNetwork(
        account,
        user_agent=USER_AGENT,
        verify_ssl=verify,
        request_seconds=NETWORK_TIMEOUT,
        deadline=deadline,
    )
    with contextlib.closing(net):
        chain, key = _order(net, ca, account, host, challenges_dir, deadline)
    issued = check(chain, key, host)
    if issued.not_before > now + CLOCK_SKEW:
        raise BadCertificate(f"the certificate is valid only from {_utc(issued.not_before)}")
    if issued.not_after < now + MIN_REMAINING:
        raise BadCertificate(f"the certificate expires at {_utc(issued.not_after)}, too soon")
    return issued


def _order(
    net: network.BoundedNetwork,
    ca: Ca,
    account: jose.JWKRSA,
    host: str,
    challenges_dir: Path,
    deadline: float,
) -> tuple[bytes, bytes]:
    """The protocol, with the library: the chain the CA returns and the key it is for."""
    directory = client.ClientV2.get_directory(ca.directory, net)
    acme = client.ClientV2(directory, net=net)
    _register(acme, ca, account, directory)

    key = new_certificate_key()
    orderr = acme.new_order(crypto_util.make_csr(key, [host]))
    written = []
    try:
        for authz in orderr.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                # The CA reused one this account proved lately (Let's Encrypt keeps them
                # 30 days): nothing to answer, and answering again fails the order.
                continue
            challenge = next(
                (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                None,
            )
            if challenge is None:
                raise errors.Error(f"the CA offers no HTTP-01 challenge for {host}")
            response, validation = challenge.response_and_validation(account)
            token = challenge.chall.encode("token")
            path = challenges_dir / token
            atomic_write(path, validation.encode(), mode=0o644, durable=False)
            written.append(path)
            acme.answer_challenge(challenge, response)
        seconds = min(ORDER_TIMEOUT, deadline - time.monotonic())
        polling = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
        orderr = acme.poll_and_finalize(orderr, deadline=polling)
    finally:
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return orderr.fullchain_pem.encode(), key


def check(chain: bytes, key: bytes, host: str) -> Issued:
    """The facts of ``chain`` (PEM, leaf first) for ``host`` with ``key``; raises
    ``BadCertificate`` unless every PEM block of it is a certificate, the leaf names
    ``host`` and is for ``key``. The chain returned is re-serialised from what parsed,
    so nothing else the CA sent reaches nginx."""
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise BadCertificate(f"the chain does not parse: {exc}") from None
    if chain.count(b"-----BEGIN") != len(certificates):
        raise BadCertificate("the chain holds PEM blocks that are not certificates")
    leaf = certificates[0]
    try:
        private = serialization.load_pem_private_key(key, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BadCertificate(f"the key does not load: {exc}") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*public) != private.public_key().public_bytes(*public):
        raise BadCertificate("the certificate is not for the key keter made")
    if host.lower() not in dns_names(leaf):
        raise BadCertificate(f"the certificate does not name {host}")
    return Issued(
        chain=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates),
        key=key,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        issuer=leaf.issuer.rfc4514_string(),
        serial=f"{leaf.serial_number:x}",
    )


def stored(chain: Path, key: Path, host: str) -> Issued:
    """The facts of a stored chain and key for ``host``, after the checks a new one
    passes (``check``, ``loadable``); raises ``BadCertificate`` or OSError."""
    issued = check(_read(chain), _read(key), host)
    loadable(chain, key)
    return issued


def loadable(chain: Path, key: Path) -> None:
    """Raises ``BadCertificate`` unless OpenSSL (nginx's library) takes this chain and key
    as a server certificate, as nginx will."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain, key)
    except ssl.SSLError as exc:
        raise BadCertificate(f"OpenSSL refuses it: {exc}") from None


def _read(path: Path) -> bytes:
    """A file keter wrote under ROOT/etc/acme, read with a bound: a chain is KBs."""
    with path.open("rb") as file:
        data = file.read(MAX_STORED + 1)
    if len(data) > MAX_STORED:
        raise BadCertificate(f"{path} is larger than {MAX_STORED} bytes")
    return data


def _utc(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _register(acme: client.ClientV2, ca: Ca, account: jose.JWKRSA, directory) -> None:
    """Create the account, or find it again (the same key): the CA answers with its URL."""
    eab = None
    if ca.eab_kid and ca.eab_hmac_key:
        eab = messages.ExternalAccountBinding.from_data(
            account_public_key=account.public_key(),
            kid=ca.eab_kid,
            hmac_key=ca.eab_hmac_key,
            directory=directory,
        )
    registration = messages.NewRegistration.from_data(
        email=ca.email, terms_of_service_agreed=True, external_account_binding=eab
    )
    try:
        acme.new_account(registration)
    except errors.ConflictError as existing:
        acme.net.account = messages.RegistrationResource(
            uri=existing.location, body=messages.Registration()
        )


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
