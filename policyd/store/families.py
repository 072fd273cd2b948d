"""Revoking token families, inside a write transaction the caller holds.

A family is the access tokens (by `jti`) and refresh tokens issued from one authorization
code and its refreshes (storage.py). Revoking one marks its refresh tokens revoked and
writes its live access-token ids to `revoked_tokens`, in the caller's transaction, so the
very next decision denies them. Used by OAuthStorage (refresh-token reuse, code replay,
RFC 7009 revocation) and by Store.disconnect (the consent, the grants and the families of
a user and an app in one transaction). The statements are about the store's tables, so
they live in the store package, below both of their users.
"""

from __future__ import annotations

from policyd.store.sql import Conn


def revoke_family(conn: Conn, family_id: str, now: float) -> None:
    """Inside a write transaction: revoke the family's refresh and live access tokens."""
    conn.execute(
        "UPDATE oauth_families SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
        (now, family_id),
    )
    conn.execute(
        "UPDATE oauth_refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
        (now, family_id),
    )
    # The same row Store.revoke_token writes, here in the family's transaction.
    conn.execute(
        "INSERT INTO revoked_tokens (jti, expires_at, revoked_at)"
        " SELECT jti, expires_at, ? FROM oauth_access_tokens"
        " WHERE family_id = ? AND expires_at > ? ON CONFLICT (jti) DO NOTHING",
        (now, family_id, now - 300),  # past any verifier's leeway: expired for good
    )


def revoke_pair_families(conn: Conn, user_id: str, client_id: str, now: float) -> int:
    """Inside a write transaction: revoke every live token family of (user, app), as
    disconnecting the app does (Store.disconnect). Returns how many were live."""
    families = [
        r[0]
        for r in conn.execute(
            "SELECT family_id FROM oauth_families WHERE user_id = ? AND client_id = ?"
            " AND revoked_at IS NULL",
            (user_id, client_id),
        )
    ]
    for family_id in families:
        revoke_family(conn, family_id, now)
    return len(families)
