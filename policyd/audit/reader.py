"""Reading the audit file: queries, tail, show, stats, verify (the hash chain), prune.

What a record is, the chain and the file are in records.py; writing is in journal.py.
"""

from __future__ import annotations

import hmac
import json
import json.scanner
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from policyd.audit.records import (
    COLUMNS,
    FIELDS,
    SHOW_WINDOW_SECONDS,
    AuditRecord,
    StoredRecord,
    chain_hash,
    connect,
)
from policyd.core.errors import PolicydError
from policyd.core.ids import id_time_ms
from policyd.store.sqlite import transaction

log = logging.getLogger(__name__)


def _stored(row: Sequence[Any]) -> StoredRecord:
    values = list(row[1 : 1 + len(FIELDS)])
    values[FIELDS.index("scopes")] = tuple(values[FIELDS.index("scopes")].split())
    values[FIELDS.index("data_sources")] = tuple(json.loads(values[FIELDS.index("data_sources")]))
    return StoredRecord(row[0], AuditRecord(*values), row[-2], row[-1])


_SELECT = f"SELECT seq, {COLUMNS}, prev_hash, hash FROM audit"
_QUALIFIED = ", ".join(f"a.{c}" for c in ("seq", *FIELDS, "prev_hash", "hash"))


@dataclass
class Query:
    since: float | None = None
    until: float | None = None
    client_id: str | None = None
    user_id: str | None = None
    data_source: str | None = None
    decision: str | None = None
    reason: str | None = None
    rule_id: str | None = None
    door: str | None = None
    request_id: str | None = None
    after_seq: int | None = None
    limit: int = 100

    def sql(self) -> tuple[str, list[Any]]:
        """SQL for the newest `limit` matching records (callers reverse for display).

        Each query walks one index newest-first and stops after `limit` matches: by data
        source alone the (data_source, ts) key of audit_data_sources, else (user_id, ts),
        (client_id, ts) or (ts), whichever the planner picks for the filters (a data
        source then checked per record in that key).
        """
        where: list[str] = []
        args: list[Any] = []
        source, ts = "audit a", "a.ts"
        order = "a.ts DESC, a.seq DESC"
        if self.data_source is not None and self.user_id is None:
            source = "audit_data_sources d JOIN audit a ON a.seq = d.seq"
            ts, order = "d.ts", "d.ts DESC, d.seq DESC"
            where.append("d.data_source = ?")
            args.append(self.data_source)
        elif self.data_source is not None:
            # With a user too, walk the user's records (far fewer than a data source's:
            # one user of many) and look each one up in the data-source key.
            where.append(
                "EXISTS (SELECT 1 FROM audit_data_sources d"
                " WHERE d.data_source = ? AND d.ts = a.ts AND d.seq = a.seq)"
            )
            args.append(self.data_source)
        for column, value in (
            ("client_id", self.client_id),
            ("user_id", self.user_id),
            ("decision", self.decision),
            ("reason", self.reason),
            ("rule_id", self.rule_id),
            ("door", self.door),
            ("request_id", self.request_id),
        ):
            if value is not None:
                where.append(f"a.{column} = ?")
                args.append(value)
        if self.since is not None:
            where.append(f"{ts} >= ?")
            args.append(self.since)
        if self.until is not None:
            where.append(f"{ts} < ?")
            args.append(self.until)
        if self.after_seq is not None:
            where.append("a.seq > ?")
            args.append(self.after_seq)
            order = "a.seq"
        sql = f"SELECT {_QUALIFIED} FROM {source}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return f"{sql} ORDER BY {order} LIMIT ?", [*args, self.limit]


class AuditReader:
    """Read side: queries, tail, show, stats, verify. Never blocks the writer (WAL)."""

    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self._conn = connect(self.path, readonly=True)

    def close(self) -> None:
        self._conn.close()

    def query(self, q: Query) -> list[StoredRecord]:
        sql, args = q.sql()
        rows = [_stored(r) for r in self._conn.execute(sql, args)]
        if q.after_seq is None:
            rows.reverse()
        return rows

    def last_seq(self) -> int:
        row = self._conn.execute("SELECT max(seq) FROM audit").fetchone()
        return int(row[0] or 0)

    def show(self, record_id: str) -> StoredRecord | None:
        """The record of a decision id. The id's own clock bounds where to look."""
        try:
            made = id_time_ms(record_id) / 1000
        except ValueError:
            return None
        row = self._conn.execute(
            _SELECT + " WHERE ts >= ? AND ts <= ? AND id = ?",
            (made - 1, made + SHOW_WINDOW_SECONDS, record_id),
        ).fetchone()
        return None if row is None else _stored(row)

    def stats(self, since: float | None, until: float | None) -> dict[str, dict[str, int]]:
        where, args = [], []
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        out: dict[str, dict[str, int]] = {}
        for name, column in (("decision", "decision"), ("reason", "reason"), ("app", "client_id")):
            rows = self._conn.execute(
                f"SELECT {column}, count(*) FROM audit{clause} GROUP BY {column}"
                " ORDER BY count(*) DESC, 1",
                args,
            )
            out[name] = {str(k) or "-": int(n) for k, n in rows}
        rows = self._conn.execute(
            "SELECT data_source, count(*) FROM audit_data_sources"
            + clause
            + " GROUP BY data_source ORDER BY count(*) DESC, 1",
            args,
        )
        out["data_source"] = {str(k): int(n) for k, n in rows}
        return out

    def verify(self) -> VerifyResult:
        if self.key is None:
            raise PolicydError("verifying the audit chain needs the audit key")
        return verify(self._conn, self.key)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int
    head: str
    problem: str = ""
    seq: int | None = None


def verify(conn: sqlite3.Connection, key: bytes) -> VerifyResult:
    """Walk the chain from its anchor; report the first record that breaks it."""
    first_seq, prev = conn.execute(
        "SELECT first_seq, prev_hash FROM audit_anchor WHERE id = 1"
    ).fetchone()
    expected_seq = first_seq
    checked = 0
    for row in conn.execute(_SELECT + " ORDER BY seq"):
        stored = _stored(row)
        if stored.seq != expected_seq:
            return VerifyResult(
                False,
                checked,
                prev,
                f"record {expected_seq} is missing (next is {stored.seq}): deleted",
                stored.seq,
            )
        if stored.prev_hash != prev:
            return VerifyResult(
                False,
                checked,
                prev,
                f"record {stored.seq} ({stored.record.id}) does not follow the record before"
                " it: inserted, deleted or reordered",
                stored.seq,
            )
        if not hmac.compare_digest(chain_hash(key, prev, stored.record), stored.hash):
            return VerifyResult(
                False,
                checked,
                prev,
                f"record {stored.seq} ({stored.record.id}) does not match its hash: edited",
                stored.seq,
            )
        prev = stored.hash
        expected_seq += 1
        checked += 1
    return VerifyResult(True, checked, prev)


def prune(
    conn: sqlite3.Connection, *, before: float | None = None, max_bytes: int | None = None
) -> int:
    """Delete the oldest records (by chain order) and move the anchor; returns how many."""
    removed = 0
    with transaction(conn):
        cut: int | None = None
        if before is not None:
            cut = conn.execute("SELECT max(seq) FROM audit WHERE ts < ?", (before,)).fetchone()[0]
        if max_bytes is not None:
            used = _used_bytes(conn)
            total = conn.execute("SELECT count(*), min(seq), max(seq) FROM audit").fetchone()
            if used > max_bytes and total[0]:
                # Drop the oldest share that brings the file under the limit, plus 10 %.
                share = min(1.0, (used - max_bytes) / used + 0.1)
                size_cut = total[1] + int(total[0] * share) - 1
                cut = size_cut if cut is None else max(cut, size_cut)
        if cut is not None:
            keep = conn.execute(
                "SELECT seq, prev_hash FROM audit WHERE seq > ? ORDER BY seq LIMIT 1", (cut,)
            ).fetchone()
            last = conn.execute(
                "SELECT seq, hash FROM audit WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (cut,)
            ).fetchone()
            if last is not None:
                names = [
                    row[0]
                    for row in conn.execute(
                        "SELECT DISTINCT j.value FROM audit, json_each(audit.data_sources) j"
                        " WHERE audit.seq <= ?",
                        (cut,),
                    )
                ]
                removed = conn.execute("DELETE FROM audit WHERE seq <= ?", (cut,)).rowcount
                # A data-source row has its record's ts: rows older than the oldest kept
                # record belong to deleted ones. (Rows of deleted records not older than
                # that stay behind; queries join through audit, so they never show.)
                oldest = conn.execute("SELECT min(ts) FROM audit").fetchone()[0]
                for name in names:
                    conn.execute(
                        "DELETE FROM audit_data_sources WHERE data_source = ? AND ts < ?",
                        (name, float("inf") if oldest is None else oldest),
                    )
                first_seq, prev_hash = (keep[0], keep[1]) if keep else (last[0] + 1, last[1])
                conn.execute(
                    "UPDATE audit_anchor SET first_seq = ?, prev_hash = ? WHERE id = 1",
                    (first_seq, prev_hash),
                )
    if removed:
        conn.execute("PRAGMA incremental_vacuum")
    return removed


def _used_bytes(conn: sqlite3.Connection) -> int:
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def follow(
    reader: AuditReader, q: Query, poll: float = 0.25, stop: threading.Event | None = None
) -> Iterator[StoredRecord]:
    """Yield records as they are written (after q.after_seq), until stop is set."""
    after = reader.last_seq() if q.after_seq is None else q.after_seq
    while stop is None or not stop.is_set():
        batch = reader.query(Query(**{**asdict(q), "after_seq": after, "limit": 1000}))
        for stored in batch:
            after = stored.seq
            yield stored
        if not batch:
            time.sleep(poll)
