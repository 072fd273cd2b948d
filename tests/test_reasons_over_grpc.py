"""Every reason code, provoked over a real gRPC socket against a `policyd serve` process.

Each test that provokes a reason is marked `@covers(Reason.X)`; the meta-test at the end
fails when a member of `Reason` has no such test. Tests that only read share the module's
server; tests that break the store or need other settings start a server of their own.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import jwt
import pytest

from policyd.core.model import CONNECTOR_ATTACH, Access
from policyd.core.policy import load_policy
from policyd.core.reasons import Reason
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import token_settings
from policyd.gen.v1 import decision_pb2
from policyd.store.keys import SigningKey
from tests.helpers import (
    ROOT,
    Home,
    ServerProcess,
    check_request,
    decision_stub,
    indexed_records,
    run_server,
)

F = TypeVar("F", bound=Callable[..., Any])

COVERED: set[Reason] = set()


def covers(reason: Reason) -> Callable[[F], F]:
    """Record that the decorated test provokes `reason` over gRPC (and asserts it)."""

    def mark(test: F) -> F:
        COVERED.add(reason)
        return test

    return mark


POLICY_VERSION = load_policy(ROOT / "policies").version

# A signing key row whose public half is not a key: only an internal fault can follow.
BROKEN_KID = "broken-key"
BROKEN_PEM = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"


# -- helpers -------------------------------------------------------------------------------


class Client:
    """A typed Decision client over a real socket."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = decision_stub(channel)

    def send(self, request: decision_pb2.CheckRequest) -> decision_pb2.CheckResponse:
        response: decision_pb2.CheckResponse = self._stub.Check(request, timeout=10)
        return response

    def http(
        self,
        token: str,
        path: str = "/api/user/me",
        method: str = "GET",
        body: bytes = b"",
        query: str = "",
    ) -> decision_pb2.CheckResponse:
        return self.send(check_request(token, method, path, query, body))

    def action(self, token: str, action: str, *data_sources: str) -> decision_pb2.CheckResponse:
        request = decision_pb2.CheckRequest(token=token, request_id="test")
        request.action.action = action
        request.action.data_sources.extend(data_sources)
        return self.send(request)


@contextmanager
def connect(server: ServerProcess) -> Iterator[Client]:
    with grpc.insecure_channel(server.address) as channel:
        yield Client(channel)


def reason_of(response: decision_pb2.CheckResponse) -> Reason:
    return Reason(response.reason)


def assert_decision_id(decision_id: str) -> None:
    """A decision id is a UUIDv7 (decision.proto), its clock within a minute of now."""
    parsed = uuid.UUID(decision_id)
    assert str(parsed) == decision_id
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert abs((parsed.int >> 80) - time.time() * 1000) < 60_000


def assert_decision(
    response: decision_pb2.CheckResponse, reason: Reason, *, verified: bool
) -> None:
    """The reason, allowed iff ALLOWED, a principal iff the token verified, and the ids."""
    assert reason_of(response) is reason, f"{reason_of(response).name}: {response.message}"
    assert response.allowed is (reason is Reason.ALLOWED)
    assert response.HasField("principal") is verified
    assert response.message
    assert_decision_id(response.decision_id)
    assert response.policy_version == POLICY_VERSION
    if not response.allowed:
        assert list(response.data_sources) == []


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(home: Home, key: SigningKey, header: dict[str, Any], **claims: Any) -> str:
    """A token with the home's valid claims (overridden or, with None, removed)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": home.config.tokens.issuer,
        "sub": "alice",
        "aud": home.config.tokens.audience,
        "exp": now + 600,
        "iat": now,
        "jti": f"jti-{time.monotonic_ns()}",
        "client_id": "app1",
        "scope": "UserInfo",
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    full_header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid, **header}
    return jwt.encode(payload, key.private_key, algorithm=key.alg, headers=full_header)


def tags_body(*data_sources: str) -> bytes:
    return json.dumps({"tags": {ds: ["t1"] for ds in data_sources}}).encode()


@pytest.fixture(scope="module")
def extra(shared_home: Home) -> Home:
    """Adds to the shared home: carol, granted ds-a by app1 but with no access of her own,
    and a signing key row whose public PEM does not parse."""
    store = shared_home.store
    store.add_user("carol")
    store.set_consent("carol", "app1", ["DataRead"])
    store.add_grant("carol", "app1", "ds-a", Access.READ)
    store.add_signing_key(BROKEN_KID, "ES256", BROKEN_PEM, "retiring")
    return shared_home


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess, extra: Home) -> Iterator[Client]:
    with connect(shared_server) as c:
        yield c


@pytest.fixture(scope="module")
def key(shared_home: Home) -> SigningKey:
    return shared_home.keyring.signing_key()


@pytest.fixture(scope="module")
def alice(shared_home: Home) -> str:
    """alice through app1 with UserInfo and DataRead (both consented)."""
    return shared_home.token()


# -- ALLOWED and the response fields -------------------------------------------------------


@covers(Reason.ALLOWED)
def test_allowed_response_names_principal_rule_and_action(
    shared_home: Home, client: Client, alice: str
) -> None:
    response = client.http(alice)
    assert_decision(response, Reason.ALLOWED, verified=True)
    claims = jwt.decode(alice, options={"verify_signature": False})
    assert response.principal.sub == "alice"
    assert response.principal.client_id == "app1"
    assert list(response.principal.scopes) == ["UserInfo", "DataRead"]
    assert response.principal.jti == claims["jti"]
    assert response.rule_id == "user-profile"
    assert response.action == "user.profile"
    assert list(response.data_sources) == []


def test_allowed_data_source_request_names_the_data_source(client: Client, alice: str) -> None:
    response = client.http(alice, "/api/data/tags/ds-a")
    assert_decision(response, Reason.ALLOWED, verified=True)
    assert response.rule_id == "tags-search"
    assert response.action == "tags.search"
    assert list(response.data_sources) == ["ds-a"]


def test_listing_action_reports_every_granted_data_source(client: Client, alice: str) -> None:
    response = client.http(alice, "/api/data/datasources")
    assert_decision(response, Reason.ALLOWED, verified=True)
    assert response.rule_id == "datasources-list"
    assert list(response.data_sources) == ["ds-a", "ds-b"]


def test_public_route_is_allowed_without_a_token(client: Client) -> None:
    response = client.http("", "/api/info")
    assert_decision(response, Reason.ALLOWED, verified=False)
    assert response.rule_id == "service-info"
    assert response.action == "service.info"


def test_decision_id_differs_per_call_and_policy_version_does_not(
    client: Client, alice: str
) -> None:
    responses = [client.http(alice) for _ in range(5)] + [client.http("")]
    ids = [r.decision_id for r in responses]
    assert len(set(ids)) == len(ids)
    for decision_id in ids:
        assert_decision_id(decision_id)
    assert {r.policy_version for r in responses} == {POLICY_VERSION}


# -- token reasons -------------------------------------------------------------------------


@covers(Reason.TOKEN_MISSING)
def test_no_token_is_token_missing(client: Client) -> None:
    assert_decision(client.http(""), Reason.TOKEN_MISSING, verified=False)


@covers(Reason.TOKEN_MALFORMED)
def test_garbage_token_is_token_malformed(client: Client) -> None:
    assert_decision(client.http("not-a-jwt"), Reason.TOKEN_MALFORMED, verified=False)


@covers(Reason.TOKEN_KEY_UNKNOWN)
def test_unknown_kid_is_token_key_unknown(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(shared_home, key, {"kid": "no-such-key"})
    assert_decision(client.http(token), Reason.TOKEN_KEY_UNKNOWN, verified=False)


@covers(Reason.TOKEN_ALGORITHM_INVALID)
def test_alg_none_is_token_algorithm_invalid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    _, payload, _ = signed(shared_home, key, {}).split(".")
    unsigned_header = b64url(json.dumps({"alg": "none", "typ": "at+jwt", "kid": key.kid}).encode())
    token = f"{unsigned_header}.{payload}."
    assert_decision(client.http(token), Reason.TOKEN_ALGORITHM_INVALID, verified=False)


@covers(Reason.TOKEN_SIGNATURE_INVALID)
def test_tampered_payload_is_token_signature_invalid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    header, payload, signature = signed(shared_home, key, {}).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "UserInfo DataRead DataWrite"
    forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    assert_decision(client.http(forged), Reason.TOKEN_SIGNATURE_INVALID, verified=False)


@covers(Reason.TOKEN_TYPE_INVALID)
def test_plain_jwt_typ_is_token_type_invalid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(shared_home, key, {"typ": "JWT"})
    assert_decision(client.http(token), Reason.TOKEN_TYPE_INVALID, verified=False)


@covers(Reason.TOKEN_CLAIM_INVALID)
def test_token_without_jti_is_token_claim_invalid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(shared_home, key, {}, jti=None)
    assert_decision(client.http(token), Reason.TOKEN_CLAIM_INVALID, verified=False)


@covers(Reason.TOKEN_ISSUER_MISMATCH)
def test_other_issuer_is_token_issuer_mismatch(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(shared_home, key, {}, iss="https://evil.test")
    assert_decision(client.http(token), Reason.TOKEN_ISSUER_MISMATCH, verified=False)


@covers(Reason.TOKEN_AUDIENCE_MISMATCH)
def test_other_audience_is_token_audience_mismatch(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(shared_home, key, {}, aud="another-hub")
    assert_decision(client.http(token), Reason.TOKEN_AUDIENCE_MISMATCH, verified=False)


@covers(Reason.TOKEN_EXPIRED)
def test_expired_token_is_token_expired(shared_home: Home, client: Client) -> None:
    token = shared_home.token(now=time.time() - 7200, ttl_seconds=3600)
    assert_decision(client.http(token), Reason.TOKEN_EXPIRED, verified=False)


@covers(Reason.TOKEN_NOT_YET_VALID)
def test_token_with_future_nbf_is_token_not_yet_valid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(shared_home, key, {}, nbf=int(time.time()) + 3600)
    assert_decision(client.http(token), Reason.TOKEN_NOT_YET_VALID, verified=False)


@covers(Reason.TOKEN_REVOKED)
def test_revoked_token_is_token_revoked(shared_home: Home, client: Client) -> None:
    # A fresh token of its own: revoking it changes no other test's answer.
    token = shared_home.token()
    assert_decision(client.http(token), Reason.ALLOWED, verified=True)
    claims = jwt.decode(token, options={"verify_signature": False})
    shared_home.store.revoke_token(claims["jti"], claims["exp"])
    response = client.http(token)
    assert_decision(response, Reason.TOKEN_REVOKED, verified=True)
    assert response.principal.jti == claims["jti"]


# -- app and consent -----------------------------------------------------------------------


@covers(Reason.APP_UNKNOWN)
def test_unregistered_client_is_app_unknown(shared_home: Home, client: Client) -> None:
    response = client.http(shared_home.token(client_id="ghost-app"))
    assert_decision(response, Reason.APP_UNKNOWN, verified=True)
    assert response.principal.client_id == "ghost-app"


@covers(Reason.APP_DISABLED)
def test_disabled_app_is_app_disabled(shared_home: Home, client: Client) -> None:
    response = client.http(shared_home.token(client_id="app-off", scopes=("UserInfo",)))
    assert_decision(response, Reason.APP_DISABLED, verified=True)


@covers(Reason.CONSENT_MISSING)
def test_user_without_consent_is_consent_missing(shared_home: Home, client: Client) -> None:
    response = client.http(shared_home.token(sub="bob"))
    assert_decision(response, Reason.CONSENT_MISSING, verified=True)
    assert response.principal.sub == "bob"


@covers(Reason.CONSENT_INSUFFICIENT)
def test_scope_beyond_consent_is_consent_insufficient(shared_home: Home, client: Client) -> None:
    # app1 may ask for AccountDebit, but alice never consented to it.
    response = client.http(shared_home.token(scopes=("UserInfo", "AccountDebit")))
    assert_decision(response, Reason.CONSENT_INSUFFICIENT, verified=True)


# -- routes and scopes ---------------------------------------------------------------------


@covers(Reason.NO_ROUTE)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/nothing"), ("DELETE", "/api/user/me"), ("GET", "/API/user/me")],
)
def test_unrouted_request_is_no_route(method: str, path: str, client: Client, alice: str) -> None:
    response = client.http(alice, path, method)
    assert_decision(response, Reason.NO_ROUTE, verified=True)
    assert response.rule_id == ""
    assert response.action == ""


@covers(Reason.SCOPE_MISSING)
def test_token_without_the_rules_scope_is_scope_missing(shared_home: Home, client: Client) -> None:
    response = client.http(shared_home.token(scopes=("UserInfo",)), "/api/data/tags/ds-a")
    assert_decision(response, Reason.SCOPE_MISSING, verified=True)
    assert response.rule_id == "tags-search"
    assert response.action == "tags.search"


@covers(Reason.REQUEST_INVALID)
@pytest.mark.parametrize(
    ("method", "path"), [("FETCH", "/api/user/me"), ("get", "/api/user/me"), ("GET", "api")]
)
def test_unknown_method_or_relative_path_is_request_invalid(
    method: str, path: str, client: Client, alice: str
) -> None:
    assert_decision(client.http(alice, path, method), Reason.REQUEST_INVALID, verified=True)


def test_request_without_a_target_is_request_invalid(client: Client, alice: str) -> None:
    response = client.send(decision_pb2.CheckRequest(token=alice, request_id="test"))
    assert_decision(response, Reason.REQUEST_INVALID, verified=True)


# -- data sources --------------------------------------------------------------------------


@covers(Reason.DATA_SOURCE_NOT_GRANTED)
def test_ungranted_data_source_is_data_source_not_granted(client: Client, alice: str) -> None:
    # alice can read ds-c herself, but never granted it to app1.
    response = client.http(alice, "/api/data/tags/ds-c")
    assert_decision(response, Reason.DATA_SOURCE_NOT_GRANTED, verified=True)
    assert response.rule_id == "tags-search"
    assert response.action == "tags.search"


@covers(Reason.DATA_SOURCE_ACCESS_INSUFFICIENT)
def test_write_to_read_granted_data_source_is_access_insufficient(
    shared_home: Home, client: Client
) -> None:
    token = shared_home.token(scopes=("DataWrite",))
    denied = client.http(token, "/api/data/v2/snapshot/ds-b", "PUT")
    assert_decision(denied, Reason.DATA_SOURCE_ACCESS_INSUFFICIENT, verified=True)
    allowed = client.http(token, "/api/data/v2/snapshot/ds-a", "PUT")
    assert_decision(allowed, Reason.ALLOWED, verified=True)
    assert list(allowed.data_sources) == ["ds-a"]


@covers(Reason.USER_ACCESS_MISSING)
def test_grant_without_the_users_own_access_is_user_access_missing(
    shared_home: Home, client: Client
) -> None:
    response = client.http(
        shared_home.token(sub="carol", scopes=("DataRead",)), "/api/data/tags/ds-a"
    )
    assert_decision(response, Reason.USER_ACCESS_MISSING, verified=True)


# -- explicit actions ----------------------------------------------------------------------


def test_action_request_is_allowed_with_its_data_sources_in_order_once(
    client: Client, alice: str
) -> None:
    response = client.action(alice, "tags.search", "ds-b", "ds-a", "ds-b")
    assert_decision(response, Reason.ALLOWED, verified=True)
    assert response.rule_id == "tags-search"
    assert response.action == "tags.search"
    assert list(response.data_sources) == ["ds-b", "ds-a"]


def test_action_request_with_an_ungranted_data_source_is_denied(client: Client, alice: str) -> None:
    response = client.action(alice, "tags.search", "ds-a", "ds-c")
    assert_decision(response, Reason.DATA_SOURCE_NOT_GRANTED, verified=True)


def test_write_action_on_a_read_grant_is_access_insufficient(
    shared_home: Home, client: Client
) -> None:
    token = shared_home.token(scopes=("DataWrite",))
    response = client.action(token, "values.write_snapshot", "ds-b")
    assert_decision(response, Reason.DATA_SOURCE_ACCESS_INSUFFICIENT, verified=True)


@pytest.mark.parametrize("data_sources", [(), ("ds-a", "")])
def test_action_request_needing_data_sources_without_them_is_request_invalid(
    data_sources: tuple[str, ...], client: Client, alice: str
) -> None:
    response = client.action(alice, "tags.search", *data_sources)
    assert_decision(response, Reason.REQUEST_INVALID, verified=True)


def test_listing_and_plain_actions_are_allowed(client: Client, alice: str) -> None:
    listing = client.action(alice, "datasources.list")
    assert_decision(listing, Reason.ALLOWED, verified=True)
    assert list(listing.data_sources) == ["ds-a", "ds-b"]
    profile = client.action(alice, "user.profile")
    assert_decision(profile, Reason.ALLOWED, verified=True)
    assert profile.rule_id == "user-profile"


def test_unknown_action_is_no_route(client: Client, alice: str) -> None:
    assert_decision(client.action(alice, "tags.delete", "ds-a"), Reason.NO_ROUTE, verified=True)


def test_public_action_is_allowed_without_a_token(client: Client) -> None:
    response = client.action("", "service.info")
    assert_decision(response, Reason.ALLOWED, verified=False)
    assert response.rule_id == "service-info"


# -- paths ---------------------------------------------------------------------------------


@covers(Reason.PATH_AMBIGUOUS)
@pytest.mark.parametrize(
    "path",
    [
        "/api/data/tags/ds-c%2F..%2Fds-a",
        "/api/data/tags/ds-a%2Fx",
        "/api/data/tags/ds-a%2fx",
        "/api/data/tags/%2e%2e/tags/ds-a",
        "/api/data/tags/%2E%2E/ds-a",
        "/api/data/tags/ds-c/../ds-a",
        "/api/data/tags/./ds-a",
        "/api/data/datasources/../tags/ds-a",
        "/api/data//tags/ds-a",
        "/api/data/tags//ds-a",
        "/api/data/tags/ds-a/",
        "/api/data/tags/%zz",
        "/api/data/tags/ds-a%",
        "/api/data/tags/ds-a%5C..%5Cds-c",
        "/api/data/tags/ds-a%00",
        "/api/data/tags/ds-a%FF",
    ],
)
def test_ambiguous_path_is_refused_and_never_routed(path: str, client: Client, alice: str) -> None:
    response = client.http(alice, path)
    assert_decision(response, Reason.PATH_AMBIGUOUS, verified=True)
    assert response.rule_id == ""
    assert response.action == ""


def test_percent_encoded_name_decodes_to_the_same_data_source(client: Client, alice: str) -> None:
    allowed = client.http(alice, "/api/data/tags/ds%2Da")
    assert_decision(allowed, Reason.ALLOWED, verified=True)
    assert list(allowed.data_sources) == ["ds-a"]
    denied = client.http(alice, "/api/data/tags/ds%2Dc")
    assert_decision(denied, Reason.DATA_SOURCE_NOT_GRANTED, verified=True)


def test_double_encoded_slash_is_one_literal_name_not_another_data_source(
    client: Client, alice: str
) -> None:
    response = client.http(alice, "/api/data/tags/ds-c%252F..%252Fds-a")
    assert_decision(response, Reason.DATA_SOURCE_NOT_GRANTED, verified=True)
    assert "ds-c%2F..%2Fds-a" in response.message


# -- bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/data/v2/snapshot",
        "/api/data/v2/raw",
        "/api/data/v2/plot",
        "/api/data/v2/processed",
        "/api/data/v2/values-at-times",
    ],
)
def test_body_keys_name_the_data_sources(path: str, client: Client, alice: str) -> None:
    response = client.http(alice, path, "POST", tags_body("ds-a", "ds-b"))
    assert_decision(response, Reason.ALLOWED, verified=True)
    assert list(response.data_sources) == ["ds-a", "ds-b"]


def test_body_naming_an_ungranted_data_source_is_denied(client: Client, alice: str) -> None:
    response = client.http(
        alice, "/api/data/v2/snapshot", "POST", tags_body("ds-a", "ds-c", "ds-b")
    )
    assert_decision(response, Reason.DATA_SOURCE_NOT_GRANTED, verified=True)
    assert response.rule_id == "values-snapshot"
    assert "ds-c" in response.message


@covers(Reason.BODY_INVALID)
@pytest.mark.parametrize(
    "body",
    [
        b'{"tags": {"ds-a": ["t1"], "ds-a": ["t2"]}}',
        b'{"tags": {"ds-c": ["t1"]}, "tags": {"ds-a": ["t1"]}}',
        b'{"tags": {"ds-a": ["t1"]}, "tags": {"ds-c": ["t1"]}}',
        b"not json",
        b'{"tags": {"ds-a": [',
        b"",
        b"\xff\xfe\x00",
        b'{"tags": ["ds-a"]}',
        b'{"other": {"ds-a": []}}',
        b"[" * 50_000,
    ],
)
def test_body_that_cannot_be_read_one_way_is_body_invalid(
    body: bytes, client: Client, alice: str
) -> None:
    response = client.http(alice, "/api/data/v2/snapshot", "POST", body)
    assert_decision(response, Reason.BODY_INVALID, verified=True)
    assert response.rule_id == "values-snapshot"


def test_body_key_that_is_not_valid_unicode_is_body_invalid(client: Client, alice: str) -> None:
    body = b'{"tags": {"ds-a": [], "\\ud800": []}}'
    response = client.http(alice, "/api/data/v2/snapshot", "POST", body)
    assert_decision(response, Reason.BODY_INVALID, verified=True)


@covers(Reason.BODY_TOO_LARGE)
def test_body_over_the_configured_limit_is_body_too_large(tmp_path: Path) -> None:
    home = Home(tmp_path, extra_config="[engine]\nmax_body_bytes = 100\n")
    home.seed()
    prefix = tags_body("ds-a", "ds-b")[:-1] + b', "pad": "'
    pad = 100 - len(prefix) - len(b'"}')
    at_limit = prefix + b"x" * pad + b'"}'
    over = prefix + b"x" * (pad + 1) + b'"}'
    assert (len(at_limit), len(over)) == (100, 101)
    token = home.token()
    with run_server(home) as server, connect(server) as client:
        ok = client.http(token, "/api/data/v2/snapshot", "POST", at_limit)
        assert_decision(ok, Reason.ALLOWED, verified=True)
        assert list(ok.data_sources) == ["ds-a", "ds-b"]
        too_large = client.http(token, "/api/data/v2/snapshot", "POST", over)
        assert_decision(too_large, Reason.BODY_TOO_LARGE, verified=True)
        # Size is checked before parsing: even garbage over the limit is too large.
        garbage = client.http(token, "/api/data/v2/raw", "POST", b"\x00" * 101)
        assert_decision(garbage, Reason.BODY_TOO_LARGE, verified=True)


# -- failures of the service itself --------------------------------------------------------


@contextmanager
def serving_seeded(tmp_path: Path, extra_config: str = "") -> Iterator[tuple[Home, Client]]:
    home = Home(tmp_path, extra_config=extra_config)
    home.seed()
    with run_server(home) as server, connect(server) as client:
        yield home, client


@covers(Reason.STORE_UNAVAILABLE)
def test_store_without_its_generation_table_is_store_unavailable(tmp_path: Path) -> None:
    with serving_seeded(tmp_path) as (home, client):
        token = home.token()
        assert_decision(client.http(token), Reason.ALLOWED, verified=True)  # now cached
        home.store.close()
        with sqlite3.connect(home.config.store.path) as db:
            db.execute("DROP TABLE generation")
        for _ in range(2):
            response = client.http(token)
            assert_decision(response, Reason.STORE_UNAVAILABLE, verified=False)
        assert "unavailable" in response.message


def test_store_files_overwritten_with_garbage_are_store_unavailable(tmp_path: Path) -> None:
    with serving_seeded(tmp_path) as (home, client):
        token = home.token()
        assert_decision(client.http(token), Reason.ALLOWED, verified=True)  # now cached
        home.store.close()
        store_files = sorted(Path(home.config.store.path).parent.glob("policyd.db*"))
        assert Path(home.config.store.path) in store_files
        for path in store_files:
            size = path.stat().st_size
            with open(path, "r+b") as fh:
                fh.write(os.urandom(size))
        for route in ("/api/user/me", "/api/data/tags/ds-a"):
            assert_decision(client.http(token, route), Reason.STORE_UNAVAILABLE, verified=False)
        # Public routes need no store.
        assert_decision(client.http("", "/api/info"), Reason.ALLOWED, verified=False)


@covers(Reason.AUDIT_UNAVAILABLE)
def test_decisions_are_audit_unavailable_once_the_log_cannot_be_indexed_for_too_long(
    tmp_path: Path,
) -> None:
    audit = (
        f'[audit]\npath = "{tmp_path / "audit.db"}"\nkey_file = "{tmp_path / "audit.key"}"\n'
        "timeout_seconds = 0.5\n"
    )
    with serving_seeded(tmp_path, audit) as (home, client):
        token = home.token()
        first = client.http(token)
        assert_decision(first, Reason.ALLOWED, verified=True)
        assert first.decision_id in indexed_records(home.config.audit.path, {first.decision_id})
        with sqlite3.connect(home.config.audit.path) as db:  # the indexer is running: break it
            db.execute("DROP TABLE audit")
        # Records still reach the journal, but none reaches the log: after
        # audit.timeout_seconds of that, a decision that would be an allow is denied.
        deadline = time.monotonic() + 10
        response = client.http(token)
        while response.reason == decision_pb2.ALLOWED and time.monotonic() < deadline:
            time.sleep(0.05)
            response = client.http(token)
        assert_decision(response, Reason.AUDIT_UNAVAILABLE, verified=True)
        assert "audit" in response.message


@covers(Reason.INTERNAL_ERROR)
def test_unparseable_signing_key_in_the_store_is_internal_error(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    # The token is fine; the key row it names is not: the fault is the service's own.
    token = signed(shared_home, key, {"kid": BROKEN_KID})
    response = client.http(token)
    assert_decision(response, Reason.INTERNAL_ERROR, verified=False)
    assert response.message == "internal error"
    # The server keeps answering.
    assert_decision(client.http(shared_home.token()), Reason.ALLOWED, verified=True)


# -- conditions (policies/hub.yaml and a policy of the test's own) -----------------------


@covers(Reason.CONDITION_DENIED)
def test_write_to_a_safety_system_is_condition_denied(shared_home: Home, client: Client) -> None:
    # dave may write to ds-safety, and granted it to app1 for write: only the policy's
    # condition (no writes to data sources labelled class=safety) stands in the way.
    store = shared_home.store
    store.add_user("dave")
    store.add_data_source("ds-safety", "interlocks", {"class": "safety"})
    store.set_user_access("dave", "ds-safety", Access.WRITE)
    store.set_user_access("dave", "ds-a", Access.WRITE)
    store.set_consent("dave", "app1", ["DataRead", "DataWrite"])
    store.add_grant("dave", "app1", "ds-safety", Access.WRITE)
    store.add_grant("dave", "app1", "ds-a", Access.WRITE)
    token = shared_home.token(sub="dave", scopes=("DataRead", "DataWrite"))
    denied = client.http(token, "/api/data/v2/snapshot/ds-safety", "PUT")
    assert_decision(denied, Reason.CONDITION_DENIED, verified=True)
    assert denied.rule_id == "values-write-snapshot"
    assert "safety" in denied.message
    assert_decision(
        client.http(token, "/api/data/v2/snapshot/ds-a", "PUT"), Reason.ALLOWED, verified=True
    )
    # Reading it is fine: the condition is on the write routes only.
    read = client.http(token, "/api/data/tags/ds-safety")
    assert_decision(read, Reason.ALLOWED, verified=True)


@covers(Reason.CONDITION_ERROR)
def test_condition_that_cannot_be_evaluated_is_condition_error(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    hub = (ROOT / "policies" / "hub.yaml").read_text()
    # Written without the `"site" in labels` guard: fails on a data source without the label.
    (folder / "hub.yaml").write_text(
        hub
        + "  - id: north-site-only\n    effect: deny\n    routes: [tags-search]\n"
        + '    when: data_source.labels["site"] != "north"\n'
    )
    (tmp_path / "home").mkdir()
    home = Home(tmp_path / "home", extra_config=f'[policy]\ndir = "{folder}"\n')
    home.seed()
    with run_server(home) as server, connect(server) as client:
        response = client.http(home.token(), "/api/data/tags/ds-a")
    assert reason_of(response) is Reason.CONDITION_ERROR
    assert not response.allowed and response.HasField("principal")
    assert response.rule_id == "tags-search"
    assert "north-site-only could not be evaluated for data source 'ds-a'" in response.message
    assert response.policy_version == load_policy(folder).version != POLICY_VERSION


# -- connector.attach (docs/connectors.md) -------------------------------------------------


@pytest.fixture(scope="module")
def plants(shared_home: Home) -> Home:
    """Adds to the shared home: connector plant-1 serving hist-1, plant-off (disabled)
    serving hist-off, and hist-hub served by the hub itself."""
    store = shared_home.store
    for connector in ("plant-1", "plant-off"):
        store.add_connector(connector)
    store.add_data_source("hist-1", connector="plant-1")
    store.add_data_source("hist-off", connector="plant-off")
    store.add_data_source("hist-hub")
    store.set_connector_enabled("plant-off", False)
    return shared_home


def connector_token(home: Home, connector_id: str) -> str:
    token, _ = issue_token(
        home.keyring,
        token_settings(home.config).for_link(),
        sub=connector_id,
        client_id=connector_id,
        scopes=["connector"],
    )
    return token


def attach(client: Client, token: str, *data_sources: str) -> decision_pb2.CheckResponse:
    request = decision_pb2.CheckRequest(token=token, request_id="test", door="link")
    request.action.action = CONNECTOR_ATTACH
    request.action.data_sources.extend(data_sources)
    return client.send(request)


@covers(Reason.ALLOWED)
def test_a_connector_may_attach_the_data_sources_it_serves(plants: Home, client: Client) -> None:
    response = attach(client, connector_token(plants, "plant-1"), "hist-1")
    assert_decision(response, Reason.ALLOWED, verified=True)
    assert (response.principal.sub, response.principal.client_id) == ("plant-1", "plant-1")
    assert (response.rule_id, response.action) == ("builtin:connector.attach", "connector.attach")
    assert list(response.data_sources) == ["hist-1"]


@covers(Reason.TOKEN_AUDIENCE_MISMATCH)
def test_audiences_keep_apps_and_connectors_apart(plants: Home, alice: str, client: Client) -> None:
    # An app's token may not attach, and a connector's token is no app's.
    assert_decision(attach(client, alice, "hist-1"), Reason.TOKEN_AUDIENCE_MISMATCH, verified=False)
    token = connector_token(plants, "plant-1")
    assert_decision(client.http(token), Reason.TOKEN_AUDIENCE_MISMATCH, verified=False)
    assert_decision(
        client.action(token, "tags.search", "hist-1"),
        Reason.TOKEN_AUDIENCE_MISMATCH,
        verified=False,
    )


@covers(Reason.CONNECTOR_UNKNOWN)
def test_a_token_of_no_connector_is_connector_unknown(plants: Home, client: Client) -> None:
    for client_id in ("ghost-plant", "app1"):  # an app's id is no connector's
        response = attach(client, connector_token(plants, client_id), "hist-1")
        assert_decision(response, Reason.CONNECTOR_UNKNOWN, verified=True)
        assert response.rule_id == "builtin:connector.attach"


@covers(Reason.CONNECTOR_DISABLED)
def test_a_disabled_connector_is_connector_disabled(plants: Home, client: Client) -> None:
    response = attach(client, connector_token(plants, "plant-off"), "hist-off")
    assert_decision(response, Reason.CONNECTOR_DISABLED, verified=True)


@covers(Reason.DATA_SOURCE_NOT_OWNED)
@pytest.mark.parametrize(
    "data_sources",
    [("hist-off",), ("hist-hub",), ("hist-nowhere",), ("hist-1", "hist-hub")],
    ids=["another connector's", "the hub's", "unknown", "one of two"],
)
def test_a_data_source_the_connector_does_not_serve_is_not_owned(
    plants: Home, client: Client, data_sources: tuple[str, ...]
) -> None:
    response = attach(client, connector_token(plants, "plant-1"), *data_sources)
    assert_decision(response, Reason.DATA_SOURCE_NOT_OWNED, verified=True)


@covers(Reason.REQUEST_INVALID)
def test_an_attach_naming_no_data_source_is_request_invalid(plants: Home, client: Client) -> None:
    token = connector_token(plants, "plant-1")
    assert_decision(attach(client, token), Reason.REQUEST_INVALID, verified=True)
    assert_decision(attach(client, token, ""), Reason.REQUEST_INVALID, verified=True)


# -- the meta-test -------------------------------------------------------------------------


def test_every_reason_has_a_grpc_test() -> None:
    missing = sorted(r.name for r in set(Reason) - COVERED)
    assert not missing, f"reasons without a test over gRPC: {missing}"
    proto_names = {decision_pb2.Reason.Name(v) for v in decision_pb2.Reason.values()}
    assert {r.name for r in COVERED} == proto_names - {"REASON_UNSPECIFIED"}
