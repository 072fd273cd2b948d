"""`policyd connectors ...`: connectors, the plant programs that serve data sources to the hub
over their link (docs/connectors.md)."""

from __future__ import annotations

import json

import click

from policyd.cli.context import Context, cell, emit, json_option, pass_ctx, when


@click.group()
def connectors() -> None:
    """Connectors: programs on a plant's premises that serve data sources to the hub."""


@connectors.command("add")
@click.argument("connector_id")
@click.option("--name", default="", help="A name for people (default: the id).")
@json_option
@pass_ctx
def connectors_add(obj: Context, connector_id: str, name: str, as_json: bool) -> None:
    """Register a connector. Its secret is printed once and stored hashed.

    The id shares one namespace with apps' client ids: neither may take the other's.
    """
    secret = obj.store.add_connector(connector_id, name)
    if as_json:
        click.echo(json.dumps({"connector_id": connector_id, "secret": secret}, sort_keys=True))
        return
    click.echo(f"registered connector {connector_id}")
    click.echo(f"client secret (shown once, store it now): {secret}")


@connectors.command("list")
@json_option
@pass_ctx
def connectors_list(obj: Context, as_json: bool) -> None:
    """List connectors."""
    rows = [c.as_dict() for c in obj.store.list_connectors()]
    emit(rows, ["connector_id", "name", "enabled"], as_json)


@connectors.command("show")
@click.argument("connector_id")
@json_option
@pass_ctx
def connectors_show(obj: Context, connector_id: str, as_json: bool) -> None:
    """Show one connector and the data sources it serves."""
    connector = obj.store.get_connector(connector_id).as_dict()
    connector["data_sources"] = [d["name"] for d in obj.store.list_data_sources(connector_id)]
    if as_json:
        click.echo(json.dumps(connector, sort_keys=True))
        return
    for key, value in connector.items():
        shown = when(value) if key == "created_at" else cell(value)
        click.echo(f"{key + ':':16}{shown}")


@connectors.command("enable")
@click.argument("connector_id")
@pass_ctx
def connectors_enable(obj: Context, connector_id: str) -> None:
    """Enable a connector."""
    obj.store.set_connector_enabled(connector_id, True)
    click.echo(f"enabled connector {connector_id}")


@connectors.command("disable")
@click.argument("connector_id")
@pass_ctx
def connectors_disable(obj: Context, connector_id: str) -> None:
    """Disable a connector: its next connector.attach is denied (CONNECTOR_DISABLED), its
    tokens with it, and it gets no new token."""
    obj.store.set_connector_enabled(connector_id, False)
    click.echo(f"disabled connector {connector_id}")


@connectors.command("rotate-secret")
@click.argument("connector_id")
@json_option
@pass_ctx
def connectors_rotate_secret(obj: Context, connector_id: str, as_json: bool) -> None:
    """Replace a connector's secret; the old one stops working. Tokens already issued stay
    valid until they expire (disable the connector to stop them at once)."""
    secret = obj.store.rotate_connector_secret(connector_id)
    if as_json:
        click.echo(json.dumps({"connector_id": connector_id, "secret": secret}, sort_keys=True))
        return
    click.echo(f"new client secret (shown once, store it now): {secret}")
