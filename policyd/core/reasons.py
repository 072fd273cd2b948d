"""The stable reason codes of a decision.

One enum, used by every door: the gRPC response, the Envoy and ASGI deny bodies, the audit
log and the metrics. The numbers match `policyd.v1.Reason` in proto/policyd/v1/decision.proto
(tests/test_reason_docs.py checks that). Never renumber or rename a member; add new ones at the
end. docs/reason-codes.md describes each.
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    ALLOWED = 1
    TOKEN_MISSING = 2
    TOKEN_MALFORMED = 3
    TOKEN_KEY_UNKNOWN = 4
    TOKEN_ALGORITHM_INVALID = 5
    TOKEN_SIGNATURE_INVALID = 6
    TOKEN_TYPE_INVALID = 7
    TOKEN_CLAIM_INVALID = 8
    TOKEN_ISSUER_MISMATCH = 9
    TOKEN_AUDIENCE_MISMATCH = 10
    TOKEN_EXPIRED = 11
    TOKEN_NOT_YET_VALID = 12
    TOKEN_REVOKED = 13
    APP_UNKNOWN = 14
    APP_DISABLED = 15
    CONSENT_MISSING = 16
    CONSENT_INSUFFICIENT = 17
    NO_ROUTE = 18
    SCOPE_MISSING = 19
    DATA_SOURCE_NOT_GRANTED = 20
    DATA_SOURCE_ACCESS_INSUFFICIENT = 21
    USER_ACCESS_MISSING = 22
    REQUEST_INVALID = 23
    PATH_AMBIGUOUS = 24
    BODY_INVALID = 25
    BODY_TOO_LARGE = 26
    STORE_UNAVAILABLE = 27
    INTERNAL_ERROR = 28
    AUDIT_UNAVAILABLE = 29
    CONDITION_DENIED = 30
    CONDITION_ERROR = 31
    CONNECTOR_UNKNOWN = 32
    CONNECTOR_DISABLED = 33
    DATA_SOURCE_NOT_OWNED = 34

    @property
    def is_token_problem(self) -> bool:
        """True when the token itself is at fault (RFC 6750 `invalid_token`, HTTP 401)."""
        return self in _TOKEN_PROBLEMS


class Denied(Exception):
    """A check failed: the decision is a deny with this reason and message.

    Each step raises its own subclass (tokens.TokenError, routes.RequestProblem,
    conditions.ConditionProblem); the engine catches them all as Denied.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_TOKEN_PROBLEMS = frozenset(
    {
        Reason.TOKEN_MISSING,
        Reason.TOKEN_MALFORMED,
        Reason.TOKEN_KEY_UNKNOWN,
        Reason.TOKEN_ALGORITHM_INVALID,
        Reason.TOKEN_SIGNATURE_INVALID,
        Reason.TOKEN_TYPE_INVALID,
        Reason.TOKEN_CLAIM_INVALID,
        Reason.TOKEN_ISSUER_MISMATCH,
        Reason.TOKEN_AUDIENCE_MISMATCH,
        Reason.TOKEN_EXPIRED,
        Reason.TOKEN_NOT_YET_VALID,
        Reason.TOKEN_REVOKED,
    }
)
