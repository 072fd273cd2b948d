"""What travels over the link: event names, a forwarded request and its answer.

The hub emits `request` to one connection with a Socket.IO acknowledgement; the connector
answers in the acknowledgement, so an answer can only ever match a request that was sent
to that same connection (python-socketio keeps ack ids per connection). Bodies travel as
binary attachments, never re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMESPACE = "/"
# hub -> connector, acknowledged with the answer
REQUEST_EVENT = "request"
# connector -> hub: {"token": <a fresh access token>}, acknowledged with {"ok", "reason"}
TOKEN_EVENT = "token"
# Where the Socket.IO endpoint is mounted (Socket.IO's default).
SOCKETIO_PATH = "socket.io"

# Request headers a forwarded request may carry (lower-case). Never Authorization or
# Cookie: the app's credential stays at the hub. The x-policyd-* decision headers are
# set by the hub (the middleware stripped any a client sent), for an upstream that runs
# like the reference hub behind a gateway (docs/hub.md, "Behind Envoy").
SAFE_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "content-type",
        "user-agent",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)
DECISION_HEADER_PREFIX = "x-policyd-"
NEVER_FORWARDED = frozenset(
    {"authorization", "cookie", "proxy-authorization", "host", "content-length"}
)
# Answer headers that describe one hop only, dropped on the way back.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
    }
)

Headers = list[tuple[str, str]]


def request_headers(headers: Headers) -> Headers:
    """The headers of `headers` that may be forwarded to a data source's upstream."""
    return [
        (name.lower(), value)
        for name, value in headers
        if name.lower() not in NEVER_FORWARDED
        and (
            name.lower() in SAFE_REQUEST_HEADERS or name.lower().startswith(DECISION_HEADER_PREFIX)
        )
    ]


def response_headers(headers: Headers) -> Headers:
    return [(n.lower(), v) for n, v in headers if n.lower() not in HOP_BY_HOP]


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """One forwarded request, as the connector replays it against its upstream."""

    request_id: str
    data_source: str
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes

    def encode(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "data_source": self.data_source,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "body": self.body,
        }

    @classmethod
    def decode(cls, data: Any) -> LinkRequest:
        if not isinstance(data, dict):
            raise ValueError("a request must be an object")
        headers = data.get("headers", [])
        body = data.get("body", b"")
        fields = (data.get(k) for k in ("request_id", "data_source", "method", "path", "query"))
        request_id, data_source, method, path, query = fields
        if not all(isinstance(v, str) for v in (request_id, data_source, method, path, query)):
            raise ValueError("a request needs request_id, data_source, method, path, query")
        if not isinstance(body, bytes) or not isinstance(headers, list):
            raise ValueError("a request's body must be bytes and its headers a list")
        pairs: Headers = []
        for h in headers:
            if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)):
                raise ValueError("a request's headers must be [name, value] pairs")
            pairs.append((h[0], h[1]))
        return cls(
            str(request_id), str(data_source), str(method), str(path), str(query), pairs, body
        )


@dataclass(frozen=True, slots=True)
class LinkResponse:
    """The answer of a forwarded request (or the hub's own 503/504)."""

    status: int
    headers: Headers
    body: bytes

    def encode(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "headers": [list(h) for h in self.headers],
            "body": self.body,
        }

    @classmethod
    def decode(cls, data: Any) -> LinkResponse:
        if not isinstance(data, dict):
            raise ValueError("an answer must be an object")
        status, headers, body = data.get("status"), data.get("headers"), data.get("body")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError("an answer needs an HTTP status")
        if not isinstance(body, bytes) or not isinstance(headers, list):
            raise ValueError("an answer's body must be bytes and its headers a list")
        pairs: Headers = []
        for h in headers:
            if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)):
                raise ValueError("an answer's headers must be [name, value] pairs")
            pairs.append((h[0], h[1]))
        return cls(status, response_headers(pairs), body)


# Socket.IO's transports: long-polling, upgraded to WebSocket where the path allows it.
TRANSPORTS = ("polling", "websocket")
