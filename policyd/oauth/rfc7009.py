"""RFC 7009 token revocation on authlib's RevocationEndpoint.

An unknown, expired or foreign-format token is answered 200 (section 2.2). Revoking a
refresh token revokes its family: the refresh tokens and the access tokens issued with
them (section 2.1 says the server SHOULD). Revoking an access token writes its `jti` to
`revoked_tokens`, so the next decision denies it (TOKEN_REVOKED).
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc7009 import RevocationEndpoint as _RevocationEndpoint

from policyd.oauth.rfc6749 import TOKEN_AUTH_METHODS, RefreshToken
from policyd.oauth.tokens import AccessToken, TokenFinder


class RevocationEndpoint(_RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def __init__(self, finder: TokenFinder) -> None:
        super().__init__(finder.server)
        self.finder = finder

    def query_token(
        self, token_string: str, token_type_hint: str | None
    ) -> AccessToken | RefreshToken | None:
        return self.finder.find(token_string, token_type_hint)

    def revoke_token(self, token: AccessToken | RefreshToken, request: Any) -> None:
        server = self.finder.server
        if isinstance(token, RefreshToken):
            server.storage.revoke_family(token.row.family_id)
        else:
            server.store.revoke_token(token.claims["jti"], float(token.claims["exp"]))
