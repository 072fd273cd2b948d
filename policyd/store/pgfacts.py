"""The decision-time view of the PostgreSQL store: facts.py's caches, answering while this
process's replica is fresh (replica.py); a miss reads in a snapshot of the caches'
generation. See facts.py's docstring and docs/cluster.md."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import psycopg
import psycopg_pool

from policyd.core import metrics
from policyd.core.errors import StoreMoved, StoreUnavailable
from policyd.core.urls import problem
from policyd.store.base import Store
from policyd.store.facts import _GENERATION, Facts, View, _Caches
from policyd.store.postgres import PostgresStore, pg_sql
from policyd.store.replica import Replica


class _Snapshot:
    """One decision's reads on PostgreSQL: a REPEATABLE READ, READ ONLY transaction on a
    pooled connection, begun at the first cache miss. `expected` is the generation of the
    caches the view uses; a snapshot of another generation must not fill them (StoreMoved,
    after moving the process's caches on). None: a view of private caches, any generation."""

    __slots__ = ("_conn", "_facts", "expected")

    def __init__(self, facts: PgFacts, expected: int | None) -> None:
        self._facts = facts
        self.expected = expected
        self._conn: psycopg.Connection[Any] | None = None

    def begin(self) -> int:
        pool = self._facts.pool
        try:
            conn = self._conn = pool.getconn()
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute(_GENERATION).fetchone()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self.end()
            raise StoreUnavailable(f"store unreadable: {self._facts.problem(exc)}") from exc
        if row is None:
            self.end()
            raise StoreUnavailable("store unreadable: it has no generation row")
        generation = int(row[0])
        if self.expected is not None and generation != self.expected:
            self.end()
            self._facts.advance(generation)
            raise StoreMoved(f"store moved to generation {generation} under {self.expected}")
        return generation

    def one(self, sql: str, args: Sequence[str]) -> tuple[Any, ...] | None:
        return self._read(sql, args).fetchone()

    def all(self, sql: str, args: Sequence[str]) -> list[tuple[Any, ...]]:
        return self._read(sql, args).fetchall()

    def _read(self, sql: str, args: Sequence[str]) -> psycopg.Cursor[Any]:
        """Run a read in the snapshot (begun here at the first one)."""
        if self._conn is None:
            self.begin()
        assert self._conn is not None
        try:
            return self._conn.execute(pg_sql(sql), args)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"store unreadable: {self._facts.problem(exc)}") from exc

    def end(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.closed:
                conn.execute("ROLLBACK")  # read only: nothing to commit
        except psycopg.Error:
            pass  # broken: the pool replaces it
        finally:
            self._facts.pool.putconn(conn)


class PgFacts(Facts):
    """Facts on the PostgreSQL store: caches valid while this process's replica is fresh."""

    def __init__(
        self,
        store: Store,
        *,
        row_cache_size: int = 200_000,
        token_cache_size: int = 100_000,
        replica: Replica | None = None,
    ) -> None:
        assert isinstance(store, PostgresStore)
        super().__init__(store, row_cache_size=row_cache_size, token_cache_size=token_cache_size)
        self.pool = store.reads()
        self.url = store.url
        # Set by wiring.start_replica in a serving process; None: every view reads afresh.
        self.replica = replica

    def problem(self, exc: BaseException) -> str:
        """The database's error, one line, without the URL's password."""
        return problem(self.url, exc)

    def advance(self, generation: int) -> None:
        """Drop every cache older than `generation` (committed: the database said so)."""
        with self._swap:
            if generation > self._caches.generation:
                self._caches = _Caches(generation, self._token_limit)
                m = metrics.current
                if m is not None:
                    m.generation_started()

    def close(self) -> None:
        self.end()

    def end(self) -> None:
        snapshot: _Snapshot | None = getattr(self._local, "snapshot", None)
        if snapshot is not None:
            self._local.snapshot = None
            snapshot.end()

    def view(self) -> View:
        self.end()  # a view this thread left open
        replica = self.replica
        if replica is not None and replica.fresh():
            caches = self._caches
            snapshot = self._local.snapshot = _Snapshot(self, caches.generation)
            return View(self, snapshot, caches, self._row_limit)
        if replica is not None and replica.problem:
            # Its own connection to the database broke and has not come back: fail fast
            # rather than wait for a pooled connection that will not come either.
            raise StoreUnavailable(f"store unreachable: {replica.problem}")
        # Not fresh (or no replica: a one-off CLI process): read everything afresh.
        snapshot = self._local.snapshot = _Snapshot(self, None)
        generation = snapshot.begin()
        return View(self, snapshot, _Caches(generation, 16), self._row_limit)

    def recall(self, key: Hashable, confirm: bool = False, batch: object = None) -> Any:
        # No per-thread confirmation here: the lease says whether the caches are exact.
        replica = self.replica
        if replica is None or not replica.fresh():
            return None
        return self._caches.decisions.get(key)
