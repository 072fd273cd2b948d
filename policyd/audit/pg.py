"""The audit index in a PostgreSQL database that several replicas share.

Each replica (`node`, config cluster.node) keeps its own journals (journal.py, unchanged)
and its own indexer, which moves their records into the tables here and extends the
node's own hash chain: one chain per node, never one chain for the cluster. Chaining then
needs no cluster-wide lock and costs what it costs in SQLite, and each chain has a single
writer: its node's indexer. A write transaction starts by locking the node's row in
`audit_chains` (SELECT ... FOR UPDATE), which holds the chain's head (last seq and hash):
two indexers of one node (a restart overlapping the old one, or `policyd audit index` by
hand) take turns, read the journal marks and the head under that lock, and can neither
index a line twice nor fork the chain; `(node, seq)` is the primary key besides, so a
fork could not be inserted anyway. Indexers of different nodes lock different rows and
never wait for each other.

Tables (all prefixed `audit_`, beside the policy store's): `audit_records` (one row per
record, primary key (node, seq)), `audit_data_sources` (one row per record and data
source), `audit_chains` (per node: the anchor, i.e. the first kept seq and the hash it
follows, the head, and the id of the chain's key), `audit_journals` (per node and journal:
how far it is indexed, moved in the same transaction as its records) and `audit_schema`
(which numbered migrations are applied). The schema is made on first use, under an
advisory lock, so replicas starting together apply each migration once.

Connection failures and a bad URL are PolicydError: one line, without the password.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg

from policyd.audit.index import Line, Writing
from policyd.audit.reader import (
    POSTGRES,
    PRUNE_BATCH,
    Position,
    Query,
    VerifyResult,
    count_stats,
    show_sql,
    stored,
    walk_chain,
)
from policyd.audit.records import (
    CANONICAL,
    FIELDS,
    GENESIS,
    StoredRecord,
    json_strings,
)
from policyd.core.errors import PolicydError
from policyd.core.urls import problem, redact

CONNECT_TIMEOUT_SECONDS = 5
_SCOPES = FIELDS.index("scopes")
_DATA_SOURCES = FIELDS.index("data_sources")
_TEXT = ("scopes", "data_sources")

# Numbered migrations: each applied once, in order, recorded in audit_schema.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            "CREATE TABLE audit_records (node text NOT NULL, seq bigint NOT NULL, "
            + ", ".join(
                f"{name} "
                + (
                    "double precision"
                    if name == "ts"
                    else "bigint"
                    if name == "latency_us"
                    else "text"
                )
                + " NOT NULL"
                for name in FIELDS
            )
            + ", prev_hash text NOT NULL, hash text NOT NULL, PRIMARY KEY (node, seq))",
            # As in SQLite: by time, user, app, and data source (below); nothing else, as
            # each index costs every insert.
            "CREATE INDEX audit_records_ts ON audit_records (ts)",
            "CREATE INDEX audit_records_user ON audit_records (user_id, ts)",
            "CREATE INDEX audit_records_app ON audit_records (client_id, ts)",
            "CREATE TABLE audit_data_sources (data_source text NOT NULL,"
            " ts double precision NOT NULL, node text NOT NULL, seq bigint NOT NULL,"
            " PRIMARY KEY (data_source, ts, node, seq))",
            "CREATE TABLE audit_chains (node text PRIMARY KEY, key_id text NOT NULL DEFAULT '',"
            " first_seq bigint NOT NULL DEFAULT 1,"
            f" anchor_hash text NOT NULL DEFAULT '{GENESIS}',"
            " last_seq bigint NOT NULL DEFAULT 0,"
            f" last_hash text NOT NULL DEFAULT '{GENESIS}')",
            "CREATE TABLE audit_journals (node text NOT NULL, name text NOT NULL,"
            " mark bigint NOT NULL, PRIMARY KEY (node, name))",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# The advisory lock the migrations are applied under (any constant; a clash with another
# user of advisory locks would only make one wait for the other).
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('policyd audit schema', 0))"

_COLUMNS = ", ".join(("node", "seq", *FIELDS, "prev_hash", "hash"))
_COPY = f"COPY audit_records ({_COLUMNS}) FROM STDIN"
_COPY_DS = "COPY audit_data_sources (data_source, ts, node, seq) FROM STDIN"
P = ParamSpec("P")
R = TypeVar("R")
_CHAIN_ORDER = f"SELECT seq, {', '.join(FIELDS)}, prev_hash, hash FROM audit_records"


class AuditIndexUnavailable(PolicydError):
    """The PostgreSQL audit index cannot be reached or used (the indexer retries)."""


def connect(url: str) -> psycopg.Connection[Any]:
    """An autocommit connection with the audit schema in place."""
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name="policyd-audit",
        )
    except (psycopg.Error, ValueError) as exc:
        raise AuditIndexUnavailable(
            f"cannot connect to the audit database {redact(url)}: {problem(url, exc)}"
        ) from None
    try:
        migrate(conn)
    except psycopg.Error as exc:
        conn.close()
        raise AuditIndexUnavailable(
            f"cannot prepare the audit tables in {redact(url)}: {problem(url, exc)}"
        ) from None
    return conn


def _applied(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('audit_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    version = conn.execute("SELECT max(version) FROM audit_schema").fetchone()
    return int(version[0] or 0) if version else 0


def migrate(conn: psycopg.Connection[Any]) -> None:
    """Apply the migrations not applied yet, under an advisory lock: replicas starting
    together apply each once (the others wait, then find it done)."""
    if _applied(conn) == SCHEMA_VERSION:
        return
    with conn.transaction():
        conn.execute(_SCHEMA_LOCK)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS audit_schema (version integer PRIMARY KEY,"
            " applied double precision NOT NULL)"
        )
        done = _applied(conn)
        if done > SCHEMA_VERSION:
            raise AuditIndexUnavailable(
                f"the audit tables are at schema version {done}, newer than this policyd"
                f" knows ({SCHEMA_VERSION}): upgrade it"
            )
        for version, statements in MIGRATIONS:
            if version <= done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO audit_schema (version, applied) VALUES (%s, %s)",
                (version, time.time()),
            )


def key_id(key: bytes) -> str:
    """Names a chain key without revealing it: which key a node's chain was made with."""
    return hmac.new(key, b"policyd audit key id", hashlib.sha256).hexdigest()[:16]


def _without_nul(values: list[Any]) -> list[Any]:
    """PostgreSQL text holds no NUL character: U+FFFD instead (the chain then covers what
    is stored, so it still verifies)."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, str):
            value = value.replace("\0", "\ufffd")
        elif isinstance(value, list):
            value = [v.replace("\0", "\ufffd") if isinstance(v, str) else v for v in value]
        out.append(value)
    return out


class _PgWriting:
    """One write transaction of one node's chain (its row in audit_chains is locked)."""

    def __init__(
        self, conn: psycopg.Connection[Any], node: str, seq: int, head: str, key_id: str
    ) -> None:
        self.conn = conn
        self.node = node
        self.seq = seq
        self.head = head
        self.key_id = key_id
        self.moved = False

    def mark(self, journal: str) -> int:
        row = self.conn.execute(
            "SELECT mark FROM audit_journals WHERE node = %s AND name = %s", (self.node, journal)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def set_mark(self, journal: str, offset: int) -> None:
        self.conn.execute(
            "INSERT INTO audit_journals (node, name, mark) VALUES (%s, %s, %s)"
            " ON CONFLICT (node, name) DO UPDATE SET mark = excluded.mark",
            (self.node, journal, offset),
        )

    def chain_head(self) -> tuple[int, str]:
        """The newest record of this node's chain in audit_records; with none left (all
        pruned), the head its audit_chains row (locked by this transaction) carries on from.
        Read from the records, not the row: the row is the indexer's own, and the check
        that uses this (Indexer._check_head) looks for newest records deleted or edited."""
        row = self.conn.execute(
            "SELECT seq, hash FROM audit_records WHERE node = %s ORDER BY seq DESC LIMIT 1",
            (self.node,),
        ).fetchone()
        return (self.seq, self.head) if row is None else (int(row[0]), str(row[1]))

    def append(self, key: bytes, records: list[Line]) -> int:
        if not self.key_id:
            self.key_id = key_id(key)
        seq, prev, node = self.seq, self.head, self.node
        keyed = hmac.new(key, digestmod=hashlib.sha256)
        rows: list[tuple[Any, ...]] = []
        ds_rows: list[tuple[str, float, str, int]] = []
        for canonical, values in records:
            if b"\\u0000" in canonical:  # a NUL somewhere (or a text that looks like one)
                values = _without_nul(values)
                canonical = CANONICAL.encode(values).encode()
            seq += 1
            mac = keyed.copy()
            mac.update(prev.encode() + canonical)
            digest = mac.hexdigest()
            ts = values[1]
            data_sources = values[_DATA_SOURCES]
            for name in data_sources:
                ds_rows.append((name, ts, node, seq))
            values[_SCOPES] = " ".join(values[_SCOPES])
            values[_DATA_SOURCES] = json_strings(data_sources)
            rows.append((node, seq, *values, prev, digest))
            prev = digest
        with self.conn.cursor() as cur:
            # COPY: several times the rate of INSERTs (the indexer must outrun the servers).
            with cur.copy(_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
            if ds_rows:  # unique by (node, seq): the node's chain lock orders its indexers
                with cur.copy(_COPY_DS) as copy:
                    for ds_row in ds_rows:
                        copy.write_row(ds_row)
        self.seq, self.head, self.moved = seq, prev, True
        return len(rows)


@contextmanager
def _unavailable(url: str) -> Iterator[None]:
    """A database error as one line naming the database (for the commands)."""
    try:
        yield
    except psycopg.Error as exc:
        raise AuditIndexUnavailable(
            f"the audit database {redact(url)} failed: {problem(url, exc)}"
        ) from None


def _one_line(method: Callable[Concatenate[PgIndex, P], R]) -> Callable[Concatenate[PgIndex, P], R]:
    @functools.wraps(method)
    def wrapper(self: PgIndex, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with _unavailable(self.url):
            return method(self, *args, **kwargs)

    return wrapper


class PgIndex:
    """The PostgreSQL audit index: the writer of `node`'s chain (journal.Indexer), and the
    reader of every node's records (`policyd audit ...`)."""

    errors: tuple[type[Exception], ...] = (psycopg.Error, AuditIndexUnavailable)
    # A transaction costs several round trips and the server's work beside its records:
    # measured (indexer + PostgreSQL CPU per record), 54 us in batches of 100 with INSERTs,
    # 44 with COPY, 29 in batches of 250 (the SQLite file: 21-29 us). About 0.1 s of
    # records per pass keeps a busy replica's indexer in step on a 2-core host.
    pass_interval = 0.1

    def __init__(self, url: str, node: str, *, key: bytes | None = None) -> None:
        if not node:
            raise PolicydError("the PostgreSQL audit index needs this replica's node name")
        self.url = url
        self.node = node
        self.key = key
        self._conn: psycopg.Connection[Any] | None = connect(url)  # fails early, in one line
        self._chain_made = False

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._conn = None
            conn = self._conn = connect(self.url)
            self._chain_made = False
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    # -- writing (Index) -----------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[Writing]:
        conn = self._connection()
        with conn.transaction():
            if not self._chain_made:
                conn.execute(
                    "INSERT INTO audit_chains (node) VALUES (%s) ON CONFLICT (node) DO NOTHING",
                    (self.node,),
                )
            # The node's lock: one writer of its chain and its marks at a time.
            row = conn.execute(
                "SELECT last_seq, last_hash, key_id FROM audit_chains WHERE node = %s FOR UPDATE",
                (self.node,),
            ).fetchone()
            assert row is not None  # made above, and never deleted
            writing = _PgWriting(conn, self.node, int(row[0]), str(row[1]), str(row[2]))
            yield writing
            if writing.moved:
                conn.execute(
                    "UPDATE audit_chains SET last_seq = %s, last_hash = %s, key_id = %s"
                    " WHERE node = %s",
                    (writing.seq, writing.head, writing.key_id, self.node),
                )
        self._chain_made = True

    def forget(self, journal: str) -> None:
        self._connection().execute(
            "DELETE FROM audit_journals WHERE node = %s AND name = %s", (self.node, journal)
        )

    @_one_line
    def prune(
        self,
        *,
        before: float | None = None,
        max_bytes: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Delete each node's oldest records (older than `before`; or, when the audit
        tables take more than max_bytes, the oldest share of each chain that brings them
        under it, plus 10 %) and move each chain's anchor, under that node's lock.
        `on_progress(deleted, total)`: total as the chains stood just before."""
        conn = self._connection()
        share = None
        if max_bytes is not None:
            used = self.used_bytes()
            if used > max_bytes:
                share = min(1.0, (used - max_bytes) / used + 0.1)
        removed = 0
        nodes = [str(r[0]) for r in conn.execute("SELECT node FROM audit_chains ORDER BY node")]
        report: Callable[[int], None] | None = None
        if on_progress is not None:
            total = 0
            for node in nodes:
                cut, first = _cut(conn, node, before, share)
                total += max(0, cut - first + 1) if cut is not None and first is not None else 0
            on_progress(0, total)

            def report(n: int) -> None:
                on_progress(removed + n, max(total, removed + n))

        for node in nodes:
            removed += self._prune_chain(conn, node, before, share, report)
        return removed

    def used_bytes(self) -> int:
        row = (
            self._connection()
            .execute(
                "SELECT pg_total_relation_size('audit_records')"
                " + pg_total_relation_size('audit_data_sources')"
            )
            .fetchone()
        )
        return int(row[0]) if row else 0

    @staticmethod
    def _prune_chain(
        conn: psycopg.Connection[Any],
        node: str,
        before: float | None,
        share: float | None,
        on_deleted: Callable[[int], None] | None = None,
    ) -> int:
        with conn.transaction():
            conn.execute("SELECT 1 FROM audit_chains WHERE node = %s FOR UPDATE", (node,))
            cut, first = _cut(conn, node, before, share)
            if cut is None:
                return 0
            last = conn.execute(
                "SELECT seq, hash FROM audit_records WHERE node = %s AND seq <= %s"
                " ORDER BY seq DESC LIMIT 1",
                (node, cut),
            ).fetchone()
            if last is None:
                return 0
            keep = conn.execute(
                "SELECT seq, prev_hash FROM audit_records WHERE node = %s AND seq > %s"
                " ORDER BY seq LIMIT 1",
                (node, cut),
            ).fetchone()
            # The data-source rows of the records going: by name, up to their newest time.
            for name, newest in conn.execute(
                "SELECT j.name, max(r.ts) FROM audit_records r,"
                " jsonb_array_elements_text(r.data_sources::jsonb) AS j(name)"
                " WHERE r.node = %s AND r.seq <= %s GROUP BY j.name",
                (node, cut),
            ).fetchall():
                conn.execute(
                    "DELETE FROM audit_data_sources WHERE data_source = %s AND ts <= %s"
                    " AND node = %s AND seq <= %s",
                    (name, newest, node, cut),
                )
            removed, upto = 0, (cut if first is None else first - 1)
            while True:
                upto = min(cut, upto + PRUNE_BATCH)
                removed += conn.execute(
                    "DELETE FROM audit_records WHERE node = %s AND seq <= %s", (node, upto)
                ).rowcount
                if on_deleted is not None:
                    on_deleted(removed)
                if upto >= cut:
                    break
            first_seq, anchor = (keep[0], keep[1]) if keep else (last[0] + 1, last[1])
            conn.execute(
                "UPDATE audit_chains SET first_seq = %s, anchor_hash = %s WHERE node = %s",
                (first_seq, anchor, node),
            )
        return int(removed)

    # -- reading (reader.Reader) ---------------------------------------------------------

    def _records(self, sql: str, args: list[Any]) -> list[StoredRecord]:
        rows = self._connection().execute(sql, args).fetchall()
        return [stored(row[:-1], row[-1]) for row in rows]

    @_one_line
    def query(self, q: Query) -> list[StoredRecord]:
        records = self._records(*q.sql(POSTGRES))
        if q.after_seq is None:
            records.reverse()
        return records

    @_one_line
    def position(self) -> Position:
        rows = self._connection().execute("SELECT node, last_seq FROM audit_chains").fetchall()
        return {str(node): int(seq) for node, seq in rows}

    @_one_line
    def newer(self, position: Position, q: Query) -> tuple[list[StoredRecord], Position]:
        """The records indexed after `position`, chain by chain (a chain's seq is its
        commit order; rows of different chains may commit in any order)."""
        moved = dict(position)
        batch: list[StoredRecord] = []
        for node in self.position():
            if q.node is not None and node != q.node:
                continue
            after = Query(**{**asdict(q), "node": node, "after_seq": position.get(node, 0)})
            found = self.query(after)
            if found:
                moved[node] = found[-1].seq
                batch += found
        batch.sort(key=lambda s: (s.record.ts, s.node, s.seq))
        return batch, moved

    @_one_line
    def show(self, record_id: str) -> StoredRecord | None:
        found = show_sql(POSTGRES, record_id)
        if found is None:
            return None
        records = self._records(*found)
        return records[0] if records else None

    @_one_line
    def stats(self, since: float | None, until: float | None) -> dict[str, dict[str, int]]:
        conn = self._connection()
        return count_stats(
            lambda sql, args: conn.execute(sql, args).fetchall(),
            POSTGRES,
            since,
            until,
        )

    @_one_line
    def journal_mark(self, name: str) -> int | None:
        row = (
            self._connection()
            .execute(
                "SELECT mark FROM audit_journals WHERE node = %s AND name = %s", (self.node, name)
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    @_one_line
    def verify_chains(
        self, on_progress: Callable[[int, int], None] | None = None
    ) -> list[VerifyResult]:
        """Every node's chain from its anchor to its head, in one snapshot.
        `on_progress(checked, total)`: total is what the chains hold, anchor to head."""
        if self.key is None:
            raise PolicydError("verifying the audit chain needs the audit key")
        key, mine = self.key, key_id(self.key)
        conn = self._connection()
        results = []
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            chains = conn.execute(
                "SELECT node, key_id, first_seq, anchor_hash, last_seq, last_hash"
                " FROM audit_chains ORDER BY node"
            ).fetchall()
            total = sum(max(0, int(c[4]) - int(c[2]) + 1) for c in chains)
            done = 0
            if on_progress is not None:
                on_progress(0, total)
            for node, chain_key, first_seq, anchor, last_seq, last_hash in chains:
                if chain_key and chain_key != mine:
                    results.append(
                        VerifyResult(
                            False,
                            0,
                            anchor,
                            f"its chain was made with another audit key (key id {chain_key};"
                            f" this one is {mine}): verify with that node's audit.key_file",
                            None,
                            node,
                        )
                    )
                    continue
                with conn.cursor(name="audit_verify") as cur:
                    cur.itersize = 2000
                    cur.execute(_CHAIN_ORDER + " WHERE node = %s ORDER BY seq", (node,))
                    result = walk_chain(
                        key,
                        int(first_seq),
                        anchor,
                        (stored(r, node) for r in cur),
                        node,
                        on_checked=_shifted(on_progress, done, total),
                    )
                results.append(_against_head(result, int(first_seq), int(last_seq), last_hash))
                # A broken chain stops early: count it whole, so the bar still ends at the total.
                done += max(result.checked, int(last_seq) - int(first_seq) + 1)
                if on_progress is not None:
                    on_progress(done, max(total, done))
        return results


def _shifted(
    on_progress: Callable[[int, int], None] | None, done: int, total: int
) -> Callable[[int], None] | None:
    """A chain's `on_checked(n)` as the whole walk's `on_progress(done + n, total)`."""
    if on_progress is None:
        return None
    report = on_progress
    return lambda n: report(done + n, max(total, done + n))


def _cut(
    conn: psycopg.Connection[Any], node: str, before: float | None, share: float | None
) -> tuple[int | None, int | None]:
    """Where prune cuts the node's chain (its last record to delete; None: none) and the
    chain's first record."""
    cut: int | None = None
    row = conn.execute("SELECT min(seq) FROM audit_records WHERE node = %s", (node,)).fetchone()
    first = None if row is None or row[0] is None else int(row[0])
    if first is None:
        return None, None
    if before is not None:
        row = conn.execute(
            "SELECT max(seq) FROM audit_records WHERE node = %s AND ts < %s",
            (node, before),
        ).fetchone()
        cut = None if row is None or row[0] is None else int(row[0])
    if share is not None:
        row = conn.execute("SELECT count(*) FROM audit_records WHERE node = %s", (node,)).fetchone()
        size_cut = first + int((int(row[0]) if row else 0) * share) - 1
        if size_cut >= first:
            cut = size_cut if cut is None else max(cut, size_cut)
    return cut, first


def _against_head(result: VerifyResult, first_seq: int, last_seq: int, head: str) -> VerifyResult:
    """A whole chain must end at the head its indexer recorded: else its newest records
    were deleted (or some were added past it)."""
    if not result.ok:
        return result
    found = first_seq + result.checked - 1
    if found < last_seq:
        problem = (
            f"records {found + 1} to {last_seq} are missing (the chain's head is record"
            f" {last_seq}): deleted"
        )
    elif found > last_seq or result.head != head:
        problem = f"the chain runs past its head (record {last_seq}): inserted or edited"
    else:
        return result
    return VerifyResult(False, result.checked, result.head, problem, last_seq, result.node)
