"""`policyd keys ...` and `policyd tokens ...`: signing keys and access tokens."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import jwt

from policyd.cli.context import Context, emit, json_option, pass_ctx, when
from policyd.cli.options import (
    read_token,
)
from policyd.core.errors import InvalidInput
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import token_settings

MAX_TOKEN_TTL = 86400  # the longest `tokens issue --ttl`


@click.group()
def keys() -> None:
    """Token signing keys."""


@keys.command("list")
@json_option
@pass_ctx
def keys_list(obj: Context, as_json: bool) -> None:
    """List signing keys and their states."""
    rows: list[dict[str, Any]] = [
        {
            "kid": k.kid,
            "alg": k.alg,
            "state": k.state,
            "created_at": k.created_at,
            "retired_at": k.retired_at,
        }
        for k in obj.store.list_signing_keys()
    ]
    if not as_json:
        for row in rows:
            row["created_at"] = when(row["created_at"])
            row["retired_at"] = when(row["retired_at"])
    emit(rows, ["kid", "alg", "state", "created_at", "retired_at"], as_json)


@keys.command("rotate")
@click.option(
    "--alg",
    type=click.Choice(["ES256", "RS256", "EdDSA"]),
    default=None,
    help="Algorithm of the new key (default: tokens.algorithm).",
)
@pass_ctx
def keys_rotate(obj: Context, alg: str | None) -> None:
    """Make a new signing key; the old one verifies until retired."""
    kid = obj.keyring().rotate(alg or obj.config.tokens.algorithm)
    click.echo(f"new active key {kid}")


@keys.command("retire")
@click.argument("kid")
@pass_ctx
def keys_retire(obj: Context, kid: str) -> None:
    """Retire a key: tokens it signed are denied from the next request on."""
    obj.keyring().retire(kid)
    click.echo(f"retired key {kid}")


@keys.command("jwks")
@pass_ctx
def keys_jwks(obj: Context) -> None:
    """Print the JSON Web Key Set of the keys that verify."""
    click.echo(json.dumps(obj.keyring().jwks(), indent=2))


@click.group()
def tokens() -> None:
    """Access tokens (operator tools for demos and tests)."""


@tokens.command("issue")
@click.option("--user", "user_id", required=True)
@click.option("--app", "client_id", required=True)
@click.option("--scope", "scopes", multiple=True, required=True, help="Repeatable.")
@click.option("--ttl", type=click.IntRange(1, MAX_TOKEN_TTL), help="Lifetime in seconds.")
@pass_ctx
def tokens_issue(
    obj: Context, user_id: str, client_id: str, scopes: tuple[str, ...], ttl: int | None
) -> None:
    """Mint an access token for a user, app and scopes; prints the token only."""
    app = obj.store.get_app(client_id)
    extra = [s for s in scopes if s not in app.allowed_scopes]
    if extra:
        raise InvalidInput(f"app {client_id} is not registered for {', '.join(extra)}")
    token, _claims = issue_token(
        obj.keyring(),
        token_settings(obj.config),
        sub=user_id,
        client_id=client_id,
        scopes=list(scopes),
        ttl_seconds=ttl,
    )
    click.echo(token)


@tokens.command("revoke")
@click.argument("token", default="-")
@click.option("--jti", help="Revoke by token id instead of by token.")
@pass_ctx
def tokens_revoke(obj: Context, token: str, jti: str | None) -> None:
    """Revoke one access token (TOKEN, or - to read it from stdin) until it expires."""
    config = obj.config
    # The longest a token can live: `tokens issue --ttl` goes up to MAX_TOKEN_TTL, past the
    # configured ttl. A revocation that ends sooner is purged while the token still works.
    longest = max(config.tokens.ttl_seconds, MAX_TOKEN_TTL) + config.tokens.leeway_seconds
    if jti:
        obj.store.revoke_token(jti, time.time() + longest)
        click.echo(f"revoked token {jti}")
        return
    raw = read_token(token)
    try:
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidInput("not a JWT access token") from None
    if not isinstance(claims.get("jti"), str):
        raise InvalidInput("token has no jti claim")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, int | float) else time.time() + longest
    obj.store.revoke_token(claims["jti"], expires_at)
    click.echo(f"revoked token {claims['jti']}")
