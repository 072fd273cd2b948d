"""The decision-time view of the store, cached exactly.

Every write to a table that changes decisions bumps the store's generation in the same
transaction (migrations.DECISION_TABLES), from whatever process made it. The caches are
filed under the generation they were filled in: a view uses them only when the store's
generation is still theirs, otherwise it starts new caches. So a revocation is never served
from a cache once its write has committed, in this process or any other sharing the file,
and a cache entry is never older than the generation it is filed under: values are read
after the generation, and a cache is only ever replaced by one of a newer generation.

Every decision starts with `Facts.view()` (or, for a remembered answer, `Facts.recall()`),
which asks SQLite whether anything has committed since this thread last read the
generation: `PRAGMA data_version` on the thread's own decision-time connection (one read
transaction, about 3 us). Only when it has moved is the generation read again (one indexed
read of a one-row table). data_version does not move for a connection's own commits, so
decisions read through connections of their own that never write (query_only), never the
store's write connections. A view's reads (the check itself, the generation and every row
it reads through) are one read transaction, so one decision sees one state of the store even
when a write commits while it runs; the engine ends it when the decision ends
(`Facts.end`, or leaving the View's `with` block). Nothing here opens, maps or locks
SQLite's files itself: on
POSIX, closing any other descriptor of a file drops every lock the process holds on it,
SQLite's own included (issue 13; https://sqlite.org/howtocorrupt.html, section 2.2).

The caches hold what decisions ask for again and again: app rows, consents, grants, the
user's own access, revoked token ids, signing keys, data-source labels (for policy
conditions), connectors and which connector serves each data source (connector.attach), and
verified token claims.

On PostgreSQL (`PgFacts`, pgfacts.py) the same caches are filed under the generation this
process has applied, which its Replica thread moves as the database notifies it
(replica.py). A view
answers from them only while the replica is fresh (its lease held, its listening
connection up), so a repeated check costs no round trip; a cache miss reads in a
REPEATABLE READ snapshot whose generation must be the caches' (else the decision starts
over once, on the newer generation: StoreMoved). A replica that is not fresh reads every
decision afresh from the database, in a snapshot of its own, and denies STORE_UNAVAILABLE
when that fails too.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import TLRUCache

from policyd.core import metrics
from policyd.core.errors import StoreUnavailable
from policyd.core.model import Access
from policyd.store import sqlite as sqlite_store
from policyd.store.base import Store
from policyd.store.sqlite import SqliteStore, connect

_GENERATION = "SELECT value FROM generation WHERE id = 1"
# Moves whenever another connection, in any process, has committed to the file.
_DATA_VERSION = "PRAGMA data_version"
REMEMBERED_DECISIONS = 16_384
_APP = "SELECT enabled, allowed_scopes FROM apps WHERE client_id = ?"
_CONSENT = "SELECT scopes FROM consents WHERE user_id = ? AND client_id = ?"
_GRANT = (
    "SELECT access FROM grants WHERE user_id = ? AND client_id = ? AND data_source = ?"
    " AND revoked_at IS NULL"
)
_USER_ACCESS = "SELECT role FROM user_access WHERE user_id = ? AND data_source = ?"
_GRANTED_LIST = (
    "SELECT g.data_source, g.access, u.role FROM grants g JOIN user_access u"
    " ON u.user_id = g.user_id AND u.data_source = g.data_source"
    " WHERE g.user_id = ? AND g.client_id = ? AND g.revoked_at IS NULL ORDER BY g.data_source"
)
_REVOKED = "SELECT 1 FROM revoked_tokens WHERE jti = ?"
_KEY = "SELECT alg, state, public_pem FROM signing_keys WHERE kid = ?"
_LABELS = "SELECT labels FROM data_sources WHERE name = ?"
_CONNECTOR = "SELECT enabled FROM connectors WHERE connector_id = ?"
_SERVED_BY = "SELECT connector FROM data_sources WHERE name = ?"

_ACCESS = {"read": Access.READ, "write": Access.WRITE}
_MISSING = object()


@dataclass(frozen=True, slots=True)
class AppFacts:
    enabled: bool
    allowed_scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeyFacts:
    alg: str
    state: str
    public_pem: str


class _Caches:
    """All caches filled under one store generation."""

    __slots__ = ("decisions", "extra", "generation", "rows", "token_lock", "tokens")

    def __init__(self, generation: int, token_cache_size: int) -> None:
        self.generation = generation
        # Keyed by (kind, *args). Bounded crudely: cleared whole when it reaches the limit.
        self.rows: dict[tuple[str, ...], Any] = {}
        # Verified tokens, each until it expires (time-to-use = exp + leeway).
        self.tokens: TLRUCache[str, tuple[Any, float]] = TLRUCache(
            maxsize=token_cache_size, ttu=lambda _k, v, _now: v[1], timer=time.time
        )
        self.token_lock = threading.Lock()
        # Objects derived from rows (e.g. parsed public keys), owned by other modules.
        self.extra: dict[str, Any] = {}
        # Allow decisions by request (engine.Remembered); cleared whole at
        # REMEMBERED_DECISIONS, so that requests that never repeat cannot pile up.
        self.decisions: dict[Hashable, Any] = {}


class _Reads(Protocol):
    """Where a view reads what its caches miss."""

    def one(self, sql: str, args: Sequence[str]) -> tuple[Any, ...] | None: ...

    def all(self, sql: str, args: Sequence[str]) -> list[tuple[Any, ...]]: ...


class _Reader:
    """One thread's decision-time connection, and what it last confirmed: that when
    data_version read `version`, the store's generation was that of `caches`. While the
    connection's data_version still reads `version`, no other connection has committed
    since, and this one never writes: `caches` are exact."""

    __slots__ = (
        "batch",
        "batch_commits",
        "caches",
        "conn",
        "nowait",
        "open",
        "version",
        "versions",
    )

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # The cursor that asks data_version, kept: conn.execute makes one a call (0.5 us
        # of the check's 4). Its fetchone steps the statement to its end, which resets it:
        # no read transaction stays open between two checks.
        self.versions = conn.cursor()
        self.version = -1
        self.caches: _Caches | None = None
        # A view's read transaction is open (view() began it; end() or the next view ends it).
        self.open = False
        # Set on the connection of a thread that only recalls (an event loop): it never
        # waits for a lock (busy_timeout 0); a busy store sends its request to the pool.
        self.nowait = False
        # The batch (Facts.recall) under which `version` was last asked and found current,
        # and this process's commits (sqlite.commits) when it was asked.
        self.batch: object = None
        self.batch_commits = -1

    def end(self) -> None:
        if self.open:
            self.open = False
            self.conn.execute("COMMIT")

    def one(self, sql: str, args: Sequence[str]) -> tuple[Any, ...] | None:
        try:
            return self.conn.execute(sql, args).fetchone()  # type: ignore[no-any-return]
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store unreadable: {exc}") from exc

    def all(self, sql: str, args: Sequence[str]) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store unreadable: {exc}") from exc


class Facts:
    """Cached, exactly invalidated reads for decisions. Thread-safe."""

    def __init__(
        self, store: Store, *, row_cache_size: int = 200_000, token_cache_size: int = 100_000
    ) -> None:
        self.store = store
        self.path = store.path if isinstance(store, SqliteStore) else None
        self._row_limit = row_cache_size
        self._token_limit = token_cache_size
        self._swap = threading.Lock()
        self._caches = _Caches(-1, token_cache_size)
        self._local = threading.local()

    def _reader(self) -> _Reader:
        """This thread's decision-time connection (opened on first use)."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            assert self.path is not None
            try:
                conn = connect(self.path)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from exc
            try:
                conn.execute("PRAGMA query_only = ON")
            except sqlite3.Error as exc:
                conn.close()
                raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from exc
            reader = self._local.reader = _Reader(conn)
        return reader

    def close(self) -> None:
        """Close this thread's decision-time connection (others close as their threads end)."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is not None:
            self._local.reader = None
            reader.conn.close()

    def end(self) -> None:
        """End this thread's view: its read transaction (a decision's snapshot) closes."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is not None:
            try:
                reader.end()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"store unreadable: {exc}") from exc

    def view(self) -> View:
        """Start a decision: pick the caches that are exact for the store as it is now, in a
        read transaction that every read of this view shares (until `end`)."""
        reader = self._reader()
        conn = reader.conn
        try:
            reader.end()  # a view this thread left open
            if not conn.in_transaction:  # (a caller's own transaction: read inside it)
                conn.execute("BEGIN")
                reader.open = True
            # The snapshot starts here: the check, the generation and every row read below.
            version = conn.execute(_DATA_VERSION).fetchone()[0]
            caches = self._caches
            if version == reader.version and reader.caches is caches:
                return View(self, reader, caches, self._row_limit)  # nothing committed since
            row = conn.execute(_GENERATION).fetchone()
        except sqlite3.Error as exc:
            reader.open = False
            if conn.in_transaction:
                conn.rollback()
            raise StoreUnavailable(f"store unreadable: {exc}") from exc
        if row is None:
            self.end()
            raise StoreUnavailable("store unreadable: it has no generation row")
        generation = row[0]
        if caches.generation != generation:
            with self._swap:
                caches = self._caches
                if generation > caches.generation:
                    caches = self._caches = _Caches(generation, self._token_limit)
                    m = metrics.current
                    if m is not None:
                        m.generation_started()
            if caches.generation != generation:
                # This view read an older generation than the current caches: it must
                # neither use nor fill them. Give it private caches.
                return View(self, reader, _Caches(generation, 16), self._row_limit)
        reader.version = version
        reader.caches = caches
        return View(self, reader, caches, self._row_limit)

    def recall(self, key: Hashable, confirm: bool = False, batch: object = None) -> Any:
        """What View.remember() kept under this key, if nothing has been committed to the
        store since this thread last found its caches exact; else None (view() then finds
        out). No generation read and no View: the fast path of a remembered decision.

        `confirm`: for a thread that only recalls and never decides (an event loop that
        sends every other decision to a pool, serve/embedded.py), whose caches view() would
        otherwise never confirm: when they are not confirmed, confirm them here (a view:
        data_version and, when it moved, the generation row), then look.

        `batch`: the caller's token for a batch of requests that had all arrived before
        the first of them was recalled (an event loop's iteration: adapters/embedded,
        docs/asgi.md "One store check per loop iteration"). The first recall of a batch
        asks data_version as without it; the others of the same batch trust that answer,
        which was given after they arrived, unless this process has committed since (a
        write on the loop itself, which no pause separates from the next request) or
        another thread has replaced the caches."""
        try:
            reader = self._reader()
            caches = reader.caches
            if caches is self._caches and caches is not None:
                if (
                    batch is not None
                    and reader.batch is batch
                    and reader.batch_commits == sqlite_store.commits
                ):
                    return caches.decisions.get(key)
                if reader.open:
                    reader.end()  # never ask inside the snapshot of a view left open
                commits = sqlite_store.commits  # (read before the check it stands for)
                version = reader.versions.execute(_DATA_VERSION).fetchone()[0]
                if version == reader.version:
                    reader.batch, reader.batch_commits = batch, commits
                    return caches.decisions.get(key)
            if not confirm:
                return None
            if not reader.nowait:
                reader.conn.execute("PRAGMA busy_timeout = 0")
                reader.nowait = True
            commits = sqlite_store.commits
            self.view()
        except (sqlite3.Error, StoreUnavailable):
            return None  # view() reports it
        try:
            caches = reader.caches
            if caches is self._caches and caches:
                # Confirmed by the view, after the batch arrived.
                reader.batch, reader.batch_commits = batch, commits
                return caches.decisions.get(key)
            return None
        finally:
            with contextlib.suppress(StoreUnavailable):
                self.end()


def _labels(text: str) -> dict[str, str]:
    # Unreadable labels raise (a deny, INTERNAL_ERROR): read as {} they could let a
    # request past a condition that looks for a label.
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("data_sources.labels is not a JSON object")
    return {str(k): str(v) for k, v in value.items()}


class View:
    """The facts one decision sees. Not shared between threads. A context manager: leaving
    the `with` block ends its read transaction (Facts.end)."""

    __slots__ = ("_caches", "_facts", "_limit", "_reads", "_rows")

    def __init__(self, facts: Facts, reads: _Reads, caches: _Caches, limit: int) -> None:
        self._facts = facts
        self._reads = reads
        self._caches = caches
        self._rows = caches.rows
        self._limit = limit

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self._facts.end()

    @property
    def generation(self) -> int:
        return self._caches.generation

    def _one(
        self,
        key: tuple[str, ...],
        sql: str,
        args: tuple[str, ...],
        convert: Callable[[tuple[Any, ...]], Any],
    ) -> Any:
        """One row by key, converted, or None when there is no row; cached."""
        value = self._rows.get(key, _MISSING)
        if value is _MISSING:
            m = metrics.current
            if m is not None:
                m.store_read(key[0])
            row = self._reads.one(sql, args)
            value = None if row is None else convert(row)
            self._put(key, value)
        return value

    def _put(self, key: tuple[str, ...], value: Any) -> None:
        if len(self._rows) >= self._limit:
            self._rows.clear()
        self._rows[key] = value

    def app(self, client_id: str) -> AppFacts | None:
        return self._one(  # type: ignore[no-any-return]
            ("app", client_id),
            _APP,
            (client_id,),
            lambda r: AppFacts(bool(r[0]), frozenset(r[1].split())),
        )

    def consent(self, user_id: str, client_id: str) -> frozenset[str] | None:
        return self._one(  # type: ignore[no-any-return]
            ("consent", user_id, client_id),
            _CONSENT,
            (user_id, client_id),
            lambda r: frozenset(r[0].split()),
        )

    def grant(self, user_id: str, client_id: str, data_source: str) -> Access | None:
        return self._one(  # type: ignore[no-any-return]
            ("grant", user_id, client_id, data_source),
            _GRANT,
            (user_id, client_id, data_source),
            lambda r: _ACCESS[r[0]],
        )

    def user_access(self, user_id: str, data_source: str) -> Access | None:
        return self._one(  # type: ignore[no-any-return]
            ("user-access", user_id, data_source),
            _USER_ACCESS,
            (user_id, data_source),
            lambda r: _ACCESS[r[0]],
        )

    def shared(self, user_id: str, client_id: str) -> tuple[tuple[str, Access], ...]:
        """The data sources the app can use for the user now, each at the level it can use:
        its live grant capped at the user's own access (none without that access); by name.
        Token introspection and the Connected apps page report this."""
        key = ("shared", user_id, client_id)
        value = self._rows.get(key, _MISSING)
        if value is _MISSING:
            m = metrics.current
            if m is not None:
                m.store_read("shared")
            rows = self._reads.all(_GRANTED_LIST, (user_id, client_id))
            value = tuple((ds, min(_ACCESS[access], _ACCESS[role])) for ds, access, role in rows)
            self._put(key, value)
        return value  # type: ignore[no-any-return]

    def granted(self, user_id: str, client_id: str, need: Access) -> tuple[str, ...]:
        """Data sources granted to the app at `need` or more that the user still reaches at
        `need` (those `shared` at `need` or more)."""
        key = ("granted", user_id, client_id, need.label)
        value = self._rows.get(key, _MISSING)
        if value is _MISSING:
            value = tuple(ds for ds, level in self.shared(user_id, client_id) if level >= need)
            self._put(key, value)
        return value  # type: ignore[no-any-return]

    def data_source_labels(self, name: str) -> dict[str, str]:
        """A data source's labels ({} when it has none or does not exist). Do not modify."""
        labels = self._one(("labels", name), _LABELS, (name,), lambda r: _labels(r[0]))
        return labels if labels is not None else {}

    def connector_enabled(self, connector_id: str) -> bool | None:
        """Whether the connector is enabled; None when there is no such connector."""
        return self._one(  # type: ignore[no-any-return]
            ("connector", connector_id), _CONNECTOR, (connector_id,), lambda r: bool(r[0])
        )

    def served_by(self, data_source: str) -> tuple[str | None] | None:
        """(the connector serving the data source,) with None for the hub itself; None when
        there is no such data source."""
        return self._one(  # type: ignore[no-any-return]
            ("served-by", data_source), _SERVED_BY, (data_source,), lambda r: (r[0],)
        )

    def token_revoked(self, jti: str) -> bool:
        return self._one(("revoked", jti), _REVOKED, (jti,), bool) is not None

    def key(self, kid: str) -> KeyFacts | None:
        return self._one(  # type: ignore[no-any-return]
            ("key", kid), _KEY, (kid,), lambda r: KeyFacts(r[0], r[1], r[2])
        )

    def derived(self, name: str, build: Callable[[], Any]) -> Any:
        """A value derived from facts of this generation (built once, then cached)."""
        extra = self._caches.extra
        value = extra.get(name, _MISSING)
        if value is _MISSING:
            value = extra[name] = build()
        return value

    def remembered(self, key: Hashable) -> Any:
        """What remember() kept under this key in this generation, or None."""
        return self._caches.decisions.get(key)

    def remember(self, key: Hashable, value: Any) -> None:
        decisions = self._caches.decisions
        if len(decisions) >= REMEMBERED_DECISIONS:
            decisions.clear()
        decisions[key] = value

    def cached_token(self, token: str) -> Any:
        """What cache_token stored for this token, if it has not expired."""
        caches = self._caches
        with caches.token_lock:
            hit = caches.tokens.get(token)
        return None if hit is None else hit[0]

    def cache_token(self, token: str, verified: Any, until: float) -> None:
        caches = self._caches
        with caches.token_lock:
            caches.tokens[token] = (verified, until)
