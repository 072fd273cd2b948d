"""Signing keys for access tokens: generation, rotation, retirement and the JWKS.

Only asymmetric algorithms: ES256 (default), RS256 and EdDSA (Ed25519). Each key has one
algorithm, which is the only one it verifies (the per-key allowlist). The public half lives
in the store so every process can verify; the private half lives in `key_dir/<kid>.pem`,
mode 0600 in a 0700 folder, read only by processes that sign (the CLI, the auth server).

States: `active` signs and verifies (exactly one), `retiring` verifies tokens it signed
before a rotation, `retired` verifies nothing.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from policyd.core.errors import InvalidInput, NotFound
from policyd.store.base import Store

ALGORITHMS = ("ES256", "RS256", "EdDSA")
VERIFYING_STATES = frozenset({"active", "retiring"})

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise InvalidInput(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {alg!r}")


def load_public_key(pem: str) -> PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise InvalidInput("unsupported public key type")
    return key


def public_jwk(kid: str, alg: str, public_pem: str) -> dict[str, Any]:
    key = load_public_key(public_pem)
    algorithm: Any = {"ES256": ECAlgorithm, "RS256": RSAAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


class KeyRing:
    """The signing keys of one store and key folder."""

    def __init__(self, store: Store, key_dir: str | Path) -> None:
        self.store = store
        self.key_dir = Path(key_dir)

    def rotate(self, alg: str = "ES256") -> str:
        """Make a new active key; the previous active key moves to `retiring`."""
        private_key = generate_private_key(alg)
        kid = secrets.token_hex(8)
        self.key_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.key_dir, 0o700)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.key_dir / f"{kid}.pem"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.store.add_signing_key(kid, alg, public_pem.decode(), "active")
        return kid

    def ensure_active(self, alg: str = "ES256") -> str:
        for row in self.store.list_signing_keys():
            if row.state == "active":
                return row.kid
        return self.rotate(alg)

    def retire(self, kid: str) -> None:
        self.store.retire_signing_key(kid)
        path = self.key_dir / f"{kid}.pem"
        if path.exists():
            path.unlink()

    def signing_key(self) -> SigningKey:
        active = [k for k in self.store.list_signing_keys() if k.state == "active"]
        if not active:
            raise NotFound("no active signing key: run `policyd keys rotate`")
        row = active[-1]
        path = self.key_dir / f"{row.kid}.pem"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise NotFound(f"private key of {row.kid} not readable at {path}: {exc}") from exc
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise InvalidInput(f"unsupported private key type in {path}")
        return SigningKey(row.kid, row.alg, key)

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set of every key that verifies (RFC 7517)."""
        return {
            "keys": [
                public_jwk(k.kid, k.alg, k.public_pem)
                for k in self.store.list_signing_keys()
                if k.state in VERIFYING_STATES
            ]
        }
