"""Envoy's ext_authz in HTTP mode (`http_service`, adapters/envoy/envoy-http.yaml) against
policyd's HTTP/1.1 door (`envoy.http_address`, policyd/doors/envoy_http.py): end to end
through the real `envoy` binary in front of the reference hub, and the door's parser in
process (malformed input is 400 and the connection closed)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from adapters.envoy import config as envoy_config
from policyd.config import load_config
from policyd.core.model import HttpTarget
from policyd.decision.wiring import build_decider
from policyd.doors import envoy_http as http_door
from tests.helpers import Home, free_port
from tests.test_envoy import FLOW_A, FLOW_B, FLOW_C, INSUFFICIENT, Stack, _stop, start_envoy
from tests.test_envoy import start_hub as start_hub

# -- through Envoy -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ports() -> envoy_config.Ports:
    """Envoy's listener and admin, the hub, and policyd's HTTP door (`policyd`)."""
    return envoy_config.Ports(
        listen=free_port(), hub=free_port(), policyd=free_port(), admin=free_port()
    )


@pytest.fixture(scope="module")
def http_stack(
    tmp_path_factory: pytest.TempPathFactory, ports: envoy_config.Ports
) -> Iterator[Stack]:
    home = Home(
        tmp_path_factory.mktemp("http-home"),
        extra_config=f'[envoy]\nhttp_address = "127.0.0.1:{ports.policyd}"\n',
    )
    home.seed()
    s = Stack(home, f"http://127.0.0.1:{ports.listen}", free_port())  # gRPC on its own port
    config = envoy_config.render(ports, source=envoy_config.HTTP)
    with ExitStack() as running:
        s.start_policyd()
        running.callback(lambda: s.policyd.close())
        running.callback(_stop, start_hub(home.root, ports.hub))
        running.callback(_stop, start_envoy(home.root, config, f"{s.url}/api/info"))
        yield s


@pytest.fixture(scope="module")
def token(http_stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {http_stack.home.token()}"}


@pytest.mark.slow
def test_an_allowed_read_reaches_the_hub_with_the_identity(
    http_stack: Stack, token: dict[str, str]
) -> None:
    url = http_stack.url
    r = httpx.get(f"{url}/api/data/tags/ds-a", params={"name": "fic*"}, headers=token)
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["tags"]] == [FLOW_A]
    spoofed = {**token, "x-policyd-sub": "bob", "x-policyd-extra": "1", "x-auth-user": "bob"}
    me = httpx.get(f"{url}/api/user/me", headers=spoofed)
    assert me.status_code == 200, me.text
    assert (me.json()["sub"], me.json()["client_id"]) == ("alice", "app1")
    assert me.json()["scopes"] == ["UserInfo", "DataRead"]
    listing = httpx.get(
        f"{url}/api/data/datasources",
        headers={**token, "x-policyd-data-sources": '["ds-a", "ds-b", "ds-c"]'},
    )
    assert [d["name"] for d in listing.json()["data_sources"]] == ["ds-a", "ds-b"]


class _Echo(BaseHTTPRequestHandler):
    """An upstream that answers with the request headers it got, as a JSON list."""

    def do_GET(self) -> None:
        body = json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.slow
def test_the_upstream_gets_only_policyds_identity_headers(
    http_stack: Stack, ports: envoy_config.Ports, token: dict[str, str]
) -> None:
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    mine = envoy_config.Ports(
        listen=free_port(), hub=echo.server_address[1], policyd=ports.policyd, admin=free_port()
    )
    config = envoy_config.render(mine, source=envoy_config.HTTP)
    url = f"http://127.0.0.1:{mine.listen}"
    envoy = start_envoy(http_stack.home.root, config, f"{url}/api/info", headers=token)
    try:
        sent = [
            *token.items(),
            ("x-policyd-sub", "bob"),
            ("x-policyd-sub", "eve"),
            ("x-policyd-extra", "1"),
            ("x-auth-user", "bob"),
        ]
        r = httpx.get(f"{url}/api/user/me", headers=sent)
        assert r.status_code == 200, r.text
        got = r.json()
    finally:
        _stop(envoy)
        echo.shutdown()
    identity = [(k, v) for k, v in got if k.startswith(("x-policyd-", "x-auth-"))]
    assert ("x-policyd-sub", "alice") in identity
    assert [k for k, _ in identity if k == "x-policyd-sub"] == ["x-policyd-sub"]
    assert not [k for k, _ in identity if k in ("x-policyd-extra", "x-auth-user")]
    assert {k for k, _ in identity} == {
        "x-policyd-sub",
        "x-policyd-client-id",
        "x-policyd-scopes",
        "x-policyd-data-sources",
        "x-policyd-decision-id",
        "x-policyd-rule-id",
        "x-policyd-action",
    }


@pytest.mark.slow
def test_token_problems_are_401_with_the_challenge(http_stack: Stack) -> None:
    bad = httpx.get(
        f"{http_stack.url}/api/data/tags/ds-a", headers={"Authorization": "Bearer not-a-token"}
    )
    assert bad.status_code == 401, bad.text
    assert bad.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert bad.headers["cache-control"] == "no-store"
    assert bad.json()["reason"] == "TOKEN_MALFORMED"
    missing = httpx.get(f"{http_stack.url}/api/data/tags/ds-a")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["reason"] == "TOKEN_MISSING"


@pytest.mark.slow
def test_an_ungranted_data_source_is_403_with_the_json_body(
    http_stack: Stack, token: dict[str, str]
) -> None:
    r = httpx.get(f"{http_stack.url}/api/data/tags/ds-c", headers=token)
    assert r.status_code == 403, r.text
    assert r.headers["www-authenticate"] == INSUFFICIENT
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "reason", "message", "decision_id"}
    assert (body["error"], body["reason"]) == ("insufficient_scope", "DATA_SOURCE_NOT_GRANTED")
    assert body["decision_id"]


@pytest.mark.slow
def test_the_body_is_read_where_the_route_sends_it(
    http_stack: Stack, token: dict[str, str]
) -> None:
    url = f"{http_stack.url}/api/data/v2/snapshot"
    both = httpx.post(url, headers=token, json={"tags": {"ds-a": [FLOW_A], "ds-b": [FLOW_B]}})
    assert both.status_code == 200, both.text
    assert set(both.json()) == {"ds-a", "ds-b"}
    one_bad = httpx.post(url, headers=token, json={"tags": {"ds-a": [FLOW_A], "ds-c": [FLOW_C]}})
    assert one_bad.status_code == 403, one_bad.text
    assert one_bad.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"
    assert "ds-c" in one_bad.json()["message"]


@pytest.mark.slow
def test_an_ambiguous_path_is_400_not_routed(http_stack: Stack, token: dict[str, str]) -> None:
    from tests.test_envoy import _raw_get

    status, body = _raw_get(http_stack.url, "/api/data/tags/ds-a/..%2F..%2Ftags%2Fds-c", token)
    assert status == 400, (status, body)
    assert body["reason"] == "PATH_AMBIGUOUS"


@pytest.mark.slow
def test_policyd_down_is_503(http_stack: Stack, token: dict[str, str]) -> None:
    url = f"{http_stack.url}/api/data/tags/ds-a"
    http_stack.stop_policyd()
    try:
        assert httpx.get(url, headers=token).status_code == 503
    finally:
        http_stack.start_policyd()
    assert httpx.get(url, headers=token).status_code == 200


# -- the door in process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[http_door.HttpDoor]:
    home = Home(tmp_path_factory.mktemp("door-home"))
    home.seed()
    decider = build_decider(load_config(home.config_path, env={}))
    d = http_door.HttpDoor(decider, "127.0.0.1:0", max_body_bytes=1024)
    d.start()
    d.home = home  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        d.stop()
        if decider.audit is not None:
            decider.audit.close()


def _exchange(door: http_door.HttpDoor, raw: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; everything answered until the door closes (True) or goes quiet."""
    with socket.create_connection(("127.0.0.1", door.port), timeout=2) as sock:
        sock.sendall(raw)
        sock.settimeout(0.5)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return out, False
            if not chunk:
                return out, True
            out += chunk


def _check(target: str, headers: str = "", body: bytes = b"", method: str = "GET") -> bytes:
    return (
        f"{method} {http_door.PATH_PREFIX}{target} HTTP/1.1\r\nhost: x\r\n{headers}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_an_allow_answers_200_with_the_identity_and_removals(door: http_door.HttpDoor) -> None:
    home: Home = door.home  # type: ignore[attr-defined]
    raw = _check(
        "/api/user/me",
        f"authorization: Bearer {home.token()}\r\nx-request-id: rid-7\r\n"
        "x-policyd-sub: bob\r\nx-auth-user: bob\r\n",
    )
    out, closed = _exchange(door, raw + raw)  # two back to back: both answered, in order
    assert not closed
    first, _, rest = out.partition(b"\r\n\r\n")
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    lines = first.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["x-policyd-sub"] == "alice"
    assert headers["x-policyd-client-id"] == "app1"
    assert headers["x-policyd-scopes"] == "UserInfo DataRead"
    assert headers["content-length"] == "0"
    assert headers[http_door.REMOVE_HEADER] == "x-auth-user"  # x-policyd-sub: overwritten


def _answer_headers(out: bytes) -> list[dict[str, str]]:
    answers = []
    for head in out.split(b"\r\n\r\n")[:-1]:
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        answers.append(dict(line.split(": ", 1) for line in lines[1:]))
    return answers


def test_a_remembered_allow_answers_the_same_with_its_own_decision_id(
    door: http_door.HttpDoor,
) -> None:
    home: Home = door.home  # type: ignore[attr-defined]
    token = home.token(scopes=("UserInfo", "DataRead", "DataWrite"))
    plain = _check("/api/data/tags/ds-a", f"authorization: Bearer {token}\r\n")
    spoofing = _check(
        "/api/data/tags/ds-a", f"authorization: Bearer {token}\r\nx-auth-user: mallory\r\n"
    )
    out, _ = _exchange(door, plain + plain + spoofing + plain)
    answers = _answer_headers(out)
    assert len(answers) == 4
    ids = [a.pop("x-policyd-decision-id") for a in answers]
    assert len(set(ids)) == 4
    # The second answer comes from memory (Remembered), the same but for its id; a client
    # that sends an identity header still gets it removed.
    assert answers[0] == answers[1] == answers[3]
    assert http_door.REMOVE_HEADER not in answers[0]
    assert answers[2][http_door.REMOVE_HEADER] == "x-auth-user"
    assert {k: v for k, v in answers[2].items() if k != http_door.REMOVE_HEADER} == answers[0]


def test_a_deny_answers_the_status_challenge_and_json_body(door: http_door.HttpDoor) -> None:
    out, _ = _exchange(door, _check("/api/data/tags/ds-a"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nwww-authenticate: Bearer\r\n" in head + b"\r\n"
    assert json.loads(body)["reason"] == "TOKEN_MISSING"
    head_only, _ = _exchange(door, _check("/api/data/tags/ds-a", method="HEAD"))
    assert head_only.endswith(b"\r\n\r\n")  # no body after a HEAD answer


def test_the_body_and_query_reach_the_check() -> None:
    request = http_door.Request(
        "POST",
        f"{http_door.PATH_PREFIX}/api/data/v2/raw?x=1",
        {"authorization": "Bearer tok", "x-request-id": "rid"},
        b"{}",
        False,
    )
    check = http_door.to_input(request)
    assert (check.token, check.request_id, check.door) == ("tok", "rid", "envoy")
    # The selected headers reach the check (policyd/doors/headers.py); the credentials never.
    assert check.target == HttpTarget(
        "POST", "/api/data/v2/raw", "x=1", {"x-request-id": "rid"}, b"{}"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /ext_authz/x HTTP/1.0\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1 extra\r\n\r\n",
        b"GET  /ext_authz/x HTTP/1.1\r\n\r\n",
        b"CONNECT /ext_authz/x HTTP/1.1\r\n\r\n",
        b"GET http://a/ext_authz/x HTTP/1.1\r\n\r\n",
        b"GET /other/x HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
        b"GET /ext_authz HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /ext_authz/x HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
        b"POST /ext_authz/x HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nab",
        b"POST /ext_authz/x HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
        b"POST /ext_authz/x HTTP/1.1\r\ncontent-length: 0x2\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nauthorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-a: 1\r\n folded\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-a : 1\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-a: 1\rx-b: 2\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-a: 1\nx-b: 2\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-a: \x00\r\n\r\n",
        b"GET /ext_authz/x y HTTP/1.1\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        b"GET /ext_authz/x HTTP/1.1\r\nx-big: " + b"a" * (70 * 1024),  # head never ends
    ],
)
def test_malformed_requests_are_400_and_closed(door: http_door.HttpDoor, raw: bytes) -> None:
    out, closed = _exchange(door, raw)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n"), out[:200]
    assert closed
    body = json.loads(out.partition(b"\r\n\r\n")[2])
    assert body["reason"] == "REQUEST_INVALID"


def test_a_body_over_the_limit_is_413_and_closed(door: http_door.HttpDoor) -> None:
    out, closed = _exchange(
        door, b"POST /ext_authz/x HTTP/1.1\r\ncontent-length: 5000\r\n\r\n" + b"a" * 100
    )
    assert out.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert closed


def test_a_body_arriving_in_pieces_is_awaited(door: http_door.HttpDoor) -> None:
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"POST /ext_authz/api/data/v2/raw HTTP/1.1\r\ncontent-length: 4\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'"a"')  # completes the 4 bytes... of a body that is not JSON
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        writer.close()
        return head

    head = asyncio.run(go())
    assert head.startswith(b"HTTP/1.1 401 ")  # no token: a decision, not a framing error


def test_the_sample_uses_the_doors_prefix() -> None:
    sample = envoy_config.load(envoy_config.HTTP)
    hcm = sample["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext = hcm["typed_config"]["http_filters"][0]["typed_config"]
    assert ext["http_service"]["path_prefix"] == http_door.PATH_PREFIX
    assert ext["failure_mode_allow"] is False
    rendered = envoy_config.render(envoy_config.Ports(policyd=6001), source=envoy_config.HTTP)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    uri = hcm["typed_config"]["http_filters"][0]["typed_config"]["http_service"]["server_uri"]
    assert uri["uri"] == "http://127.0.0.1:6001"
    assert Path(envoy_config.HTTP).name == "envoy-http.yaml"


def test_a_remembered_allow_whose_record_cannot_be_written_is_503(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    decider = build_decider(load_config(home.config_path, env={}))
    assert decider.audit is not None
    d = http_door.HttpDoor(decider, "127.0.0.1:0")
    d.start()
    try:
        ask = _check("/api/data/tags/ds-a", f"authorization: Bearer {home.token()}\r\n")
        for _ in range(2):  # the second is answered from memory
            out, _ = _exchange(d, ask)
            assert out.startswith(b"HTTP/1.1 200 "), out
        decider.audit.close()  # no record can be written from now on
        out, _ = _exchange(d, ask)
        assert out.startswith(b"HTTP/1.1 503 "), out
        assert b'"reason":"AUDIT_UNAVAILABLE"' in out.replace(b" ", b"")
    finally:
        d.stop()
