"""Numbered schema migrations of the policy store, applied in order, each in a transaction.

Applied migrations are recorded by sqlite-utils in `_sqlite_migrations`. Never edit a
migration that has shipped; add a new one.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("policyd")

# The decision tables of the first migration, which made their generation triggers. Frozen:
# a table added later gets its triggers in the migration that adds it.
INITIAL_DECISION_TABLES = (
    "apps",
    "users",
    "data_sources",
    "user_access",
    "consents",
    "grants",
    "signing_keys",
    "revoked_tokens",
)
# Tables whose rows change decisions. Any write to them bumps `generation.value` (by
# trigger, so writes from any process or tool count); readers compare the generation to
# know whether their caches are still exact.
DECISION_TABLES = (*INITIAL_DECISION_TABLES, "connectors")


@migrations()
def m001_initial(db: Database) -> None:
    db.table("apps").create(
        {
            "client_id": str,
            "name": str,
            "redirect_uris": str,  # JSON array
            "allowed_scopes": str,  # space-separated
            "confidential": int,
            "secret_hash": str,  # sha256 hex of a 256-bit random secret; NULL for public apps
            "enabled": int,
            "created_at": float,
        },
        pk="client_id",
        not_null=["name", "redirect_uris", "allowed_scopes", "confidential", "enabled"],
    )
    db.table("users").create(
        {"user_id": str, "name": str, "password_hash": str, "created_at": float},
        pk="user_id",
        not_null=["name"],
    )
    db.table("data_sources").create(
        {"name": str, "description": str, "labels": str, "created_at": float},
        pk="name",
        not_null=["description", "labels"],
    )
    db.execute(
        """CREATE TABLE user_access (
            user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
            data_source TEXT NOT NULL REFERENCES data_sources(name) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('read', 'write')),
            created_at REAL,
            PRIMARY KEY (user_id, data_source)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE consents (
            user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
            client_id TEXT NOT NULL REFERENCES apps(client_id) ON DELETE CASCADE,
            scopes TEXT NOT NULL,
            created_at REAL,
            updated_at REAL,
            PRIMARY KEY (user_id, client_id)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE grants (
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
            client_id TEXT NOT NULL REFERENCES apps(client_id) ON DELETE CASCADE,
            data_source TEXT NOT NULL REFERENCES data_sources(name) ON DELETE CASCADE,
            access TEXT NOT NULL CHECK (access IN ('read', 'write')),
            granted_at REAL NOT NULL,
            revoked_at REAL
        )"""
    )
    # At most one live grant per (user, app, data source); revoked rows stay as history.
    db.execute(
        "CREATE UNIQUE INDEX grants_live ON grants (user_id, client_id, data_source) "
        "WHERE revoked_at IS NULL"
    )
    db.table("signing_keys").create(
        {
            "kid": str,
            "alg": str,
            "state": str,  # active | retiring | retired
            "public_pem": str,
            "created_at": float,
            "retired_at": float,
        },
        pk="kid",
        not_null=["alg", "state", "public_pem"],
    )
    db.execute(
        """CREATE TABLE revoked_tokens (
            jti TEXT PRIMARY KEY,
            expires_at REAL NOT NULL,
            revoked_at REAL NOT NULL
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at)")
    db.execute("CREATE TABLE generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER)")
    db.execute("INSERT INTO generation (id, value) VALUES (1, 0)")
    for table in INITIAL_DECISION_TABLES:
        _generation_triggers(db, table)


def _generation_triggers(db: Database, table: str) -> None:
    for event in ("INSERT", "UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER {table}_{event.lower()}_generation AFTER {event} ON {table} "
            "BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END"
        )


@migrations()
def m002_oauth(db: Database) -> None:
    """The authorization server's state: codes, token families, refresh tokens, sessions.

    Codes, refresh tokens and session ids are random values stored only as SHA-256 hashes.
    None of these tables change decisions by themselves (revoking a family writes
    `revoked_tokens`, which does), so they have no generation triggers.
    """
    db.execute(
        """CREATE TABLE oauth_families (
            family_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL REFERENCES apps(client_id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            revoked_at REAL
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX oauth_families_pair ON oauth_families (user_id, client_id)")
    db.execute(
        """CREATE TABLE oauth_codes (
            code_hash TEXT PRIMARY KEY,
            family_id TEXT NOT NULL REFERENCES oauth_families(family_id) ON DELETE CASCADE,
            client_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            redirect_uri TEXT NOT NULL,
            scopes TEXT NOT NULL,
            data_sources TEXT NOT NULL,
            code_challenge TEXT NOT NULL,
            code_challenge_method TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX oauth_codes_expiry ON oauth_codes (expires_at)")
    db.execute(
        """CREATE TABLE oauth_refresh_tokens (
            token_hash TEXT PRIMARY KEY,
            family_id TEXT NOT NULL REFERENCES oauth_families(family_id) ON DELETE CASCADE,
            scopes TEXT NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            rotated_at REAL,
            revoked_at REAL
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX oauth_refresh_tokens_family ON oauth_refresh_tokens (family_id)")
    db.execute(
        """CREATE TABLE oauth_access_tokens (
            jti TEXT PRIMARY KEY,
            family_id TEXT NOT NULL REFERENCES oauth_families(family_id) ON DELETE CASCADE,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX oauth_access_tokens_family ON oauth_access_tokens (family_id)")
    db.execute(
        """CREATE TABLE oauth_sessions (
            session_hash TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID"""
    )


@migrations()
def m003_connectors(db: Database) -> None:
    """Connectors (docs/connectors.md): programs on a plant's premises that serve some data
    sources to the hub, authorized as principals of their own; and which connector serves
    each data source (NULL: the hub itself). A decision table: its writes bump the
    generation, as a write to data_sources always has."""
    db.execute(
        """CREATE TABLE connectors (
            connector_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            enabled INTEGER NOT NULL,
            created_at REAL
        ) WITHOUT ROWID"""
    )
    _generation_triggers(db, "connectors")
    db.execute(
        "ALTER TABLE data_sources ADD COLUMN connector TEXT"
        " REFERENCES connectors(connector_id) ON DELETE SET NULL"
    )
    db.execute("CREATE INDEX data_sources_connector ON data_sources (connector)")
