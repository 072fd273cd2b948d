"""What every command shares: the lazily opened core objects (`Context`) and the output helpers.

Listing commands print an aligned table (`emit`), or with --json one JSON object per line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from policyd.cli.progress import progress
from policyd.config import Config, load_config
from policyd.core.model import Access
from policyd.decision.wiring import keyring, open_store
from policyd.store.base import Store
from policyd.store.keys import KeyRing
from policyd.store.open import migrate_store


class Context:
    """Lazily opened core objects for one command."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._store: Store | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    @property
    def store(self) -> Store:
        """The store, opened (and migrated: with a bar when one is pending, on a terminal)
        on first use."""
        if self._store is None:
            with progress("migrating the store") as bar:
                if bar is not None:  # else opening migrates, as it does for a server
                    migrate_store(self.config.store_url, on_progress=bar)
            self._store = open_store(self.config)
        return self._store

    def keyring(self) -> KeyRing:
        return keyring(self.config, self.store)

    def close(self) -> None:
        """When the command ends: the store's connections (PostgreSQL: its pools)."""
        if self._store is not None:
            self._store.close()
            self._store = None


pass_ctx = click.make_pass_decorator(Context)


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Print rows as JSON lines, or as an aligned table of the given columns."""
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
        return
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def cell(value: Any) -> str:
    """One value as a table cell: "-" for none, yes/no, comma-joined lists and mappings."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def access_option_callback(_ctx: click.Context, _param: click.Parameter, value: str) -> Access:
    """An option's `read`/`write` value as an Access level (a usage error otherwise)."""
    try:
        return Access.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
