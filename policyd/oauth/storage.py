"""The authorization server's rows in the policy store: codes, token families, sessions.

Authorization codes, refresh tokens and session ids are 256-bit random values; only their
SHA-256 hashes are stored (as for client secrets, a slow hash adds nothing at that
entropy). Every code starts a token *family*: the access tokens (by `jti`) and refresh
tokens issued from that code and from its refreshes. Revoking a family (refresh-token
reuse, code replay, disconnecting the app) marks its refresh tokens revoked and writes its
live access-token ids to `revoked_tokens` in the same transaction, so the very next
decision denies them. Those revoking statements are families.py, shared with
Store.disconnect, which revokes a pair's families in one transaction with its consent and
grants.

Local users' passwords are argon2id hashes in `users.password_hash` (passwords.py).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from policyd.store import families
from policyd.store.base import Store


def new_secret() -> str:
    """A fresh 256-bit random value, URL-safe."""
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CodeRow:
    family_id: str
    client_id: str
    user_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    data_sources: tuple[str, ...]
    code_challenge: str
    code_challenge_method: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class RefreshRow:
    family_id: str
    client_id: str
    user_id: str
    scopes: tuple[str, ...]
    expires_at: float
    rotated: bool
    revoked: bool


class CodeState:
    """What claiming a code found."""

    OK = "ok"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REPLAYED = "replayed"


class OAuthStorage:
    """Codes, refresh tokens, access-token ids, sessions and passwords on one Store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- passwords ---------------------------------------------------------------------

    def set_password_hash(self, user_id: str, password_hash: str | None) -> bool:
        with self.store.write() as conn:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id)
            )
            return cur.rowcount == 1

    def password_hash(self, user_id: str) -> str | None:
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT password_hash FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
        return None if row is None else row[0]

    def user_exists(self, user_id: str) -> bool:
        with self.store.read() as conn:
            row = conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row is not None

    # -- authorization codes -----------------------------------------------------------

    def save_code(
        self,
        code: str,
        *,
        client_id: str,
        user_id: str,
        redirect_uri: str,
        scopes: list[str],
        data_sources: list[str],
        code_challenge: str,
        code_challenge_method: str,
        ttl_seconds: float,
    ) -> str:
        """Store a new code and the family its tokens will belong to. Returns the family."""
        now = time.time()
        family_id = new_secret()
        with self.store.write() as conn:
            conn.execute(
                "DELETE FROM oauth_codes WHERE expires_at < ? AND used_at IS NULL", (now - 3600,)
            )
            conn.execute(
                "INSERT INTO oauth_families (family_id, client_id, user_id, created_at)"
                " VALUES (?, ?, ?, ?)",
                (family_id, client_id, user_id, now),
            )
            conn.execute(
                "INSERT INTO oauth_codes (code_hash, family_id, client_id, user_id, redirect_uri,"
                " scopes, data_sources, code_challenge, code_challenge_method, created_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    digest(code),
                    family_id,
                    client_id,
                    user_id,
                    redirect_uri,
                    " ".join(scopes),
                    json.dumps(data_sources),
                    code_challenge,
                    code_challenge_method,
                    now,
                    now + ttl_seconds,
                ),
            )
        return family_id

    def claim_code(self, code: str, client_id: str) -> tuple[str, CodeRow | None]:
        """Use a code once. A second use revokes every token issued from the first.

        The code is marked used as it is claimed (in one transaction), so two concurrent
        exchanges cannot both succeed, and a failed exchange (say, a wrong PKCE verifier)
        burns the code too.
        """
        now = time.time()
        with self.store.write() as conn:
            row = conn.execute(
                "SELECT family_id, client_id, user_id, redirect_uri, scopes, data_sources,"
                " code_challenge, code_challenge_method, expires_at, used_at"
                " FROM oauth_codes WHERE code_hash = ?",
                (digest(code),),
            ).fetchone()
            if row is None or row[1] != client_id:
                return CodeState.UNKNOWN, None
            if row[9] is not None:
                # RFC 6749 section 4.1.2: a replayed code SHOULD revoke what it issued.
                families.revoke_family(conn, row[0], now)
                return CodeState.REPLAYED, None
            conn.execute(
                "UPDATE oauth_codes SET used_at = ? WHERE code_hash = ?", (now, digest(code))
            )
            if row[8] <= now:
                return CodeState.EXPIRED, None
            return CodeState.OK, CodeRow(
                family_id=row[0],
                client_id=row[1],
                user_id=row[2],
                redirect_uri=row[3],
                scopes=tuple(row[4].split()),
                data_sources=tuple(json.loads(row[5])),
                code_challenge=row[6],
                code_challenge_method=row[7],
                expires_at=row[8],
            )

    # -- tokens ------------------------------------------------------------------------

    def save_tokens(
        self,
        family_id: str,
        *,
        jti: str,
        access_expires_at: float,
        refresh_token: str | None,
        scopes: list[str],
        refresh_ttl_seconds: float,
    ) -> bool:
        """Record tokens just issued in their family; False (and the access token's id
        revoked) when the family was revoked meanwhile: the code was replayed, or the
        refresh token reused, between its claim and this save. Then the tokens must not be
        handed out, and the access token is dead wherever it may turn up."""
        now = time.time()
        with self.store.write() as conn:
            conn.execute(
                "INSERT INTO oauth_access_tokens (jti, family_id, issued_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (jti, family_id, now, access_expires_at),
            )
            revoked = conn.execute(
                "SELECT revoked_at IS NOT NULL FROM oauth_families WHERE family_id = ?",
                (family_id,),
            ).fetchone()
            if revoked is None or revoked[0]:
                # In this transaction, so no moment exists where the token is saved and live.
                families.revoke_family(conn, family_id, now)
                return False
            # Forget ids of access tokens that have expired anyway.
            conn.execute(
                "DELETE FROM oauth_access_tokens WHERE family_id = ? AND expires_at < ?",
                (family_id, now - 3600),
            )
            if refresh_token is not None:
                conn.execute(
                    "INSERT INTO oauth_refresh_tokens (token_hash, family_id, scopes, issued_at,"
                    " expires_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        digest(refresh_token),
                        family_id,
                        " ".join(scopes),
                        now,
                        now + refresh_ttl_seconds,
                    ),
                )
        return True

    def refresh_token(self, token: str) -> RefreshRow | None:
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT r.family_id, f.client_id, f.user_id, r.scopes, r.expires_at,"
                " r.rotated_at, coalesce(r.revoked_at, f.revoked_at)"
                " FROM oauth_refresh_tokens r JOIN oauth_families f USING (family_id)"
                " WHERE r.token_hash = ?",
                (digest(token),),
            ).fetchone()
        if row is None:
            return None
        return RefreshRow(
            family_id=row[0],
            client_id=row[1],
            user_id=row[2],
            scopes=tuple(row[3].split()),
            expires_at=row[4],
            rotated=row[5] is not None,
            revoked=row[6] is not None,
        )

    def rotate_refresh_token(self, token: str) -> bool:
        """Mark a refresh token used. False if it was used (or revoked) already."""
        with self.store.write() as conn:
            cur = conn.execute(
                "UPDATE oauth_refresh_tokens SET rotated_at = ? WHERE token_hash = ?"
                " AND rotated_at IS NULL AND revoked_at IS NULL",
                (time.time(), digest(token)),
            )
            return cur.rowcount == 1

    def revoke_family(self, family_id: str) -> None:
        with self.store.write() as conn:
            families.revoke_family(conn, family_id, time.time())

    def access_token_family(self, jti: str) -> str | None:
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT family_id FROM oauth_access_tokens WHERE jti = ?", (jti,)
            ).fetchone()
        return None if row is None else str(row[0])

    # -- sessions ----------------------------------------------------------------------

    def new_session(self, session_id: str, user_id: str, ttl_seconds: float) -> None:
        now = time.time()
        with self.store.write() as conn:
            conn.execute("DELETE FROM oauth_sessions WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO oauth_sessions (session_hash, user_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (digest(session_id), user_id, now, now + ttl_seconds),
            )

    def session_user(self, session_id: str) -> str | None:
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT user_id FROM oauth_sessions WHERE session_hash = ? AND expires_at > ?",
                (digest(session_id), time.time()),
            ).fetchone()
        return None if row is None else str(row[0])

    def end_session(self, session_id: str) -> None:
        with self.store.write() as conn:
            conn.execute("DELETE FROM oauth_sessions WHERE session_hash = ?", (digest(session_id),))
