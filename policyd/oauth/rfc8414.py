"""RFC 8414 authorization server metadata, served at /.well-known/oauth-authorization-server."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from policyd.oauth.rfc6749 import GRANT_TYPES, SECRET_METHODS, TOKEN_AUTH_METHODS
from policyd.oauth.rfc7636 import METHODS as PKCE_METHODS

AUTHORIZE = "/authorize"
TOKEN = "/token"
REVOKE = "/revoke"
INTROSPECT = "/introspect"
JWKS = "/jwks.json"
SETTINGS = "/settings"


def well_known_path(issuer: str) -> str:
    """Section 3.1: the well-known segment goes between the host and the issuer's path."""
    path = urlsplit(issuer).path.rstrip("/")
    return "/.well-known/oauth-authorization-server" + path


def metadata(issuer: str, scopes: list[str]) -> dict[str, Any]:
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "authorization_endpoint": base + AUTHORIZE,
        "token_endpoint": base + TOKEN,
        "jwks_uri": base + JWKS,
        "scopes_supported": scopes,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": TOKEN_AUTH_METHODS,
        "revocation_endpoint": base + REVOKE,
        "revocation_endpoint_auth_methods_supported": TOKEN_AUTH_METHODS,
        "introspection_endpoint": base + INTROSPECT,
        "introspection_endpoint_auth_methods_supported": SECRET_METHODS,
        "code_challenge_methods_supported": list(PKCE_METHODS),
    }
