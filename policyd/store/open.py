"""Opening the store a URL names (`sqlite:///PATH` or `postgresql://…`, config.store_url),
and its decision-time view: the one place that picks a backend."""

from __future__ import annotations

from collections.abc import Callable

from policyd.core.urls import is_postgres
from policyd.store.base import Store
from policyd.store.facts import Facts
from policyd.store.sqlite import SqliteStore


def open_store(
    url: str, *, migrate: bool = True, pool_size: int = 8, lease_seconds: float = 2.0
) -> Store:
    """The store at `url`, migrated (StoreUnavailable, one line, when it cannot be had)."""
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///") :], migrate=migrate)
    if is_postgres(url):
        # Imported here: psycopg costs a process on SQLite 0.1 s of start-up.
        from policyd.store.postgres import PostgresStore

        return PostgresStore(url, migrate=migrate, pool_size=pool_size, lease_seconds=lease_seconds)
    raise ValueError(f"not a store URL: {url.split(':', 1)[0]}:…")


def migrate_store(url: str, *, on_progress: Callable[[int, int], None] | None = None) -> None:
    """Apply the pending migrations of the store at `url` and nothing more, reporting
    `on_progress(applied, pending)` after each (not called when none is pending); opening
    it afterwards finds nothing left to do. StoreUnavailable (one line) on failure."""
    if url.startswith("sqlite:///"):
        # It opens no connection of its own until used: this migrates and is done.
        SqliteStore(url[len("sqlite:///") :], on_progress=on_progress)
    elif is_postgres(url):
        from policyd.store.postgres import migrate

        migrate(url, on_progress)
    else:
        raise ValueError(f"not a store URL: {url.split(':', 1)[0]}:…")


def facts_for(store: Store, *, token_cache_size: int = 100_000) -> Facts:
    """The decision-time view of a store, on its backend (pgfacts.py for PostgreSQL,
    imported only there: psycopg costs a SQLite process 0.1 s of start-up)."""
    if store.backend == "postgresql":
        from policyd.store.pgfacts import PgFacts

        return PgFacts(store, token_cache_size=token_cache_size)
    return Facts(store, token_cache_size=token_cache_size)
