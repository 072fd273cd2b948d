"""`policyd consents ...` and `policyd grants ...`: a user's approvals of an app."""

from __future__ import annotations

import click

from policyd.cli.context import Context, access_option_callback, emit, json_option, pass_ctx, when
from policyd.core.model import Access


@click.group()
def consents() -> None:
    """Users' consents to apps (the scopes they approved)."""


@consents.command("add")
@click.argument("user_id")
@click.argument("client_id")
@click.option("--scope", "scopes", multiple=True, required=True, help="Repeatable.")
@pass_ctx
def consents_add(obj: Context, user_id: str, client_id: str, scopes: tuple[str, ...]) -> None:
    """Record a consent (normally written by the consent screen)."""
    obj.store.set_consent(user_id, client_id, list(scopes))
    click.echo(f"user {user_id} consented to {client_id}: {' '.join(scopes)}")


@consents.command("list")
@click.option("--user", "user_id")
@click.option("--app", "client_id")
@json_option
@pass_ctx
def consents_list(obj: Context, user_id: str | None, client_id: str | None, as_json: bool) -> None:
    """List consents."""
    emit(obj.store.list_consents(user_id, client_id), ["user_id", "client_id", "scopes"], as_json)


@consents.command("revoke")
@click.argument("user_id")
@click.argument("client_id")
@pass_ctx
def consents_revoke(obj: Context, user_id: str, client_id: str) -> None:
    """Revoke a consent, the pair's grants and refresh tokens (like Disconnect on the
    Connected apps page); the app's next request is denied."""
    done = obj.store.disconnect(user_id, client_id, missing_ok=False)
    families = done.families
    click.echo(
        f"revoked consent of {user_id} for {client_id}, {done.grants} grant(s)"
        f" and {families} refresh-token famil{'y' if families == 1 else 'ies'}"
    )


@click.group()
def grants() -> None:
    """Grants: a user's approval of an app on one data source."""


@grants.command("add")
@click.argument("user_id")
@click.argument("client_id")
@click.argument("data_source")
@click.option("--access", default="read", callback=access_option_callback, help="read or write.")
@pass_ctx
def grants_add(
    obj: Context, user_id: str, client_id: str, data_source: str, access: Access
) -> None:
    """Grant an app a user's data source (normally written by the consent screen)."""
    obj.store.add_grant(user_id, client_id, data_source, access)
    click.echo(f"granted {data_source} ({access.label}) to {client_id} for {user_id}")


@grants.command("list")
@click.option("--user", "user_id")
@click.option("--app", "client_id")
@click.option("--data-source")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked grants.")
@json_option
@pass_ctx
def grants_list(
    obj: Context,
    user_id: str | None,
    client_id: str | None,
    data_source: str | None,
    include_revoked: bool,
    as_json: bool,
) -> None:
    """List live grants (or all with --all)."""
    rows = [
        g.as_dict()
        for g in obj.store.list_grants(
            user_id, client_id, data_source, include_revoked=include_revoked
        )
    ]
    if not as_json:
        for row in rows:
            row["granted_at"] = when(row["granted_at"])
            row["revoked_at"] = when(row["revoked_at"])
    emit(
        rows, ["user_id", "client_id", "data_source", "access", "granted_at", "revoked_at"], as_json
    )


@grants.command("revoke")
@click.argument("user_id")
@click.argument("client_id")
@click.argument("data_source")
@pass_ctx
def grants_revoke(obj: Context, user_id: str, client_id: str, data_source: str) -> None:
    """Revoke a grant; the app's next request for the data source is denied."""
    obj.store.revoke_grant(user_id, client_id, data_source)
    click.echo(f"revoked {data_source} from {client_id} for {user_id}")
