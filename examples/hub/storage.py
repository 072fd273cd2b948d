"""What the hub keeps: written tag values and account balances, in one SQLite file.

Writes commit before the response goes out, so a value written and acknowledged is read
back by the next request and after a restart. One connection per thread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

STARTING_BALANCE_CENTS = 100_00

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tag_values (
    data_source TEXT NOT NULL,
    tag TEXT NOT NULL,
    ts REAL NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (data_source, tag, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts (
    sub TEXT PRIMARY KEY,
    balance_cents INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    client_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('debit', 'refund')),
    amount_cents INTEGER NOT NULL,
    description TEXT NOT NULL,
    created_at REAL NOT NULL,
    refunds TEXT REFERENCES transactions (id) UNIQUE
);
"""


class InsufficientFunds(Exception):
    pass


class UnknownTransaction(Exception):
    pass


class AlreadyRefunded(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Transaction:
    id: str
    amount_cents: int
    balance_cents: int


class HubStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA synchronous = FULL")
            self._local.db = db
        return db

    # -- tag values ---------------------------------------------------------------------

    def write_values(self, rows: list[tuple[str, str, float, float]]) -> int:
        """(data source, tag, time, value) rows; a value at the same time is replaced."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO tag_values VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(rows)

    def values(
        self, data_source: str, tag: str, start: float, end: float, limit: int = -1
    ) -> list[tuple[float, float]]:
        """Written values with start <= time <= end, oldest first."""
        return (
            self._db()
            .execute(
                "SELECT ts, value FROM tag_values WHERE data_source = ? AND tag = ?"
                " AND ts BETWEEN ? AND ? ORDER BY ts LIMIT ?",
                (data_source, tag, start, end, limit),
            )
            .fetchall()
        )

    def latest(self, data_source: str, tag: str, at: float) -> tuple[float, float] | None:
        """The last written value at or before `at`."""
        row = (
            self._db()
            .execute(
                "SELECT ts, value FROM tag_values WHERE data_source = ? AND tag = ? AND ts <= ?"
                " ORDER BY ts DESC LIMIT 1",
                (data_source, tag, at),
            )
            .fetchone()
        )
        return None if row is None else (row[0], row[1])

    # -- accounts -----------------------------------------------------------------------

    def balance(self, sub: str) -> int:
        row = self._db().execute("SELECT balance_cents FROM accounts WHERE sub = ?", (sub,))
        found = row.fetchone()
        return STARTING_BALANCE_CENTS if found is None else int(found[0])

    def debit(self, sub: str, client_id: str, cents: int, description: str) -> Transaction:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            balance = self.balance(sub)
            if cents > balance:
                raise InsufficientFunds
            tx = Transaction(uuid.uuid4().hex, cents, balance - cents)
            self._record(db, tx, sub, client_id, "debit", description, None)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return tx

    def refund(self, sub: str, client_id: str, debit_id: str) -> Transaction:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT amount_cents FROM transactions WHERE id = ? AND sub = ? AND kind = 'debit'",
                (debit_id, sub),
            ).fetchone()
            if row is None:
                raise UnknownTransaction
            done = db.execute("SELECT 1 FROM transactions WHERE refunds = ?", (debit_id,))
            if done.fetchone() is not None:
                raise AlreadyRefunded
            cents = int(row[0])
            tx = Transaction(uuid.uuid4().hex, cents, self.balance(sub) + cents)
            self._record(db, tx, sub, client_id, "refund", "refund", debit_id)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return tx

    @staticmethod
    def _record(
        db: sqlite3.Connection,
        tx: Transaction,
        sub: str,
        client_id: str,
        kind: str,
        description: str,
        refunds: str | None,
    ) -> None:
        db.execute(
            "INSERT INTO accounts VALUES (?, ?)"
            " ON CONFLICT (sub) DO UPDATE SET balance_cents = excluded.balance_cents",
            (sub, tx.balance_cents),
        )
        db.execute(
            "INSERT INTO transactions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (tx.id, sub, client_id, kind, tx.amount_cents, description, time.time(), refunds),
        )
