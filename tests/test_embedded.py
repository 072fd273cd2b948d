"""Embedded mode: the middleware deciding in the hub's own process (adapters/embedded/).

Real uvicorn, a real `policyd serve` on the same store for the remote side of each
comparison, real SQLite files and audit indexers; nothing on the decision path is mocked.
The multi-process suites (revocation across two hub processes and a server, kill -9 of a
hub under load) are in tests/test_embedded_processes.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.asgi import AuthInfo, PolicydMiddleware
from adapters.asgi.middleware import Message
from adapters.asgi.stall import LoopStall
from adapters.embedded import EmbeddedPolicyd
from adapters.embedded.engine import MEMO_BODY_BYTES
from policyd.core.policy import Policy
from tests.asgi_server import serve_asgi
from tests.helpers import (
    ROOT,
    Home,
    ServerProcess,
    free_port,
    indexed_records,
    run_hub,
    run_server,
)
from tests.test_asgi import (
    JSON,
    Recorder,
    _handshake,
    _websocket_app,
    bearer,
    echo_app,
    snapshot_body,
)


@dataclass
class Pair:
    home: Home
    server: ServerProcess
    remote: str  # the echo app behind the remote middleware
    embedded: str  # the same app behind the embedded one


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("embedded")
    home = Home(root)
    home.seed()
    with run_server(home) as server:
        remote = PolicydMiddleware(echo_app(Recorder()), server.address, timeout_seconds=5.0)
        embedded = PolicydMiddleware(
            echo_app(Recorder()), embedded=EmbeddedPolicyd(home.config_path)
        )
        with serve_asgi(remote) as remote_url, serve_asgi(embedded) as embedded_url:
            yield Pair(home, server, remote_url, embedded_url)


def _seen(reply: httpx.Response) -> tuple[int, Any, str]:
    """What a client and the app see of an answer, the decision id left out."""
    try:
        doc = reply.json()
    except ValueError:
        doc = reply.text
    if isinstance(doc, dict):
        doc.pop("decision_id", None)
        auth = doc.get("auth")
        if isinstance(auth, dict):
            auth.pop("decision_id")
    return reply.status_code, doc, reply.headers.get("www-authenticate", "")


def _decision_id(reply: httpx.Response) -> str:
    doc = reply.json()
    found = doc["auth"]["decision_id"] if "auth" in doc else doc["decision_id"]
    assert isinstance(found, str)
    return found


def test_embedded_answers_as_remote_does(pair: Pair) -> None:
    home = pair.home
    token = home.token(scopes=("UserInfo", "DataRead", "DataWrite"))
    disabled = home.token(client_id="app-off")
    requests: list[tuple[str, str, dict[str, str], bytes]] = [
        ("GET", "/api/info", {}, b""),
        ("GET", "/api/user/me", bearer(token), b""),
        ("GET", "/api/user/me", {}, b""),
        ("GET", "/api/user/me", bearer("not-a-jwt"), b""),
        ("GET", "/api/user/me", bearer(disabled), b""),
        ("GET", "/api/data/tags/ds-a?name=fic*", bearer(token), b""),
        ("GET", "/api/data/tags/ds-c", bearer(token), b""),  # not granted
        ("GET", "/api/data/datasources", bearer(token), b""),
        ("GET", "/api/data/tags/ds-a%2Fx", bearer(token), b""),  # ambiguous
        ("GET", "/api/nowhere", bearer(token), b""),
        ("POST", "/api/data/v2/snapshot", {**bearer(token), **JSON}, snapshot_body("ds-a")),
        ("POST", "/api/data/v2/snapshot", {**bearer(token), **JSON}, snapshot_body("ds-a", "ds-c")),
        ("POST", "/api/data/v2/snapshot", {**bearer(token), **JSON}, b"{not json"),
        ("PUT", "/api/data/v2/snapshot/ds-b", {**bearer(token), **JSON}, b"{}"),  # read only
    ]
    ids: set[str] = set()
    with httpx.Client(timeout=10) as client:
        for method, path, headers, body in requests:
            for _ in range(2):  # the second time a remembered allow, where it is one
                remote = client.request(method, pair.remote + path, headers=headers, content=body)
                here = client.request(method, pair.embedded + path, headers=headers, content=body)
                assert _seen(here) == _seen(remote), f"{method} {path}"
                ids.add(_decision_id(here))
    assert len(ids) == 2 * len(requests)  # every answer its own decision
    records = indexed_records(home.root / "audit.db", ids)
    assert ids <= set(records)
    assert {records[i].door for i in ids} == {"embedded"}


def test_embedded_allows_keep_one_record_per_answer(pair: Pair) -> None:
    token = pair.home.token()
    with httpx.Client(timeout=10) as client:
        replies = [
            client.get(f"{pair.embedded}/api/data/tags/ds-a", headers=bearer(token))
            for _ in range(50)
        ]
    assert {r.status_code for r in replies} == {200}
    ids = {r.json()["auth"]["decision_id"] for r in replies}
    assert len(ids) == 50
    records = indexed_records(pair.home.root / "audit.db", ids)
    assert ids <= set(records)
    assert {(records[i].decision, records[i].reason, records[i].user_id) for i in ids} == {
        ("allow", "ALLOWED", "alice")
    }


def test_remembered_allows_are_answered_on_the_loop_the_rest_in_the_pool(
    tmp_path: Path,
) -> None:
    """The loop answers a repeat itself (its own connection confirms the caches after a
    commit); a deny, a first decision and the first one after a store write go to the pool."""
    home = Home(tmp_path)
    home.seed()
    policyd = EmbeddedPolicyd(home.config_path)
    app = PolicydMiddleware(echo_app(Recorder()), embedded=policyd)
    token = home.token()

    with serve_asgi(app) as url, httpx.Client(timeout=10) as client:
        allowed = f"{url}/api/data/tags/ds-a"
        denied = f"{url}/api/data/tags/ds-c"
        for _ in range(50):
            assert client.get(allowed, headers=bearer(token)).status_code == 200
        assert (policyd.answered_inline, policyd.answered_in_pool) == (49, 1)
        for _ in range(10):
            assert client.get(denied, headers=bearer(token)).status_code == 403
        assert policyd.answered_in_pool == 11  # denials are never remembered
        home.store.add_user("carol")  # a write: every cache starts again
        for _ in range(10):
            assert client.get(allowed, headers=bearer(token)).status_code == 200
        assert (policyd.answered_inline, policyd.answered_in_pool) == (58, 12)


def test_a_revoked_grant_is_denied_on_the_next_embedded_request(pair: Pair) -> None:
    home = pair.home
    token = home.token()
    url = f"{pair.embedded}/api/data/tags/ds-b"
    with httpx.Client(timeout=10) as client:
        for _ in range(5):
            assert client.get(url, headers=bearer(token)).status_code == 200
        result = home.cli("grants", "revoke", "alice", "app1", "ds-b")
        assert result.returncode == 0, result.stderr
        try:
            reply = client.get(url, headers=bearer(token))
            assert reply.status_code == 403
            assert reply.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"
        finally:
            again = home.cli("grants", "add", "alice", "app1", "ds-b", "--access", "read")
            assert again.returncode == 0, again.stderr
        assert client.get(url, headers=bearer(token)).status_code == 200


def test_a_websocket_handshake_is_decided_in_process_without_lifespan(pair: Pair) -> None:
    """No lifespan ran: the first handshake starts the embedded policyd."""
    seen: list[object] = []
    middleware = PolicydMiddleware(
        _websocket_app(seen), embedded=EmbeddedPolicyd(pair.home.config_path)
    )
    auth = [(b"authorization", f"Bearer {pair.home.token()}".encode())]

    async def run() -> tuple[list[Any], list[Any]]:
        try:
            return (
                await _handshake(middleware, "/api/data/tags/ds-a", auth, {}),
                await _handshake(
                    middleware, "/api/data/tags/ds-c", auth, {"websocket.http.response": {}}
                ),
            )
        finally:
            await middleware.aclose()

    allowed, denied = asyncio.run(run())
    assert allowed == [{"type": "websocket.accept"}]
    assert isinstance(seen[0], AuthInfo) and seen[0].data_sources == ("ds-a",)
    assert denied[0]["status"] == 403
    assert json.loads(denied[1]["body"])["reason"] == "DATA_SOURCE_NOT_GRANTED"


def test_the_sync_api_decides_in_the_calling_thread(pair: Pair) -> None:
    policyd = EmbeddedPolicyd(pair.home.config_path)
    policyd.start_sync()
    try:
        token = pair.home.token()
        auth, denial = policyd.check_http_sync(token, "GET", "/api/data/tags/ds-a")
        assert denial is None and auth is not None
        assert (auth.sub, auth.client_id, auth.data_sources) == ("alice", "app1", ("ds-a",))
        auth, denial = policyd.check_http_sync(token, "GET", "/api/data/tags/ds-c")
        assert auth is None and denial is not None
        assert (denial.status, denial.reason) == (403, "DATA_SOURCE_NOT_GRANTED")
        assert json.loads(denial.body())["decision_id"] == denial.decision_id
    finally:
        policyd.stop_sync()


def test_embedded_policy_hot_reload_is_seen(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(ROOT / "policies" / "hub.yaml", policies / "hub.yaml")
    home = Home(tmp_path, extra_config=f'[policy]\ndir = "{policies}"\nwatch_seconds = 0.1\n')
    home.seed()
    app = PolicydMiddleware(echo_app(Recorder()), embedded=EmbeddedPolicyd(home.config_path))
    with serve_asgi(app) as url, httpx.Client(timeout=10) as client:
        assert client.get(f"{url}/api/info").status_code == 200
        text = (policies / "hub.yaml").read_text()
        (policies / "hub.yaml").write_text(text.replace("path: /api/info\n", "path: /api/about\n"))
        deadline = time.monotonic() + 15
        while client.get(f"{url}/api/info").status_code == 200:
            assert time.monotonic() < deadline, "the policy change was not loaded"
            time.sleep(0.1)
        reply = client.get(f"{url}/api/info", headers=bearer(home.token()))
        assert (reply.status_code, reply.json()["reason"]) == (403, "NO_ROUTE")
        assert client.get(f"{url}/api/about").status_code == 200
        status = list(tmp_path.glob("policy-status-embedded-*.json"))
        assert len(status) == 1 and json.loads(status[0].read_text())["last_reload"]["result"] == (
            "loaded"
        )
    assert not list(tmp_path.glob("policy-status-embedded-*.json"))  # removed at shutdown


def test_loop_stall_probe_reports_the_worst_lateness_and_resets() -> None:
    async def run() -> tuple[float, float, float]:
        probe = LoopStall(0.001)
        probe.start()
        await asyncio.sleep(0.05)
        probe.take()
        time.sleep(0.08)  # the loop is held for 80 ms
        await asyncio.sleep(0.01)
        held = probe.take()
        await asyncio.sleep(0.05)
        calm = probe.take()
        probe.stop()
        return held, calm, probe.worst_ever

    held, calm, ever = asyncio.run(run())
    assert 0.07 <= held < 1.0
    assert calm < 0.07
    assert ever == held


def test_the_hub_serves_the_loop_stall_on_its_metrics_port(tmp_path: Path) -> None:
    """The hub in embedded mode, as the benchmark runs it: the stall is on the metrics port,
    worst since the previous scrape; every answer names its decision."""
    home = Home(tmp_path)
    home.seed()
    metrics_port = free_port()
    settings = {"metrics_address": f"127.0.0.1:{metrics_port}", "loop_probe_ms": "1"}
    with run_hub(home, "ds-a,ds-b,ds-c", **settings) as hub:
        token = home.token()
        with httpx.Client(timeout=10) as client:
            for _ in range(100):
                reply = client.get(f"{hub.url}/api/data/tags/ds-a", headers=bearer(token))
                assert reply.status_code == 200
                assert reply.headers["x-policyd-decision-id"]
            scrape = client.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        values = {
            line.split()[0]: float(line.split()[1])
            for line in scrape.splitlines()
            if line.startswith("policyd_loop_stall")
        }
        assert 0 <= values["policyd_loop_stall_seconds"] < 5
        assert values["policyd_loop_stall_max_seconds"] >= values["policyd_loop_stall_seconds"]
        assert values["policyd_loop_stall_probes_total"] > 10
    # uvicorn ends a graceful SIGTERM shutdown by raising the signal again.
    assert hub.process.returncode in (0, -15), hub.log()
    assert "Application shutdown complete" in hub.log(), hub.log()
    assert "Traceback" not in hub.log(), hub.log()


async def answered(middleware: PolicydMiddleware, scope: dict[str, Any], body: bytes) -> int:
    """The status the middleware (or its app) answers this request with, its body sent whole."""
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await middleware(scope, receive, send)
    return statuses[0]


def test_a_repeated_request_is_read_once_and_each_answer_has_its_own_ids(tmp_path: Path) -> None:
    """The middleware keeps what a request's bytes made (its token, path, query, forwarded
    headers, whether its body is read) by those bytes; a repeat is answered the same, with a
    decision id and a request id of its own, and its body is read and decided every time. A
    request carrying its own request id or a trace context is not kept (each one differs);
    two Authorization headers are refused every time."""
    home = Home(tmp_path)
    home.seed()
    answers: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        answers.append(scope["auth"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    policyd = EmbeddedPolicyd(home.config_path)
    middleware = PolicydMiddleware(app, embedded=policyd)
    token = home.token()
    path = b"/api/data/tags/ds-a"

    def scope(*extra: tuple[bytes, bytes], method: str = "GET", at: bytes = path) -> dict[str, Any]:
        headers = [(b"host", b"hub"), (b"authorization", f"Bearer {token}".encode()), *extra]
        return {
            "type": "http",
            "method": method,
            "path": at.decode(),
            "raw_path": at,
            "query_string": b"",
            "headers": headers,
        }

    async def ask(s: dict[str, Any], body: bytes = b"") -> int:
        return await answered(middleware, s, body)

    async def run() -> list[int]:
        await policyd.start()
        try:
            statuses = [await ask(scope()) for _ in range(5)]
            assert len(middleware._asked) == 1
            statuses.append(await ask(scope((b"x-request-id", b"mine-1"))))
            statuses.append(await ask(scope((b"x-request-id", b"mine-2"))))
            traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            statuses.append(await ask(scope((b"traceparent", traceparent))))
            assert len(middleware._asked) == 1  # none of those kept
            twice = scope((b"Authorization", b"Bearer other"))
            statuses += [await ask(twice), await ask(twice)]
            # A body is read and decided on every time, whatever was kept of the headers
            # (the two bodies have the same length: the headers are the same bytes).
            post = scope(
                (b"content-type", b"application/json"),
                method="POST",
                at=b"/api/data/v2/snapshot",
            )
            granted, not_granted = snapshot_body("ds-a"), snapshot_body("ds-c")
            assert len(granted) == len(not_granted)
            statuses += [await ask(post, granted), await ask(post, not_granted)]
            statuses += [await ask(post, granted), await ask(post, not_granted)]
            assert len(middleware._asked) == 2
            ids = {a.decision_id for a in answers}
            found = await asyncio.to_thread(indexed_records, home.root / "audit.db", ids)
            records.update(found)
            return statuses
        finally:
            await policyd.stop()

    records: dict[str, Any] = {}
    assert asyncio.run(run()) == [200] * 8 + [400, 400] + [200, 403, 200, 403]
    reads, posts = answers[:8], answers[8:]
    assert len({(a.sub, a.client_id, a.scopes, a.data_sources, a.rule_id) for a in reads}) == 1
    assert [a.data_sources for a in posts] == [("ds-a",), ("ds-a",)]
    assert len({a.decision_id for a in answers}) == 10
    request_ids = [records[a.decision_id].request_id for a in answers]
    assert request_ids[5:7] == ["mine-1", "mine-2"]
    assert len(set(request_ids)) == 10  # the repeats' ids made anew each time


def test_a_repeated_body_reuses_its_key_and_a_different_body_is_decided_on_its_own(
    tmp_path: Path,
) -> None:
    """The key of a request with a body is kept with that body (up to MEMO_BODY_BYTES): the
    same body again is not encoded again; any other body, even with the same headers and
    length, is decided on its own (here a data source alice was not granted: 403), and a
    larger body is never kept."""
    home = Home(tmp_path)
    home.seed()
    policyd = EmbeddedPolicyd(home.config_path)
    keyed: list[bytes] = []
    key_http = policyd.embedded.key_http

    def counting(
        token: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[Hashable, Policy]:
        keyed.append(body)
        return key_http(token, method, path, query, headers, body)

    policyd.embedded.key_http = counting  # type: ignore[method-assign]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = PolicydMiddleware(app, embedded=policyd)
    headers = [
        (b"host", b"hub"),
        (b"authorization", f"Bearer {home.token()}".encode()),
        (b"content-type", b"application/json"),
    ]
    post = {
        "type": "http",
        "method": "POST",
        "path": "/api/data/v2/snapshot",
        "raw_path": b"/api/data/v2/snapshot",
        "query_string": b"",
        "headers": headers,
    }

    async def ask(body: bytes) -> int:
        return await answered(middleware, dict(post), body)

    granted, not_granted = snapshot_body("ds-a"), snapshot_body("ds-c")
    assert len(granted) == len(not_granted)
    large = json.dumps({"tags": {"ds-a": ["T1"] * 1000}}).encode()
    assert len(large) > MEMO_BODY_BYTES

    async def run() -> list[int]:
        await policyd.start()
        try:
            statuses = [await ask(granted) for _ in range(3)]
            assert keyed == [granted]
            statuses += [await ask(not_granted), await ask(not_granted)]
            assert keyed == [granted, not_granted]
            statuses.append(await ask(granted))
            statuses += [await ask(large), await ask(large)]
            assert keyed == [granted, not_granted, granted, large, large]
            return statuses
        finally:
            await policyd.stop()

    assert asyncio.run(run()) == [200, 200, 200, 403, 403, 200, 200, 200]


def test_a_loop_iteration_asks_the_store_once_for_the_requests_it_decides(
    tmp_path: Path,
) -> None:
    """With per_iteration (the middleware's default), remembered allows decided in one loop
    iteration share one data_version check (they had all arrived before it was asked:
    docs/asgi.md, "One store check per loop iteration"). A second request of the same task
    without a pause, every request under a task factory (an eager one runs a request where
    it was read), and every request of a caller that did not ask for it, is checked
    alone."""
    home = Home(tmp_path)
    home.seed()
    policyd = EmbeddedPolicyd(home.config_path)
    token = home.token()
    statements: list[str] = []

    async def check(per_iteration: bool = True) -> int:
        _, denial = await policyd.check_http(
            token, "GET", "/api/data/tags/ds-a", per_iteration=per_iteration
        )
        return 200 if denial is None else denial.status

    def asked() -> int:
        count = statements.count("PRAGMA data_version")
        statements.clear()
        return count

    async def run() -> dict[str, Any]:
        await policyd.start()
        try:
            assert [await check(), await check()] == [200, 200]  # remembered from here on
            # The loop thread's own decision-time connection (Facts: one per thread).
            reader = policyd.embedded.decider.engine.facts._reader()
            reader.conn.set_trace_callback(statements.append)
            await asyncio.sleep(0)  # a new iteration
            asked()
            seen: dict[str, Any] = {}
            seen["together"] = await asyncio.gather(*(check() for _ in range(16)))
            seen["together asked"] = asked()
            seen["one task"] = [await check() for _ in range(16)]
            seen["one task asked"] = asked()
            loop = asyncio.get_running_loop()
            loop.set_task_factory(lambda loop, coro, **kw: asyncio.Task(coro, loop=loop, **kw))
            try:
                seen["factory"] = await asyncio.gather(*(check() for _ in range(16)))
                seen["factory asked"] = asked()
            finally:
                loop.set_task_factory(None)
            seen["not asked for"] = await asyncio.gather(*(check(False) for _ in range(16)))
            seen["not asked for asked"] = asked()
            reader.conn.set_trace_callback(None)
            return seen
        finally:
            await policyd.stop()

    seen = asyncio.run(run())
    assert seen["together"] == seen["one task"] == seen["factory"] == [200] * 16
    assert seen["not asked for"] == [200] * 16
    assert seen["together asked"] == 1
    assert seen["one task asked"] == 16
    assert seen["factory asked"] == 16
    assert seen["not asked for asked"] == 16
    assert policyd.answered_in_pool == 1  # the first decision only


def test_a_write_in_the_same_iteration_is_seen_by_the_next_request(tmp_path: Path) -> None:
    """A write on the loop, then a request without a pause (an in-process client), in one
    iteration whose batch began before the write: the request is denied, whether the same
    task or another one wrote (this process's commits end a batch's trust) and whether the
    task's own earlier request joined the batch."""
    home = Home(tmp_path)
    home.seed()
    policyd = EmbeddedPolicyd(home.config_path)
    token = home.token()

    async def check(path: str) -> str:
        _, denial = await policyd.check_http(token, "GET", path, per_iteration=True)
        return "ALLOWED" if denial is None else denial.reason

    async def revoke_and_check(data_source: str) -> str:
        home.store.revoke_grant("alice", "app1", data_source)  # on the loop, no pause
        return await check(f"/api/data/tags/{data_source}")

    async def run() -> list[str]:
        await policyd.start()
        try:
            answers = [await check("/api/data/tags/ds-a"), await check("/api/data/tags/ds-b")]
            await asyncio.sleep(0)  # a new iteration: the next check begins a batch
            # The same task: its request began the batch, its next one follows the write.
            answers.append(await check("/api/data/tags/ds-a"))
            answers.append(await revoke_and_check("ds-a"))
            await asyncio.sleep(0)
            # The write forgot every remembered allow: ds-b's is remembered again, else the
            # next check would be decided in the pool, racing the other task's write.
            answers.append(await check("/api/data/tags/ds-b"))
            await asyncio.sleep(0)
            # Another task: the first one's request begins the batch (answered inline, from
            # memory), the second writes.
            in_pool = policyd.answered_in_pool
            answers += await asyncio.gather(check("/api/data/tags/ds-b"), revoke_and_check("ds-b"))
            assert policyd.answered_in_pool == in_pool + 1  # the second request's alone
            return answers
        finally:
            await policyd.stop()

    assert asyncio.run(run()) == [
        "ALLOWED",
        "ALLOWED",
        "ALLOWED",
        "DATA_SOURCE_NOT_GRANTED",
        "ALLOWED",
        "ALLOWED",
        "DATA_SOURCE_NOT_GRANTED",
    ]
