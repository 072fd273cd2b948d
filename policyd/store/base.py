"""The policy store: apps, connectors, users, data sources, access, consents, grants, keys,
revocations.

`Store` holds the administrative reads and writes, in SQL both backends speak: SQLite
(sqlite.py: one file shared by the processes of one host) and PostgreSQL (postgres.py:
one database shared by replicas on several hosts). A backend gives connections
(`read()`, `write()`), applies its migrations and says which of its errors are integrity
errors; nothing here asks which backend it runs on. Statements use `?` placeholders (the
PostgreSQL backend translates them).

Writes are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: one advisory lock) and every
write to a table that changes decisions bumps the store's generation in the same
transaction (by trigger), so a reader that checks the generation after a write has
returned sees it. On PostgreSQL a write that moved the generation returns only once every
live replica has acknowledged it (replica.py). The hot read path lives in facts.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from policyd.core.errors import Conflict, InvalidInput, NotFound
from policyd.core.model import Access
from policyd.store.families import revoke_pair_families
from policyd.store.sql import Conn


@dataclass(frozen=True, slots=True)
class App:
    client_id: str
    name: str
    redirect_uris: tuple[str, ...]
    allowed_scopes: tuple[str, ...]
    confidential: bool
    enabled: bool
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "name": self.name,
            "redirect_uris": list(self.redirect_uris),
            "allowed_scopes": list(self.allowed_scopes),
            "confidential": self.confidential,
            "enabled": self.enabled,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Connector:
    """A program on a plant's premises that serves some data sources to the hub over its
    link (docs/connectors.md). Its id shares one namespace with apps' client ids."""

    connector_id: str
    name: str
    enabled: bool
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "connector_id": self.connector_id,
            "name": self.name,
            "enabled": self.enabled,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Grant:
    id: int
    user_id: str
    client_id: str
    data_source: str
    access: Access
    granted_at: float
    revoked_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "client_id": self.client_id,
            "data_source": self.data_source,
            "access": self.access.label,
            "granted_at": self.granted_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class Disconnected:
    """What Store.disconnect took away from (user, app)."""

    consent: bool  # there was a consent
    grants: int  # live grants revoked
    families: int  # live token families revoked


@dataclass(frozen=True, slots=True)
class SigningKeyRow:
    kid: str
    alg: str
    state: str
    public_pem: str
    created_at: float
    retired_at: float | None


def hash_secret(secret: str) -> str:
    """Hash a client secret. Secrets are 256-bit random values, so one SHA-256 suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _check_name(kind: str, value: str) -> str:
    value = value.strip()
    if not value or any(c.isspace() for c in value) or "/" in value or len(value) > 200:
        raise InvalidInput(f"{kind} must be 1-200 characters without spaces or '/': {value!r}")
    return value


class Store:
    """The policy store, on one backend (sqlite.SqliteStore, postgres.PostgresStore).
    Safe to share between threads."""

    # The backend's errors: any failure of the database, and a broken constraint.
    errors: tuple[type[Exception], ...] = ()
    integrity_errors: tuple[type[Exception], ...] = ()
    # Where it is, for messages (never with a password).
    where: str = ""
    # "sqlite" or "postgresql": for choosing the matching decision-time view (facts_for).
    backend: str = ""

    # -- the backend ---------------------------------------------------------------------

    def read(self) -> AbstractContextManager[Conn]:
        """A connection for reads outside a transaction of the caller's."""
        raise NotImplementedError

    def write(self) -> AbstractContextManager[Conn]:
        """A write transaction; commits (durably) before the with-block's exit returns, and
        on PostgreSQL once every live replica has applied it."""
        raise NotImplementedError

    def migrate(self) -> None:
        """Apply pending migrations, one process at a time."""
        raise NotImplementedError

    def close(self) -> None:
        """Close this thread's connections (SQLite) or the pool (PostgreSQL)."""
        raise NotImplementedError

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def replicas(self) -> list[dict[str, Any]]:
        """The serving processes holding (or lately holding) a lease: PostgreSQL only; a
        SQLite store is one host's, whose processes need none."""
        return []

    def generation(self) -> int:
        with self.read() as conn:
            row = conn.execute("SELECT value FROM generation WHERE id = 1").fetchone()
        return int(row[0])

    # -- apps --------------------------------------------------------------------------

    def add_app(
        self,
        client_id: str,
        name: str,
        *,
        redirect_uris: list[str],
        scopes: list[str],
        confidential: bool,
    ) -> str | None:
        """Register an app. Returns the client secret (shown once) for confidential apps."""
        client_id = _check_name("client_id", client_id)
        for uri in redirect_uris:
            if not (uri.startswith("https://") or uri.startswith("http://")) or "#" in uri:
                raise InvalidInput(f"redirect URI must be an absolute http(s) URI: {uri!r}")
        secret = secrets.token_urlsafe(32) if confidential else None
        try:
            with self.write() as conn:
                _refuse_taken(conn, "connectors", "connector_id", client_id, "a connector")
                conn.execute(
                    "INSERT INTO apps (client_id, name, redirect_uris, allowed_scopes,"
                    " confidential, secret_hash, enabled, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                    (
                        client_id,
                        name,
                        json.dumps(redirect_uris),
                        " ".join(scopes),
                        int(confidential),
                        hash_secret(secret) if secret else None,
                        time.time(),
                    ),
                )
        except self.integrity_errors:
            raise Conflict(f"app {client_id!r} already exists") from None
        return secret

    def get_app(self, client_id: str) -> App:
        with self.read() as conn:
            row = conn.execute(
                "SELECT client_id, name, redirect_uris, allowed_scopes, confidential, enabled,"
                " created_at FROM apps WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"no app {client_id!r}")
        return self._app(row)

    def list_apps(self) -> list[App]:
        with self.read() as conn:
            rows = conn.execute(
                "SELECT client_id, name, redirect_uris, allowed_scopes, confidential, enabled,"
                " created_at FROM apps ORDER BY client_id"
            ).fetchall()
        return [self._app(r) for r in rows]

    @staticmethod
    def _app(row: tuple[Any, ...]) -> App:
        return App(
            client_id=row[0],
            name=row[1],
            redirect_uris=tuple(json.loads(row[2])),
            allowed_scopes=_split(row[3]),
            confidential=bool(row[4]),
            enabled=bool(row[5]),
            created_at=row[6],
        )

    def set_app_enabled(self, client_id: str, enabled: bool) -> None:
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE apps SET enabled = ? WHERE client_id = ?", (int(enabled), client_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no app {client_id!r}")

    def rotate_secret(self, client_id: str) -> str:
        app = self.get_app(client_id)
        if not app.confidential:
            raise InvalidInput(f"app {client_id!r} is public: it has no secret")
        secret = secrets.token_urlsafe(32)
        with self.write() as conn:
            conn.execute(
                "UPDATE apps SET secret_hash = ? WHERE client_id = ?",
                (hash_secret(secret), client_id),
            )
        return secret

    def verify_client_secret(self, client_id: str, secret: str) -> bool:
        with self.read() as conn:
            row = conn.execute(
                "SELECT secret_hash FROM apps WHERE client_id = ?", (client_id,)
            ).fetchone()
        if row is None or row[0] is None:
            return False
        return hmac.compare_digest(row[0], hash_secret(secret))

    # -- connectors --------------------------------------------------------------------

    def add_connector(self, connector_id: str, name: str = "") -> str:
        """Register a connector. Returns its secret (shown once; stored only hashed)."""
        connector_id = _check_name("connector id", connector_id)
        secret = secrets.token_urlsafe(32)
        try:
            with self.write() as conn:
                _refuse_taken(conn, "apps", "client_id", connector_id, "an app")
                conn.execute(
                    "INSERT INTO connectors (connector_id, name, secret_hash, enabled, created_at)"
                    " VALUES (?, ?, ?, 1, ?)",
                    (connector_id, name or connector_id, hash_secret(secret), time.time()),
                )
        except self.integrity_errors:
            raise Conflict(f"connector {connector_id!r} already exists") from None
        return secret

    def get_connector(self, connector_id: str) -> Connector:
        with self.read() as conn:
            row = conn.execute(
                "SELECT connector_id, name, enabled, created_at FROM connectors"
                " WHERE connector_id = ?",
                (connector_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"no connector {connector_id!r}")
        return Connector(row[0], row[1], bool(row[2]), row[3])

    def list_connectors(self) -> list[Connector]:
        with self.read() as conn:
            rows = conn.execute(
                "SELECT connector_id, name, enabled, created_at FROM connectors"
                " ORDER BY connector_id"
            ).fetchall()
        return [Connector(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def set_connector_enabled(self, connector_id: str, enabled: bool) -> None:
        """Enable or disable a connector; disabled, its next connector.attach is denied
        (CONNECTOR_DISABLED) and it gets no new token."""
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE connectors SET enabled = ? WHERE connector_id = ?",
                (int(enabled), connector_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no connector {connector_id!r}")

    def rotate_connector_secret(self, connector_id: str) -> str:
        """Replace a connector's secret (returned, shown once); the old one stops working at
        once. Tokens already issued stay valid until they expire: disable to stop them."""
        secret = secrets.token_urlsafe(32)
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE connectors SET secret_hash = ? WHERE connector_id = ?",
                (hash_secret(secret), connector_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no connector {connector_id!r}")
        return secret

    def verify_connector_secret(self, connector_id: str, secret: str) -> bool:
        """Whether `secret` is the connector's (compared in constant time). Says nothing of
        whether it is enabled."""
        with self.read() as conn:
            row = conn.execute(
                "SELECT secret_hash FROM connectors WHERE connector_id = ?", (connector_id,)
            ).fetchone()
        # An unknown id still costs one comparison, so timing does not tell ids apart.
        expected = row[0] if row is not None else _NO_SECRET
        return hmac.compare_digest(expected, hash_secret(secret)) and row is not None

    def set_data_source_connector(self, name: str, connector_id: str | None) -> None:
        """Say which connector serves a data source (None: the hub itself). Its previous
        connector's next connector.attach naming it is denied (DATA_SOURCE_NOT_OWNED)."""
        with self.write() as conn:
            if connector_id is not None:
                found = conn.execute(
                    "SELECT 1 FROM connectors WHERE connector_id = ?", (connector_id,)
                ).fetchone()
                if found is None:
                    raise NotFound(f"no connector {connector_id!r}")
            cur = conn.execute(
                "UPDATE data_sources SET connector = ? WHERE name = ?", (connector_id, name)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no data source {name!r}")

    # -- users and data sources -------------------------------------------------------

    def add_user(self, user_id: str, name: str = "") -> None:
        user_id = _check_name("user id", user_id)
        try:
            with self.write() as conn:
                conn.execute(
                    "INSERT INTO users (user_id, name, created_at) VALUES (?, ?, ?)",
                    (user_id, name or user_id, time.time()),
                )
        except self.integrity_errors:
            raise Conflict(f"user {user_id!r} already exists") from None

    def list_users(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(
                "SELECT user_id, name, created_at FROM users ORDER BY user_id"
            ).fetchall()
        return [{"user_id": r[0], "name": r[1], "created_at": r[2]} for r in rows]

    def add_data_source(
        self,
        name: str,
        description: str = "",
        labels: dict[str, str] | None = None,
        connector: str | None = None,
    ) -> None:
        """Add a data source, served by `connector` (None: by the hub itself)."""
        name = _check_name("data source name", name)
        if connector is not None:
            self._require("connectors", "connector_id", connector, "connector")
        try:
            with self.write() as conn:
                conn.execute(
                    "INSERT INTO data_sources (name, description, labels, created_at, connector)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, description, json.dumps(labels or {}), time.time(), connector),
                )
        except self.integrity_errors:
            raise Conflict(f"data source {name!r} already exists") from None

    def list_data_sources(self, connector: str | None = None) -> list[dict[str, Any]]:
        """The data sources (those `connector` serves, when given), each with its connector
        (None: served by the hub itself)."""
        sql = "SELECT name, description, labels, connector FROM data_sources"
        args: tuple[str, ...] = ()
        if connector is not None:
            sql += " WHERE connector = ?"
            args = (connector,)
        with self.read() as conn:
            rows = conn.execute(sql + " ORDER BY name", args).fetchall()
        return [
            {"name": r[0], "description": r[1], "labels": json.loads(r[2]), "connector": r[3]}
            for r in rows
        ]

    def set_user_access(self, user_id: str, data_source: str, role: Access) -> None:
        """Give a user their own access to a data source (replacing any earlier role)."""
        self._require("users", "user_id", user_id, "user")
        self._require("data_sources", "name", data_source, "data source")
        with self.write() as conn:
            conn.execute(
                "INSERT INTO user_access (user_id, data_source, role, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, data_source)"
                " DO UPDATE SET role = excluded.role",
                (user_id, data_source, role.label, time.time()),
            )

    def remove_user_access(self, user_id: str, data_source: str) -> None:
        with self.write() as conn:
            cur = conn.execute(
                "DELETE FROM user_access WHERE user_id = ? AND data_source = ?",
                (user_id, data_source),
            )
            if cur.rowcount == 0:
                raise NotFound(f"user {user_id!r} has no access to {data_source!r}")

    def list_user_access(self, user_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT user_id, data_source, role FROM user_access"
        args: tuple[str, ...] = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args = (user_id,)
        with self.read() as conn:
            rows = conn.execute(sql + " ORDER BY user_id, data_source", args).fetchall()
        return [{"user_id": r[0], "data_source": r[1], "role": r[2]} for r in rows]

    def _require(self, table: str, column: str, value: str, kind: str) -> None:
        with self.read() as conn:
            row = conn.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            raise NotFound(f"no {kind} {value!r}")

    # -- consents ----------------------------------------------------------------------

    def _check_consent(self, user_id: str, client_id: str, scopes: list[str]) -> None:
        """The user exists and the app is registered for every scope (InvalidInput if not)."""
        self._require("users", "user_id", user_id, "user")
        app = self.get_app(client_id)
        extra = set(scopes) - set(app.allowed_scopes)
        if extra:
            raise InvalidInput(
                f"app {client_id!r} is not registered for scope(s) {', '.join(sorted(extra))}"
            )

    def set_consent(self, user_id: str, client_id: str, scopes: list[str]) -> None:
        """Record (or replace) the scopes a user approved for an app."""
        self._check_consent(user_id, client_id, scopes)
        with self.write() as conn:
            _write_consent(conn, user_id, client_id, scopes, time.time())

    def approve(
        self,
        user_id: str,
        client_id: str,
        scopes: list[str],
        grants: Mapping[str, Access] | None,
    ) -> None:
        """What the consent screen's Allow writes, in one transaction: the consent and, when
        `grants` is given (the screen listed data sources), exactly those live grants: the
        others revoked, each kept as it is when its level is unchanged. Never a moment where
        a reader sees the new consent beside a grant the user has just taken away."""
        self._check_consent(user_id, client_id, scopes)
        for name in grants or {}:
            self._require("data_sources", "name", name, "data source")
        now = time.time()
        with self.write() as conn:
            _write_consent(conn, user_id, client_id, scopes, now)
            if grants is None:
                return
            live = dict(
                conn.execute(
                    "SELECT data_source, access FROM grants WHERE user_id = ? AND client_id = ?"
                    " AND revoked_at IS NULL",
                    (user_id, client_id),
                ).fetchall()
            )
            for name in live:
                if name not in grants:
                    _revoke_grant(conn, user_id, client_id, name, now)
            for name, access in grants.items():
                if live.get(name) != access.label:
                    _write_grant(conn, user_id, client_id, name, access, now)

    def list_consents(
        self, user_id: str | None = None, client_id: str | None = None
    ) -> list[dict[str, Any]]:
        where, args = _filters({"user_id": user_id, "client_id": client_id})
        with self.read() as conn:
            rows = conn.execute(
                f"SELECT user_id, client_id, scopes, created_at, updated_at FROM consents{where}"
                " ORDER BY user_id, client_id",
                args,
            ).fetchall()
        return [
            {
                "user_id": r[0],
                "client_id": r[1],
                "scopes": list(_split(r[2])),
                "created_at": r[3],
                "updated_at": r[4],
            }
            for r in rows
        ]

    def disconnect(self, user_id: str, client_id: str, *, missing_ok: bool = True) -> Disconnected:
        """Disconnect an app from a user: remove the consent, revoke the pair's live grants
        and its live token families (their refresh tokens, and their access tokens' ids
        into revoked_tokens), in one transaction, so that no reader ever sees a part of it
        done (say, the consent gone and a grant still live). With `missing_ok` false, a
        pair without a consent is NotFound and nothing changes."""
        now = time.time()
        with self.write() as conn:
            cur = conn.execute(
                "DELETE FROM consents WHERE user_id = ? AND client_id = ?", (user_id, client_id)
            )
            if cur.rowcount == 0 and not missing_ok:
                raise NotFound(f"no consent of user {user_id!r} for app {client_id!r}")
            consent = cur.rowcount > 0
            cur = conn.execute(
                "UPDATE grants SET revoked_at = ? WHERE user_id = ? AND client_id = ?"
                " AND revoked_at IS NULL",
                (now, user_id, client_id),
            )
            grants = cur.rowcount
            families = revoke_pair_families(conn, user_id, client_id, now)
        return Disconnected(consent, grants, families)

    def revoke_consent(self, user_id: str, client_id: str) -> int:
        """`disconnect`, refusing a pair without a consent (NotFound). Returns the number
        of grants revoked."""
        return self.disconnect(user_id, client_id, missing_ok=False).grants

    # -- grants ------------------------------------------------------------------------

    def add_grant(self, user_id: str, client_id: str, data_source: str, access: Access) -> None:
        """Grant an app a user's data source at an access level (replacing a live grant)."""
        self._require("users", "user_id", user_id, "user")
        self._require("apps", "client_id", client_id, "app")
        self._require("data_sources", "name", data_source, "data source")
        with self.write() as conn:
            _write_grant(conn, user_id, client_id, data_source, access, time.time())

    def revoke_grant(self, user_id: str, client_id: str, data_source: str) -> None:
        with self.write() as conn:
            if not _revoke_grant(conn, user_id, client_id, data_source, time.time()):
                raise NotFound(
                    f"no live grant of {data_source!r} to app {client_id!r} by user {user_id!r}"
                )

    def list_grants(
        self,
        user_id: str | None = None,
        client_id: str | None = None,
        data_source: str | None = None,
        *,
        include_revoked: bool = False,
    ) -> list[Grant]:
        where, args = _filters(
            {"user_id": user_id, "client_id": client_id, "data_source": data_source}
        )
        if not include_revoked:
            where += (" AND" if where else " WHERE") + " revoked_at IS NULL"
        with self.read() as conn:
            rows = conn.execute(
                "SELECT id, user_id, client_id, data_source, access, granted_at, revoked_at"
                f" FROM grants{where} ORDER BY user_id, client_id, data_source, id",
                args,
            ).fetchall()
        return [Grant(r[0], r[1], r[2], r[3], Access.parse(r[4]), r[5], r[6]) for r in rows]

    # -- signing keys ------------------------------------------------------------------

    def add_signing_key(self, kid: str, alg: str, public_pem: str, state: str) -> None:
        with self.write() as conn:
            if state == "active":
                # Only one key signs; the previous signer keeps verifying until retired.
                conn.execute("UPDATE signing_keys SET state = 'retiring' WHERE state = 'active'")
            conn.execute(
                "INSERT INTO signing_keys (kid, alg, state, public_pem, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (kid, alg, state, public_pem, time.time()),
            )

    def list_signing_keys(self) -> list[SigningKeyRow]:
        with self.read() as conn:
            rows = conn.execute(
                "SELECT kid, alg, state, public_pem, created_at, retired_at FROM signing_keys"
                " ORDER BY created_at"
            ).fetchall()
        return [SigningKeyRow(*r) for r in rows]

    def retire_signing_key(self, kid: str) -> None:
        with self.write() as conn:
            row = conn.execute("SELECT state FROM signing_keys WHERE kid = ?", (kid,)).fetchone()
            if row is None:
                raise NotFound(f"no signing key {kid!r}")
            if row[0] == "active":
                raise InvalidInput(f"key {kid!r} is the active signing key: rotate first")
            conn.execute(
                "UPDATE signing_keys SET state = 'retired', retired_at = ? WHERE kid = ?",
                (time.time(), kid),
            )

    # -- revoked tokens ----------------------------------------------------------------

    def revoke_token(self, jti: str, expires_at: float) -> None:
        """Deny the token with this id until it expires anyway."""
        with self.write() as conn:
            conn.execute(
                "INSERT INTO revoked_tokens (jti, expires_at, revoked_at) VALUES (?, ?, ?)"
                " ON CONFLICT (jti) DO NOTHING",
                (jti, expires_at, time.time()),
            )

    def purge_expired_revocations(self, now: float, leeway: float) -> int:
        """Forget revoked ids of tokens that no verifier would accept anyway."""
        with self.write() as conn:
            cur = conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now - leeway,))
            return cur.rowcount


_NO_SECRET = hash_secret("")


def _refuse_taken(conn: Conn, table: str, column: str, value: str, kind: str) -> None:
    """(Inside a write transaction.) Apps' client ids and connectors' ids are one namespace:
    a token's client_id names one principal, whichever kind it is."""
    if conn.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,)).fetchone():
        raise Conflict(f"{value!r} is already the id of {kind}: app and connector ids are shared")


def _filters(values: dict[str, str | None]) -> tuple[str, tuple[str, ...]]:
    clauses = [f"{column} = ?" for column, v in values.items() if v is not None]
    args = tuple(v for v in values.values() if v is not None)
    return ((" WHERE " + " AND ".join(clauses)) if clauses else ""), args


def _write_consent(conn: Conn, user_id: str, client_id: str, scopes: list[str], now: float) -> None:
    """(Inside a write transaction.) Record or replace the scopes a user approved."""
    conn.execute(
        "INSERT INTO consents (user_id, client_id, scopes, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, client_id)"
        " DO UPDATE SET scopes = excluded.scopes, updated_at = excluded.updated_at",
        (user_id, client_id, " ".join(scopes), now, now),
    )


def _revoke_grant(conn: Conn, user_id: str, client_id: str, data_source: str, now: float) -> bool:
    """(Inside a write transaction.) Revoke the live grant; False when there was none."""
    cur = conn.execute(
        "UPDATE grants SET revoked_at = ? WHERE user_id = ? AND client_id = ?"
        " AND data_source = ? AND revoked_at IS NULL",
        (now, user_id, client_id, data_source),
    )
    return cur.rowcount > 0


def _write_grant(
    conn: Conn,
    user_id: str,
    client_id: str,
    data_source: str,
    access: Access,
    now: float,
) -> None:
    """(Inside a write transaction.) Grant at `access`, replacing a live grant."""
    _revoke_grant(conn, user_id, client_id, data_source, now)
    conn.execute(
        "INSERT INTO grants (user_id, client_id, data_source, access, granted_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (user_id, client_id, data_source, access.label, now),
    )
