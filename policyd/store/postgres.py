"""The PostgreSQL backend of the store: one database shared by policyd replicas on several
hosts (docs/cluster.md).

The tables are those of the SQLite store (pg_migrations.py), in the same SQL. Writes are
serialised by one transaction-level advisory lock, as SQLite's BEGIN IMMEDIATE serialises
them, so the statements written for SQLite keep their meaning (a claim-then-save of an
authorization code, say), and generations are numbered in commit order: every statement on
a table that changes decisions bumps `generation` by trigger, notes the new value in the
transaction (`policyd.generation`) and NOTIFYs it on `policyd_generation`.

A write that moved the generation returns only once every replica with a live lease has
acknowledged that generation (it has dropped every cache older than it), or its lease has
run out: the revoke is then exact on every replica, for the very next request
(replica.py is the replica's half of the protocol).

Connections come from two pools: one for these administrative reads and writes (checked
before use, so a PostgreSQL restart costs no failed write), one for decision-time reads
(facts.py), sized by store.pool_size. URLs are never printed with their password.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, ClassVar

import psycopg
import psycopg_pool

from policyd.core.errors import StoreUnavailable
from policyd.core.urls import problem, redact
from policyd.store.base import Store
from policyd.store.pg_migrations import MIGRATE_LOCK, WRITE_LOCK, apply_migrations
from policyd.store.sql import Conn, Cursor

log = logging.getLogger("policyd.store")

CONNECT_TIMEOUT_SECONDS = 5
POOL_TIMEOUT_SECONDS = 5.0
IDLE_IN_TRANSACTION_MS = 10_000
ADMIN_POOL_SIZE = 4


@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """A statement written with `?` placeholders, as psycopg wants it (`%s`)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConn:
    """A psycopg connection that takes `?` placeholders (what Store code writes)."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self.raw.execute(pg_sql(sql), parameters)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """One autocommit connection (StoreUnavailable, one line, when it cannot be had)."""
    try:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS, **kwargs
        )
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot reach store {redact(url)}: {problem(url, exc)}") from None


class PostgresStore(Store):
    """The policy store on a PostgreSQL database."""

    backend = "postgresql"
    errors = (psycopg.Error, psycopg_pool.PoolTimeout)
    integrity_errors = (psycopg.errors.IntegrityError,)
    # The stores of this process not yet closed: a pool left to the garbage collector
    # stops its threads there, waiting up to 5 s for each, in whatever thread collects
    # it. Whoever drops a database closes its stores first (the tests do).
    opened: ClassVar[weakref.WeakSet[PostgresStore]] = weakref.WeakSet()

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        pool_size: int = 8,
        lease_seconds: float = 2.0,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.lease_seconds = lease_seconds
        self.pool_size = pool_size
        # Fail fast, with one line, when the database cannot be reached at all.
        connect(url).close()
        # Administrative reads and writes: the CLI, the settings page, the maintenance.
        self._admin = self._pool("admin", ADMIN_POOL_SIZE, check=True)
        self._reads: psycopg_pool.ConnectionPool[Any] | None = None
        PostgresStore.opened.add(self)
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self.close()
                raise

    def _pool(self, name: str, size: int, *, check: bool) -> psycopg_pool.ConnectionPool[Any]:
        return psycopg_pool.ConnectionPool(
            self.url,
            name=f"policyd-{name}",
            min_size=1,
            max_size=size,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                "application_name": f"policyd-{name}",
                # A process stopped inside a transaction (a write holds the writers' lock)
                # must not hold the store up for longer than this.
                "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
            },
            check=psycopg_pool.ConnectionPool.check_connection if check else None,
            timeout=POOL_TIMEOUT_SECONDS,
            open=True,
        )

    def reads(self) -> psycopg_pool.ConnectionPool[Any]:
        """The pool of decision-time reads (opened on first use)."""
        if self._reads is None:
            self._reads = self._pool("reads", self.pool_size, check=False)
        return self._reads

    def close(self) -> None:
        PostgresStore.opened.discard(self)
        self._admin.close()
        if self._reads is not None:
            self._reads.close()

    @contextmanager
    def read(self) -> Iterator[Conn]:
        try:
            with self._admin.connection() as raw:
                yield PgConn(raw)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailable(f"store {self.where}: {problem(self.url, exc)}") from exc

    @contextmanager
    def write(self) -> Iterator[Conn]:
        moved: str | None = None
        try:
            with self._admin.connection() as raw:
                with raw.transaction():
                    raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    yield PgConn(raw)
                    row = raw.execute("SELECT current_setting('policyd.generation', true)")
                    moved = row.fetchone()[0]
                if moved:
                    self.await_replicas(raw, int(moved))
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailable(f"store {self.where}: {problem(self.url, exc)}") from exc

    def await_replicas(self, raw: psycopg.Connection[Any], generation: int) -> None:
        """Return once every replica with a live lease has acknowledged `generation`.

        A replica renews its lease only together with acknowledging the generation it
        reads as it renews (replica.py), so this ends within one lease of the write even
        when a replica has stopped; the deadline below only guards against a protocol bug.
        """
        deadline = time.monotonic() + 2 * self.lease_seconds + 1.0
        pause = 0.0005
        while True:
            waiting = raw.execute(
                "SELECT replica_id FROM policyd_replicas"
                " WHERE lease_expires_at > clock_timestamp() AND acked_generation < %s",
                (generation,),
            ).fetchall()
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(r[0] for r in waiting)
                raise StoreUnavailable(
                    f"the write committed (generation {generation}), but replica(s) {names}"
                    " did not acknowledge it in time"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def replicas(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(
                "SELECT r.replica_id, r.node, r.host, r.pid,"
                " extract(epoch FROM r.started_at), extract(epoch FROM r.renewed_at),"
                " extract(epoch FROM r.lease_expires_at - clock_timestamp()),"
                " r.acked_generation, g.value"
                " FROM policyd_replicas r, generation g WHERE g.id = 1 ORDER BY r.replica_id"
            ).fetchall()
        return [
            {
                "replica_id": r[0],
                "node": r[1],
                "host": r[2],
                "pid": r[3],
                "started_at": float(r[4]),
                "renewed_at": float(r[5]),
                "live": r[6] > 0,
                "lease_left_seconds": round(max(float(r[6]), 0.0), 3),
                "acked_generation": r[7],
                "behind": max(r[8] - r[7], 0),
            }
            for r in rows
        ]

    def migrate(self) -> None:
        try:
            with self._admin.connection() as raw:
                apply_migrations(raw, MIGRATE_LOCK)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailable(
                f"cannot migrate store {self.where}: {problem(self.url, exc)}"
            ) from exc


def migrate(url: str, on_progress: Callable[[int, int], None] | None = None) -> None:
    """Apply the pending migrations of the database at `url` on a connection of its own
    (what PostgresStore does on opening), reporting `on_progress(applied, pending)`."""
    raw = connect(url)
    try:
        apply_migrations(raw, MIGRATE_LOCK, on_progress)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot migrate store {redact(url)}: {problem(url, exc)}") from exc
    finally:
        raw.close()
