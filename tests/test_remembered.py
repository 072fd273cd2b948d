"""Remembered decisions (Engine.decide_keyed): a repeat of an allowed request is answered
from memory exactly while `decide` would answer the same."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import jwt
import pytest

from policyd.audit import journal as journal_module
from policyd.audit.journal import AuditLog, Indexer
from policyd.audit.reader import AuditReader, Query
from policyd.core.model import (
    MAX_PLAIN_KEY,
    Access,
    ActionTarget,
    CheckInput,
    Decision,
    HttpTarget,
    http_memo_key,
)
from policyd.core.policy import load_policy
from policyd.core.reasons import Reason
from policyd.decision import decider as decider_module
from policyd.decision.decider import Decider, Door
from policyd.decision.engine import Engine
from policyd.decision.wiring import build_decider, open_store
from policyd.gen.v1 import decision_pb2
from policyd.policy.policytest import Fixture, Runner, scratch_dir
from policyd.store.base import Store
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.helpers import (
    ROOT,
    Home,
    check_request,
    decision_stub,
    indexed_records,
    run_server,
)
from tests.test_policy_conditions import ALICE, GRANTS, LABELS, policy_with

KEY = b"GET /api/data/tags/ds-a"


@pytest.fixture
def engine(seeded: Home) -> Engine:
    """A server's engine: on PostgreSQL, a replica's (wiring.start_replica)."""
    return build_decider(seeded.config, seeded.store, serving=True).engine


class Inputs:
    """make_input for decide_keyed, counting how often the request had to be built."""

    def __init__(self, request: CheckInput) -> None:
        self.request = request
        self.built = 0

    def __call__(self) -> CheckInput:
        self.built += 1
        return self.request


def read_ds_a(home: Home, token: str | None = None) -> Inputs:
    return Inputs(CheckInput(token or home.token(), HttpTarget("GET", "/api/data/tags/ds-a")))


def test_a_repeated_request_is_answered_from_memory_with_a_new_decision_id(
    seeded: Home, engine: Engine
) -> None:
    inputs = read_ds_a(seeded)
    first, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    again, same = engine.decide_keyed(KEY, engine.policy, inputs)
    assert first.allowed and entry is not None
    assert same is entry and inputs.built == 1
    assert again.decision_id != first.decision_id
    assert again == first._replace(decision_id=again.decision_id)
    fresh = engine.decide(inputs.request)  # what deciding again says
    assert fresh._replace(decision_id="") == again._replace(decision_id="")


def _lower_grant(store: Store) -> None:
    store.revoke_grant("alice", "app1", "ds-a")
    store.add_grant("alice", "app1", "ds-a", Access.READ)


# Writes another process could make (a separate Store connection), and the reason after.
WRITES: dict[str, tuple[Callable[[Store, str], object], Reason]] = {
    "grant revoked": (
        lambda s, _t: s.revoke_grant("alice", "app1", "ds-a"),
        Reason.DATA_SOURCE_NOT_GRANTED,
    ),
    "consent revoked": (lambda s, _t: s.revoke_consent("alice", "app1"), Reason.CONSENT_MISSING),
    "token revoked": (
        lambda s, t: s.revoke_token(
            jwt.decode(t, options={"verify_signature": False})["jti"], time.time() + 3600
        ),
        Reason.TOKEN_REVOKED,
    ),
    "app disabled": (lambda s, _t: s.set_app_enabled("app1", False), Reason.APP_DISABLED),
    "user access removed": (
        lambda s, _t: s.remove_user_access("alice", "ds-a"),
        Reason.USER_ACCESS_MISSING,
    ),
    # Not a revocation, still a change: forgotten all the same (and decided again).
    "grant lowered to read": (lambda s, _t: _lower_grant(s), Reason.ALLOWED),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_any_store_write_forgets_it_before_the_write_returns(
    seeded: Home, engine: Engine, write: str
) -> None:
    token = seeded.token()
    inputs = read_ds_a(seeded, token)
    _, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    assert entry is not None and engine.recall(KEY, engine.policy) is entry
    change, reason = WRITES[write]
    with open_store(seeded.config, migrate=False) as other:  # as another process would
        change(other, token)
    assert engine.recall(KEY, engine.policy) is None  # the fast path sees the write too
    decision, _ = engine.decide_keyed(KEY, engine.policy, inputs)
    assert inputs.built == 2  # decided again, not remembered
    assert decision.reason is reason


def test_recall_answers_only_what_decide_keyed_would_answer_from_memory(
    seeded: Home, engine: Engine
) -> None:
    inputs = read_ds_a(seeded)
    assert engine.recall(KEY, engine.policy) is None  # nothing remembered yet
    _, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    assert entry is not None and engine.recall(KEY, engine.policy) is entry
    assert engine.recall(b"another request", engine.policy) is None
    # Made under another policy (a reload meanwhile): not this entry.
    assert engine.recall(KEY, load_policy(ROOT / "policies")) is None
    entry.expires = time.time() - 1
    assert engine.recall(KEY, engine.policy) is None


def test_a_policy_reload_forgets_it(seeded: Home, engine: Engine) -> None:
    inputs = read_ds_a(seeded)
    engine.decide_keyed(KEY, engine.policy, inputs)
    engine.policy = load_policy(ROOT / "policies")  # the same files, a new policy object
    decision, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    assert decision.allowed and entry is not None and inputs.built == 2


def test_it_ends_when_its_token_expires(seeded: Home, engine: Engine) -> None:
    leeway = seeded.config.tokens.leeway_seconds
    # A token that expires (leeway included) within two seconds (exp is whole seconds).
    token = seeded.token(ttl_seconds=60, now=time.time() - 60 - leeway + 2)
    inputs = read_ds_a(seeded, token)
    first, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    assert first.allowed and entry is not None
    assert time.time() < entry.expires <= time.time() + 2
    time.sleep(max(0.0, entry.expires - time.time()) + 0.05)
    decision, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    assert decision.reason is Reason.TOKEN_EXPIRED and entry is None


def test_denials_are_not_remembered(seeded: Home, engine: Engine) -> None:
    inputs = Inputs(CheckInput(seeded.token(), HttpTarget("GET", "/api/data/tags/ds-c")))
    for _ in range(2):
        decision, entry = engine.decide_keyed(b"ds-c", engine.policy, inputs)
        assert decision.reason is Reason.DATA_SOURCE_NOT_GRANTED and entry is None
    assert inputs.built == 2


def test_a_decision_whose_conditions_read_the_clock_is_not_remembered(tmp_path: Path) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - id: business-hours
          effect: allow
          routes: [write]
          when: now.getHours("UTC") >= 0
        """,
    )
    with scratch_dir() as scratch:
        engine, token = Runner(policy, scratch).engine(Fixture(ALICE, GRANTS, None, LABELS))
        try:
            write = Inputs(CheckInput(token, HttpTarget("PUT", "/d/plain")))
            read = Inputs(CheckInput(token, HttpTarget("GET", "/d/plain")))
            decision, entry = engine.decide_keyed(b"write", engine.policy, write)
            assert decision.allowed and entry is None
            decision, entry = engine.decide_keyed(b"read", engine.policy, read)  # remembered
            assert decision.allowed and entry is not None
        finally:
            engine.facts.store.close()


def test_over_grpc_each_answer_has_its_own_id_and_audit_record(seeded: Home) -> None:
    token = seeded.token()
    with run_server(seeded) as server, grpc.insecure_channel(server.address) as channel:
        stub = decision_stub(channel)
        answers = []
        for n in range(3):
            request = check_request(token, path="/api/data/tags/ds-a")
            request.request_id = f"call-{n}"
            answers.append(stub.Check(request, timeout=5))
        ids = [a.decision_id for a in answers]
        assert len(set(ids)) == 3
        for answer in answers:
            assert answer.allowed and answer.rule_id and answer.principal.sub == "alice"
            assert answer == replace_id(answers[0], answer.decision_id)
        records = indexed_records(seeded.config, set(ids))
    assert [records[i].request_id for i in ids] == ["call-0", "call-1", "call-2"]
    assert len({replace(records[i], id="", ts=0, request_id="", latency_us=0) for i in ids}) == 1


def replace_id(
    response: decision_pb2.CheckResponse, decision_id: str
) -> decision_pb2.CheckResponse:
    copy = decision_pb2.CheckResponse()
    copy.CopyFrom(response)
    copy.decision_id = decision_id
    return copy


def _keyed(engine: Engine, inputs: Inputs) -> tuple[bool, bool]:
    """(allowed, remembered) of a decide_keyed with the key every door uses."""
    request = inputs.request
    policy = engine.policy
    decision, entry = engine.decide_keyed(request.memo_key(policy.reads_headers), policy, inputs)
    return decision.allowed, entry is not None


def test_headers_stay_out_of_the_key_when_no_condition_can_read_them(
    seeded: Home, engine: Engine
) -> None:
    assert not engine.policy.reads_headers  # policies/hub.yaml
    token = seeded.token()

    def read(request_id: str) -> Inputs:
        target = HttpTarget("GET", "/api/data/tags/ds-a", "", {"x-request-id": request_id})
        return Inputs(CheckInput(token, target, request_id))

    first, second = read("r-1"), read("r-2")
    assert _keyed(engine, first) == (True, True)
    assert _keyed(engine, second) == (True, True)
    assert second.built == 0  # a different request id header: the same decision


def test_headers_are_in_the_key_when_a_condition_reads_the_request(tmp_path: Path) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - id: no-test-traffic
          effect: deny
          routes: [read]
          when: '"x-env" in request.headers && request.headers["x-env"] == "test"'
        """,
    )
    assert policy.reads_headers
    with scratch_dir() as scratch:
        engine, token = Runner(policy, scratch).engine(Fixture(ALICE, GRANTS, None, LABELS))
        try:

            def read(env: str) -> Inputs:
                target = HttpTarget("GET", "/d/plain", "", {"x-env": env})
                return Inputs(CheckInput(token, target))

            prod, test = read("prod"), read("test")
            assert _keyed(engine, prod) == (True, True)
            assert _keyed(engine, test) == (False, False)  # decided, and denied
            assert test.built == 1
        finally:
            engine.facts.store.close()


SNAPSHOT = "/api/data/v2/snapshot"


def _variants(home: Home) -> dict[str, tuple[CheckInput, CheckInput, Reason]]:
    """(a remembered allow, the same request with one thing changed, what that one gets)."""
    token = home.token()

    def http(
        path: str, query: str = "", body: bytes = b"", door: str = "grpc", tok: str = token
    ) -> CheckInput:
        method = "POST" if body else "GET"
        return CheckInput(tok, HttpTarget(method, path, query, {}, body), "", door)

    def action(*data_sources: str) -> CheckInput:
        return CheckInput(token, ActionTarget("values.snapshot", data_sources))

    tags = "/api/data/tags/ds-a"
    return {
        "the body names another data source": (
            http(SNAPSHOT, body=b'{"tags": {"ds-a": ["t"]}}'),
            http(SNAPSHOT, body=b'{"tags": {"ds-c": ["t"]}}'),
            Reason.DATA_SOURCE_NOT_GRANTED,
        ),
        "an action names another data source": (
            action("ds-a"),
            action("ds-c"),
            Reason.DATA_SOURCE_NOT_GRANTED,
        ),
        "the path names another data source": (
            http(tags),
            http("/api/data/tags/ds-c"),
            Reason.DATA_SOURCE_NOT_GRANTED,
        ),
        "another token (a disabled app's)": (
            http(tags),
            http(tags, tok=home.token(client_id="app-off")),
            Reason.APP_DISABLED,
        ),
        "another query (the record's path differs)": (
            http(tags, query="a=1"),
            http(tags, query="b=1"),
            Reason.ALLOWED,
        ),
        "another door (the record's door differs)": (
            http(tags),
            http(tags, door="envoy"),
            Reason.ALLOWED,
        ),
    }


@pytest.mark.parametrize(
    "change",
    [
        "the body names another data source",
        "an action names another data source",
        "the path names another data source",
        "another token (a disabled app's)",
        "another query (the record's path differs)",
        "another door (the record's door differs)",
    ],
)
def test_a_request_that_differs_in_anything_the_decision_reads_is_decided_again(
    seeded: Home, engine: Engine, change: str
) -> None:
    base, changed, reason = _variants(seeded)[change]
    assert _keyed(engine, Inputs(base)) == (True, True)
    other = Inputs(changed)
    request = other.request
    policy = engine.policy
    decision, _ = engine.decide_keyed(request.memo_key(policy.reads_headers), policy, other)
    assert other.built == 1 and decision.reason is reason


def test_a_large_request_is_remembered_by_a_32_byte_digest_whatever_the_body() -> None:
    big = CheckInput("t", HttpTarget("POST", SNAPSHOT, "", {}, b"x" * 1_000_000))
    other = CheckInput("t", HttpTarget("POST", SNAPSHOT, "", {}, b"x" * 999_999 + b"y"))
    key = big.memo_key()
    assert isinstance(key, tuple) and key[0] == "input-blake2b" and len(key[1]) == 32
    assert big.memo_key() != other.memo_key()
    assert big.memo_key() == replace(big, request_id="another id").memo_key()
    # Every string counts towards the size, the action's and method's too.
    long_action = CheckInput("t", ActionTarget("a" * 2000, ("ds1",))).memo_key()
    assert isinstance(long_action, tuple) and long_action[0] == "input-blake2b"


def test_a_small_request_is_its_own_key_without_the_request_id() -> None:
    target = HttpTarget("GET", "/api/data/tags/a", "", {"x-a": "1"}, b"")
    small = CheckInput("t", target, "r1")
    key = small.memo_key()
    assert key == replace(small, request_id="r2").memo_key()
    assert "r1" not in repr(key) and "x-a" in repr(key)
    other_headers = replace(small, target=replace(target, headers={"x-b": "2"}))
    assert small.memo_key(with_headers=False) == other_headers.memo_key(with_headers=False)
    assert key != replace(small, token="u").memo_key()
    # A larger request is keyed by a digest: never equal to a small one's tuple.
    assert key != replace(small, target=replace(target, body=b"x" * 2000)).memo_key()


def test_the_key_of_an_http_request_is_made_alike_without_building_it() -> None:
    # adapters/embedded answers a remembered allow from http_memo_key; a request decided in
    # its pool is keyed by memo_key: one entry must serve both.
    headers = {"x-b": "2", "host": "hub", "x-a": "1"}
    for body in (b"", b'{"tags": {}}', b"x" * 2000):
        for with_headers in (True, False):
            for hs in (headers, {}):
                check = CheckInput("tok", HttpTarget("POST", SNAPSHOT, "q=1", hs, body), "r", "e")
                made = http_memo_key("e", "tok", "POST", SNAPSHOT, "q=1", hs, body, with_headers)
                assert made == check.memo_key(with_headers)
                assert hash(made) == hash(check.memo_key(with_headers))


def test_a_recall_leaves_no_read_transaction_open(seeded: Home, engine: Engine) -> None:
    # The data_version check reuses its cursor (facts._Reader.versions): its statement must
    # end with the check, or the reader would hold a snapshot between requests (and keep a
    # checkpoint from truncating the WAL).
    if seeded.config.store.url:
        pytest.skip("SQLite's data_version check")
    inputs = read_ds_a(seeded)
    _, entry = engine.decide_keyed(KEY, engine.policy, inputs)
    assert engine.recall(KEY, engine.policy, True) is entry
    with open_store(seeded.config, migrate=False) as other:
        other.set_app_enabled("app1", True)  # a write: the WAL has frames to checkpoint
    assert engine.recall(KEY, engine.policy, True) is None  # (the write moved the store)
    inputs = read_ds_a(seeded)
    engine.decide_keyed(KEY, engine.policy, inputs)
    assert engine.recall(KEY, engine.policy, True) is not None
    conn = sqlite3.connect(seeded.config.store.path)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    assert busy == 0


def test_over_grpc_a_different_body_or_door_is_not_answered_from_memory(seeded: Home) -> None:
    token = seeded.token()

    def snapshot(body: bytes, door: str = "") -> decision_pb2.CheckRequest:
        request = check_request(token, method="POST", path=SNAPSHOT, body=body)
        request.door = door
        return request

    granted, ungranted = b'{"tags": {"ds-a": ["t"]}}', b'{"tags": {"ds-c": ["t"]}}'
    with run_server(seeded) as server, grpc.insecure_channel(server.address) as channel:
        stub = decision_stub(channel)
        for _ in range(2):  # the second is remembered
            assert stub.Check(snapshot(granted), timeout=5).allowed
        assert (
            stub.Check(snapshot(ungranted), timeout=5).reason
            == decision_pb2.DATA_SOURCE_NOT_GRANTED
        )
        # Larger than MAX_PLAIN_KEY: remembered by a digest, which tells the bodies apart too.
        pad = b" " * MAX_PLAIN_KEY
        for _ in range(2):
            assert stub.Check(snapshot(granted + pad), timeout=5).allowed
        assert (
            stub.Check(snapshot(ungranted + pad), timeout=5).reason
            == decision_pb2.DATA_SOURCE_NOT_GRANTED
        )
        envoy = stub.Check(snapshot(granted, door="envoy"), timeout=5)
        assert envoy.allowed
        records = indexed_records(seeded.config, {envoy.decision_id})
    assert records[envoy.decision_id].door == "envoy"


class _Recorder(Door[str, tuple[str, "Decision | str"]]):
    """A door that says how it answered: from its form (with the id), or rendered."""

    def form(self, decision: Decision) -> str:
        return "form"

    def render_form(self, form: str, decision_id: str) -> tuple[str, Decision | str]:
        return "remembered", decision_id


def _answer(decider: Decider, request_id: str, inputs: Inputs) -> tuple[str, Decision | str]:
    return decider.answer(
        _Recorder(),
        lambda decision: ("rendered", decision),
        KEY,
        decider.engine.policy,
        request_id,
        inputs,
        time.perf_counter_ns(),
    )


def _remembered_once(home: Home) -> tuple[Decider, AuditLog, Inputs, Decision]:
    """A decider with its audit log, and the first (recorded, remembered) allow of KEY."""
    decider = build_decider(home.config, home.store, serving=True)
    assert decider.audit is not None
    inputs = read_ds_a(home)
    first, entry = decider.check_keyed(KEY, decider.engine.policy, "r0", inputs)
    assert first.allowed and entry is not None
    return decider, decider.audit, inputs, first


def test_a_recalled_answer_is_recorded_and_one_that_cannot_be_is_decided_and_denied(
    seeded: Home,
) -> None:
    decider, audit, inputs, first = _remembered_once(seeded)
    how, decision_id = _answer(decider, "r1", inputs)
    assert how == "remembered" and isinstance(decision_id, str) and inputs.built == 1
    assert decision_id != first.decision_id
    audit.flush()
    records = indexed_records(seeded.config, {first.decision_id, decision_id})
    assert records[decision_id].request_id == "r1"
    assert records[decision_id].decision == "allow"
    audit.close()  # from now on no record can be written
    how, refused = _answer(decider, "r2", inputs)
    assert how == "rendered" and isinstance(refused, Decision) and not refused.allowed
    assert refused.reason is Reason.AUDIT_UNAVAILABLE and refused.decision_id
    assert inputs.built == 1  # a remembered answer refused, not decided again
    denied, _ = decider.check_keyed(KEY, decider.engine.policy, "r2", inputs)
    assert denied.reason is Reason.AUDIT_UNAVAILABLE and not denied.allowed


def test_denials_for_a_refusing_audit_log_are_logged_a_line_per_second_with_a_count(
    seeded: Home, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    decider, audit, inputs, _ = _remembered_once(seeded)
    audit.close()  # from now on every decision is denied
    clock = [1000.0]
    throttled = decider_module._Throttled(clock=lambda: clock[0])
    monkeypatch.setattr(decider_module, "_unrecorded_log", throttled)
    with caplog.at_level(logging.ERROR, logger="policyd.decision.decider"):
        for n in range(50):
            denied, _ = decider.check_keyed(KEY, decider.engine.policy, f"r{n}", inputs)
            assert denied.reason is Reason.AUDIT_UNAVAILABLE  # every one is still denied
        assert len(caplog.records) == 1
        clock[0] += 1.5
        denied, _ = decider.check_keyed(KEY, decider.engine.policy, "last", inputs)
    assert len(caplog.records) == 2
    assert "and 49 more denied so" in caplog.records[1].getMessage()
    assert denied.decision_id in caplog.records[1].getMessage()


def test_a_recalled_answer_whose_sync_fails_is_denied_with_the_id_of_its_one_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # audit.sync = "full": the line is copied into the journal, then the msync fails.
    home = Home(
        tmp_path,
        extra_config=f'[audit]\npath = "{tmp_path / "audit.db"}"\n'
        f'key_file = "{tmp_path / "audit.key"}"\nsync = "full"\n',
    )
    home.seed()
    decider, audit, inputs, first = _remembered_once(home)

    def failing_sync(self: object) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(journal_module._Journal, "sync", failing_sync)
    how, refused = _answer(decider, "r1", inputs)
    assert how == "rendered" and isinstance(refused, Decision)
    assert refused.reason is Reason.AUDIT_UNAVAILABLE
    monkeypatch.undo()
    audit.close()
    Indexer(home.config.audit.path, audit.key).run_once()
    records = [
        s.record for s in AuditReader(home.config.audit.path, audit.key).query(Query(limit=10))
    ]
    # One record per answer: r1's (its line reached the journal before the failed sync)
    # carries the id the caller got with the deny; no second record was made for it.
    assert sorted(r.id for r in records) == sorted([first.decision_id, refused.decision_id])
    assert [r.request_id for r in records if r.id == refused.decision_id] == ["r1"]
