"""A local certificate authority for the link: `python -m adapters.link.certs --dir var/tls`.

Writes, with the `cryptography` package, into one folder:

    ca.pem, ca.key            a CA (10 years) that the connector trusts (its `ca_file`)
    server.pem, server.key    the hub's link listener: localhost and 127.0.0.1 (2 years)
    client.pem, client.key    a connector's certificate for mutual TLS (2 years)

Keys are mode 0600. Idempotent: files that exist and are still valid (a certificate that
chains to the CA and is not about to expire) are kept, so a running connector keeps
trusting the hub across `make run`s. For a real plant, use your own PKI.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 730
# A certificate closer than this to its end is made anew.
RENEW_BEFORE = datetime.timedelta(days=30)
HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Files:
    folder: Path

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _load(files: Files, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(files.cert(name).read_bytes())
        key = serialization.load_pem_private_key(files.key(name).read_bytes(), None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return None
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return None
    return cert, key


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _build(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    usage: str,
) -> x509.Certificate:
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=usage == "ca", path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if usage == "ca":
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif usage == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def ensure(folder: str | Path, client_name: str = "connector") -> list[str]:
    """Make the CA, server and client files that are missing or no longer valid; the names
    of the files written (empty when all were kept)."""
    files = Files(Path(folder))
    files.folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    ca = _load(files, "ca")
    new_ca = ca is None
    if ca is None:
        key = ec.generate_private_key(ec.SECP256R1())
        ca = (_build("policyd link CA", key, None, key, days=CA_DAYS, usage="ca"), key)
        _write_key(files.key("ca"), key)
        _write_cert(files.cert("ca"), ca[0])
        written += ["ca.pem", "ca.key"]
    for name, subject, usage in (
        ("server", "localhost", "server"),
        ("client", client_name, "client"),
    ):
        have = _load(files, name)
        if have is not None and _issued_by(have[0], ca[0]) and not new_ca:
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _build(subject, key, ca[0], ca[1], days=LEAF_DAYS, usage=usage)
        _write_key(files.key(name), key)
        _write_cert(files.cert(name), cert)
        written += [f"{name}.pem", f"{name}.key"]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adapters.link.certs",
        description="Create a local CA, a server certificate for localhost/127.0.0.1 and a "
        "client certificate for the link (keeps valid files).",
    )
    parser.add_argument("--dir", default="var/tls", help="the folder (default var/tls)")
    parser.add_argument("--client-name", default="connector", help="the client's common name")
    args = parser.parse_args(argv)
    try:
        written = ensure(args.dir, args.client_name)
    except OSError as exc:
        print(f"certs: error: {args.dir}: {exc.strerror}", file=sys.stderr)
        return 2
    print(
        f"certs: {args.dir}: wrote {', '.join(written)}"
        if written
        else f"certs: {args.dir}: kept the existing files"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
