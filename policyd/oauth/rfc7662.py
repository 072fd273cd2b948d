"""RFC 7662 token introspection on authlib's IntrospectionEndpoint.

A confidential app (client_secret_basic or client_secret_post) may introspect its own
tokens. `active` is true only for a token the hub would accept right now: genuine,
unexpired, not revoked, its app enabled and its scopes still consented. The answer also
carries the live grants, as an extension member:

    "data_sources": [{"name": "edge-historian", "access": "read"}, ...]

(each grant's level capped at the user's own access), read from the store at the moment
of the call: grants are not in the token.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc7662 import IntrospectionEndpoint as _IntrospectionEndpoint

from policyd.core.model import Access
from policyd.oauth.rfc6749 import SECRET_METHODS, Client, RefreshToken
from policyd.oauth.tokens import AccessToken, TokenFinder


class IntrospectionEndpoint(_IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = SECRET_METHODS

    def __init__(self, finder: TokenFinder) -> None:
        super().__init__(finder.server)
        self.finder = finder

    def query_token(
        self, token_string: str, token_type_hint: str | None
    ) -> AccessToken | RefreshToken | None:
        return self.finder.find(token_string, token_type_hint)

    def check_permission(
        self, token: AccessToken | RefreshToken, client: Client, request: Any
    ) -> bool:
        return token.client_id == client.client_id

    def introspect_token(self, token: AccessToken | RefreshToken) -> dict[str, Any]:
        server = self.finder.server
        if isinstance(token, AccessToken):
            user_id = token.user_id
            payload: dict[str, Any] = {
                "token_type": "Bearer",
                "jti": token.claims["jti"],
                "iat": token.claims["iat"],
                "exp": token.claims["exp"],
                "iss": token.claims["iss"],
                "aud": token.claims["aud"],
            }
        else:
            user_id = token.row.user_id
            payload = {"exp": int(token.row.expires_at)}
            if token.row.client_id and server.query_client(token.client_id) is None:
                return {"active": False}
        payload.update(
            {
                "active": True,
                "client_id": token.client_id,
                "sub": user_id,
                "username": user_id,
                "scope": token.get_scope(),
                "data_sources": live_data_sources(server.store, user_id, token.client_id),
            }
        )
        return payload


def live_data_sources(store: Any, user_id: str, client_id: str) -> list[dict[str, str]]:
    """The grants of (user, app) that work now: each at min(grant, the user's own access)."""
    own = {row["data_source"]: Access.parse(row["role"]) for row in store.list_user_access(user_id)}
    result = []
    for grant in store.list_grants(user_id, client_id):
        role = own.get(grant.data_source)
        if role is not None:
            result.append({"name": grant.data_source, "access": min(grant.access, role).label})
    return result
