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

Two audiences: apps' tokens are for the hub (`audience`), connectors' tokens for the link
(`link_audience`, docs/connectors.md). `for_link` gives the settings of the second; each
audience has its own Verifier, and their cached verifications are kept apart (`cache_tag`),
so a token verified for one audience is never taken from the cache for the other.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import jwt

from policyd.core.model import Principal
from policyd.core.reasons import Denied, Reason
from policyd.store.facts import View
from policyd.store.keys import ALGORITHMS, VERIFYING_STATES, KeyRing, load_public_key

ACCESS_TOKEN_TYP = "at+jwt"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")


@dataclass(frozen=True, slots=True)
class TokenSettings:
    issuer: str
    audience: str
    leeway_seconds: float = 30.0
    max_token_bytes: int = 8192
    ttl_seconds: int = 3600
    # The audience of connectors' tokens (client credentials), checked by connector.attach.
    link_audience: str = "policyd-link"

    def for_link(self) -> TokenSettings:
        """These settings with the link's audience: what connectors' tokens are issued and
        verified with."""
        return replace(self, audience=self.link_audience)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    claims: dict[str, Any]
    principal: Principal


class TokenError(Denied):
    """The token is missing, unreadable or not acceptable."""


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

    def __init__(self, settings: TokenSettings, cache_tag: str = "") -> None:
        """`cache_tag`: what this verifier's cache keys start with; verifiers of different
        audiences need different tags (the hub's has none: its keys are the tokens)."""
        self.settings = settings
        self._tag = cache_tag
        self._jwt = jwt.PyJWT()

    def verify(self, view: View, token: str) -> VerifiedToken:
        """The verified token, or TokenError. Repeat calls are served from the cache."""
        key = self._tag + token if self._tag else token
        cached: VerifiedToken | None = view.cached_token(key)
        if cached is not None:
            return cached
        claims = self._verify(view, token)
        verified = VerifiedToken(claims, principal_of(claims))
        # Cached until exp (+ leeway): after that, verification fails with TOKEN_EXPIRED.
        view.cache_token(key, verified, claims["exp"] + self.settings.leeway_seconds)
        return verified

    def _verify(self, view: View, token: str) -> dict[str, Any]:
        s = self.settings
        if not token:
            raise TokenError(Reason.TOKEN_MISSING, "no access token")
        if len(token) > s.max_token_bytes:
            raise TokenError(
                Reason.TOKEN_MALFORMED, f"token is longer than {s.max_token_bytes} bytes"
            )
        if not token.isascii():  # a JWS is base64url and dots; also makes len() bytes
            raise TokenError(Reason.TOKEN_MALFORMED, "token is not ASCII")
        if token.count(".") != 2:
            raise TokenError(Reason.TOKEN_MALFORMED, "token is not a compact JWS (3 parts)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
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
            # pyjwt checks the signature (and the JSON); the claims are checked below, so
            # that each problem gets its own reason code and typ is checked first.
            decoded = self._jwt.decode_complete(
                token, public_key, algorithms=[key.alg], options=_SIGNATURE_ONLY
            )
        except jwt.InvalidSignatureError:
            raise TokenError(Reason.TOKEN_SIGNATURE_INVALID, "signature does not verify") from None
        except jwt.InvalidTokenError:
            raise TokenError(Reason.TOKEN_MALFORMED, "token payload is not valid") from None
        if decoded["header"].get("typ") not in _ACCESS_TOKEN_TYPES:
            raise TokenError(Reason.TOKEN_TYPE_INVALID, "token is not an access token (typ)")
        claims: dict[str, Any] = decoded["payload"]
        self._check_claims(claims, time.time())
        return claims

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        s = self.settings
        for name in REQUIRED_CLAIMS:
            if name not in claims or claims[name] is None:
                raise TokenError(Reason.TOKEN_CLAIM_INVALID, f"token lacks claim {name!r}")
        for name in ("iss", "sub", "client_id", "jti", "scope"):
            if name in claims and not _is_text(claims[name], empty_ok=name == "scope"):
                raise TokenError(
                    Reason.TOKEN_CLAIM_INVALID, f"claim {name!r} must be a non-empty string"
                )
        for name in ("exp", "iat", "nbf"):
            if name in claims and not _is_time(claims[name]):
                raise TokenError(Reason.TOKEN_CLAIM_INVALID, f"claim {name!r} must be a time")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(_is_text(a) for a in audiences):
            raise TokenError(Reason.TOKEN_CLAIM_INVALID, "claim 'aud' must be string(s)")
        if claims["iss"] != s.issuer:
            raise TokenError(Reason.TOKEN_ISSUER_MISMATCH, "token is from another issuer")
        if s.audience not in audiences:
            raise TokenError(Reason.TOKEN_AUDIENCE_MISMATCH, "token is for another audience")
        if claims["exp"] <= now - s.leeway_seconds:
            raise TokenError(Reason.TOKEN_EXPIRED, "token has expired")
        if claims.get("nbf", 0) > now + s.leeway_seconds:
            raise TokenError(Reason.TOKEN_NOT_YET_VALID, "token is not valid yet (nbf)")
        if claims["iat"] > now + s.leeway_seconds:
            raise TokenError(Reason.TOKEN_NOT_YET_VALID, "token was issued in the future (iat)")


_ACCESS_TOKEN_TYPES = (ACCESS_TOKEN_TYP, "application/at+jwt")
_SIGNATURE_ONLY: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}
_LATEST_TIME = 1e11  # year 5138: anything later is not a real expiry


def _is_text(value: Any, empty_ok: bool = False) -> bool:
    """A string that can be stored and sent on (UTF-8 encodable, no lone surrogates)."""
    if not isinstance(value, str) or (not value and not empty_ok):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < _LATEST_TIME
    )
