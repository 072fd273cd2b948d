"""RFC 6749 (OAuth 2.0) on authlib's framework-agnostic server core.

The authorization code grant (with PKCE, rfc7636.py) and the refresh token grant, over the
apps in the policy store. Access tokens are policyd's RFC 9068 JWTs (policyd.decision.tokens);
refresh tokens are opaque, rotated on every use, and the reuse of a rotated one revokes its
whole family (RFC 9700 section 4.14.2). Client authentication: client_secret_basic or
client_secret_post for confidential apps, `none` (with PKCE) for public ones.

The client credentials grant (section 4.4) is for connectors only (docs/connectors.md):
a registered, enabled connector authenticates with its id and secret (client_secret_basic
or client_secret_post) and gets an access token for the link's audience
(tokens.link_audience) with sub = client_id = its id and scope `connector`, and no refresh
token. Apps may not use it, and connectors no other grant: everywhere else `query_client`
knows apps alone.

authlib logs issued tokens at DEBUG; its logger is kept at INFO so they never reach a log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from authlib.oauth2 import AuthorizationServer as _AuthorizationServer
from authlib.oauth2.rfc6749 import (
    ClientMixin,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    TokenMixin,
)
from authlib.oauth2.rfc6749.authenticate_client import ClientAuthentication
from authlib.oauth2.rfc6749.grants import (
    AuthorizationCodeGrant,
    ClientCredentialsGrant,
    RefreshTokenGrant,
)
from starlette.responses import JSONResponse, Response

from policyd.core import metrics
from policyd.core.errors import NotFound
from policyd.decision.liveness import pair_denial
from policyd.decision.tokens import TokenSettings, issue_token
from policyd.oauth.rfc7636 import S256CodeChallenge
from policyd.oauth.scopes import ScopeInfo
from policyd.oauth.storage import CodeRow, CodeState, OAuthStorage, RefreshRow, new_secret
from policyd.store.base import App, Connector, Store
from policyd.store.facts import Facts
from policyd.store.keys import KeyRing

logging.getLogger("authlib").setLevel(logging.INFO)

SECRET_METHODS = ["client_secret_basic", "client_secret_post"]
TOKEN_AUTH_METHODS = [*SECRET_METHODS, "none"]
APP_GRANT_TYPES = ("authorization_code", "refresh_token")
CLIENT_CREDENTIALS = "client_credentials"  # connectors only
GRANT_TYPES = (*APP_GRANT_TYPES, CLIENT_CREDENTIALS)
# The one scope of a connector's token; a client credentials request may ask for it or none.
CONNECTOR_SCOPE = "connector"


@dataclass(frozen=True, slots=True)
class Approval:
    """The signed-in user and what they approved on the consent screen."""

    user_id: str
    scopes: tuple[str, ...] = ()
    data_sources: tuple[str, ...] = ()


class Client(ClientMixin):  # type: ignore[misc]
    def __init__(self, app: App, store: Store) -> None:
        self.app = app
        self.client_id = app.client_id
        self._store = store

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None  # redirect_uri is required: exact match against a registered URI

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The requested scopes the app is registered for; None (invalid_scope) if none."""
        if not scope:
            return None
        allowed = [s for s in dict.fromkeys(scope.split()) if s in self.app.allowed_scopes]
        return " ".join(allowed) or None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.app.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return self._store.verify_client_secret(self.client_id, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.app.confidential:
            return method in SECRET_METHODS
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in APP_GRANT_TYPES


class ConnectorClient(ClientMixin):  # type: ignore[misc]
    """A connector at the token endpoint: client credentials with its secret, nothing else."""

    def __init__(self, connector: Connector, store: Store) -> None:
        self.connector = connector
        self.client_id = connector.connector_id
        self._store = store

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        return CONNECTOR_SCOPE

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return self._store.verify_connector_secret(self.client_id, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in SECRET_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == CLIENT_CREDENTIALS


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    row: CodeRow

    @property
    def code_challenge(self) -> str:
        return self.row.code_challenge

    @property
    def code_challenge_method(self) -> str:
        return self.row.code_challenge_method

    def get_redirect_uri(self) -> str:
        return self.row.redirect_uri

    def get_scope(self) -> str:
        return " ".join(self.row.scopes)


class RefreshToken(TokenMixin):  # type: ignore[misc]
    def __init__(self, row: RefreshRow, value: str) -> None:
        self.row = row
        self.value = value
        self.client_id = row.client_id

    def check_client(self, client: Client) -> bool:
        return self.row.client_id == client.client_id

    def get_scope(self) -> str:
        return " ".join(self.row.scopes)

    def get_expires_in(self) -> int:
        return max(0, int(self.row.expires_at - time.time()))

    def is_expired(self) -> bool:
        return self.row.expires_at <= time.time()

    def is_revoked(self) -> bool:
        return self.row.revoked or self.row.rotated


class CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    server: AuthorizationServer

    def save_authorization_code(self, code: str, request: Any) -> None:
        approval: Approval = request.user
        data = request.payload.data
        self.server.storage.save_code(
            code,
            client_id=request.client.client_id,
            user_id=approval.user_id,
            redirect_uri=request.payload.redirect_uri,
            scopes=list(approval.scopes),
            data_sources=list(approval.data_sources),
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            ttl_seconds=self.server.code_ttl_seconds,
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        state, row = self.server.storage.claim_code(code, client.client_id)
        if state == CodeState.REPLAYED:
            raise InvalidGrantError(
                "The code was used before; the tokens issued from it are revoked."
            )
        if state == CodeState.EXPIRED:
            raise InvalidGrantError("The code has expired.")
        return None if row is None else AuthorizationCode(row)

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        pass  # claimed (marked used) by query_authorization_code, kept to detect replays

    def authenticate_user(self, authorization_code: AuthorizationCode) -> Approval:
        row = authorization_code.row
        return Approval(row.user_id, row.scopes, row.data_sources)


class RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True
    server: AuthorizationServer

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        storage = self.server.storage
        row = storage.refresh_token(refresh_token)
        if row is None or row.revoked or row.expires_at <= time.time():
            return None
        if row.rotated:
            storage.revoke_family(row.family_id)
            _count_reuse()
            raise InvalidGrantError(
                "The refresh token was used before; every token of its family is revoked."
            )
        if row.client_id != self.request.client.client_id:
            return None
        requested = (self.request.payload.scope or "").split()
        if not set(requested) <= set(row.scopes):
            raise InvalidScopeError()
        with self.server.facts.view() as view:
            denied = pair_denial(view, row.user_id, row.client_id, requested or row.scopes)
        if denied is not None:
            return None  # the user took the consent back (or the app is off)
        if not storage.rotate_refresh_token(refresh_token):  # lost a race with a reuse
            storage.revoke_family(row.family_id)
            _count_reuse()
            raise InvalidGrantError("The refresh token was used before.")
        return RefreshToken(row, refresh_token)

    def authenticate_user(self, refresh_token: RefreshToken) -> Approval:
        return Approval(refresh_token.row.user_id, refresh_token.row.scopes)

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        pass  # rotated as it was authenticated


class ConnectorGrant(ClientCredentialsGrant):  # type: ignore[misc]
    """RFC 6749 section 4.4 for connectors: their token for the link (docs/connectors.md)."""

    TOKEN_ENDPOINT_AUTH_METHODS = SECRET_METHODS
    server: AuthorizationServer

    def authenticate_token_endpoint_client(self) -> ConnectorClient | Client:
        # Connectors and apps (the latter only to answer unauthorized_client, not
        # invalid_client, to an app that tries this grant with its good secret).
        client: ConnectorClient | Client = self.server.token_client_auth(
            self.request, self.TOKEN_ENDPOINT_AUTH_METHODS
        )
        return client

    def validate_requested_scope(self) -> None:
        scope = self.request.payload.scope
        if scope and set(scope.split()) != {CONNECTOR_SCOPE}:
            raise InvalidScopeError(f"A connector's token has the scope '{CONNECTOR_SCOPE}' only.")

    def save_token(self, token: dict[str, Any]) -> None:
        # Nothing to keep: no refresh token, and the token's id is revoked like any other.
        metrics.safely(lambda m: m.tokens_issued.labels(CLIENT_CREDENTIALS).inc())


class AuthorizationServer(_AuthorizationServer):  # type: ignore[misc]
    """authlib's server core bound to the policy store, the key ring and Starlette."""

    def __init__(
        self,
        store: Store,
        facts: Facts,
        keyring: KeyRing,
        token_settings: TokenSettings,
        *,
        code_ttl_seconds: float,
        refresh_ttl_seconds: float,
        scopes: Callable[[], dict[str, ScopeInfo]],
    ) -> None:
        super().__init__()
        self.scopes = scopes
        self.store = store
        self.facts = facts  # what decisions read; the refresh grant asks liveness.py of it
        self.storage = OAuthStorage(store)
        self.keyring = keyring
        self.token_settings = token_settings
        self.code_ttl_seconds = code_ttl_seconds
        self.refresh_ttl_seconds = refresh_ttl_seconds
        self.register_token_generator("default", self._generate_token)
        self.register_grant(CodeGrant, [S256CodeChallenge()])
        self.register_grant(RefreshGrant)
        self.register_grant(ConnectorGrant)
        self.token_client_auth = ClientAuthentication(self._query_token_client)

    def validate_requested_scope(self, scope: str | None) -> None:
        """An unknown scope is invalid_scope (RFC 6749 section 4.1.2.1)."""
        if scope and not set(scope.split()) <= set(self.scopes()):
            raise InvalidScopeError()

    def query_client(self, client_id: str) -> Client | None:
        try:
            app = self.store.get_app(client_id)
        except NotFound:
            return None
        return Client(app, self.store) if app.enabled else None

    def _query_token_client(self, client_id: str) -> ConnectorClient | Client | None:
        """The client credentials grant's clients: enabled connectors (a disabled one is
        invalid_client), else apps."""
        try:
            connector = self.store.get_connector(client_id)
        except NotFound:
            return self.query_client(client_id)
        return ConnectorClient(connector, self.store) if connector.enabled else None

    def _generate_token(
        self,
        grant_type: str,
        client: Client | ConnectorClient,
        user: Approval,
        scope: str,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        now = time.time()
        if grant_type == CLIENT_CREDENTIALS:
            token, claims = issue_token(
                self.keyring,
                self.token_settings.for_link(),
                sub=client.client_id,
                client_id=client.client_id,
                scopes=[CONNECTOR_SCOPE],
                now=now,
            )
            return {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": _expires_in(claims, now),
                "scope": CONNECTOR_SCOPE,
            }
        token, claims = issue_token(
            self.keyring,
            self.token_settings,
            sub=user.user_id,
            client_id=client.client_id,
            scopes=scope.split(),
            now=now,
        )
        result: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": _expires_in(claims, now),
            "scope": scope,
        }
        if include_refresh_token:
            result["refresh_token"] = new_secret()
        return result

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        if request.authorization_code is not None:
            family_id = request.authorization_code.row.family_id
            grant_type = "authorization_code"
        else:
            family_id = request.refresh_token.row.family_id
            grant_type = "refresh_token"
        # Our own token, just signed: read back its id and expiry.
        claims = jwt.decode(token["access_token"], options={"verify_signature": False})
        saved = self.storage.save_tokens(
            family_id,
            jti=claims["jti"],
            access_expires_at=claims["exp"],
            refresh_token=token.get("refresh_token"),
            scopes=token["scope"].split(),
            refresh_ttl_seconds=self.refresh_ttl_seconds,
        )
        if not saved:  # its family was revoked after the grant was claimed: never hand out
            raise InvalidGrantError(
                "The grant was used twice; the tokens issued from it are revoked."
            )
        # Handed out now (a token saved too late, above, never is).
        metrics.safely(lambda m: m.tokens_issued.labels(grant_type).inc())

    def create_oauth2_request(self, request: Any) -> Any:
        return request  # already adapted (requests.py)

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("no JSON endpoints")

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        if isinstance(body, dict):
            response: Response = JSONResponse(body, status_code=status)
        else:
            response = Response(body or b"", status_code=status)
        for name, value in headers:
            response.headers[name] = value
        return response

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


def _expires_in(claims: dict[str, Any], now: float) -> int:
    """The whole seconds the token has left (RFC 6749 section 5.1), rounded down: `exp` is
    whole seconds from a truncated `iat`, so a token of `ttl_seconds` issued at 12.9 lives
    until 12 + ttl. A client timing its renewal from `expires_in` never finds the token
    already expired; as Google's, a one-hour token usually says 3599."""
    return max(0, int(claims["exp"] - now))


def _count_reuse() -> None:
    metrics.safely(lambda m: m.refresh_reuse.inc())


def refuse_repeated_parameters(request: Any) -> Response | None:
    """RFC 6749 section 3.2: parameters MUST NOT be included more than once."""
    repeated = request.form.duplicated()
    if not repeated:
        return None
    error = InvalidRequestError(f"Repeated parameter(s): {', '.join(repeated)}.")
    response: Response = JSONResponse(dict(error.get_body()), status_code=400)
    response.headers["Cache-Control"] = "no-store"
    return response
