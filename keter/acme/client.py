"""One certificate order, with the ``acme`` library (certbot's) and ``cryptography``.

The protocol is the library's: keter only keeps the account key, makes a key
and CSR per order, and answers HTTP-01 challenges by writing the key
authorization where nginx serves ``/.well-known/acme-challenge/`` from.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keter.fsutil import atomic_write

USER_AGENT = "keter"
NETWORK_TIMEOUT = 30  # seconds per request to the CA
ORDER_TIMEOUT = 90  # seconds for the CA to validate and issue


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


def order(ca: Ca, host: str, challenges_dir: Path) -> Issued:
    """A certificate for ``host`` by HTTP-01; raises ``acme.errors.Error`` or OSError."""
    account = jose.JWKRSA(key=serialization.load_pem_private_key(ca.account_key, None))
    verify: bool | str = str(ca.ca_bundle) if ca.ca_bundle else True
    net = client.ClientNetwork(
        account, user_agent=USER_AGENT, verify_ssl=verify, timeout=NETWORK_TIMEOUT
    )
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
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        orderr = acme.poll_and_finalize(orderr, deadline=deadline)
    finally:
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
    chain = orderr.fullchain_pem.encode()
    return describe(chain, key)


def describe(chain: bytes, key: bytes) -> Issued:
    """The facts of a stored or new certificate chain."""
    leaf = x509.load_pem_x509_certificate(chain)
    issuer = leaf.issuer.rfc4514_string()
    return Issued(
        chain=chain,
        key=key,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        issuer=issuer,
        serial=f"{leaf.serial_number:x}",
    )


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
