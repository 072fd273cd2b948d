"""The demo data that `make run` seeds: one app, two users, three data sources, some grants,
and one connector (`plant-connector`, which serves plant-mes to the hub over the link).

`policyd demo seed` writes it (and a token for alice); tests and benchmarks use the data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import click

from policyd.cli.context import Context, pass_ctx
from policyd.core.errors import Conflict
from policyd.core.model import Access
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import token_settings
from policyd.oauth.passwords import hash_password
from policyd.oauth.storage import OAuthStorage
from policyd.store.base import Store
from policyd.store.keys import KeyRing

DEMO_APP = "demo-app"
DATA_SOURCES = {
    "edge-historian": ("Process historian at the edge gateway", {"site": "north"}),
    "plant-mes": ("Manufacturing execution system", {"site": "north"}),
    "lab-lims": ("Laboratory information system", {"class": "safety"}),
}
USERS = {"alice": "Alice Operator", "bob": "Bob Engineer"}
# Sign-in passwords of the demo users (for the authorization server's pages). Demo only.
PASSWORDS = {"alice": "alice-demo", "bob": "bob-demo"}
USER_ACCESS = {
    "alice": {"edge-historian": Access.WRITE, "plant-mes": Access.READ, "lab-lims": Access.READ},
    "bob": {"edge-historian": Access.READ, "plant-mes": Access.READ},
}
CONSENTS = {"alice": ["UserInfo", "DataRead", "DataWrite"], "bob": ["UserInfo", "DataRead"]}
# The on-premises connector of the demo and the data sources it serves (docs/link.md).
DEMO_CONNECTOR = "plant-connector"
CONNECTOR_SOURCES = {DEMO_CONNECTOR: ["plant-mes"]}
SECRET_FILE = f"{DEMO_CONNECTOR}.secret"
GRANTS = {
    "alice": {"edge-historian": Access.WRITE, "lab-lims": Access.READ},
    "bob": {"plant-mes": Access.READ},
}


def seed(store: Store, keyring: KeyRing, algorithm: str = "ES256") -> list[str]:
    """Create whatever of the demo is missing. Returns what was created, one line each."""
    created: list[str] = []
    try:
        store.add_app(
            DEMO_APP,
            "Demo Historian Viewer",
            redirect_uris=["http://127.0.0.1:8090/callback"],
            scopes=["UserInfo", "DataRead", "DataWrite", "AccountDebit"],
            confidential=False,
        )
        created.append(f"app {DEMO_APP}")
    except Conflict:
        pass
    for user_id, name in USERS.items():
        try:
            store.add_user(user_id, name)
            OAuthStorage(store).set_password_hash(user_id, hash_password(PASSWORDS[user_id]))
            created.append(f"user {user_id}")
            created.append(f"sign-in password {PASSWORDS[user_id]!r} for {user_id}")
        except Conflict:
            pass
    for ds, (description, labels) in DATA_SOURCES.items():
        try:
            store.add_data_source(ds, description, labels)
            created.append(f"data source {ds}")
        except Conflict:
            pass
    for connector_id, served in CONNECTOR_SOURCES.items():
        try:
            store.add_connector(connector_id, "Demo plant connector")  # secret: demo_seed
        except Conflict:
            continue  # an operator may have moved its data sources since: leave them
        for ds in served:
            store.set_data_source_connector(ds, connector_id)
        created.append(f"connector {connector_id} serving {', '.join(served)}")
    if created:
        for user_id, access in USER_ACCESS.items():
            for ds, role in access.items():
                store.set_user_access(user_id, ds, role)
        for user_id, scopes in CONSENTS.items():
            store.set_consent(user_id, DEMO_APP, scopes)
        for user_id, grants in GRANTS.items():
            for ds, level in grants.items():
                store.add_grant(user_id, DEMO_APP, ds, level)
        created.append("access, consents and grants")
    if not any(k.state == "active" for k in store.list_signing_keys()):
        created.append(f"signing key {keyring.rotate(algorithm)}")
    return created


@click.group()
def demo() -> None:
    """The demo data used by `make run`."""


@demo.command("seed")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default="var/demo-alice.token",
    show_default=True,
    help="Where to write a fresh demo token for alice.",
)
@click.option(
    "--connector-secret-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where the demo connector's secret is kept (mode 0600); made when missing."
    "  [default: plant-connector.secret beside the token file]",
)
@pass_ctx
def demo_seed(obj: Context, token_file: str, connector_secret_file: str | None) -> None:
    """Create the demo app, users, data sources, grants and connector (idempotent); mint a
    token."""
    ring = obj.keyring()
    created = seed(obj.store, ring, obj.config.tokens.algorithm)
    for line in created:
        click.echo(f"created {line}")
    # Beside the token by default: a seed for another folder never touches this one's.
    secret_path = Path(connector_secret_file or Path(token_file).parent / SECRET_FILE)
    new_connector = any(line.startswith(f"connector {DEMO_CONNECTOR} ") for line in created)
    if new_connector or not secret_path.exists():
        # A secret is stored only hashed, so a lost file means a new secret (and a file
        # left from an earlier store holds a secret this store never had).
        _write_private(secret_path, obj.store.rotate_connector_secret(DEMO_CONNECTOR))
        click.echo(f"wrote a new secret for connector {DEMO_CONNECTOR} to {secret_path}")
    token, _ = issue_token(
        ring,
        token_settings(obj.config),
        sub="alice",
        client_id=DEMO_APP,
        scopes=["UserInfo", "DataRead"],
    )
    path = Path(token_file)
    _write_private(path, token)
    click.echo(f"wrote a 1-hour access token for alice (demo-app) to {path}")


def _write_private(path: Path, text: str) -> None:
    """Write `text` and a newline to `path`, readable by its owner only: whole or not at
    all (a new file renamed over the old one, so a crash never leaves an empty secret that
    the next seed would keep), never through a symlink planted at a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
