"""Opening the store a URL names: `sqlite:///PATH` or `postgresql://…` (config.store_url)."""

from __future__ import annotations

from policyd.store.base import Store
from policyd.store.postgres import PostgresStore
from policyd.store.sqlite import SqliteStore


def open_store(
    url: str, *, migrate: bool = True, pool_size: int = 8, lease_seconds: float = 2.0
) -> Store:
    """The store at `url`, migrated (StoreUnavailable, one line, when it cannot be had)."""
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///") :], migrate=migrate)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, migrate=migrate, pool_size=pool_size, lease_seconds=lease_seconds)
    raise ValueError(f"not a store URL: {url.split(':', 1)[0]}:…")
