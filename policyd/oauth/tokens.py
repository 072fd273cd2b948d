"""Finding a presented token, of either kind, for revocation and introspection."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from policyd.decision.tokens import TokenError, Verifier
from policyd.oauth.rfc6749 import AuthorizationServer, Client, RefreshToken
from policyd.store.facts import Facts


class AccessToken:
    """A genuine, unexpired access token of ours (an RFC 9068 JWT)."""

    def __init__(self, claims: dict[str, Any], server: AuthorizationServer) -> None:
        self.claims = claims
        self.client_id: str = claims["client_id"]
        self.user_id: str = claims["sub"]
        self._server = server

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return str(self.claims.get("scope", ""))

    def is_expired(self) -> bool:
        return float(self.claims["exp"]) <= time.time()

    def is_revoked(self) -> bool:
        """Revoked, or no longer usable: the app disabled or the consent taken back."""
        store = self._server.store
        revoked = store.conn().execute(
            "SELECT 1 FROM revoked_tokens WHERE jti = ?", (self.claims["jti"],)
        )
        if revoked.fetchone() is not None or self._server.query_client(self.client_id) is None:
            return True
        consents = store.list_consents(self.user_id, self.client_id)
        return not consents or not set(self.get_scope().split()) <= set(consents[0]["scopes"])


class TokenFinder:
    def __init__(self, server: AuthorizationServer, facts: Facts, verifier: Verifier) -> None:
        self.server = server
        self.facts = facts
        self.verifier = verifier

    def find(self, value: str, hint: str | None) -> AccessToken | RefreshToken | None:
        """The token, tried as the hinted type first (RFC 7009 section 2.1)."""
        finders: list[Callable[[str], AccessToken | RefreshToken | None]] = [
            self._refresh,
            self._access,
        ]
        if hint == "access_token":
            finders.reverse()
        for find in finders:
            token = find(value)
            if token is not None:
                return token
        return None

    def _access(self, value: str) -> AccessToken | None:
        if value.count(".") != 2:
            return None
        try:
            verified = self.verifier.verify(self.facts.view(), value)
        except TokenError:
            return None  # not ours, altered, or expired: nothing to revoke or report
        return AccessToken(verified.claims, self.server)

    def _refresh(self, value: str) -> RefreshToken | None:
        row = self.server.storage.refresh_token(value)
        return None if row is None else RefreshToken(row, value)
