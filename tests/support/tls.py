"""Self-signed certificates for the tests, made with the openssl command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certificate(folder: Path, name: str, *hosts: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``hosts`` (SAN) and its key: ``(certificate, key)``.

    EC P-256 keys: generating one takes milliseconds, unlike RSA.
    """
    folder.mkdir(parents=True, exist_ok=True)
    certificate, key = folder / f"{name}.crt", folder / f"{name}.key"
    names = ",".join(f"DNS:{host}" for host in hosts)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={hosts[0]}", "-addext", f"subjectAltName={names}",
         "-keyout", str(key), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate, key


def ca_certificate(
    folder: Path, host: str, *, issuer: str, not_before: float, not_after: float
) -> tuple[Path, Path]:
    """A leaf for ``host`` (SAN) signed by a throwaway CA whose subject is the RFC 4514
    name ``issuer``, valid between the two times, and its key: ``(chain, key)``, named
    like keter.acme names its own. The chain is the leaf then the CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def when(seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name.from_rfc4514_string(issuer)
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(when(not_before - 86400)).not_valid_after(when(not_after + 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(f"CN={host}"))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(when(not_before)).not_valid_after(when(not_after))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    chain_path, key_path = (
        folder / f"{leaf.serial_number:x}.crt",
        folder / f"{leaf.serial_number:x}.key",
    )
    pem = serialization.Encoding.PEM
    chain_path.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return chain_path, key_path
