"""RFC 7662 token introspection on authlib's IntrospectionEndpoint.

A confidential app (client_secret_basic or client_secret_post) may introspect its own
tokens. `active` is true only for a token the hub would accept right now: genuine,
unexpired, not revoked, its app enabled and its scopes still consented, asked of the
engine's own checks (liveness.py) on the facts decisions read (facts.py). The answer also
carries the live grants, as an extension member:

    "data_sources": [{"name": "edge-historian", "access": "read"}, ...]

(each grant's level capped at the user's own access: facts.View.shared, from which the
engine's lists of granted data sources are made), read from the store at the moment of the
call: grants are not in the token.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc7662 import IntrospectionEndpoint as _IntrospectionEndpoint

from policyd.decision.liveness import pair_denial
from policyd.oauth.rfc6749 import SECRET_METHODS, Client, RefreshToken
from policyd.oauth.tokens import AccessToken, TokenFinder
from policyd.store.facts import View


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
        with self.finder.facts.view() as view:  # one state of the store for the answer
            return self._introspect(view, token)

    def _introspect(self, view: View, token: AccessToken | RefreshToken) -> dict[str, Any]:
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
            # A refresh token is live while its app is enabled and its scopes consented,
            # as the refresh grant requires (its own revocation is RefreshToken.is_revoked).
            if pair_denial(view, user_id, token.client_id, token.row.scopes) is not None:
                return {"active": False}
        payload.update(
            {
                "active": True,
                "client_id": token.client_id,
                "sub": user_id,
                "username": user_id,
                "scope": token.get_scope(),
                "data_sources": live_data_sources(view, user_id, token.client_id),
            }
        )
        return payload


def live_data_sources(view: View, user_id: str, client_id: str) -> list[dict[str, str]]:
    """The `data_sources` member: what (user, app) can use now (facts.View.shared)."""
    return [
        {"name": name, "access": level.label} for name, level in view.shared(user_id, client_id)
    ]
