"""Whether a token's principal is still live: one definition for decisions and introspection.

A verified access token names a principal: a user, an app, scopes and the token's id. The
hub may still act for it while checks 3 to 5 of the engine hold (engine.py), in this order:

 3. the token id not revoked;
 4. the app registered, then enabled;
 5. the user's consent to the app present and covering the token's scopes.

The engine runs `principal_denial` in every decision; the authorization server's
introspection (RFC 7662 `active`, oauth/tokens.py and oauth/rfc7662.py) asks the same
functions on the same facts, so that what introspection calls active is exactly what the
hub accepts. A refresh token has no token id in `revoked_tokens` (its family says whether
it is revoked), so its app and consent are `pair_denial` alone.

The answer is the failing check's `Denied`, returned rather than raised: the engine raises
it, introspection only asks whether there is one. A live principal costs no allocation.
"""

from __future__ import annotations

from collections.abc import Collection

from policyd.core.model import Principal
from policyd.core.reasons import Denied, Reason
from policyd.store.facts import View


def principal_denial(view: View, p: Principal) -> Denied | None:
    """Why the hub no longer acts for this verified token's principal, or None when it does."""
    if view.token_revoked(p.jti):
        return Denied(Reason.TOKEN_REVOKED, "token has been revoked")
    return pair_denial(view, p.sub, p.client_id, p.scopes)


def pair_denial(view: View, user_id: str, client_id: str, scopes: Collection[str]) -> Denied | None:
    """Checks 4 and 5: the app registered and enabled, and the user's consent to it
    covering `scopes`; the first that fails, or None."""
    app = view.app(client_id)
    if app is None:
        return Denied(Reason.APP_UNKNOWN, f"app {client_id[:80]!r} is not registered")
    if not app.enabled:
        return Denied(Reason.APP_DISABLED, f"app {client_id!r} is disabled")
    consent = view.consent(user_id, client_id)
    if consent is None:
        return Denied(Reason.CONSENT_MISSING, "the user has not consented to this app")
    if not consent.issuperset(scopes):
        missing = [s for s in scopes if s not in consent]
        return Denied(
            Reason.CONSENT_INSUFFICIENT,
            f"the user's consent does not cover {' '.join(missing)[:200]}",
        )
    return None
