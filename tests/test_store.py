"""The policy store and its decision-time view, on real SQLite files.

store.py: migrations, file modes, WAL, the generation counter, grant history, consents and
client secrets. facts.py: the caches are exact, across Store objects and processes.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlite_utils import Database

from policyd.core.errors import NotFound
from policyd.core.model import Access, CheckInput, HttpTarget
from policyd.decision.wiring import build_engine, open_store
from policyd.oauth.storage import OAuthStorage
from policyd.pgserver import PgServer
from policyd.store.base import Store
from policyd.store.facts import Facts
from policyd.store.families import revoke_pair_families
from policyd.store.keys import KeyRing
from policyd.store.migrations import DECISION_TABLES, migrations
from policyd.store.open import facts_for
from policyd.store.open import open_store as open_url
from policyd.store.pg_migrations import MIGRATIONS as PG_MIGRATIONS
from policyd.store.pg_migrations import WRITE_LOCK
from policyd.store.replica import Replica
from policyd.store.sqlite import SqliteStore
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.helpers import Home


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, as another tool or process would open the file."""
    return sqlite3.connect(path, isolation_level=None, timeout=5)


def _db(home: Home) -> Path:
    return Path(home.config.store.path)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 0, so that any restrictive file mode comes from policyd, not the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- migrations, files, WAL -------------------------------------------------------------


def _registered_migrations() -> list[str]:
    return [m.name for m in migrations.pending(Database(memory=True))]


def _applied(path: Path) -> list[tuple[str, str]]:
    with _raw(path) as conn:
        rows = conn.execute(
            "SELECT name, applied_at FROM _sqlite_migrations WHERE migration_set = 'policyd'"
            " ORDER BY rowid"
        ).fetchall()
    conn.close()
    return [(r[0], r[1]) for r in rows]


def test_migrations_are_applied_once_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "policyd.db"
    store = SqliteStore(path)
    registered = _registered_migrations()
    assert registered, "no migrations registered"
    first = _applied(path)
    assert [name for name, _ in first] == registered
    store.add_user("carol")
    generation = store.generation()

    SqliteStore(path)  # as a second process starting on the same file would
    SqliteStore(path).migrate()

    assert _applied(path) == first, "a migration was applied again"
    assert SqliteStore(path).generation() == generation
    assert [u["user_id"] for u in SqliteStore(path).list_users()] == ["carol"]


@pytest.mark.slow
def test_processes_opening_a_new_store_together_apply_migrations_once(tmp_path: Path) -> None:
    path = tmp_path / "policyd.db"
    code = (
        "import sys; from policyd.store.sqlite import SqliteStore;"
        " SqliteStore(sys.argv[1]).add_user(sys.argv[2])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), f"user{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert [name for name, _ in _applied(path)] == _registered_migrations()
    assert sorted(u["user_id"] for u in SqliteStore(path).list_users()) == [
        f"user{i}" for i in range(4)
    ]


def test_replicas_opening_a_new_postgres_store_together_apply_migrations_once(
    pg_server: PgServer,
) -> None:
    url = pg_server.create_database("migrate_together")
    code = (
        "import sys; from policyd.store.open import open_store;"
        " s = open_store(sys.argv[1]); s.add_user(sys.argv[2]); s.close()"
    )
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, url, f"user{i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        with open_url(url) as store, store.read() as conn:
            applied = conn.execute("SELECT name FROM policyd_migrations ORDER BY name").fetchall()
            assert [r[0] for r in applied] == [name for name, _ in PG_MIGRATIONS]
            assert sorted(u["user_id"] for u in store.list_users()) == [
                f"user{i}" for i in range(4)
            ]
    finally:
        pg_server.drop_database("migrate_together")


def test_a_replica_stopped_inside_its_renewal_holds_writes_up_for_a_quarter_lease_at_most(
    pg_server: PgServer,
) -> None:
    """Stopped (SIGSTOP) between the statements of a renewal, a replica holds the writers'
    advisory lock shared: its connection's idle_in_transaction_session_timeout ends the
    session, so writes wait a quarter of a lease, not until the replica runs again."""
    url = pg_server.create_database("stuck_renewal")
    try:
        with open_url(url) as store:
            replica = Replica(url, "stuck", 2.0, lambda _generation: None)
            conn = replica.connect()
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (WRITE_LOCK,))
            began = time.monotonic()
            store.add_user("carol")  # waits for the lock
            waited = time.monotonic() - began
            assert 0.3 < waited < 1.5, waited
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
                conn.execute("SELECT 1")  # its session was ended
            conn.close()
    finally:
        pg_server.drop_database("stuck_renewal")


def test_store_file_and_its_wal_files_are_private(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "data" / "policyd.db"
    store = SqliteStore(path)
    store.add_user("carol")  # a write, so the WAL and shared-memory files exist
    files = [path, path.with_name("policyd.db-wal"), path.with_name("policyd.db-shm")]
    files.append(path.with_name("policyd.db.migrate-lock"))
    for file in files:
        assert file.exists(), file
        assert _mode(file) == 0o600, f"{file.name} has mode {_mode(file):o}"


def test_private_signing_keys_are_0600_in_a_0700_folder(
    tmp_path: Path, permissive_umask: None
) -> None:
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o755)
    os.chmod(key_dir, 0o755)
    ring = KeyRing(SqliteStore(tmp_path / "policyd.db"), key_dir)
    kids = [ring.rotate("ES256"), ring.rotate("EdDSA")]
    assert _mode(key_dir) == 0o700
    for kid in kids:
        assert _mode(key_dir / f"{kid}.pem") == 0o600
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(f"{k}.pem" for k in kids)


def test_store_uses_write_ahead_logging(tmp_path: Path) -> None:
    path = tmp_path / "policyd.db"
    SqliteStore(path)
    conn = _raw(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# -- the generation counter -------------------------------------------------------------


def _retire_previous_key(home: Home) -> None:
    old = home.keyring.ensure_active()
    home.keyring.rotate()
    home.keyring.retire(old)


def _purge_one(home: Home) -> None:
    home.store.revoke_token("long-gone", time.time() - 3600)
    assert home.store.purge_expired_revocations(time.time(), 30) == 1


STORE_WRITES: dict[str, Callable[[Home], Any]] = {
    "add_app": lambda h: h.store.add_app(
        "app2", "App 2", redirect_uris=[], scopes=["UserInfo"], confidential=False
    ),
    "set_app_enabled": lambda h: h.store.set_app_enabled("app1", False),
    "rotate_secret": lambda h: h.store.rotate_secret("app1"),
    "add_user": lambda h: h.store.add_user("carol"),
    "add_data_source": lambda h: h.store.add_data_source("ds-new"),
    "set_user_access": lambda h: h.store.set_user_access("bob", "ds-a", Access.READ),
    "change_user_access": lambda h: h.store.set_user_access("alice", "ds-a", Access.READ),
    "remove_user_access": lambda h: h.store.remove_user_access("alice", "ds-c"),
    "set_consent": lambda h: h.store.set_consent("bob", "app1", ["UserInfo"]),
    "revoke_consent": lambda h: h.store.revoke_consent("alice", "app1"),
    "disconnect": lambda h: h.store.disconnect("alice", "app1"),
    "add_grant": lambda h: h.store.add_grant("alice", "app1", "ds-c", Access.READ),
    "replace_grant": lambda h: h.store.add_grant("alice", "app1", "ds-a", Access.READ),
    "revoke_grant": lambda h: h.store.revoke_grant("alice", "app1", "ds-a"),
    "rotate_key": lambda h: h.keyring.rotate(),
    "retire_key": _retire_previous_key,
    "revoke_token": lambda h: h.store.revoke_token("jti-1", time.time() + 60),
    "purge_expired_revocations": _purge_one,
    "add_connector": lambda h: h.store.add_connector("plant-new"),
    "set_connector_enabled": lambda h: h.store.set_connector_enabled("plant-1", False),
    "rotate_connector_secret": lambda h: h.store.rotate_connector_secret("plant-1"),
    "set_data_source_connector": lambda h: h.store.set_data_source_connector("ds-c", "plant-1"),
    "take_data_source_from_connector": lambda h: h.store.set_data_source_connector("ds-b", None),
}


@pytest.mark.parametrize("write", sorted(STORE_WRITES))
def test_every_store_write_bumps_the_generation_seen_by_other_connections(
    seeded: Home, write: str
) -> None:
    seeded.store.add_connector("plant-1")
    seeded.store.set_data_source_connector("ds-b", "plant-1")
    with open_store(seeded.config, migrate=False) as other:
        before = other.generation()
        STORE_WRITES[write](seeded)
        assert other.generation() > before
        assert seeded.store.generation() == other.generation()


# One row per decision table, written with the plain sqlite3 module (no policyd code).
RAW_WRITES: dict[str, tuple[str, str, str]] = {
    "apps": (
        "INSERT INTO apps (client_id, name, redirect_uris, allowed_scopes, confidential, enabled)"
        " VALUES ('raw', 'Raw', '[]', 'UserInfo', 0, 1)",
        "UPDATE apps SET enabled = 0 WHERE client_id = 'raw'",
        "DELETE FROM apps WHERE client_id = 'raw'",
    ),
    "users": (
        "INSERT INTO users (user_id, name) VALUES ('raw', 'Raw')",
        "UPDATE users SET name = 'Raw 2' WHERE user_id = 'raw'",
        "DELETE FROM users WHERE user_id = 'raw'",
    ),
    "data_sources": (
        "INSERT INTO data_sources (name, description, labels) VALUES ('raw', '', '{}')",
        "UPDATE data_sources SET description = 'x' WHERE name = 'raw'",
        "DELETE FROM data_sources WHERE name = 'raw'",
    ),
    "user_access": (
        "INSERT INTO user_access (user_id, data_source, role) VALUES ('bob', 'ds-a', 'read')",
        "UPDATE user_access SET role = 'write' WHERE user_id = 'bob'",
        "DELETE FROM user_access WHERE user_id = 'bob'",
    ),
    "consents": (
        "INSERT INTO consents (user_id, client_id, scopes) VALUES ('bob', 'app1', 'UserInfo')",
        "UPDATE consents SET scopes = 'UserInfo DataRead' WHERE user_id = 'bob'",
        "DELETE FROM consents WHERE user_id = 'bob'",
    ),
    "grants": (
        "INSERT INTO grants (user_id, client_id, data_source, access, granted_at)"
        " VALUES ('bob', 'app1', 'ds-c', 'read', 0)",
        "UPDATE grants SET revoked_at = 1 WHERE user_id = 'bob'",
        "DELETE FROM grants WHERE user_id = 'bob'",
    ),
    "signing_keys": (
        "INSERT INTO signing_keys (kid, alg, state, public_pem)"
        " VALUES ('raw', 'ES256', 'retiring', 'x')",
        "UPDATE signing_keys SET state = 'retired' WHERE kid = 'raw'",
        "DELETE FROM signing_keys WHERE kid = 'raw'",
    ),
    "connectors": (
        "INSERT INTO connectors (connector_id, name, secret_hash, enabled)"
        " VALUES ('raw', 'Raw', 'x', 1)",
        "UPDATE connectors SET enabled = 0 WHERE connector_id = 'raw'",
        "DELETE FROM connectors WHERE connector_id = 'raw'",
    ),
    "revoked_tokens": (
        "INSERT INTO revoked_tokens (jti, expires_at, revoked_at) VALUES ('raw', 0, 0)",
        "UPDATE revoked_tokens SET expires_at = 1 WHERE jti = 'raw'",
        "DELETE FROM revoked_tokens WHERE jti = 'raw'",
    ),
}


def test_raw_writes_cover_every_decision_table() -> None:
    assert sorted(RAW_WRITES) == sorted(DECISION_TABLES)


@pytest.mark.parametrize("table", sorted(RAW_WRITES))
@pytest.mark.usefixtures("sqlite_only")
def test_plain_sqlite_writes_to_a_decision_table_bump_the_generation(
    seeded: Home, table: str
) -> None:
    conn = _raw(_db(seeded))
    try:
        for sql in RAW_WRITES[table]:
            before = seeded.store.generation()
            cur = conn.execute(sql)
            assert cur.rowcount == 1, sql
            assert seeded.store.generation() == before + 1, sql
    finally:
        conn.close()


# -- grants and consents ----------------------------------------------------------------


def test_replacing_and_revoking_grants_keeps_history_with_one_live_grant(seeded: Home) -> None:
    s = seeded.store
    s.add_grant("alice", "app1", "ds-c", Access.READ)
    s.add_grant("alice", "app1", "ds-c", Access.WRITE)  # replaces the live grant
    live = s.list_grants("alice", "app1", "ds-c")
    assert [(g.access, g.revoked_at) for g in live] == [(Access.WRITE, None)]

    s.revoke_grant("alice", "app1", "ds-c")
    assert s.list_grants("alice", "app1", "ds-c") == []
    history = s.list_grants("alice", "app1", "ds-c", include_revoked=True)
    assert [g.access for g in history] == [Access.READ, Access.WRITE]
    assert all(g.revoked_at is not None for g in history)
    with pytest.raises(NotFound):
        s.revoke_grant("alice", "app1", "ds-c")

    s.add_grant("alice", "app1", "ds-c", Access.READ)
    assert len(s.list_grants("alice", "app1", "ds-c", include_revoked=True)) == 3
    assert len(s.list_grants("alice", "app1", "ds-c")) == 1


@pytest.mark.usefixtures("sqlite_only")
def test_the_file_refuses_a_second_live_grant_for_the_same_triple(seeded: Home) -> None:
    conn = _raw(_db(seeded))
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO grants (user_id, client_id, data_source, access, granted_at)"
                " VALUES ('alice', 'app1', 'ds-a', 'read', 0)"
            )
        # A revoked row for the same triple is history and is allowed.
        conn.execute(
            "INSERT INTO grants (user_id, client_id, data_source, access, granted_at, revoked_at)"
            " VALUES ('alice', 'app1', 'ds-a', 'read', 0, 1)"
        )
    finally:
        conn.close()
    assert len(seeded.store.list_grants("alice", "app1", "ds-a")) == 1


def test_revoking_a_consent_revokes_only_that_pairs_grants(seeded: Home) -> None:
    s = seeded.store
    s.set_consent("bob", "app1", ["UserInfo", "DataRead"])
    s.set_user_access("bob", "ds-a", Access.READ)
    s.add_grant("bob", "app1", "ds-a", Access.READ)
    s.add_grant("alice", "app-off", "ds-a", Access.READ)

    assert s.revoke_consent("alice", "app1") == 2

    assert s.list_consents("alice", "app1") == []
    assert s.list_grants("alice", "app1") == []
    revoked = s.list_grants("alice", "app1", include_revoked=True)
    assert sorted(g.data_source for g in revoked) == ["ds-a", "ds-b"]
    assert all(g.revoked_at is not None for g in revoked)
    assert [g.data_source for g in s.list_grants("bob", "app1")] == ["ds-a"]
    assert [g.data_source for g in s.list_grants("alice", "app-off")] == ["ds-a"]
    assert [c["client_id"] for c in s.list_consents("alice")] == ["app-off"]
    with pytest.raises(NotFound):
        s.revoke_consent("alice", "app1")


# -- disconnect: one transaction --------------------------------------------------------

# The pair (alice, app1) as any reader sees it, in one statement (one read snapshot): the
# generation, its consent, live grants, live token families and refresh tokens, and
# whether its access token's id is revoked.
_PAIR_STATE = (
    "SELECT (SELECT value FROM generation),"
    " (SELECT count(*) FROM consents WHERE user_id = 'alice' AND client_id = 'app1'),"
    " (SELECT count(*) FROM grants WHERE user_id = 'alice' AND client_id = 'app1'"
    "  AND revoked_at IS NULL),"
    " (SELECT count(*) FROM oauth_families WHERE user_id = 'alice' AND client_id = 'app1'"
    "  AND revoked_at IS NULL),"
    " (SELECT count(*) FROM oauth_refresh_tokens r JOIN oauth_families f USING (family_id)"
    "  WHERE f.user_id = 'alice' AND f.client_id = 'app1' AND r.revoked_at IS NULL),"
    " (SELECT count(*) FROM revoked_tokens WHERE jti = 'jti-pair')"
)
_CONNECTED = (1, 2, 1, 1, 0)  # consent, live grants, families, refresh tokens, jti revoked
_DISCONNECTED = (0, 0, 0, 0, 1)


def _with_token_family(home: Home) -> None:
    """alice's app1 pair also holds a token family: an access token id and a refresh token."""
    storage = OAuthStorage(home.store)
    family = storage.save_code(
        "code-1",
        client_id="app1",
        user_id="alice",
        redirect_uri="https://app1.test/cb",
        scopes=["UserInfo"],
        data_sources=[],
        code_challenge="challenge",
        code_challenge_method="S256",
        ttl_seconds=60,
    )
    assert storage.save_tokens(
        family,
        jti="jti-pair",
        access_expires_at=time.time() + 3600,
        refresh_token="refresh-1",
        scopes=["UserInfo"],
        refresh_ttl_seconds=3600,
    )


class _Observer:
    """Every time the store's connection starts a statement, reads the pair's state
    through a connection of its own: what any other reader could see at that moment."""

    def __init__(self, db: Path) -> None:
        self.conn = _raw(db)
        self.statements: list[str] = []
        self.seen: list[tuple[int, ...]] = []
        self.errors: list[BaseException] = []

    def state(self) -> tuple[int, ...]:
        return tuple(self.conn.execute(_PAIR_STATE).fetchone())

    def __call__(self, sql: str) -> None:
        self.statements.append(sql)
        try:
            self.seen.append(self.state())
        except BaseException as exc:  # sqlite3 swallows a trace callback's exceptions
            self.errors.append(exc)

    def watch(self, store: Store, write: Callable[[], Any]) -> None:
        assert isinstance(store, SqliteStore)  # a trace callback is SQLite's
        store.conn().set_trace_callback(self)
        try:
            write()
        finally:
            store.conn().set_trace_callback(None)
        assert self.errors == []


def _transactions(statements: list[str]) -> list[str]:
    return [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "ROLLBACK")]


@pytest.mark.usefixtures("sqlite_only")
def test_disconnect_is_one_transaction_no_reader_sees_a_part_of_it(seeded: Home) -> None:
    _with_token_family(seeded)
    observer = _Observer(_db(seeded))
    before = observer.state()
    assert before[1:] == _CONNECTED

    # A reader polling from another thread the whole time, as well as one at every step.
    polled: list[tuple[int, ...]] = []
    stop = threading.Event()

    def poll() -> None:
        conn = _raw(_db(seeded))
        try:
            while not stop.is_set() or len(polled) < 2:
                polled.append(tuple(conn.execute(_PAIR_STATE).fetchone()))
        finally:
            conn.close()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        while not polled:
            time.sleep(0.001)
        done = []
        observer.watch(seeded.store, lambda: done.append(seeded.store.disconnect("alice", "app1")))
    finally:
        stop.set()
        poller.join(10)
    after = observer.state()

    assert done[0].consent and (done[0].grants, done[0].families) == (2, 1)
    assert after[1:] == _DISCONNECTED
    assert after[0] > before[0] + 1  # several rows changed, each bumping the generation...
    assert set(observer.seen) | set(polled) <= {before, after}  # ...seen all at once or not
    assert _transactions(observer.statements) == ["BEGIN IMMEDIATE", "COMMIT"]


_APPROVAL_STATE = (
    "SELECT (SELECT scopes FROM consents WHERE user_id = 'alice' AND client_id = 'app1'),"
    " (SELECT group_concat(data_source || ':' || access || ':' || id, ' ') FROM"
    " (SELECT data_source, access, id FROM grants WHERE user_id = 'alice'"
    " AND client_id = 'app1' AND revoked_at IS NULL ORDER BY data_source))"
)


class _ApprovalObserver(_Observer):
    """As _Observer, over the pair's consent and live grants (scopes; source:level:id)."""

    def state(self) -> tuple[Any, ...]:
        return tuple(self.conn.execute(_APPROVAL_STATE).fetchone())


@pytest.mark.usefixtures("sqlite_only")
def test_an_approval_is_one_transaction_no_reader_sees_the_new_consent_beside_an_old_grant(
    seeded: Home,
) -> None:
    """The consent screen's Allow (Store.approve). Written as a consent and then one write
    per grant, a reader could see the new consent (say, DataWrite newly approved) beside a
    write grant the same Allow takes away: an allow that neither choice gives."""
    observer = _ApprovalObserver(_db(seeded))
    before: tuple[Any, ...] = observer.state()
    assert before[0] == "UserInfo DataRead DataWrite"
    kept = next(g for g in seeded.store.list_grants("alice", "app1") if g.data_source == "ds-b")
    observer.watch(
        seeded.store,
        lambda: seeded.store.approve(
            "alice", "app1", ["UserInfo", "DataRead"], {"ds-b": Access.READ, "ds-c": Access.READ}
        ),
    )
    after: tuple[Any, ...] = observer.state()
    live = {g.data_source: g for g in seeded.store.list_grants("alice", "app1")}
    assert sorted(live) == ["ds-b", "ds-c"] and live["ds-b"].id == kept.id  # kept, not rewritten
    assert after[0] == "UserInfo DataRead"
    assert set(observer.seen) <= {before, after}
    assert _transactions(observer.statements) == ["BEGIN IMMEDIATE", "COMMIT"]


@pytest.mark.usefixtures("sqlite_only")
def test_the_observer_would_see_an_approval_written_as_several_transactions(
    seeded: Home,
) -> None:
    """The check above is not vacuous: the old way (the consent, then each grant) shows a
    reader the new consent beside the grant about to be taken away."""
    observer = _ApprovalObserver(_db(seeded))
    before: tuple[Any, ...] = observer.state()

    def old_way() -> None:
        store = seeded.store
        store.set_consent("alice", "app1", ["UserInfo", "DataRead"])
        store.revoke_grant("alice", "app1", "ds-a")
        store.add_grant("alice", "app1", "ds-c", Access.READ)

    observer.watch(seeded.store, old_way)
    after: tuple[Any, ...] = observer.state()
    assert set(observer.seen) - {before, after}
    assert len(_transactions(observer.statements)) == 6


def test_a_decision_sees_one_state_of_the_store_even_when_a_write_commits_while_it_runs(
    seeded: Home,
) -> None:
    """A decision reads the consent (check 5) and later a grant (check 8). If an Allow that
    narrows the consent and shares another source at write commits in between, the decision
    must see the store before it or after it, never the old consent beside the new grant
    (DataWrite still consented and ds-c now writable: neither state allows writing ds-c)."""
    facts = facts_for(seeded.store)
    view = facts.view()
    assert view.consent("alice", "app1") == frozenset({"UserInfo", "DataRead", "DataWrite"})
    with open_store(seeded.config, migrate=False) as other:
        other.approve("alice", "app1", ["UserInfo", "DataRead"], {"ds-c": Access.WRITE})
    assert view.grant("alice", "app1", "ds-c") is None  # as it was when the view began
    assert view.grant("alice", "app1", "ds-a") is Access.WRITE
    facts.end()
    after = facts.view()
    assert after.consent("alice", "app1") == frozenset({"UserInfo", "DataRead"})
    assert after.grant("alice", "app1", "ds-c") is Access.WRITE
    assert after.grant("alice", "app1", "ds-a") is None
    facts.end()


@pytest.mark.usefixtures("sqlite_only")
def test_an_ended_view_leaves_no_read_transaction_open(seeded: Home) -> None:
    """A view's snapshot ends with the decision: a reader left open would keep the WAL from
    being checkpointed back to its start."""
    engine = build_engine(seeded.config, seeded.store)
    token = seeded.token()
    decision = engine.decide(CheckInput(token, HttpTarget("GET", "/api/data/tags/ds-a"), "r"))
    assert decision.allowed
    assert not engine.facts._reader().conn.in_transaction
    with engine.facts.view() as view:
        assert view.grant("alice", "app1", "ds-a") is Access.WRITE
        assert engine.facts._reader().conn.in_transaction
    assert not engine.facts._reader().conn.in_transaction


def test_an_approval_without_data_sources_leaves_the_grants_as_they_are(seeded: Home) -> None:
    grants = seeded.store.list_grants("alice", "app1")
    seeded.store.approve("alice", "app1", ["UserInfo"], None)
    assert seeded.store.list_consents("alice", "app1")[0]["scopes"] == ["UserInfo"]
    assert seeded.store.list_grants("alice", "app1") == grants


@pytest.mark.usefixtures("sqlite_only")
def test_the_observer_would_see_a_disconnect_split_into_two_transactions(seeded: Home) -> None:
    """The check above is not vacuous: the old way (consent and grants, then families)
    lets a reader see the consent gone while the token family still lives."""
    _with_token_family(seeded)
    observer = _Observer(_db(seeded))
    before = observer.state()

    def in_two() -> None:
        with seeded.store.write() as conn:
            conn.execute("DELETE FROM consents WHERE user_id = 'alice' AND client_id = 'app1'")
            conn.execute("UPDATE grants SET revoked_at = 1 WHERE user_id = 'alice'")
        with seeded.store.write() as conn:
            revoke_pair_families(conn, "alice", "app1", time.time())

    observer.watch(seeded.store, in_two)
    after = observer.state()
    assert after[1:] == _DISCONNECTED
    assert [s[1:] for s in set(observer.seen) - {before, after}] == [(0, 0, 1, 1, 0)]


def test_disconnect_takes_what_a_pair_holds_even_without_a_consent(seeded: Home) -> None:
    s = seeded.store
    s.add_grant("bob", "app1", "ds-a", Access.READ)  # a grant without a consent
    with pytest.raises(NotFound):
        s.disconnect("bob", "app1", missing_ok=False)
    assert [g.data_source for g in s.list_grants("bob", "app1")] == ["ds-a"]  # untouched
    done = s.disconnect("bob", "app1")
    assert (done.consent, done.grants, done.families) == (False, 1, 0)
    assert s.list_grants("bob", "app1") == []
    again = s.disconnect("bob", "app1")
    assert (again.consent, again.grants, again.families) == (False, 0, 0)


# -- client secrets ---------------------------------------------------------------------


def _file_bytes(db: Path) -> bytes:
    """The database and its WAL and shared-memory files, as an attacker copying them gets."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


def test_client_secrets_are_stored_hashed_and_verify(tmp_path: Path) -> None:
    db = tmp_path / "policyd.db"
    s = SqliteStore(db)
    secret = s.add_app(
        "conf", "Confidential", redirect_uris=["https://c.test/cb"], scopes=[], confidential=True
    )
    assert secret is not None and len(secret) >= 32
    assert s.add_app("pub", "Public", redirect_uris=[], scopes=[], confidential=False) is None

    assert secret.encode() not in _file_bytes(db)
    assert s.verify_client_secret("conf", secret)
    assert not s.verify_client_secret("conf", secret + "x")
    assert not s.verify_client_secret("conf", "")
    assert not s.verify_client_secret("pub", "")
    assert not s.verify_client_secret("pub", secret)
    assert not s.verify_client_secret("nobody", secret)

    rotated = s.rotate_secret("conf")
    assert rotated != secret
    data = _file_bytes(db)
    assert secret.encode() not in data
    assert rotated.encode() not in data
    assert s.verify_client_secret("conf", rotated)
    assert not s.verify_client_secret("conf", secret)


# -- facts.py: exact caches -------------------------------------------------------------


@dataclass(frozen=True)
class FactChange:
    read: Callable[[Facts, Home], Any]
    write: Callable[[Store, Home], Any]
    before: Any
    after: Any


def _key_state(facts: Facts, kid: str) -> str | None:
    key = facts.view().key(kid)
    return None if key is None else key.state


def _retire_first_key(store: Store, home: Home) -> None:
    ring = KeyRing(store, home.config.tokens.key_dir)
    first = store.list_signing_keys()[0].kid
    ring.rotate()
    ring.retire(first)


def _connector(store: Store, *, enabled: bool = True, serves: str = "") -> None:
    """Register plant-1, disabled unless `enabled`, serving `serves` (if given)."""
    store.add_connector("plant-1")
    if not enabled:
        store.set_connector_enabled("plant-1", False)
    if serves:
        store.set_data_source_connector(serves, "plant-1")


FACT_CHANGES: dict[str, FactChange] = {
    "grant revoked": FactChange(
        lambda f, _h: f.view().grant("alice", "app1", "ds-a"),
        lambda s, _h: s.revoke_grant("alice", "app1", "ds-a"),
        Access.WRITE,
        None,
    ),
    "grant added": FactChange(
        lambda f, _h: f.view().grant("alice", "app1", "ds-c"),
        lambda s, _h: s.add_grant("alice", "app1", "ds-c", Access.READ),
        None,
        Access.READ,
    ),
    "granted list": FactChange(
        lambda f, _h: f.view().granted("alice", "app1", Access.READ),
        lambda s, _h: s.revoke_grant("alice", "app1", "ds-b"),
        ("ds-a", "ds-b"),
        ("ds-a",),
    ),
    "app disabled": FactChange(
        lambda f, _h: f.view().app("app1").enabled,  # type: ignore[union-attr]
        lambda s, _h: s.set_app_enabled("app1", False),
        True,
        False,
    ),
    "consent revoked": FactChange(
        lambda f, _h: f.view().consent("alice", "app1"),
        lambda s, _h: s.revoke_consent("alice", "app1"),
        frozenset({"UserInfo", "DataRead", "DataWrite"}),
        None,
    ),
    "user access removed": FactChange(
        lambda f, _h: f.view().user_access("alice", "ds-b"),
        lambda s, _h: s.remove_user_access("alice", "ds-b"),
        Access.READ,
        None,
    ),
    "token revoked": FactChange(
        lambda f, _h: f.view().token_revoked("jti-x"),
        lambda s, _h: s.revoke_token("jti-x", time.time() + 60),
        False,
        True,
    ),
    "connector added and disabled": FactChange(
        lambda f, _h: f.view().connector_enabled("plant-1"),
        lambda s, _h: _connector(s, enabled=False),
        None,
        False,
    ),
    "data source given to a connector": FactChange(
        lambda f, _h: f.view().served_by("ds-a"),
        lambda s, _h: _connector(s, serves="ds-a"),
        (None,),
        ("plant-1",),
    ),
    "key retired": FactChange(
        lambda f, h: _key_state(f, h.store.list_signing_keys()[0].kid),
        _retire_first_key,
        "active",
        "retired",
    ),
}


@pytest.mark.parametrize("change", sorted(FACT_CHANGES))
def test_a_write_through_another_store_is_seen_by_the_next_view(
    seeded: Home, live_facts: Facts, change: str
) -> None:
    c = FACT_CHANGES[change]
    facts = live_facts
    assert c.read(facts, seeded) == c.before
    assert c.read(facts, seeded) == c.before  # now from the cache
    with open_store(seeded.config, migrate=False) as other:  # as another process would
        c.write(other, seeded)
    assert c.read(facts, seeded) == c.after


@pytest.mark.slow
def test_a_revocation_by_another_process_is_seen_by_the_next_view(
    seeded: Home, live_facts: Facts
) -> None:
    facts = live_facts
    assert facts.view().grant("alice", "app1", "ds-a") == Access.WRITE
    assert facts.view().consent("alice", "app1") is not None
    result = seeded.cli("grants", "revoke", "alice", "app1", "ds-a")
    assert result.returncode == 0, result.stderr
    assert facts.view().grant("alice", "app1", "ds-a") is None
    result = seeded.cli("consents", "revoke", "alice", "app1")
    assert result.returncode == 0, result.stderr
    view = facts.view()
    assert view.consent("alice", "app1") is None
    assert view.grant("alice", "app1", "ds-b") is None


def test_caches_see_a_revocation_after_the_shm_file_was_recreated(tmp_path: Path) -> None:
    """When every connection of the process has closed (per-thread connections close when
    their thread ends), SQLite deletes `<db>-shm` and the next connection makes a new one.
    The commit watch that came before PRAGMA data_version mapped the old file, which never
    changed again, so the caches were served after a revocation had committed (fail open).
    Each new thread's decision connection must still see the write."""
    db = tmp_path / "policyd.db"
    store = SqliteStore(db)
    store.close()
    facts = Facts(store)
    seen: list[bool] = []

    def decide() -> None:
        seen.append(facts.view().token_revoked("jti-1"))
        store.close()  # as when a worker thread ends

    for _ in range(2):
        worker = threading.Thread(target=decide)
        worker.start()
        worker.join()
        if not seen[-1]:
            writer = SqliteStore(db, migrate=False)
            with writer.write() as conn:
                conn.execute(
                    "INSERT INTO revoked_tokens (jti, expires_at, revoked_at)"
                    " VALUES ('jti-1', 9e9, 0)"
                )
            writer.close()
    assert seen == [False, True]


@pytest.mark.usefixtures("sqlite_only")
def test_view_serves_cached_facts_until_the_generation_changes(seeded: Home) -> None:
    facts = Facts(seeded.store)
    assert facts.view().grant("alice", "app1", "ds-a") == Access.WRITE
    conn = _raw(_db(seeded))
    try:
        # A change the generation does not record (trigger dropped) is not seen: the
        # caches are in use, and the generation is what invalidates them.
        conn.execute("DROP TRIGGER grants_update_generation")
        conn.execute("UPDATE grants SET revoked_at = 1 WHERE data_source = 'ds-a'")
        assert facts.view().grant("alice", "app1", "ds-a") == Access.WRITE
        conn.execute("UPDATE generation SET value = value + 1")
        assert facts.view().grant("alice", "app1", "ds-a") is None
    finally:
        conn.close()


@pytest.mark.usefixtures("sqlite_only")
def test_a_view_of_an_older_generation_does_not_poison_the_cache(seeded: Home) -> None:
    store = seeded.store
    facts = Facts(store)
    assert facts.view().grant("alice", "app1", "ds-a") == Access.WRITE
    facts.end()
    # This thread's decision-time connection, held in a read transaction of the test's own:
    # its views read the generation as it was (as a thread does whose view began just
    # before a commit and reads the generation after another thread swapped the caches).
    conn = facts._reader().conn
    conn.execute("BEGIN")
    try:
        old_generation = conn.execute("SELECT value FROM generation").fetchone()[0]
        # Another process revokes; another thread of this one starts a view of the new
        # generation (swapping the caches) but reads nothing yet.
        open_store(seeded.config, migrate=False).revoke_grant("alice", "app1", "ds-a")
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(facts.view().generation))
        thread.start()
        thread.join()
        assert seen == [old_generation + 1]
        # This thread is still in a read transaction of the old generation: its view sees
        # the old grant, and must not file it under the new generation.
        old = facts.view()
        assert old.generation == old_generation
        assert old.grant("alice", "app1", "ds-a") == Access.WRITE
    finally:
        conn.execute("ROLLBACK")
    new = facts.view()
    assert new.generation == old_generation + 1
    assert new.grant("alice", "app1", "ds-a") is None
