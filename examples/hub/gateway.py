"""Identity from a gateway in front of the hub (POLICYD_HUB_GATEWAY=envoy).

When Envoy (ext_authz) has asked policyd already, the hub runs without the middleware and
takes the decision from headers the gateway set on the allowed request:

    x-policyd-sub           the user
    x-policyd-client-id     the app
    x-policyd-scopes        the token's scopes, space-separated
    x-policyd-data-sources  the decision's data sources, a JSON array of strings
    x-policyd-decision-id   the decision id
    x-policyd-rule-id       the matched rule
    x-policyd-action        the rule's action

The gateway must set (overwrite) them on every request it allows and the hub must be
reachable only through it; otherwise anyone could send these headers.
"""

from __future__ import annotations

import json

from adapters.asgi.middleware import ASGIApp, AuthInfo, Receive, Scope, Send

PREFIX = b"x-policyd-"


def auth_from_headers(headers: list[tuple[bytes, bytes]]) -> AuthInfo | None:
    found = {
        name.lower()[len(PREFIX) :].decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name.lower().startswith(PREFIX)
    }
    if "decision-id" not in found:
        return None
    try:
        data_sources = json.loads(found.get("data-sources", "[]"))
    except ValueError:
        return None
    if not isinstance(data_sources, list) or not all(isinstance(d, str) for d in data_sources):
        return None
    return AuthInfo(
        sub=found.get("sub", ""),
        client_id=found.get("client-id", ""),
        scopes=tuple(found.get("scopes", "").split()),
        data_sources=tuple(data_sources),
        decision_id=found["decision-id"],
        rule_id=found.get("rule-id", ""),
        action=found.get("action", ""),
    )


class TrustedGatewayHeaders:
    """Sets scope["auth"] from the gateway's x-policyd-* headers (None when there are none)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            scope["auth"] = auth_from_headers(scope["headers"])
        await self.app(scope, receive, send)
