"""`policyd users ...` and `policyd datasources ...`: users, data sources, users' access."""

from __future__ import annotations

import sys

import click

from policyd.cli.context import Context, access_option_callback, emit, json_option, pass_ctx
from policyd.core.errors import InvalidInput, NotFound
from policyd.core.model import Access
from policyd.oauth.passwords import hash_password
from policyd.oauth.storage import OAuthStorage


@click.group()
def users() -> None:
    """Users (resource owners)."""


password_stdin_option = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
password_prompt_option = click.option(
    "--password", "prompt_password", is_flag=True, help="Prompt for the password (not echoed)."
)


def _read_password(from_stdin: bool, prompt: bool) -> str | None:
    """The new password from stdin or a prompt; never from the command line."""
    if from_stdin and prompt:
        raise click.UsageError("give at most one of --password-stdin and --password")
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if prompt:
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    return None


@users.command("add")
@click.argument("user_id")
@click.option("--name", default="", help="Display name.")
@password_stdin_option
@password_prompt_option
@pass_ctx
def users_add(
    obj: Context, user_id: str, name: str, password_stdin: bool, prompt_password: bool
) -> None:
    """Add a user; with a password, they can sign in to the authorization server.

    The password is hashed with argon2id; it is read from stdin or a prompt, never taken
    as an argument (arguments show in the process list and the shell history).
    """
    password = _read_password(password_stdin, prompt_password)
    hashed = hash_password(password) if password is not None else None
    obj.store.add_user(user_id, name)
    if hashed is not None:
        OAuthStorage(obj.store).set_password_hash(user_id, hashed)
    click.echo(f"added user {user_id}" + (" with a password" if hashed else ""))


@users.command("set-password")
@click.argument("user_id")
@password_stdin_option
@pass_ctx
def users_set_password(obj: Context, user_id: str, password_stdin: bool) -> None:
    """Set (or replace) a user's sign-in password: from stdin, else a prompt."""
    password = _read_password(password_stdin, not password_stdin)
    assert password is not None
    if not OAuthStorage(obj.store).set_password_hash(user_id, hash_password(password)):
        raise NotFound(f"no user {user_id!r}")
    click.echo(f"set the password of {user_id}")


@users.command("list")
@json_option
@pass_ctx
def users_list(obj: Context, as_json: bool) -> None:
    """List users."""
    emit(obj.store.list_users(), ["user_id", "name"], as_json)


@click.group()
def datasources() -> None:
    """Data sources and users' own access to them."""


@datasources.command("add")
@click.argument("name")
@click.option("--description", default="")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--connector", metavar="ID", help="The connector that serves it (default: the hub).")
@pass_ctx
def datasources_add(
    obj: Context, name: str, description: str, labels: tuple[str, ...], connector: str | None
) -> None:
    """Add a data source."""
    parsed: dict[str, str] = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label must be KEY=VALUE, not {label!r}")
        parsed[key] = value
    obj.store.add_data_source(name, description, parsed, connector)
    click.echo(f"added data source {name}" + (f" served by {connector}" if connector else ""))


@datasources.command("list")
@json_option
@pass_ctx
def datasources_list(obj: Context, as_json: bool) -> None:
    """List data sources."""
    emit(obj.store.list_data_sources(), ["name", "description", "labels", "connector"], as_json)


@datasources.command("set-connector")
@click.argument("name")
@click.argument("connector_id", required=False)
@click.option("--none", "to_hub", is_flag=True, help="Served by no connector: the hub itself.")
@pass_ctx
def datasources_set_connector(
    obj: Context, name: str, connector_id: str | None, to_hub: bool
) -> None:
    """Say which connector serves a data source (or, with --none, that none does).

    The connector that served it before is denied it from its next connector.attach on
    (DATA_SOURCE_NOT_OWNED).
    """
    if bool(connector_id) == to_hub:
        raise click.UsageError("give exactly one of CONNECTOR_ID and --none")
    obj.store.set_data_source_connector(name, connector_id)
    if connector_id:
        click.echo(f"data source {name} is served by connector {connector_id}")
    else:
        click.echo(f"data source {name} is served by no connector")


@datasources.command("give-access")
@click.argument("user_id")
@click.argument("data_source")
@click.option("--role", default="read", callback=access_option_callback, help="read or write.")
@pass_ctx
def datasources_give_access(obj: Context, user_id: str, data_source: str, role: Access) -> None:
    """Give a user their own access to a data source."""
    obj.store.set_user_access(user_id, data_source, role)
    click.echo(f"user {user_id} has {role.label} access to {data_source}")


@datasources.command("remove-access")
@click.argument("user_id")
@click.argument("data_source")
@pass_ctx
def datasources_remove_access(obj: Context, user_id: str, data_source: str) -> None:
    """Take a user's own access away; apps acting for the user lose it too."""
    obj.store.remove_user_access(user_id, data_source)
    click.echo(f"removed access of {user_id} to {data_source}")


@datasources.command("access")
@click.option("--user", "user_id")
@json_option
@pass_ctx
def datasources_access(obj: Context, user_id: str | None, as_json: bool) -> None:
    """List users' own access to data sources."""
    emit(obj.store.list_user_access(user_id), ["user_id", "data_source", "role"], as_json)
