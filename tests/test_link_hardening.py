"""What the link lets through, and how: found by review and by driving `make run`.

The wire format (no binary attachments), the answer headers the hub passes on, the request
bodies it forwards, and the session ids it keeps out of logs. The link's behaviour with a
real policyd, connectors and hub is in tests/test_link.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from adapters.asgi import AuthInfo
from adapters.link.listener import _RedactSessionIds
from adapters.link.wire import LinkRequest, LinkResponse, response_headers
from examples.hub.link import LinkForward


def _no_bytes(value: Any) -> bool:
    if isinstance(value, bytes | bytearray):
        return False
    if isinstance(value, dict):
        return all(_no_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_no_bytes(v) for v in value)
    return True


@pytest.mark.parametrize(
    "body", [b"", b'{"tags": ["T1"]}', "caf\u00e9 \u2603".encode(), b"\xff\xfe\x00binary"]
)
def test_bodies_travel_in_the_text_message_and_come_back_the_same(body: bytes) -> None:
    """No bytes in what is emitted: Socket.IO would send them as separate binary frames,
    and a link closed between an answer's frames left an orphan frame (and a traceback)."""
    request = LinkRequest("r1", "ds-a", "PUT", "/api/x", "a=1", [("accept", "*/*")], body)
    encoded = request.encode()
    assert _no_bytes(encoded)
    assert LinkRequest.decode(encoded) == request
    answer = LinkResponse(200, [("content-type", "application/octet-stream")], body)
    assert _no_bytes(answer.encode())
    assert LinkResponse.decode(answer.encode()) == answer


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"status": 200, "headers": [], "body_b64": "not base64!"}, "not base64"),
        ({"status": 200, "headers": [], "body": "x", "body_b64": "eA=="}, "both"),
        ({"status": 200, "headers": [], "body": 3}, "must be a string"),
        ({"status": 101, "headers": [], "body": ""}, "200 to 599"),
        ({"status": 600, "headers": [], "body": ""}, "200 to 599"),
    ],
)
def test_a_malformed_answer_is_refused(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        LinkResponse.decode(data)


def test_only_the_answer_headers_an_app_may_see_come_back_from_the_plant() -> None:
    kept = response_headers(
        [
            ("Content-Type", "application/json"),
            ("ETag", '"v1"'),
            ("Set-Cookie", "session=plant; Path=/"),  # would reach every port of the host
            ("Location", "https://elsewhere.example/"),
            ("X-Policyd-Decision-Id", "forged"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("Cache-Control", "no-store\r\nSet-Cookie: smuggled=1"),
            ("X-Request-Id", "caf\u00e9\u2603"),  # not latin-1
        ]
    )
    assert kept == [("content-type", "application/json"), ("etag", '"v1"')]


class _Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(dict(message))


class _NoLink:
    """Where LinkForward would send the request: it must not be reached here."""

    def __init__(self) -> None:
        self.forwarded = 0

    async def forward(self, *args: Any, **kwargs: Any) -> LinkResponse:
        self.forwarded += 1
        return LinkResponse(200, [], b"")


def _forwarding(link: _NoLink, max_body_bytes: int = 1 << 20) -> LinkForward:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the hub's own app is not for a data source behind the link")

    return LinkForward(app, link, frozenset({"edge-historian"}), max_body_bytes)  # type: ignore[arg-type]


def _scope() -> dict[str, Any]:
    auth = AuthInfo(
        sub="alice",
        client_id="demo-app",
        scopes=("DataWrite",),
        data_sources=("plant-mes",),
        decision_id="d1",
        rule_id="write-snapshot",
        action="snapshot.write",
    )
    return {
        "type": "http",
        "method": "PUT",
        "path": "/api/data/snapshot/plant-mes",
        "raw_path": b"/api/data/snapshot/plant-mes",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "auth": auth,
    }


def test_a_write_whose_client_went_mid_body_is_never_forwarded() -> None:
    sent_by_client: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"tags": {"T1": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    messages = iter(sent_by_client)

    async def receive() -> dict[str, Any]:
        return next(messages)

    link, sent = _NoLink(), _Sent()
    asyncio.run(_forwarding(link)(_scope(), receive, sent))
    assert (link.forwarded, sent.messages) == (0, [])


def test_a_body_over_the_limit_is_413_and_not_forwarded() -> None:
    chunks = iter(
        [
            {"type": "http.request", "body": b"x" * 600, "more_body": True},
            {"type": "http.request", "body": b"x" * 600, "more_body": False},
        ]
    )

    async def receive() -> dict[str, Any]:
        return next(chunks)

    link, sent = _NoLink(), _Sent()
    asyncio.run(_forwarding(link, max_body_bytes=1000)(_scope(), receive, sent))
    assert link.forwarded == 0
    assert sent.messages[0]["status"] == 413
    assert b"request_too_large" in sent.messages[1]["body"]


def test_a_body_within_the_limit_is_forwarded_once() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    link, sent = _NoLink(), _Sent()
    asyncio.run(_forwarding(link)(_scope(), receive, sent))
    assert (link.forwarded, sent.messages[0]["status"]) == (1, 200)


def test_engine_io_session_ids_stay_out_of_the_log() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", "/socket.io/?transport=websocket&EIO=4&sid=AbC-123_x&t=1.5"),
        None,
    )
    assert _RedactSessionIds().filter(record)
    assert record.getMessage() == (
        '127.0.0.1:5000 - "WebSocket /socket.io/?transport=websocket&EIO=4'
        '&sid=[redacted]&t=1.5" [accepted]'
    )
