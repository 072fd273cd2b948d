"""Which request headers the doors tell policyd about (policy conditions can read them),
and which carry identity.

The same selection for every door (ASGI, Envoy gRPC, Envoy HTTP), so a condition over
`request.headers` holds or not whichever door the request came through. Credentials are
never sent, whatever a list says: the token travels in CheckRequest.token only.

IDENTITY_PREFIXES name the headers that say who a request is for: the `x-policyd-*`
headers the Envoy doors set on an allowed request (docs/hub.md), and the `x-auth-*` some
other gateways set. The doors remove those a client sent, so none can be spoofed.
"""

from __future__ import annotations

from collections.abc import Mapping

FORWARD_HEADERS = (
    "host",
    "content-type",
    "content-length",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
)
# Lower-case prefixes of identity headers: set only by a door, removed when a client sends them.
IDENTITY_PREFIXES = ("x-policyd-", "x-auth-")
NEVER_FORWARD = frozenset({"authorization", "proxy-authorization", "cookie"})
_FORWARD = frozenset(FORWARD_HEADERS) - NEVER_FORWARD


def selected(headers: Mapping[str, str]) -> dict[str, str]:
    """The forwarded subset of a lower-case header map."""
    return {name: headers[name] for name in _FORWARD if name in headers}
