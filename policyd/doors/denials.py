"""Deny answers of the HTTP doors (ASGI, Envoy): a reason becomes a status, challenge, body.

The mapping is the *HTTP status* column of docs/reason-codes.md (a test keeps them equal):
token problems are 401 `invalid_token` (`TOKEN_MISSING` gets a bare `Bearer` challenge),
what the token may not do is 403 `insufficient_scope`, malformed requests 400, a body over
the limit 413, an unreadable store or audit log 503 with Retry-After, a policyd bug or a
policy condition that cannot be evaluated 500. A reason this adapter does not know (a newer
server) is a 403: fail closed.

When the call to policyd itself fails there is no reason code; the answer is 503 with the
adapter's own code `POLICYD_UNAVAILABLE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from policyd.core.reasons import Reason
from policyd.doors.rfc6750 import challenge
from policyd.gen.v1 import decision_pb2

UNAVAILABLE = "POLICYD_UNAVAILABLE"
RETRY_AFTER_SECONDS = 1

# By name, so that this table reads the same whichever codes this policyd version has.
_BAD_REQUEST = frozenset({"REQUEST_INVALID", "PATH_AMBIGUOUS", "BODY_INVALID"})
_TOO_LARGE = frozenset({"BODY_TOO_LARGE"})
_UNAVAILABLE = frozenset({"STORE_UNAVAILABLE", "AUDIT_UNAVAILABLE"})
_SERVER_ERROR = frozenset({"INTERNAL_ERROR", "CONDITION_ERROR"})


@dataclass(frozen=True, slots=True)
class Denial:
    """One deny answer, ready to render."""

    status: int
    error: str  # RFC 6750 / OAuth style error code for the JSON body
    reason: str  # the reason code name
    message: str
    decision_id: str = ""
    www_authenticate: str | None = None
    retry_after: int | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        body = self.body()
        out = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if self.www_authenticate is not None:
            out.append((b"www-authenticate", self.www_authenticate.encode()))
        if self.retry_after is not None:
            out.append((b"retry-after", str(self.retry_after).encode()))
        return out

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": self.error,
                "reason": self.reason,
                "message": self.message,
                "decision_id": self.decision_id,
            },
            separators=(",", ":"),
        ).encode()


def reason_name(number: int) -> str:
    """The code's name, also for numbers this adapter's enum does not have yet."""
    try:
        return decision_pb2.Reason.Name(number)
    except ValueError:
        return f"REASON_{number}"


def status_of(reason: Reason | int) -> int:
    """The HTTP status for a deny reason (unknown numbers: 403)."""
    return for_reason(reason, "", "").status


def for_reason(reason: Reason | int, message: str, decision_id: str) -> Denial:
    """The answer to a deny decision with this reason."""
    try:
        known: Reason | None = Reason(reason)
    except ValueError:
        known = None
    name = known.name if known is not None else reason_name(int(reason))
    if known is not None and known.is_token_problem:
        error = None if known is Reason.TOKEN_MISSING else "invalid_token"
        return Denial(401, "invalid_token", name, message, decision_id, challenge(error))
    if name in _BAD_REQUEST:
        return Denial(400, "invalid_request", name, message, decision_id)
    if name in _TOO_LARGE:
        return Denial(413, "invalid_request", name, message, decision_id)
    if name in _UNAVAILABLE:
        return Denial(
            503,
            "temporarily_unavailable",
            name,
            message,
            decision_id,
            retry_after=RETRY_AFTER_SECONDS,
        )
    if name in _SERVER_ERROR:
        return Denial(500, "server_error", name, message, decision_id)
    # The app, consent, route, scopes or data sources forbid it; and anything unknown.
    return Denial(
        403, "insufficient_scope", name, message, decision_id, challenge("insufficient_scope")
    )


def unavailable(detail: str) -> Denial:
    """policyd could not be asked in time: deny with 503 (fail closed)."""
    return Denial(
        503,
        "temporarily_unavailable",
        UNAVAILABLE,
        f"the authorization service is unavailable ({detail})",
        retry_after=RETRY_AFTER_SECONDS,
    )


def body_too_large(limit: int) -> Denial:
    """The body is over the adapter's buffer limit; policyd is not asked."""
    return Denial(
        413, "invalid_request", Reason.BODY_TOO_LARGE.name, f"body is larger than {limit} bytes"
    )


def ambiguous_authorization() -> Denial:
    """Several Authorization headers; policyd is not asked."""
    return Denial(
        400,
        "invalid_request",
        Reason.REQUEST_INVALID.name,
        "more than one Authorization header",
        www_authenticate=challenge("invalid_request"),
    )
