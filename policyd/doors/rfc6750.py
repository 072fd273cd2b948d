"""RFC 6750 bearer tokens: reading the `Authorization` header and writing the challenge.

Every door reads the token with `token_from` (the ASGI door through `bearer_token`, which
also refuses two Authorization headers; the Envoy doors from their header maps). Only the
`Bearer` scheme (case-insensitive, RFC 6750 section 2.1) carries a token; any other scheme,
or no header, means no token. The challenge is `Bearer` alone when the request had no
token (section 3.1: no error code then), else `Bearer error="<code>"`.
"""

from __future__ import annotations

from collections.abc import Iterable


class AmbiguousAuthorization(ValueError):
    """More than one Authorization header: which one the app would read is not knowable."""


def token_from(authorization: str) -> str:
    """The bearer token of one Authorization header's value, or "" (empty, another scheme)."""
    scheme, _, credentials = authorization.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The bearer token of an ASGI header list, or "" when there is none."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if not values:
        return ""
    if len(values) > 1:
        raise AmbiguousAuthorization("more than one Authorization header")
    return token_from(values[0].decode("latin-1"))


def challenge(error: str | None) -> str:
    """The WWW-Authenticate value: `Bearer`, or `Bearer error="<error>"`."""
    return "Bearer" if error is None else f'Bearer error="{error}"'
