"""The ASGI middleware in front of a real uvicorn server, asking a real `policyd serve`.

The app behind the middleware echoes what it was given (scope["auth"], the body's hash and
length, the header names), and records each call, so a test can tell that a denied request
never reached it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.asgi import AuthInfo, PolicydMiddleware, status_of
from adapters.asgi.middleware import ASGIApp, Message, Scope, check_request
from policyd.core.reasons import Reason
from policyd.doors import rfc6750
from tests.asgi_server import serve_asgi
from tests.helpers import ROOT, Home, ServerProcess, free_port, run_server
from tests.test_server import PKI, _credentials, _tls_config, pki  # noqa: F401

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass
class Recorder:
    calls: list[str] = field(default_factory=list)
    lifespan: list[str] = field(default_factory=list)


def echo_app(recorder: Recorder) -> Starlette:
    async def echo(request: Request) -> Response:
        body = await request.body()
        recorder.calls.append(f"{request.method} {request.url.path}")
        auth = request.scope.get("auth")
        return JSONResponse(
            {
                "auth": dataclasses.asdict(auth) if isinstance(auth, AuthInfo) else None,
                "path": request.url.path,
                "query": request.url.query,
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
                "headers": [name.decode() for name, _ in request.headers.raw],
            }
        )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        recorder.lifespan.append("startup")
        yield
        recorder.lifespan.append("shutdown")

    return Starlette(routes=[Route("/{path:path}", echo, methods=METHODS)], lifespan=lifespan)


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def hub(recorder: Recorder, shared_server: ServerProcess) -> Iterator[str]:
    """The echo app behind the middleware (a generous deadline: CI machines are slow)."""
    app = PolicydMiddleware(echo_app(recorder), shared_server.address, timeout_seconds=5.0)
    with serve_asgi(app) as url:
        yield url


@pytest.fixture(scope="module")
def token(shared_home: Home) -> str:
    return shared_home.token()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def snapshot_body(*data_sources: str) -> bytes:
    return json.dumps({"tags": {ds: ["T1"] for ds in data_sources}}).encode()


JSON = {"content-type": "application/json"}


# -- allow and deny -------------------------------------------------------------------------


def test_an_allowed_request_reaches_the_app_with_scope_auth(
    hub: str, token: str, recorder: Recorder
) -> None:
    r = httpx.get(f"{hub}/api/data/tags/ds-a", headers=bearer(token))
    assert r.status_code == 200, r.text
    auth = r.json()["auth"]
    assert auth["sub"] == "alice"
    assert auth["client_id"] == "app1"
    assert auth["scopes"] == ["UserInfo", "DataRead"]
    assert auth["data_sources"] == ["ds-a"]
    assert auth["rule_id"] == "tags-search"
    assert auth["action"] == "tags.search"
    assert re.fullmatch(r"[0-9a-f-]{36}", auth["decision_id"])
    assert "GET /api/data/tags/ds-a" in recorder.calls


def test_a_listing_route_gets_the_granted_data_sources(hub: str, token: str) -> None:
    r = httpx.get(f"{hub}/api/data/datasources", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert sorted(r.json()["auth"]["data_sources"]) == ["ds-a", "ds-b"]


def test_a_public_route_needs_no_token_and_has_no_principal(hub: str) -> None:
    r = httpx.get(f"{hub}/api/info")
    assert r.status_code == 200, r.text
    auth = r.json()["auth"]
    assert (auth["sub"], auth["client_id"], auth["rule_id"]) == ("", "", "service-info")


def test_no_token_is_401_with_a_bare_bearer_challenge(hub: str, recorder: Recorder) -> None:
    before = len(recorder.calls)
    r = httpx.get(f"{hub}/api/user/me")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] == "invalid_token"
    assert body["reason"] == "TOKEN_MISSING"
    assert body["message"]
    assert re.fullmatch(r"[0-9a-f-]{36}", body["decision_id"])
    assert len(recorder.calls) == before


def test_a_bad_token_is_401_invalid_token(hub: str, recorder: Recorder) -> None:
    before = len(recorder.calls)
    r = httpx.get(f"{hub}/api/user/me", headers=bearer("not.a.token"))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert r.json()["reason"] == "TOKEN_MALFORMED"
    assert len(recorder.calls) == before


def test_an_expired_token_is_401_token_expired(hub: str, shared_home: Home) -> None:
    expired = shared_home.token(now=time.time() - 7200)
    r = httpx.get(f"{hub}/api/user/me", headers=bearer(expired))
    assert r.status_code == 401
    assert r.json()["reason"] == "TOKEN_EXPIRED"


def test_an_ungranted_data_source_is_403_insufficient_scope(
    hub: str, token: str, recorder: Recorder
) -> None:
    before = len(recorder.calls)
    r = httpx.get(f"{hub}/api/data/tags/ds-c", headers=bearer(token))
    assert r.status_code == 403
    assert r.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    body = r.json()
    assert body["error"] == "insufficient_scope"
    assert body["reason"] == "DATA_SOURCE_NOT_GRANTED"
    assert "ds-c" in body["message"]
    assert len(recorder.calls) == before


def test_a_disabled_app_is_403(hub: str, shared_home: Home) -> None:
    r = httpx.get(f"{hub}/api/user/me", headers=bearer(shared_home.token(client_id="app-off")))
    assert r.status_code == 403
    assert r.json()["reason"] == "APP_DISABLED"


def test_the_bearer_scheme_is_case_insensitive(hub: str, token: str) -> None:
    r = httpx.get(f"{hub}/api/user/me", headers={"Authorization": f"bEaReR {token}"})
    assert r.status_code == 200, r.text


def test_another_scheme_carries_no_token(hub: str, token: str) -> None:
    r = httpx.get(f"{hub}/api/user/me", headers={"Authorization": f"Basic {token}"})
    assert r.status_code == 401
    assert r.json()["reason"] == "TOKEN_MISSING"


def test_two_authorization_headers_are_400_without_asking(hub: str, token: str) -> None:
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer other")]
    r = httpx.get(f"{hub}/api/user/me", headers=headers)
    assert r.status_code == 400
    assert r.json()["reason"] == "REQUEST_INVALID"
    assert r.json()["decision_id"] == ""


def test_the_asgi_header_list_gives_one_bearer_token_or_refuses_two() -> None:
    assert rfc6750.bearer_token([(b"host", b"x"), (b"authorization", b"bEaReR abc")]) == "abc"
    assert rfc6750.bearer_token([(b"Authorization", b"Basic abc")]) == ""
    assert rfc6750.bearer_token([(b"host", b"x")]) == ""
    for second in (b"Bearer abc", b"Basic abc", b""):  # even the same one, or another scheme
        with pytest.raises(rfc6750.AmbiguousAuthorization):
            rfc6750.bearer_token([(b"authorization", b"Bearer abc"), (b"AUTHORIZATION", second)])


def test_the_raw_path_is_checked_not_the_decoded_one(hub: str, token: str) -> None:
    encoded = httpx.get(f"{hub}/api/data/tags/ds%2Da", headers=bearer(token))
    assert encoded.status_code == 200, encoded.text
    assert encoded.json()["auth"]["data_sources"] == ["ds-a"]
    # Decoded, this would be /api/data/tags/ds-a/x (tags-get on ds-a); policyd refuses it.
    slash = httpx.get(f"{hub}/api/data/tags/ds-a%2Fx", headers=bearer(token))
    assert slash.status_code == 400
    assert slash.json()["reason"] == "PATH_AMBIGUOUS"


def test_spoofed_identity_headers_never_reach_the_app(hub: str, token: str) -> None:
    spoofed = {
        "X-Policyd-Sub": "mallory",
        "X-Policyd-Data-Sources": '["ds-c"]',
        "X-Auth-User": "mallory",
        "X-Forwarded-User": "mallory",
        "X-Remote-User": "mallory",
        "X-Custom": "kept",
    }
    r = httpx.get(f"{hub}/api/data/tags/ds-a", headers={**bearer(token), **spoofed})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert "x-custom" in seen
    assert not [h for h in seen if h.startswith(("x-policyd-", "x-auth-"))]
    assert "x-forwarded-user" not in seen and "x-remote-user" not in seen
    assert r.json()["auth"]["sub"] == "alice"
    assert r.json()["auth"]["data_sources"] == ["ds-a"]


# -- bodies ---------------------------------------------------------------------------------


def test_the_body_reaches_the_app_byte_for_byte(hub: str, token: str) -> None:
    body = (
        b'{ "tags" : {"ds-a": ["T1", "\xc3\xa9t\xc3\xa9"], "ds-b":["T2"]},\n\t"start": "*-1h",'
        b' "pad": "' + b"x" * 200_000 + b'" }\r\n'
    )

    def chunks() -> Iterator[bytes]:  # sent chunked, in pieces of odd sizes
        for i in range(0, len(body), 7777):
            yield body[i : i + 7777]

    r = httpx.post(f"{hub}/api/data/v2/raw", headers={**bearer(token), **JSON}, content=chunks())
    assert r.status_code == 200, r.text
    assert r.json()["body_len"] == len(body)
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_data_sources_in_the_body_are_checked_and_reported(hub: str, token: str) -> None:
    r = httpx.post(
        f"{hub}/api/data/v2/snapshot",
        headers={**bearer(token), **JSON},
        content=snapshot_body("ds-b", "ds-a"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["auth"]["data_sources"] == ["ds-b", "ds-a"]
    assert r.json()["auth"]["rule_id"] == "values-snapshot"


def test_a_body_naming_one_ungranted_data_source_is_403(
    hub: str, token: str, recorder: Recorder
) -> None:
    before = len(recorder.calls)
    r = httpx.post(
        f"{hub}/api/data/v2/snapshot",
        headers={**bearer(token), **JSON},
        content=snapshot_body("ds-a", "ds-c", "ds-b"),
    )
    assert r.status_code == 403
    assert r.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"
    assert "ds-c" in r.json()["message"]
    assert len(recorder.calls) == before


def test_a_json_body_sent_as_text_is_not_shown_to_policyd(hub: str, token: str) -> None:
    r = httpx.post(
        f"{hub}/api/data/v2/snapshot",
        headers={**bearer(token), "content-type": "text/plain"},
        content=snapshot_body("ds-a"),
    )
    assert r.status_code == 400
    assert r.json()["reason"] == "BODY_INVALID"


def test_a_media_type_with_parameters_or_a_json_suffix_is_json(hub: str, token: str) -> None:
    for media in ("application/json; charset=utf-8", "application/vnd.hub+json"):
        r = httpx.post(
            f"{hub}/api/data/v2/snapshot",
            headers={**bearer(token), "content-type": media},
            content=snapshot_body("ds-a"),
        )
        assert r.status_code == 200, (media, r.text)


def test_a_body_over_the_limit_is_413_without_asking(
    shared_server: ServerProcess, token: str
) -> None:
    recorder = Recorder()
    app = PolicydMiddleware(echo_app(recorder), shared_server.address, max_body_bytes=100)
    body = snapshot_body("ds-a", "ds-b") + b" " * 100
    with serve_asgi(app) as url:
        sized = httpx.post(
            f"{url}/api/data/v2/snapshot", headers={**bearer(token), **JSON}, content=body
        )
        chunked = httpx.post(
            f"{url}/api/data/v2/snapshot",
            headers={**bearer(token), **JSON},
            content=iter([body[:60], body[60:]]),
        )
        fits = httpx.post(
            f"{url}/api/data/v2/snapshot",
            headers={**bearer(token), **JSON},
            content=snapshot_body("ds-a"),
        )
    for r in (sized, chunked):
        assert r.status_code == 413
        assert r.json()["reason"] == "BODY_TOO_LARGE"
        assert r.json()["decision_id"] == ""
    assert fits.status_code == 200
    assert recorder.calls == ["POST /api/data/v2/snapshot"]


# -- policyd down or slow --------------------------------------------------------------------


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    body = r.json()
    assert body["error"] == "temporarily_unavailable"
    assert body["reason"] == "POLICYD_UNAVAILABLE"
    assert body["decision_id"] == ""


@pytest.mark.slow
def test_policyd_down_is_503_until_it_starts(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    token = home.token()
    port = free_port()
    recorder = Recorder()
    app = PolicydMiddleware(echo_app(recorder), f"127.0.0.1:{port}")
    with serve_asgi(app) as url:
        for _ in range(3):
            _assert_unavailable(httpx.get(f"{url}/api/data/tags/ds-a", headers=bearer(token)))
        _assert_unavailable(httpx.get(f"{url}/api/info"))
        assert recorder.calls == []
        with run_server(home, port=port):
            deadline = time.monotonic() + 10
            while True:
                r = httpx.get(f"{url}/api/data/tags/ds-a", headers=bearer(token))
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
    assert recorder.calls == ["GET /api/data/tags/ds-a"]


@pytest.mark.slow
def test_policyd_slower_than_the_deadline_is_503(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    token = home.token()
    recorder = Recorder()
    with run_server(home) as server:
        app = PolicydMiddleware(echo_app(recorder), server.address, timeout_seconds=0.25)
        with serve_asgi(app) as url:
            assert httpx.get(f"{url}/api/info").status_code == 200  # the channel is up
            os.kill(server.process.pid, signal.SIGSTOP)  # policyd hangs, the socket stays
            try:
                started = time.monotonic()
                r = httpx.get(f"{url}/api/data/tags/ds-a", headers=bearer(token))
                took = time.monotonic() - started
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            _assert_unavailable(r)
            assert "deadline_exceeded" in r.json()["message"]
            assert 0.2 < took < 2.0
            after = httpx.get(f"{url}/api/data/tags/ds-a", headers=bearer(token))
            assert after.status_code == 200, after.text
    assert recorder.calls == ["GET /api/info", "GET /api/data/tags/ds-a"]


# -- TLS --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mutual_tls_to_policyd(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    home = Home(tmp_path, _tls_config(pki, mutual=True, client=False))
    home.seed()
    token = home.token()
    mtls = _credentials(pki, pki.client_cert, pki.client_key)
    with run_server(home, credentials=mtls) as server:
        with_cert = PolicydMiddleware(
            echo_app(Recorder()),
            server.address,
            timeout_seconds=5.0,
            ca_file=str(pki.ca_cert),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
        )
        without_cert = PolicydMiddleware(
            echo_app(Recorder()), server.address, ca_file=str(pki.ca_cert)
        )
        plaintext = PolicydMiddleware(echo_app(Recorder()), server.address)
        with serve_asgi(with_cert) as a, serve_asgi(without_cert) as b, serve_asgi(plaintext) as c:
            ok = httpx.get(f"{a}/api/data/tags/ds-a", headers=bearer(token))
            assert ok.status_code == 200, ok.text
            _assert_unavailable(httpx.get(f"{b}/api/data/tags/ds-a", headers=bearer(token)))
            _assert_unavailable(httpx.get(f"{c}/api/data/tags/ds-a", headers=bearer(token)))


def test_tls_options_are_checked_when_the_middleware_is_made(pki: PKI) -> None:  # noqa: F811
    app = echo_app(Recorder())
    with pytest.raises(ValueError, match="cert_file and key_file"):
        PolicydMiddleware(app, ca_file=str(pki.ca_cert), cert_file=str(pki.client_cert))
    with pytest.raises(ValueError, match="no such file"):
        PolicydMiddleware(app, ca_file="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="timeout_seconds"):
        PolicydMiddleware(app, timeout_seconds=0)


# -- many at once ------------------------------------------------------------------------------


def test_200_concurrent_requests_each_get_their_own_answer(
    hub: str, token: str, shared_home: Home, recorder: Recorder
) -> None:
    disabled = shared_home.token(client_id="app-off")
    kinds = ["tag", "ungranted", "no-token", "body", "body-ungranted", "app-off"]

    def request(i: int) -> tuple[str, str, dict[str, str], bytes | None]:
        kind = kinds[i % len(kinds)]
        q = f"?i={i}"
        if kind == "tag":
            return "GET", f"/api/data/tags/ds-a/T{i}{q}", bearer(token), None
        if kind == "ungranted":
            return "GET", f"/api/data/tags/ds-c{q}", bearer(token), None
        if kind == "no-token":
            return "GET", f"/api/user/me{q}", {}, None
        if kind == "body":
            return "POST", f"/api/data/v2/snapshot{q}", {**bearer(token), **JSON}, body(i)
        if kind == "body-ungranted":
            sources = ("ds-b", "ds-c") if i % 2 else ("ds-c", "ds-a")
            return (
                "POST",
                f"/api/data/v2/snapshot{q}",
                {**bearer(token), **JSON},
                (snapshot_body(*sources)),
            )
        return "GET", f"/api/user/me{q}", bearer(disabled), None

    def body(i: int) -> bytes:
        return json.dumps({"tags": {"ds-b": [f"T{i}"], "ds-a": ["T0"]}, "n": i}).encode()

    async def run_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=hub, limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.request(m, path, headers=headers, content=content)
                    for m, path, headers, content in map(request, range(200))
                )
            )

    before = len(recorder.calls)
    responses = asyncio.run(run_all())
    allowed = 0
    for i, r in enumerate(responses):
        kind = kinds[i % len(kinds)]
        if kind in ("tag", "body"):
            allowed += 1
            assert r.status_code == 200, (i, r.text)
            echo = r.json()
            assert echo["query"] == f"i={i}"
            if kind == "tag":
                assert echo["path"] == f"/api/data/tags/ds-a/T{i}"
                assert echo["auth"]["data_sources"] == ["ds-a"]
            else:
                assert echo["body_sha256"] == hashlib.sha256(body(i)).hexdigest()
                assert echo["auth"]["data_sources"] == ["ds-b", "ds-a"]
        elif kind == "no-token":
            assert (r.status_code, r.json()["reason"]) == (401, "TOKEN_MISSING"), i
        elif kind == "app-off":
            assert (r.status_code, r.json()["reason"]) == (403, "APP_DISABLED"), i
        else:
            assert (r.status_code, r.json()["reason"]) == (403, "DATA_SOURCE_NOT_GRANTED"), i
            assert "ds-c" in r.json()["message"]
    assert len(recorder.calls) - before == allowed == 67


# -- lifespan and websockets -------------------------------------------------------------------


def test_lifespan_passes_through(shared_server: ServerProcess) -> None:
    recorder = Recorder()
    with serve_asgi(PolicydMiddleware(echo_app(recorder), shared_server.address)):
        assert recorder.lifespan == ["startup"]
    assert recorder.lifespan == ["startup", "shutdown"]


async def _handshake(
    middleware: PolicydMiddleware, path: str, headers: list[tuple[bytes, bytes]], extensions: Any
) -> list[Message]:
    """One websocket handshake through the middleware; returns what was sent to the client."""
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"hub.test"), *headers],
        "subprotocols": [],
        "extensions": extensions,
    }
    incoming: list[Message] = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


def _websocket_app(seen: list[Any]) -> ASGIApp:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope.get("auth"))
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})

    return app


def test_a_websocket_handshake_is_checked_before_the_app_accepts(
    shared_server: ServerProcess, token: str
) -> None:
    seen: list[Any] = []
    middleware = PolicydMiddleware(_websocket_app(seen), shared_server.address, timeout_seconds=5)
    auth = [(b"authorization", f"Bearer {token}".encode())]
    denial_ext: dict[str, Any] = {"websocket.http.response": {}}

    async def run() -> tuple[list[Message], ...]:
        try:
            return (
                await _handshake(middleware, "/api/data/tags/ds-a", auth, {}),
                await _handshake(middleware, "/api/data/tags/ds-c", auth, denial_ext),
                await _handshake(middleware, "/api/data/tags/ds-c", auth, {}),
                await _handshake(middleware, "/api/data/tags/ds-a", [], denial_ext),
            )
        finally:
            await middleware.aclose()

    allowed, denied, closed, no_token = asyncio.run(run())
    assert allowed == [{"type": "websocket.accept"}]
    assert len(seen) == 1 and isinstance(seen[0], AuthInfo)
    assert seen[0].data_sources == ("ds-a",)
    assert denied[0]["type"] == "websocket.http.response.start"
    assert denied[0]["status"] == 403
    assert json.loads(denied[1]["body"])["reason"] == "DATA_SOURCE_NOT_GRANTED"
    assert closed == [{"type": "websocket.close", "code": 1008}]
    assert no_token[0]["status"] == 401
    assert (b"www-authenticate", b"Bearer") in no_token[0]["headers"]


# -- the request to policyd and the status mapping ----------------------------------------------


def test_the_check_request_carries_no_credentials_and_the_raw_path() -> None:
    scope: Scope = {
        "type": "http",
        "path": "/api/data/tags/ds a",
        "raw_path": b"/api/data/tags/ds%20a",
        "query_string": b"name=F%2A",
        "headers": [
            (b"host", b"hub.test"),
            (b"authorization", b"Bearer secret"),
            (b"cookie", b"session=secret"),
            (b"x-request-id", b"req-42"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-for", b"10.0.0.2"),
            (b"x-other", b"not forwarded"),
        ],
    }
    forward = frozenset({"host", "authorization", "cookie", "x-forwarded-for"})
    request = check_request(scope, "tok", "GET", b"", forward)
    assert request.token == "tok"
    assert request.door == "asgi"
    assert request.request_id == "req-42"
    assert request.http.method == "GET"
    assert request.http.path == "/api/data/tags/ds%20a"
    assert request.http.query == "name=F%2A"
    assert dict(request.http.headers) == {
        "host": "hub.test",
        "x-forwarded-for": "10.0.0.1, 10.0.0.2",
    }
    scope["headers"] = [(b"x-request-id", b"bad id with spaces")]
    generated = check_request(scope, "", "GET", b"", forward).request_id
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


_ROW = re.compile(r"^\| `([A-Z_]+)` \| (\d+) \|(.*)\|(.*)\|(.*)\|$")


def test_the_status_of_each_reason_is_the_one_docs_reason_codes_gives() -> None:
    documented: dict[str, str] = {}
    for line in (ROOT / "docs" / "reason-codes.md").read_text().splitlines():
        m = _ROW.match(line)
        if m:
            documented[m.group(1)] = m.group(5).strip()
    for reason in Reason:
        if reason is Reason.ALLOWED:
            continue
        status = re.match(r"\d{3}", documented[reason.name])
        assert status is not None, reason.name
        assert status_of(reason) == int(status.group()), reason.name
    assert status_of(999) == 403  # a code from a newer policyd: deny


def test_the_apps_scope_drops_identity_headers_in_any_case_and_keeps_the_rest_in_order() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        pass

    middleware = PolicydMiddleware(app)
    headers = [
        (b"Host", b"hub"),
        (b"X-Policyd-Sub", b"mallory"),
        (b"accept", b"*/*"),
        (b"x-auth-user", b"mallory"),
        (b"X-Forwarded-User", b"mallory"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"remote-user", b"mallory"),
        (b"accept", b"text/plain"),
    ]
    scope: Scope = {"type": "http", "headers": headers, "path": "/"}
    auth = AuthInfo("alice", "app", (), (), "id", "rule", "action")
    app_scope = middleware._app_scope(scope, auth)
    assert app_scope["headers"] == [
        (b"Host", b"hub"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"accept", b"text/plain"),
    ]
    assert app_scope["auth"] is auth and app_scope["path"] == "/"
    assert scope["headers"] is headers and len(headers) == 8  # the server's scope untouched
    assert "auth" not in scope
