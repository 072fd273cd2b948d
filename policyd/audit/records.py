"""The audit log: one hash-chained record per decision, durable before the decision is answered.

This module holds what a record is, its hash chain and the SQLite file (its own, WAL);
reader.py everything that reads it: queries, tail, show, stats, verify, prune. Writing is in
journal.py: a decision's record is made durable by one append to its process's journal (a
memory-mapped file), and an indexer moves records from the journals into this file,
extending the chain.

Tamper evidence: each record stores `prev_hash` (the hash of the record before it) and
`hash = HMAC-SHA256(key, prev_hash + canonical JSON of its fields)`, with a 32-byte key in
its own 0600 file (`audit.key_file`): whoever can write the database but not read the key
cannot forge a link. The chain is extended inside the indexer's write transaction, so
several indexers on one file still form one chain. `verify` recomputes it and names the
first broken link. Pruning removes the oldest records and moves the chain's anchor (the
first kept record and the hash it must follow) in the same transaction, so what remains
still verifies.

Never stored: the token, an Authorization header, a body, a secret, query values.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import json.scanner
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from policyd.core.errors import PolicydError
from policyd.core.files import create_private, create_whole
from policyd.core.model import ActionTarget, CheckInput, Decision, HttpTarget
from policyd.store.sqlite import transaction

log = logging.getLogger(__name__)

GENESIS = "0" * 64
# How long after its decision id's clock a record may be written (decision + commit wait).
SHOW_WINDOW_SECONDS = 60.0
BUSY_TIMEOUT_MS = 5000
# The most data-source names a record keeps (each cut to 200 characters).
RECORD_DATA_SOURCES = 256

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        ts REAL NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        client_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        scopes TEXT NOT NULL,
        data_sources TEXT NOT NULL,
        action TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        door TEXT NOT NULL,
        request_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        latency_us INTEGER NOT NULL,
        message TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    # Every index costs a page write per commit, so only the lookups operators need most:
    # by time, by user, by app, and (below) by data source. A record is found by its
    # decision id through the time inside the id (a UUIDv7); other filters narrow these.
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts)",
    "CREATE INDEX IF NOT EXISTS audit_user ON audit (user_id, ts)",
    "CREATE INDEX IF NOT EXISTS audit_app ON audit (client_id, ts)",
    # One row per (record, data source), for "who touched this data source" queries.
    """CREATE TABLE IF NOT EXISTS audit_data_sources (
        data_source TEXT NOT NULL,
        ts REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (data_source, ts, seq)
    ) WITHOUT ROWID""",
    # The chain's anchor: the first record kept and the hash it must follow.
    """CREATE TABLE IF NOT EXISTS audit_anchor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        first_seq INTEGER NOT NULL,
        prev_hash TEXT NOT NULL
    )""",
    "INSERT OR IGNORE INTO audit_anchor (id, first_seq, prev_hash) VALUES (1, 1, '"
    + GENESIS
    + "')",
    # How far each journal file (journal.py) has been indexed, as a byte offset, moved in
    # the same transaction as its records: a journal is never indexed twice.
    """CREATE TABLE IF NOT EXISTS audit_journal (
        name TEXT PRIMARY KEY,
        offset INTEGER NOT NULL
    )""",
)

# The fields covered by the hash, in the order of AuditRecord.
FIELDS = (
    "id",
    "ts",
    "decision",
    "reason",
    "rule_id",
    "policy_version",
    "client_id",
    "user_id",
    "scopes",
    "data_sources",
    "action",
    "method",
    "path",
    "door",
    "request_id",
    "jti",
    "latency_us",
    "message",
)
COLUMNS = ", ".join(FIELDS)
_SCOPES = FIELDS.index("scopes")
_DATA_SOURCES = FIELDS.index("data_sources")
_INSERT = (
    f"INSERT INTO audit (seq, {COLUMNS}, prev_hash, hash)"
    f" VALUES (?, {', '.join('?' * len(FIELDS))}, ?, ?)"
)


# The encoder of a record's canonical JSON (what the chain hashes and a journal line holds).
CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class AuditUnavailable(PolicydError):
    """The record could not be made durable; the decision must not be answered as allow."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: str
    ts: float
    decision: str
    reason: str
    rule_id: str
    policy_version: str
    client_id: str
    user_id: str
    scopes: tuple[str, ...]
    data_sources: tuple[str, ...]
    action: str
    method: str
    path: str
    door: str
    request_id: str
    jti: str
    latency_us: int
    message: str

    def canonical(self) -> str:
        """The JSON array of the fields, the form the chain hashes and a journal holds."""
        return CANONICAL.encode(self.json_values())

    def json_values(self) -> list[Any]:
        """The fields in order, as JSON values (tuples as lists)."""
        return [list(v) if isinstance(v, tuple) else v for v in self.values()]

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in FIELDS)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scopes"] = list(self.scopes)
        out["data_sources"] = list(self.data_sources)
        return out


@dataclass(frozen=True, slots=True)
class StoredRecord:
    seq: int
    record: AuditRecord
    prev_hash: str
    hash: str
    # The replica whose chain holds it (PostgreSQL index; "" in the SQLite file, one chain).
    node: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = self.record.as_dict()
        out.update(seq=self.seq, prev_hash=self.prev_hash, hash=self.hash)
        if self.node:
            out["node"] = self.node
        return out


def chain_hash(key: bytes, prev_hash: str, record: AuditRecord) -> str:
    message = (prev_hash + record.canonical()).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def load_key(path: str | Path, *, create: bool = False) -> bytes:
    """The chain key: 32 random bytes in a file of mode 0600, made on first use."""
    path = Path(path)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise PolicydError(f"no audit key at {path}") from None
        try:
            create_whole(path, secrets.token_bytes(32))  # or another process made it first
        except OSError as exc:
            raise PolicydError(f"cannot make audit key {path}: {exc.strerror}") from None
        return load_key(path)
    except OSError as exc:
        raise PolicydError(f"cannot read audit key {path}: {exc.strerror}") from None
    if len(key) < 32:
        raise PolicydError(f"audit key {path} is shorter than 32 bytes")
    return key


def masked_path(target: HttpTarget | ActionTarget | None) -> tuple[str, str]:
    """(method, path) for the record: query values are replaced by '*', never stored."""
    if isinstance(target, HttpTarget):
        # A caller may leave the query (or a fragment) in the path: mask it too.
        path, _, in_path = target.path.partition("?")
        path = path.partition("#")[0][:2048]
        query = "&".join(q for q in (in_path.partition("#")[0], target.query) if q)
        if query:
            keys = [k for k, _ in parse_qsl(query, keep_blank_values=True)]
            path += "?" + "&".join(f"{k[:64]}=*" for k in keys[:32])
        return target.method[:16], path
    return "", ""


def record_for(
    request: CheckInput, decision: Decision, latency_us: int, now: float | None = None
) -> AuditRecord:
    p = decision.principal
    method, path = masked_path(request.target)
    action = decision.action
    if not action and isinstance(request.target, ActionTarget):
        action = request.target.action[:200]
    data_sources = decision.data_sources
    if not data_sources and isinstance(request.target, ActionTarget):
        data_sources = request.target.data_sources
    # Bounded, like every field: a record is one journal line (journal.py reads them in
    # 1 MiB chunks).
    data_sources = tuple(ds[:200] for ds in data_sources[:RECORD_DATA_SOURCES])
    return AuditRecord(
        id=decision.decision_id,
        ts=time.time() if now is None else now,
        decision="allow" if decision.allowed else "deny",
        reason=decision.reason.name,
        rule_id=decision.rule_id,
        policy_version=decision.policy_version,
        client_id=p.client_id if p else "",
        user_id=p.sub if p else "",
        scopes=p.scopes if p else (),
        data_sources=data_sources,
        action=action,
        method=method,
        path=path,
        door=request.door[:32],
        request_id=request.request_id[:200],
        jti=p.jti if p else "",
        latency_us=latency_us,
        message=decision.message[:500],
    )


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        if not path.exists():
            raise PolicydError(f"no audit log at {path}")
        conn = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    else:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def open_log_file(path: Path, sync: str) -> sqlite3.Connection:
    """Create (mode 0600) or open the audit file for writing, with its schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    create_private(path)
    conn = connect(path)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new file only
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
    with transaction(conn):
        for statement in _SCHEMA:
            conn.execute(statement)
    return conn


def chain_head(conn: sqlite3.Connection) -> tuple[int, str]:
    """(seq, hash) of the chain's newest record; with none, those the first must follow."""
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if last is None:
        anchor = conn.execute(
            "SELECT first_seq, prev_hash FROM audit_anchor WHERE id = 1"
        ).fetchone()
        return int(anchor[0]) - 1, str(anchor[1])
    return int(last[0]), str(last[1])


def append_records(
    conn: sqlite3.Connection, key: bytes, records: Iterable[tuple[bytes, list[Any]]]
) -> int:
    """(Inside the caller's write transaction.) Chain the records after the last one and
    insert them; returns how many. Each record is its canonical JSON, as a journal line
    holds it, with the list of FIELDS values it holds (fields_of_line)."""
    seq, prev = chain_head(conn)
    rows = []
    ds_rows: list[tuple[str, float, int]] = []
    keyed = hmac.new(key, digestmod=hashlib.sha256)
    for canonical, values in records:
        seq += 1
        # The line is AuditRecord.canonical() of these values (journal.py writes nothing
        # else), so it is what verify recomputes from the stored row.
        mac = keyed.copy()  # the key's HMAC state, made once per batch
        mac.update(prev.encode() + canonical)
        digest = mac.hexdigest()
        ts = values[1]
        data_sources = values[_DATA_SOURCES]
        for name in data_sources:
            ds_rows.append((name, ts, seq))
        # The list is the caller's (fields_of_line makes a new one per line): made into
        # the stored row in place.
        values[_SCOPES] = " ".join(values[_SCOPES])
        values[_DATA_SOURCES] = json_strings(data_sources)
        rows.append((seq, *values, prev, digest))
        prev = digest
    conn.executemany(_INSERT, rows)
    if ds_rows:
        conn.executemany(
            "INSERT OR IGNORE INTO audit_data_sources (data_source, ts, seq) VALUES (?, ?, ?)",
            ds_rows,
        )
    return len(rows)


# The string escaper CANONICAL uses (C): a str as JSON.
json_string: Callable[[str], str] = json.encoder.encode_basestring


def json_strings(names: list[str]) -> str:
    """CANONICAL.encode(names) for a list of strings, without the encoder's Python layers."""
    return "[" + ",".join(map(json_string, names)) + "]"


def journal_dir(path: Path) -> Path:
    """The folder of the journals of the audit log at `path`."""
    return path.with_name(path.name + ".journal")


# json's scanner (C): one JSON value at an offset, as (value, end).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def fields_of_line(line: bytes) -> list[Any]:
    """The FIELDS values of one journal line (a record's canonical JSON); ValueError when
    it is not one. Journals are this service's own files (mode 0600): the check is for
    damage, so it looks at the shape, not every type."""
    text = line.decode()  # UnicodeDecodeError is a ValueError
    try:
        values, end = _SCAN(text, 0)  # json's C scanner, without json.loads's layers
    except StopIteration:  # what the scanner raises for no JSON value at all
        raise ValueError("not JSON") from None
    except RecursionError:  # damage such as a long run of "[": skipped like any other
        raise ValueError("nested too deeply") from None
    if end != len(text):
        raise ValueError("not one JSON value")
    if type(values) is not list or len(values) != len(FIELDS):
        raise ValueError("not an audit record")
    for names in (values[_SCOPES], values[_DATA_SOURCES]):
        if type(names) is not list:
            raise ValueError("not an audit record")
        for name in names:
            if type(name) is not str:
                raise ValueError("not an audit record")
    return values
