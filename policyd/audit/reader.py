"""Reading the audit log: queries, tail, show, stats, verify (the hash chain), prune.

One reading interface (`Reader`), two implementations: `AuditReader` here reads the SQLite
file (one chain); `pg.PgIndex` reads the PostgreSQL index that several replicas share (one
chain per replica, `node`). The SQL of a query is written once (`Query.sql`) for both.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from policyd.audit.records import (
    COLUMNS,
    FIELDS,
    SHOW_WINDOW_SECONDS,
    AuditRecord,
    StoredRecord,
    chain_hash,
    connect,
)
from policyd.core.errors import InvalidInput, PolicydError
from policyd.core.ids import id_time_ms
from policyd.store.sqlite import transaction

log = logging.getLogger(__name__)

# How many records a long walk (verify) checks between two reports of its progress.
PROGRESS_EVERY = 2000
# How many records prune deletes per statement, reporting its progress between them.
PRUNE_BATCH = 20_000

# Where each chain stands: node -> the seq of its newest record ("" is the SQLite file's
# one chain). What `follow` resumes from.
Position = dict[str, int]


def stored(row: Sequence[Any], node: str = "") -> StoredRecord:
    """A record from a row of (seq, FIELDS..., prev_hash, hash)."""
    values = list(row[1 : 1 + len(FIELDS)])
    values[FIELDS.index("scopes")] = tuple(values[FIELDS.index("scopes")].split())
    values[FIELDS.index("data_sources")] = tuple(json.loads(values[FIELDS.index("data_sources")]))
    return StoredRecord(row[0], AuditRecord(*values), row[-2], row[-1], node)


_stored = stored
_SELECT = f"SELECT seq, {COLUMNS}, prev_hash, hash FROM audit"


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the SQL of a query differs in between the two indexes."""

    records: str  # the records table
    data_sources: str  # the (data_source, ts, [node,] seq) table
    param: str  # the placeholder
    nodes: bool  # whether records carry a node (one chain per node)

    def columns(self) -> str:
        columns = ", ".join(f"a.{c}" for c in ("seq", *FIELDS, "prev_hash", "hash"))
        return columns + ", a.node" if self.nodes else columns

    def same_record(self) -> str:
        return "a.node = d.node AND a.seq = d.seq" if self.nodes else "a.seq = d.seq"


SQLITE = Dialect("audit", "audit_data_sources", "?", nodes=False)
POSTGRES = Dialect("audit_records", "audit_data_sources", "%s", nodes=True)


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
    node: str | None = None

    def sql(self, dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
        """SQL for the newest `limit` matching records (callers reverse for display).

        Each query walks one index newest-first and stops after `limit` matches: by data
        source alone the (data_source, ts) key of audit_data_sources, else (user_id, ts),
        (client_id, ts) or (ts), whichever the planner picks for the filters (a data
        source then checked per record in that key). With after_seq (one chain: with
        `node` in the PostgreSQL index), the records after it in chain order.
        """
        d, p = dialect, dialect.param
        where: list[str] = []
        args: list[Any] = []
        source, ts = f"{d.records} a", "a.ts"
        order = f"a.ts DESC, {'a.node DESC, ' if d.nodes else ''}a.seq DESC"
        if self.data_source is not None and self.user_id is None:
            source = f"{d.data_sources} d JOIN {d.records} a ON {d.same_record()}"
            ts, order = "d.ts", f"d.ts DESC, {'d.node DESC, ' if d.nodes else ''}d.seq DESC"
            where.append(f"d.data_source = {p}")
            args.append(self.data_source)
        elif self.data_source is not None:
            # With a user too, walk the user's records (far fewer than a data source's:
            # one user of many) and look each one up in the data-source key.
            where.append(
                f"EXISTS (SELECT 1 FROM {d.data_sources} d"
                f" WHERE d.data_source = {p} AND d.ts = a.ts AND {d.same_record()})"
            )
            args.append(self.data_source)
        if self.node is not None and not d.nodes:
            raise InvalidInput(
                "--node filters the PostgreSQL audit index (store.url); this log is one file"
            )
        for column, value in (
            ("node", self.node),
            ("client_id", self.client_id),
            ("user_id", self.user_id),
            ("decision", self.decision),
            ("reason", self.reason),
            ("rule_id", self.rule_id),
            ("door", self.door),
            ("request_id", self.request_id),
        ):
            if value is not None:
                where.append(f"a.{column} = {p}")
                args.append(value)
        if self.since is not None:
            where.append(f"{ts} >= {p}")
            args.append(self.since)
        if self.until is not None:
            where.append(f"{ts} < {p}")
            args.append(self.until)
        if self.after_seq is not None:
            where.append(f"a.seq > {p}")
            args.append(self.after_seq)
            order = "a.seq"
        sql = f"SELECT {d.columns()} FROM {source}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return f"{sql} ORDER BY {order} LIMIT {p}", [*args, self.limit]


class Reader(Protocol):
    """What `policyd audit query/tail/show/stats/verify` read through: the SQLite file
    (AuditReader) or the PostgreSQL index (pg.PgIndex)."""

    def query(self, q: Query) -> list[StoredRecord]: ...

    def position(self) -> Position: ...

    def newer(self, position: Position, q: Query) -> tuple[list[StoredRecord], Position]: ...

    def show(self, record_id: str) -> StoredRecord | None: ...

    def stats(self, since: float | None, until: float | None) -> dict[str, dict[str, int]]: ...

    def verify_chains(
        self, on_progress: Callable[[int, int], None] | None = None
    ) -> list[VerifyResult]:
        """Every chain's result; `on_progress(checked, total)` as the records are walked
        (total: what the chains should hold)."""
        ...

    def journal_mark(self, name: str) -> int | None: ...

    def close(self) -> None: ...


class AuditReader:
    """Reads the SQLite file (one chain): queries, tail, show, stats, verify. Never blocks
    the writer (WAL)."""

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

    def position(self) -> Position:
        return {"": self.last_seq()}

    def newer(self, position: Position, q: Query) -> tuple[list[StoredRecord], Position]:
        batch = self.query(Query(**{**asdict(q), "after_seq": position.get("", 0)}))
        return batch, ({"": batch[-1].seq} if batch else position)

    def show(self, record_id: str) -> StoredRecord | None:
        """The record of a decision id. The id's own clock bounds where to look."""
        found = show_sql(SQLITE, record_id)
        if found is None:
            return None
        row = self._conn.execute(*found).fetchone()
        return None if row is None else _stored(row)

    def stats(self, since: float | None, until: float | None) -> dict[str, dict[str, int]]:
        return count_stats(lambda sql, args: self._conn.execute(sql, args), SQLITE, since, until)

    def verify(self, on_progress: Callable[[int, int], None] | None = None) -> VerifyResult:
        if self.key is None:
            raise PolicydError("verifying the audit chain needs the audit key")
        return verify(self._conn, self.key, on_progress)

    def verify_chains(
        self, on_progress: Callable[[int, int], None] | None = None
    ) -> list[VerifyResult]:
        return [self.verify(on_progress)]

    def journal_mark(self, name: str) -> int | None:
        """How far the journal `name` is indexed (None: not yet, or finished)."""
        row = self._conn.execute("SELECT offset FROM audit_journal WHERE name = ?", (name,))
        found = row.fetchone()
        return None if found is None else int(found[0])


def show_sql(d: Dialect, record_id: str) -> tuple[str, list[Any]] | None:
    """The SQL finding a decision id's record (None: not an id): its clock bounds the time."""
    try:
        made = id_time_ms(record_id) / 1000
    except ValueError:
        return None
    p = d.param
    return (
        f"SELECT {d.columns()} FROM {d.records} a WHERE a.ts >= {p} AND a.ts <= {p} AND a.id = {p}",
        [made - 1, made + SHOW_WINDOW_SECONDS, record_id],
    )


def count_stats(
    execute: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
    d: Dialect,
    since: float | None,
    until: float | None,
) -> dict[str, dict[str, int]]:
    """Counts by decision, reason, app, data source (and node, where records have one)."""
    p = d.param
    where, args = [], []
    if since is not None:
        where.append(f"ts >= {p}")
        args.append(since)
    if until is not None:
        where.append(f"ts < {p}")
        args.append(until)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    out: dict[str, dict[str, int]] = {}
    groups = [("decision", "decision"), ("reason", "reason"), ("app", "client_id")]
    if d.nodes:
        groups.append(("node", "node"))
    for name, column in groups:
        rows = execute(
            f"SELECT {column}, count(*) FROM {d.records}{clause} GROUP BY {column}"
            " ORDER BY count(*) DESC, 1",
            args,
        )
        out[name] = {str(k) or "-": int(n) for k, n in rows}
    rows = execute(
        f"SELECT data_source, count(*) FROM {d.data_sources}{clause}"
        " GROUP BY data_source ORDER BY count(*) DESC, 1",
        args,
    )
    out["data_source"] = {str(k): int(n) for k, n in rows}
    return out


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int
    head: str
    problem: str = ""
    seq: int | None = None
    node: str = ""  # the chain's replica (PostgreSQL index); "" for the SQLite file

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(
    conn: sqlite3.Connection, key: bytes, on_progress: Callable[[int, int], None] | None = None
) -> VerifyResult:
    """Walk the chain from its anchor; report the first record that breaks it.
    `on_progress(checked, total)`: total is what an intact chain holds (anchor to newest)."""
    first_seq, prev = conn.execute(
        "SELECT first_seq, prev_hash FROM audit_anchor WHERE id = 1"
    ).fetchone()
    total = 0
    if on_progress is not None:
        last = conn.execute("SELECT max(seq) FROM audit").fetchone()[0]
        total = max(0, int(last) - int(first_seq) + 1) if last is not None else 0
        on_progress(0, total)
    result = walk_chain(
        key,
        first_seq,
        prev,
        (_stored(r) for r in conn.execute(_SELECT + " ORDER BY seq")),
        on_checked=None if on_progress is None else lambda n: on_progress(n, total),
    )
    if on_progress is not None:
        on_progress(result.checked, total)
    return result


def walk_chain(
    key: bytes,
    first_seq: int,
    prev: str,
    records: Iterable[StoredRecord],
    node: str = "",
    *,
    on_checked: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Check one chain's records, in seq order, from its anchor (first_seq, prev).
    `on_checked(n)`: every PROGRESS_EVERY records, how many are checked so far."""
    expected_seq = first_seq
    checked = 0
    for stored in records:
        if on_checked is not None and checked % PROGRESS_EVERY == 0 and checked:
            on_checked(checked)
        if stored.seq != expected_seq:
            return VerifyResult(
                False,
                checked,
                prev,
                f"record {expected_seq} is missing (next is {stored.seq}): deleted",
                stored.seq,
                node,
            )
        if stored.prev_hash != prev:
            return VerifyResult(
                False,
                checked,
                prev,
                f"record {stored.seq} ({stored.record.id}) does not follow the record before"
                " it: inserted, deleted or reordered",
                stored.seq,
                node,
            )
        if not hmac.compare_digest(chain_hash(key, prev, stored.record), stored.hash):
            return VerifyResult(
                False,
                checked,
                prev,
                f"record {stored.seq} ({stored.record.id}) does not match its hash: edited",
                stored.seq,
                node,
            )
        prev = stored.hash
        expected_seq += 1
        checked += 1
    return VerifyResult(True, checked, prev, node=node)


def prune(
    conn: sqlite3.Connection,
    *,
    before: float | None = None,
    max_bytes: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Delete the oldest records (by chain order) and move the anchor; returns how many.
    `on_progress(deleted, total)` between batches of PRUNE_BATCH records (one transaction
    all the same)."""
    removed = 0
    with transaction(conn):
        cut: int | None = None
        if before is not None:
            # By the ts index: max(seq) alone walks the table from its newest record back
            # to the first one old enough, which is all of it when none is.
            cut = conn.execute(
                "SELECT max(seq) FROM audit INDEXED BY audit_ts WHERE ts < ?", (before,)
            ).fetchone()[0]
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
                removed = _delete_upto(conn, cut, on_progress)
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


def _delete_upto(
    conn: sqlite3.Connection, cut: int, on_progress: Callable[[int, int], None] | None
) -> int:
    """Delete the records up to seq `cut`, a batch at a time; returns how many."""
    first = conn.execute("SELECT min(seq) FROM audit").fetchone()[0]
    if first is None:
        return 0
    total = max(0, cut - int(first) + 1)  # exact for a whole chain: its seqs have no gaps
    removed, upto = 0, int(first) - 1
    while upto < cut:
        upto = min(cut, upto + PRUNE_BATCH)
        removed += conn.execute("DELETE FROM audit WHERE seq <= ?", (upto,)).rowcount
        if on_progress is not None:
            on_progress(removed, max(total, removed))
    return removed


def _used_bytes(conn: sqlite3.Connection) -> int:
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def follow(
    reader: Reader,
    q: Query,
    poll: float = 0.25,
    stop: threading.Event | None = None,
    after: Position | None = None,
) -> Iterator[StoredRecord]:
    """Yield records as they are indexed (after `after`, else from now), until stop is set."""
    position = reader.position() if after is None else after
    while stop is None or not stop.is_set():
        batch, position = reader.newer(position, Query(**{**asdict(q), "limit": 1000}))
        yield from batch
        if not batch:
            time.sleep(poll)
