"""`policyd apps ...`: registered apps (OAuth clients)."""

from __future__ import annotations

import json

import click

from policyd.cli.context import Context, cell, emit, json_option, pass_ctx, when
from policyd.core.errors import InvalidInput
from policyd.core.policy import load_policy


@click.group()
def apps() -> None:
    """Registered apps (OAuth clients)."""


@apps.command("add")
@click.argument("client_id")
@click.option("--name", required=True, help="Name shown on the consent screen.")
@click.option("--redirect-uri", "redirect_uris", multiple=True, help="Repeat for each URI.")
@click.option("--scope", "scopes", multiple=True, required=True, help="Allowed scope; repeat.")
@click.option("--public", is_flag=True, help="A public app (no secret; PKCE only).")
@pass_ctx
def apps_add(
    obj: Context,
    client_id: str,
    name: str,
    redirect_uris: tuple[str, ...],
    scopes: tuple[str, ...],
    public: bool,
) -> None:
    """Register an app. A confidential app's secret is printed once and stored hashed."""
    known = load_policy(obj.config.policy.dir).scopes
    unknown = [s for s in scopes if s not in known]
    if unknown:
        raise InvalidInput(
            f"unknown scope(s): {', '.join(unknown)} (the policy defines {', '.join(known)})"
        )
    secret = obj.store.add_app(
        client_id,
        name,
        redirect_uris=list(redirect_uris),
        scopes=list(scopes),
        confidential=not public,
    )
    click.echo(f"registered app {client_id}")
    if secret:
        click.echo(f"client secret (shown once, store it now): {secret}")


@apps.command("list")
@json_option
@pass_ctx
def apps_list(obj: Context, as_json: bool) -> None:
    """List apps."""
    rows = [a.as_dict() for a in obj.store.list_apps()]
    emit(rows, ["client_id", "name", "confidential", "enabled", "allowed_scopes"], as_json)


@apps.command("show")
@click.argument("client_id")
@json_option
@pass_ctx
def apps_show(obj: Context, client_id: str, as_json: bool) -> None:
    """Show one app."""
    app = obj.store.get_app(client_id).as_dict()
    if as_json:
        click.echo(json.dumps(app, sort_keys=True))
        return
    for key, value in app.items():
        shown = when(value) if key == "created_at" else cell(value)
        click.echo(f"{key + ':':16}{shown}")


@apps.command("enable")
@click.argument("client_id")
@pass_ctx
def apps_enable(obj: Context, client_id: str) -> None:
    """Enable an app."""
    obj.store.set_app_enabled(client_id, True)
    click.echo(f"enabled app {client_id}")


@apps.command("disable")
@click.argument("client_id")
@pass_ctx
def apps_disable(obj: Context, client_id: str) -> None:
    """Disable an app: its next request is denied (APP_DISABLED)."""
    obj.store.set_app_enabled(client_id, False)
    click.echo(f"disabled app {client_id}")


@apps.command("rotate-secret")
@click.argument("client_id")
@pass_ctx
def apps_rotate_secret(obj: Context, client_id: str) -> None:
    """Replace a confidential app's secret; the old one stops working."""
    secret = obj.store.rotate_secret(client_id)
    click.echo(f"new client secret (shown once, store it now): {secret}")
