"""The hub's end of the link (adapters/link, docs/link.md): data sources that the hub does not
hold itself are served by connectors on the plant's premises.

`HubLink` serves a LinkHub on its own listener (POLICYD_HUB_LINK_ADDRESS), started and
stopped with the hub's lifespan. `LinkForward` sits behind the middleware: a request that
policyd allowed for a data source not in the hub's own catalogue goes down the link of the
connector serving it, with the decision in x-policyd-* headers (the connector's upstream
runs like a hub behind a gateway, docs/hub.md "Behind Envoy"); the answer comes back as it
is, or 503/504 from the link.
"""

from __future__ import annotations

import json

from adapters.asgi import AuthInfo
from adapters.asgi.channel import ChannelSettings
from adapters.asgi.middleware import ASGIApp, Receive, Scope, Send
from adapters.link import GrpcAuthorizer, LinkError, LinkHub, LinkResponse
from adapters.link.listener import Listener
from adapters.link.wire import DECISION_HEADER_PREFIX, request_headers
from examples.hub.settings import HubSettings
from policyd.core import net

# A listing answers from the hub's own catalogue; it is never forwarded.
LOCAL_ACTIONS = frozenset({"datasources.list", "service.info", "user.profile"})


class HubLink:
    """A LinkHub on its listener, asking policyd (the middleware's address and TLS options)."""

    def __init__(self, settings: HubSettings) -> None:
        authorizer = GrpcAuthorizer(
            ChannelSettings(
                settings.policyd_address,
                settings.ca_file,
                settings.cert_file,
                settings.key_file,
                settings.server_name,
            ),
            timeout_seconds=max(settings.timeout_seconds, 1.0),
        )
        self.hub = LinkHub(
            authorizer,
            timeout_seconds=settings.link_timeout_seconds,
            recheck_seconds=settings.link_recheck_seconds,
            ping_interval=settings.link_ping_seconds,
            ping_timeout=settings.link_ping_timeout_seconds,
            transports=settings.link_transports,
            allow_insecure=settings.link_insecure,
        )
        where = net.parse("POLICYD_HUB_LINK_ADDRESS", settings.link_address)
        self.listener = Listener(
            self.hub,
            where.host,
            where.port,
            certfile=settings.link_cert_file,
            keyfile=settings.link_key_file,
            client_ca_file=settings.link_client_ca_file,
            graceful_seconds=2,
        )

    async def start(self) -> None:
        await self.listener.start()

    async def stop(self) -> None:
        await self.hub.close()
        await self.listener.stop()


def _answer(response: LinkResponse) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
        if not name.startswith(DECISION_HEADER_PREFIX)  # the hub names its own decision
    ]
    if response.status in (204, 304):  # no body, whatever the upstream sent
        return response.status, headers, b""
    headers.append((b"content-length", str(len(response.body)).encode()))
    return response.status, headers, response.body


def decision_headers(auth: AuthInfo) -> list[tuple[str, str]]:
    return [
        ("x-policyd-sub", auth.sub),
        ("x-policyd-client-id", auth.client_id),
        ("x-policyd-scopes", " ".join(auth.scopes)),
        ("x-policyd-data-sources", json.dumps(list(auth.data_sources))),
        ("x-policyd-decision-id", auth.decision_id),
        ("x-policyd-rule-id", auth.rule_id),
        ("x-policyd-action", auth.action),
    ]


class LinkForward:
    """Forwards allowed requests for data sources the hub does not hold to the link."""

    def __init__(
        self, app: ASGIApp, link: LinkHub, local: frozenset[str], max_body_bytes: int = 1 << 20
    ) -> None:
        self.app = app
        self.link = link
        self.local = local
        # A request body larger than this is 413 here: one over the link's message limit
        # would close the link, and every other request in flight on it would fail.
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = scope.get("auth") if scope["type"] == "http" else None
        if (
            not isinstance(auth, AuthInfo)
            or auth.action in LOCAL_ACTIONS
            or all(d in self.local for d in auth.data_sources)
        ):
            await self.app(scope, receive, send)
            return
        if len(auth.data_sources) != 1:
            response = _error(
                400, "invalid_request", "a request may touch one data source served over the link"
            )
        else:
            body = await _read_body(receive, self.max_body_bytes)
            if body is None:  # the client went mid-body: nothing is forwarded, no one to answer
                return
            if isinstance(body, bytes):
                response = await self._forward(scope, auth, body)
            else:
                response = body  # 413
        status, out_headers, out_body = _answer(response)
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": out_body})

    async def _forward(self, scope: Scope, auth: AuthInfo, body: bytes) -> LinkResponse:
        path = scope.get("raw_path") or scope["path"].encode()
        # The hub's decision goes down as its own x-policyd-* headers; any that came in (a
        # gateway's, in front of this hub) stay here.
        prefix = DECISION_HEADER_PREFIX.encode()
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in scope.get("headers", ())
            if not n.startswith(prefix)
        ]
        try:
            return await self.link.forward(
                auth.data_sources[0],
                scope["method"],
                path.decode("latin-1"),
                scope.get("query_string", b"").decode("latin-1"),
                request_headers(headers) + decision_headers(auth),
                body,
                request_id=auth.decision_id,
            )
        except LinkError as exc:
            return exc.response()


def _error(status: int, error: str, message: str) -> LinkResponse:
    body = json.dumps({"error": error, "message": message}).encode()
    return LinkResponse(status, [("content-type", "application/json")], body)


async def _read_body(receive: Receive, limit: int) -> bytes | LinkResponse | None:
    """The whole request body; a 413 answer when it is over `limit` bytes; None when the
    client went before sending all of it (a truncated write is never forwarded)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _error(
                413, "request_too_large", f"a request over the link carries at most {limit} bytes"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
