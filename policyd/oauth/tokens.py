"""Finding a presented token, of either kind, for revocation and introspection.

Whether an access token is still live is asked of liveness.principal_denial, on the facts
the decisions read (facts.py), so introspection answers exactly as the hub decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from policyd.decision.liveness import principal_denial
from policyd.decision.tokens import TokenError, VerifiedToken, Verifier
from policyd.oauth.rfc6749 import AuthorizationServer, Client, RefreshToken
from policyd.store.facts import Facts


class AccessToken:
    """A genuine, unexpired access token of ours (an RFC 9068 JWT)."""

    def __init__(self, verified: VerifiedToken, facts: Facts, leeway_seconds: float) -> None:
        self.claims: dict[str, Any] = verified.claims
        self.principal = verified.principal
        self.client_id: str = verified.principal.client_id
        self.user_id: str = verified.principal.sub
        self._facts = facts
        # Until when the hub accepts it: the verifier's rule (tokens.py), exp plus its leeway.
        self._until = float(self.claims["exp"]) + leeway_seconds

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return str(self.claims.get("scope", ""))

    def is_expired(self) -> bool:
        return self._until <= time.time()

    def is_revoked(self) -> bool:
        """No longer live: its id revoked, its app unknown or disabled, or its scopes no
        longer consented (the engine's checks 3 to 5)."""
        with self._facts.view() as view:
            return principal_denial(view, self.principal) is not None


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
            with self.facts.view() as view:
                verified = self.verifier.verify(view, value)
        except TokenError:
            return None  # not ours, altered, or expired: nothing to revoke or report
        return AccessToken(verified, self.facts, self.verifier.settings.leeway_seconds)

    def _refresh(self, value: str) -> RefreshToken | None:
        row = self.server.storage.refresh_token(value)
        return None if row is None else RefreshToken(row, value)
