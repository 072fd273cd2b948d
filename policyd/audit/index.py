"""Where the indexer puts records: one interface, two implementations.

`Index` is what the indexer (journal.Indexer) writes through and `reader.Reader` what the
commands read through. `SqliteIndex` (here) and `reader.AuditReader` are the audit's own
SQLite file: one host, one chain. `pg.PgIndex` is both for a PostgreSQL database that
several replicas share: each replica (`node`) extends a chain of its own
(docs/audit.md, "Several replicas (PostgreSQL)").

`target.IndexTarget` names one of them and opens it. The journals (journal.py) are the
same for both.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from policyd.audit.reader import prune
from policyd.audit.records import append_records, chain_head, open_log_file
from policyd.store.sqlite import transaction

# One record as the indexer hands it over: its journal line (canonical JSON) and the list
# of its FIELDS values (records.fields_of_line), which the index may reuse in place.
Line = tuple[bytes, list[Any]]


class Writing(Protocol):
    """One write transaction of the index: the journal marks and the records move together."""

    def mark(self, journal: str) -> int:
        """How far the journal is indexed (0: not yet)."""
        ...

    def append(self, key: bytes, records: list[Line]) -> int:
        """Chain the records after the chain's last one and insert them."""
        ...

    def set_mark(self, journal: str, offset: int) -> None: ...

    def chain_head(self) -> tuple[int, str]:
        """The chain's newest record as this transaction sees it: (seq, hash); with no
        record, (the anchor's first seq - 1, the hash the first must follow)."""
        ...


# The pause between two indexing passes into the SQLite file: records gather meanwhile.
INDEX_INTERVAL_SECONDS = 0.02


class Index(Protocol):
    """The write side of an index (journal.Indexer)."""

    # What its operations raise when the index cannot be used (the indexer retries).
    errors: tuple[type[Exception], ...]
    # How often the indexer makes a pass (journal.Indexer.run): what one transaction costs
    # beside its records decides it (PostgreSQL's round trips want larger batches).
    pass_interval: float

    def writing(self) -> AbstractContextManager[Writing]:
        """A write transaction, exclusive for its chain: committed at the end of the block,
        rolled back if it raises."""
        ...

    def forget(self, journal: str) -> None:
        """Delete the mark of a journal that is indexed to its end and deleted."""
        ...

    def prune(
        self,
        *,
        before: float | None = None,
        max_bytes: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Delete the oldest records (older than `before`, or beyond max_bytes) and move
        the chains' anchors; returns how many. `on_progress(deleted, total)` as it goes."""
        ...

    def close(self) -> None: ...


class _SqliteWriting:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def mark(self, journal: str) -> int:
        row = self.conn.execute(
            "SELECT offset FROM audit_journal WHERE name = ?", (journal,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def append(self, key: bytes, records: list[Line]) -> int:
        return append_records(self.conn, key, records)

    def set_mark(self, journal: str, offset: int) -> None:
        self.conn.execute(
            "INSERT INTO audit_journal (name, offset) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET offset = excluded.offset",
            (journal, offset),
        )

    def chain_head(self) -> tuple[int, str]:
        return chain_head(self.conn)


class SqliteIndex:
    """The audit's own SQLite file: one chain, extended under SQLite's write lock."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    pass_interval = INDEX_INTERVAL_SECONDS

    def __init__(self, path: str | Path, sync: str = "normal") -> None:
        self.path = Path(path)
        self.conn = open_log_file(self.path, sync)

    @contextmanager
    def writing(self) -> Iterator[Writing]:
        with transaction(self.conn) as conn:
            yield _SqliteWriting(conn)

    def forget(self, journal: str) -> None:
        self.conn.execute("DELETE FROM audit_journal WHERE name = ?", (journal,))

    def prune(
        self,
        *,
        before: float | None = None,
        max_bytes: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        return prune(self.conn, before=before, max_bytes=max_bytes, on_progress=on_progress)

    def close(self) -> None:
        self.conn.close()
