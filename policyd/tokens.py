"""RFC 9068 JWT access tokens: issue and verify.

Header `typ: at+jwt` and `kid`; claims iss, sub, aud, exp, iat, jti, client_id and scope
(space-separated). Verification checks, in order: size and shape; `kid` names a key that
still verifies; the header's `alg` is that key's one algorithm (so `none`, HS256 and any
other algorithm substitution fail); the signature; `typ`; the required claims and their
types; iss; aud; exp, nbf and iat with a small leeway. Each failure is a TokenError with
its own reason code.

Verified claims are cached (in the generation-bound caches of facts.py) until the token
expires, so a repeat check skips the signature; any write to the keys or revocations
starts new caches, so the cache never outlives a revocation or a key retirement.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from policyd.facts import View
from policyd.keys import ALGORITHMS, VERIFYING_STATES, KeyRing, load_public_key
from policyd.model import Principal
from policyd.reasons import Reason

ACCESS_TOKEN_TYP = "at+jwt"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")


@dataclass(frozen=True, slots=True)
class TokenSettings:
    issuer: str
    audience: str
    leeway_seconds: float = 30.0
    max_token_bytes: int = 8192
    ttl_seconds: int = 3600


class TokenError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def issue_token(
    keyring: KeyRing,
    settings: TokenSettings,
    *,
    sub: str,
    client_id: str,
    scopes: list[str] | tuple[str, ...],
    ttl_seconds: int | None = None,
    now: float | None = None,
    extra_claims: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Sign an access token with the active key. Returns the token and its claims."""
    key = keyring.signing_key()
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "sub": sub,
        "aud": settings.audience,
        "exp": issued + (settings.ttl_seconds if ttl_seconds is None else ttl_seconds),
        "iat": issued,
        "jti": secrets.token_urlsafe(16),
        "client_id": client_id,
        "scope": " ".join(scopes),
    }
    if extra_claims:
        claims.update(extra_claims)
    token = jwt.encode(
        claims,
        key.private_key,
        algorithm=key.alg,
        headers={"typ": ACCESS_TOKEN_TYP, "kid": key.kid},
    )
    return token, claims


def principal_of(claims: dict[str, Any]) -> Principal:
    return Principal(
        sub=claims["sub"],
        client_id=claims["client_id"],
        scopes=tuple(claims.get("scope", "").split()),
        jti=claims["jti"],
    )


class Verifier:
    """Verifies access tokens against the signing keys in the store."""

    def __init__(self, settings: TokenSettings) -> None:
        self.settings = settings
        self._jwt = jwt.PyJWT()

    def verify(self, view: View, token: str) -> dict[str, Any]:
        """The token's claims, or TokenError. Repeat calls are served from the cache."""
        cached = view.cached_claims(token)
        if cached is not None:
            return cached
        claims = self._verify(view, token)
        # Cached until exp (+ leeway): after that, verification fails with TOKEN_EXPIRED.
        view.cache_claims(token, claims, claims["exp"] + self.settings.leeway_seconds)
        return claims

    def _verify(self, view: View, token: str) -> dict[str, Any]:
        s = self.settings
        if not token:
            raise TokenError(Reason.TOKEN_MISSING, "no access token")
        if len(token) > s.max_token_bytes:
            raise TokenError(
                Reason.TOKEN_MALFORMED, f"token is longer than {s.max_token_bytes} bytes"
            )
        if token.count(".") != 2:
            raise TokenError(Reason.TOKEN_MALFORMED, "token is not a compact JWS (3 parts)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenError(Reason.TOKEN_MALFORMED, "token header is not valid") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenError(
                Reason.TOKEN_ALGORITHM_INVALID, f"algorithm {str(alg)[:20]!r} is not accepted"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError(Reason.TOKEN_KEY_UNKNOWN, "token header has no kid")
        key = view.key(kid)
        if key is None or key.state not in VERIFYING_STATES:
            raise TokenError(Reason.TOKEN_KEY_UNKNOWN, f"unknown or retired key {kid[:40]!r}")
        if alg != key.alg:
            raise TokenError(
                Reason.TOKEN_ALGORITHM_INVALID, f"key {kid} does not verify algorithm {alg}"
            )
        public_key = view.derived("pub:" + kid, lambda: load_public_key(key.public_pem))
        try:
            decoded = self._jwt.decode_complete(
                token,
                public_key,
                algorithms=[key.alg],
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_aud": True,
                    "verify_iss": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                },
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_seconds,
            )
        except jwt.InvalidSignatureError:
            raise TokenError(Reason.TOKEN_SIGNATURE_INVALID, "signature does not verify") from None
        except jwt.ExpiredSignatureError:
            raise TokenError(Reason.TOKEN_EXPIRED, "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError(Reason.TOKEN_NOT_YET_VALID, "token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise TokenError(
                Reason.TOKEN_AUDIENCE_MISMATCH, "token is for another audience"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenError(Reason.TOKEN_ISSUER_MISMATCH, "token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(
                Reason.TOKEN_CLAIM_INVALID, f"token lacks claim {exc.claim!r}"
            ) from None
        except jwt.InvalidIssuedAtError as exc:
            raise TokenError(Reason.TOKEN_CLAIM_INVALID, f"invalid claim: {exc}") from None
        except jwt.DecodeError:
            raise TokenError(Reason.TOKEN_MALFORMED, "token payload is not valid") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(Reason.TOKEN_MALFORMED, f"token is not valid: {exc}") from None
        if decoded["header"].get("typ") not in (ACCESS_TOKEN_TYP, "application/at+jwt"):
            raise TokenError(Reason.TOKEN_TYPE_INVALID, "token is not an access token (typ)")
        claims: dict[str, Any] = decoded["payload"]
        for name in ("sub", "client_id", "jti"):
            if not isinstance(claims[name], str) or not claims[name]:
                raise TokenError(Reason.TOKEN_CLAIM_INVALID, f"claim {name!r} must be a string")
        if not isinstance(claims.get("scope", ""), str):
            raise TokenError(Reason.TOKEN_CLAIM_INVALID, "claim 'scope' must be a string")
        return claims
