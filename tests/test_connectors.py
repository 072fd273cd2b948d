"""Connectors as principals (docs/connectors.md): the store's connectors, the built-in
connector.attach decision in the engine, and its exactness against a real `policyd serve`
while the CLI disables, re-assigns and rotates. Every test runs on both store backends."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import jwt
import pytest

from policyd.core.errors import Conflict, InvalidInput, NotFound
from policyd.core.model import CONNECTOR_ATTACH, ActionTarget, CheckInput, HttpTarget
from policyd.core.reasons import Reason
from policyd.decision.engine import Engine
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import build_engine, token_settings
from policyd.gen.v1 import decision_pb2
from policyd.store.base import hash_secret
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.helpers import Home, decision_stub, dump_store, indexed_records, run_server


@pytest.fixture
def plant(seeded: Home) -> Home:
    """The seeded home with connector plant-1 serving hist-1 and hist-2."""
    seeded.store.add_connector("plant-1", "Plant One")
    for name in ("hist-1", "hist-2"):
        seeded.store.add_data_source(name, connector="plant-1")
    return seeded


def connector_token(home: Home, connector_id: str = "plant-1", **kw: object) -> str:
    token, _ = issue_token(
        home.keyring,
        token_settings(home.config).for_link(),
        sub=connector_id,
        client_id=connector_id,
        scopes=["connector"],
        **kw,  # type: ignore[arg-type]
    )
    return token


def attach(*data_sources: str, token: str) -> CheckInput:
    return CheckInput(token, ActionTarget(CONNECTOR_ATTACH, data_sources), door="link")


# -- the store -------------------------------------------------------------------------------


def test_a_connectors_secret_is_returned_once_and_stored_only_hashed(seeded: Home) -> None:
    store = seeded.store
    secret = store.add_connector("plant-1", "Plant One")
    assert len(secret) >= 32
    assert store.verify_connector_secret("plant-1", secret)
    assert not store.verify_connector_secret("plant-1", secret + "x")
    assert not store.verify_connector_secret("nobody", secret)
    assert not store.verify_client_secret("plant-1", secret)  # not an app's secret
    stored = dump_store(store)
    assert secret not in stored and hash_secret(secret) in stored
    rotated = store.rotate_connector_secret("plant-1")
    assert store.verify_connector_secret("plant-1", rotated)
    assert not store.verify_connector_secret("plant-1", secret)
    with pytest.raises(NotFound, match="no connector 'nobody'"):
        store.rotate_connector_secret("nobody")


def test_connectors_are_listed_shown_enabled_and_disabled(seeded: Home) -> None:
    store = seeded.store
    store.add_connector("plant-2")
    store.add_connector("plant-1", "Plant One")
    assert [(c.connector_id, c.name, c.enabled) for c in store.list_connectors()] == [
        ("plant-1", "Plant One", True),
        ("plant-2", "plant-2", True),
    ]
    store.set_connector_enabled("plant-2", False)
    assert store.get_connector("plant-2").enabled is False
    assert store.get_connector("plant-1").as_dict()["enabled"] is True
    with pytest.raises(NotFound, match="no connector 'nobody'"):
        store.get_connector("nobody")
    with pytest.raises(NotFound, match="no connector 'nobody'"):
        store.set_connector_enabled("nobody", True)
    with pytest.raises(Conflict, match="connector 'plant-1' already exists"):
        store.add_connector("plant-1")
    with pytest.raises(InvalidInput, match="connector id must be"):
        store.add_connector("a b")


def test_apps_and_connectors_share_one_namespace_of_ids(seeded: Home) -> None:
    store = seeded.store
    with pytest.raises(Conflict, match="'app1' is already the id of an app"):
        store.add_connector("app1")
    store.add_connector("plant-1")
    with pytest.raises(Conflict, match="'plant-1' is already the id of a connector"):
        store.add_app("plant-1", "X", redirect_uris=[], scopes=["UserInfo"], confidential=False)
    assert [a.client_id for a in store.list_apps()] == ["app-off", "app1"]


def test_a_data_source_is_served_by_one_connector_or_the_hub(plant: Home) -> None:
    store = plant.store
    store.add_connector("plant-2")
    served = {d["name"]: d["connector"] for d in store.list_data_sources()}
    assert served == {
        "ds-a": None,
        "ds-b": None,
        "ds-c": None,
        "hist-1": "plant-1",
        "hist-2": "plant-1",
    }
    store.set_data_source_connector("hist-2", "plant-2")
    store.set_data_source_connector("ds-a", "plant-2")
    store.set_data_source_connector("hist-1", None)
    assert [d["name"] for d in store.list_data_sources("plant-2")] == ["ds-a", "hist-2"]
    assert store.list_data_sources("plant-1") == []
    with pytest.raises(NotFound, match="no connector 'nobody'"):
        store.set_data_source_connector("ds-a", "nobody")
    with pytest.raises(NotFound, match="no data source 'ds-nope'"):
        store.set_data_source_connector("ds-nope", "plant-2")
    with pytest.raises(NotFound, match="no connector 'nobody'"):
        store.add_data_source("hist-3", connector="nobody")
    assert "hist-3" not in {d["name"] for d in store.list_data_sources()}


# -- the engine ------------------------------------------------------------------------------


@pytest.fixture
def engine(plant: Home) -> Iterator[Engine]:
    # As a server holds it: on PostgreSQL a replica, whose caches answer while its lease holds.
    engine = build_engine(plant.config, plant.store, serving=True)
    yield engine
    engine.facts.close()


def test_attach_is_allowed_for_the_connectors_own_data_sources(plant: Home, engine: Engine) -> None:
    token = connector_token(plant)
    decision = engine.decide(attach("hist-1", "hist-2", "hist-1", token=token))
    assert decision.allowed and decision.reason is Reason.ALLOWED
    assert decision.data_sources == ("hist-1", "hist-2")
    assert (decision.rule_id, decision.action) == ("builtin:connector.attach", CONNECTOR_ATTACH)
    assert decision.principal is not None
    assert (decision.principal.sub, decision.principal.client_id) == ("plant-1", "plant-1")
    assert decision.principal.scopes == ("connector",)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda h: attach("hist-1", token=connector_token(h, "ghost")), Reason.CONNECTOR_UNKNOWN),
        (lambda h: attach("hist-1", token=connector_token(h, "app1")), Reason.CONNECTOR_UNKNOWN),
        (lambda h: attach("ds-a", token=connector_token(h)), Reason.DATA_SOURCE_NOT_OWNED),
        (
            lambda h: attach("hist-1", "nope", token=connector_token(h)),
            Reason.DATA_SOURCE_NOT_OWNED,
        ),
        (lambda h: attach(token=connector_token(h)), Reason.REQUEST_INVALID),
        (lambda h: attach("hist-1", token=h.token()), Reason.TOKEN_AUDIENCE_MISMATCH),
        (lambda h: attach("hist-1", token=""), Reason.TOKEN_MISSING),
        (
            lambda h: attach("hist-1", token=connector_token(h, now=0, ttl_seconds=60)),
            Reason.TOKEN_EXPIRED,
        ),
    ],
    ids=[
        "unknown connector",
        "an app's id",
        "the hub's data source",
        "an unknown data source",
        "no data sources",
        "an app's token",
        "no token",
        "expired",
    ],
)
def test_attach_denies_with_the_first_failing_checks_reason(
    plant: Home, engine: Engine, make: object, reason: Reason
) -> None:
    request = make(plant)  # type: ignore[operator]
    decision = engine.decide(request)
    assert (decision.allowed, decision.reason) == (False, reason), decision.message
    assert (decision.rule_id, decision.action) == ("builtin:connector.attach", CONNECTOR_ATTACH)
    assert decision.data_sources == ()


def test_a_connector_token_is_refused_for_app_requests_and_an_app_token_for_attach(
    plant: Home, engine: Engine
) -> None:
    # Each token verified first for its own audience (and cached), then tried for the other.
    app, link = plant.token(), connector_token(plant)
    me = HttpTarget("GET", "/api/user/me")
    assert engine.decide(CheckInput(app, me)).allowed
    assert engine.decide(attach("hist-1", token=link)).allowed
    assert engine.decide(attach("hist-1", token=app)).reason is Reason.TOKEN_AUDIENCE_MISMATCH
    for target in (me, ActionTarget("tags.search", ("hist-1",))):
        decision = engine.decide(CheckInput(link, target))
        assert decision.reason is Reason.TOKEN_AUDIENCE_MISMATCH


def test_a_revoked_connector_token_is_token_revoked(plant: Home, engine: Engine) -> None:
    token = connector_token(plant)
    assert engine.decide(attach("hist-1", token=token)).allowed
    claims = jwt.decode(token, options={"verify_signature": False})
    plant.store.revoke_token(claims["jti"], claims["exp"])
    assert engine.decide(attach("hist-1", token=token)).reason is Reason.TOKEN_REVOKED


def test_a_remembered_attach_is_forgotten_by_the_write_that_changes_it(
    plant: Home, engine: Engine
) -> None:
    request = attach("hist-1", token=connector_token(plant))
    key = request.memo_key()

    def decide() -> tuple[Reason, bool]:
        decision, entry = engine.decide_keyed(key, engine.policy, lambda: request)
        return decision.reason, entry is not None

    assert decide() == (Reason.ALLOWED, True)
    assert engine.recall(key, engine.policy) is not None  # the fast path answers it now
    plant.store.set_connector_enabled("plant-1", False)
    assert engine.recall(key, engine.policy) is None
    assert decide() == (Reason.CONNECTOR_DISABLED, False)
    plant.store.set_connector_enabled("plant-1", True)
    assert decide() == (Reason.ALLOWED, True)
    plant.store.set_data_source_connector("hist-1", None)
    assert decide() == (Reason.DATA_SOURCE_NOT_OWNED, False)


def test_explain_traces_an_attach(plant: Home, engine: Engine) -> None:
    explained = engine.explain(attach("hist-1", token=connector_token(plant)))
    assert explained.decision.allowed
    names = [c.name for c in explained.trace.checks]
    assert names == ["route", "token id", "connector", "data source hist-1"]
    assert all(c.passed for c in explained.trace.checks)


# -- a real server, the real command ------------------------------------------------------------


def test_disable_set_connector_and_rotate_take_effect_on_the_next_check(plant: Home) -> None:
    token = connector_token(plant)

    def check(stub: object, *data_sources: str) -> decision_pb2.CheckResponse:
        request = decision_pb2.CheckRequest(token=token, request_id="t", door="link")
        request.action.action = CONNECTOR_ATTACH
        request.action.data_sources.extend(data_sources)
        response: decision_pb2.CheckResponse = stub.Check(request, timeout=10)  # type: ignore[attr-defined]
        return response

    def cli(*args: str) -> None:
        done = plant.cli(*args)
        assert done.returncode == 0, done.stderr

    with run_server(plant) as server, grpc.insecure_channel(server.address) as channel:
        stub = decision_stub(channel)
        for _ in range(2):  # the second is answered from memory
            first = check(stub, "hist-1")
            assert first.allowed, first.message
        cli("connectors", "disable", "plant-1")
        assert Reason(check(stub, "hist-1").reason) is Reason.CONNECTOR_DISABLED
        cli("connectors", "enable", "plant-1")
        for _ in range(2):
            assert check(stub, "hist-1", "hist-2").allowed
        cli("datasources", "set-connector", "hist-1", "--none")
        assert Reason(check(stub, "hist-1", "hist-2").reason) is Reason.DATA_SOURCE_NOT_OWNED
        cli("connectors", "rotate-secret", "plant-1")
        last = check(stub, "hist-2")  # rotating the secret leaves issued tokens valid
        assert last.allowed, last.message
    records = indexed_records(plant.config, {first.decision_id, last.decision_id})
    assert records[first.decision_id].door == "link"
    assert records[first.decision_id].rule_id == "builtin:connector.attach"
    assert records[first.decision_id].client_id == "plant-1"
