"""`policyd cluster status`: the replicas of a PostgreSQL store (docs/cluster.md)."""

from __future__ import annotations

import json

import click

from policyd.cli.context import Context, emit, json_option, pass_ctx


@click.group()
def cluster() -> None:
    """Replicas sharing a PostgreSQL store."""


@cluster.command("status")
@json_option
@pass_ctx
def cluster_status(obj: Context, as_json: bool) -> None:
    """The store's generation and every replica's lease: live or lapsed, how long it has
    left, and how many generations it is behind (a live replica is at most a moment
    behind: a revoking write waits for it). Rows of lapsed leases go after an hour."""
    store = obj.store
    generation = store.generation()
    replicas = store.replicas()
    if as_json:
        click.echo(json.dumps({"generation": generation, "replicas": replicas}, sort_keys=True))
        return
    if not obj.config.postgres:
        click.echo(f"store {store.where}: SQLite, one host: no replicas (generation {generation})")
        return
    live = sum(1 for r in replicas if r["live"])
    click.echo(f"store {store.where}: generation {generation}, {live} live replica(s)")
    if replicas:
        emit(
            replicas,
            ["replica_id", "live", "lease_left_seconds", "acked_generation", "behind", "host"],
            False,
        )
