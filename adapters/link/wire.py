"""What travels over the link: event names, a forwarded request and its answer.

The hub emits `request` to one connection with a Socket.IO acknowledgement; the connector
answers in the acknowledgement, so an answer can only ever match a request that was sent
to that same connection (python-socketio keeps ack ids per connection).

Bodies travel inside the one text message: as `body` (text) when they are small and UTF-8,
as they nearly always are (JSON), else as `body_b64` (base64). Never as Socket.IO binary
attachments: those are separate frames, and a link closed between an answer's frames made
python-socketio log a traceback for the orphaned attachment (found by driving `make run`
while connectors were disabled under load).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

NAMESPACE = "/"
# hub -> connector, acknowledged with the answer
REQUEST_EVENT = "request"
# connector -> hub: {"token": <a fresh access token>}, acknowledged with {"ok", "reason"}
TOKEN_EVENT = "token"
# hub -> connector, when a link starts serving and when policyd takes a data source from
# it: {"serving": [names], "refused": {name: reason}}
ATTACHED_EVENT = "attached"
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
# Answer headers the hub passes on to the app; every other one stays at the link. The plant
# is another trust domain: it may not set cookies on the hub's origin (cookies ignore the
# port, so that would reach every service on the host), redirect the app elsewhere, or
# speak for the hub's own decision (x-policyd-*); hop-by-hop headers describe one hop only.
ANSWER_HEADERS = frozenset(
    {
        "content-type",
        "content-language",
        "content-disposition",
        "cache-control",
        "etag",
        "last-modified",
        "expires",
        "vary",
        "retry-after",
        "x-request-id",
    }
)
_BAD_IN_VALUES = ("\r", "\n", "\0")

Headers = list[tuple[str, str]]


# Bodies up to this size may travel as text. Socket.IO sends JSON escaped to ASCII, which
# can grow text up to 12 times (a character outside the BMP becomes two \\uXXXX escapes), so
# a larger body travels as base64, which is exactly 4/3 of its bytes: what fits the link's
# message limit is then known from the body's size alone (adapters/link/config.py).
TEXT_BODY_BYTES = 256 << 10


def encode_body(body: bytes) -> dict[str, str]:
    """`{"body": text}` for a small UTF-8 body, else `{"body_b64": base64}`."""
    if len(body) <= TEXT_BODY_BYTES:
        try:
            return {"body": body.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"body_b64": base64.b64encode(body).decode("ascii")}


def decode_body(data: dict[str, Any], what: str) -> bytes:
    """The body `encode_body` put in `data` (empty when there is none), or ValueError."""
    text, b64 = data.get("body"), data.get("body_b64")
    if text is not None and b64 is not None:
        raise ValueError(f"{what} has both body and body_b64")
    if b64 is not None:
        if not isinstance(b64, str):
            raise ValueError(f"{what}'s body_b64 must be a string")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{what}'s body_b64 is not base64") from None
    if text is None:
        return b""
    if not isinstance(text, str):
        raise ValueError(f"{what}'s body must be a string")
    return text.encode("utf-8")


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
    """The headers of a connector's answer that the hub passes on: ANSWER_HEADERS only, with
    values HTTP can carry (latin-1, no CR, LF or NUL)."""
    kept: Headers = []
    for name, value in headers:
        name = name.lower()
        if name not in ANSWER_HEADERS or any(c in value for c in _BAD_IN_VALUES):
            continue
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            continue
        kept.append((name, value))
    return kept


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
            **encode_body(self.body),
        }

    @classmethod
    def decode(cls, data: Any) -> LinkRequest:
        if not isinstance(data, dict):
            raise ValueError("a request must be an object")
        headers = data.get("headers", [])
        body = decode_body(data, "a request")
        fields = (data.get(k) for k in ("request_id", "data_source", "method", "path", "query"))
        request_id, data_source, method, path, query = fields
        if not all(isinstance(v, str) for v in (request_id, data_source, method, path, query)):
            raise ValueError("a request needs request_id, data_source, method, path, query")
        if not isinstance(headers, list):
            raise ValueError("a request's headers must be a list")
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
            **encode_body(self.body),
        }

    @classmethod
    def decode(cls, data: Any) -> LinkResponse:
        if not isinstance(data, dict):
            raise ValueError("an answer must be an object")
        status, headers = data.get("status"), data.get("headers")
        body = decode_body(data, "an answer")
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            raise ValueError("an answer needs an HTTP status from 200 to 599")
        if not isinstance(headers, list):
            raise ValueError("an answer's headers must be a list")
        pairs: Headers = []
        for h in headers:
            if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)):
                raise ValueError("an answer's headers must be [name, value] pairs")
            pairs.append((h[0], h[1]))
        return cls(status, response_headers(pairs), body)


# Socket.IO's transports: long-polling, upgraded to WebSocket where the path allows it.
TRANSPORTS = ("polling", "websocket")
