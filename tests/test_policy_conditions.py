"""Conditions (CEL) in decisions: deny wins, allow must hold, errors fail closed, only where set.

Decisions run through the real engine on a scratch store (policytest.Runner), as policy
tests do.
"""

from __future__ import annotations

import calendar
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.core import cel
from policyd.core.model import Access, ActionTarget, CheckInput, Decision, HttpTarget
from policyd.core.policy import Policy, load_policy
from policyd.core.reasons import Reason
from policyd.decision.engine import Engine
from policyd.policy.policytest import Fixture, Principal, Runner, scratch_dir

POLICY = """\
apiVersion: policyd/v1
scopes:
  - {name: DataRead, description: Read, dataSources: true}
  - {name: DataWrite, description: Write, dataSources: true}
  - {name: UserInfo, description: You}
routes:
  - id: read
    methods: GET
    path: /d/{dsn}
    action: d.read
    scopes: [DataRead]
    access: read
    dataSources: [{in: path, name: dsn}]
  - id: write
    methods: PUT
    path: /d/{dsn}
    action: d.write
    scopes: [DataWrite]
    access: write
    dataSources: [{in: path, name: dsn}]
  - id: many
    methods: POST
    path: /many
    action: many
    scopes: [DataRead]
    access: read
    dataSources: [{in: body, pointer: /sources, shape: items}]
  - id: list
    methods: GET
    path: /d
    action: list
    scopes: [DataRead]
    access: read
    dataSources: granted
  - id: me
    methods: GET
    path: /me
    action: me
    scopes: [UserInfo]
conditions:
"""

ALICE = Principal("alice", "app", ("UserInfo", "DataRead", "DataWrite"))
GRANTS = {"plain": Access.WRITE, "safe": Access.WRITE, "other": Access.READ}
LABELS = {"safe": {"class": "safety"}, "plain": {"site": "north"}}


def policy_with(tmp_path: Path, conditions: str) -> Policy:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "p.yaml").write_text(POLICY + textwrap.indent(textwrap.dedent(conditions), "  "))
    return load_policy(folder)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with scratch_dir() as folder:
        yield folder


def decide(
    policy: Policy,
    scratch: Path,
    target: HttpTarget | ActionTarget,
    fixture: Fixture | None = None,
    now: str | None = None,
) -> Decision:
    fixture = fixture or Fixture(ALICE, GRANTS, None, LABELS)
    engine, token = Runner(policy, scratch).engine(fixture)
    if now is not None:
        fixed = float(calendar.timegm(time.strptime(now, "%Y-%m-%dT%H:%M:%SZ")))
        engine.clock = lambda: fixed
    try:
        return engine.decide(CheckInput(token, target))
    finally:
        engine.facts.store.close()


SAFETY = """\
- id: no-safety-writes
  effect: deny
  routes: [write]
  when: '"class" in data_source.labels && data_source.labels["class"] == "safety"'
  message: no writes to safety systems
"""


def test_deny_condition_that_holds_denies_with_its_message(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(tmp_path, SAFETY)
    denied = decide(policy, scratch, HttpTarget("PUT", "/d/safe"))
    assert denied.reason is Reason.CONDITION_DENIED
    assert denied.message == "no writes to safety systems (data source 'safe')"
    assert denied.rule_id == "write" and denied.data_sources == ()
    allowed = decide(policy, scratch, HttpTarget("PUT", "/d/plain"))
    assert allowed.reason is Reason.ALLOWED and allowed.data_sources == ("plain",)


def test_conditions_run_after_the_built_in_checks(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(tmp_path, SAFETY)
    # Not granted: the built-in check decides before the condition is looked at.
    ungranted = Fixture(ALICE, {"plain": Access.WRITE}, None, LABELS)
    decision = decide(policy, scratch, HttpTarget("PUT", "/d/safe"), ungranted)
    assert decision.reason is Reason.DATA_SOURCE_NOT_GRANTED
    # Reads are not selected by the condition: a safety system can be read.
    assert decide(policy, scratch, HttpTarget("GET", "/d/safe")).allowed


def test_deny_wins_over_an_allow_that_holds(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(
        tmp_path,
        SAFETY
        + "- {id: alice-may, effect: allow, routes: [write], when: principal.sub == 'alice'}\n",
    )
    assert decide(policy, scratch, HttpTarget("PUT", "/d/safe")).reason is Reason.CONDITION_DENIED
    assert decide(policy, scratch, HttpTarget("PUT", "/d/plain")).allowed


def test_with_allow_conditions_one_must_hold(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - {id: app-x, effect: allow, routes: [me], when: principal.client_id == 'x'}
        - {id: bob, effect: allow, routes: [me], when: principal.sub == 'bob'}
        """,
    )
    denied = decide(policy, scratch, HttpTarget("GET", "/me"))
    assert denied.reason is Reason.CONDITION_DENIED
    assert denied.message == "no allow condition holds (app-x, bob)"
    bob = Fixture(Principal("bob", "app", ("UserInfo",)))
    assert decide(policy, scratch, HttpTarget("GET", "/me"), bob).allowed


def test_per_data_source_deny_needs_one_and_allow_needs_every_one(
    tmp_path: Path, scratch: Path
) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - id: north-only
          effect: allow
          routes: [many]
          when: '"site" in data_source.labels && data_source.labels["site"] == "north"'
        """,
    )
    both = HttpTarget("POST", "/many", body=b'{"sources": ["plain", "other"]}')
    denied = decide(policy, scratch, both)
    assert denied.reason is Reason.CONDITION_DENIED
    only_north = HttpTarget("POST", "/many", body=b'{"sources": ["plain"]}')
    assert decide(policy, scratch, only_north).data_sources == ("plain",)


def test_a_condition_that_cannot_be_evaluated_denies_with_condition_error(
    tmp_path: Path, scratch: Path
) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - {id: strict, effect: deny, routes: [read], when: 'data_source.labels["class"] == "x"'}
        - {id: number, effect: deny, routes: [me], when: 'size(principal.scopes)'}
        """,
    )
    missing_key = decide(policy, scratch, HttpTarget("GET", "/d/plain"))
    assert missing_key.reason is Reason.CONDITION_ERROR
    assert missing_key.message == (
        "condition strict could not be evaluated for data source 'plain':"
        " no such member in mapping: 'class'"
    )
    not_bool = decide(policy, scratch, HttpTarget("GET", "/me"))
    assert not_bool.reason is Reason.CONDITION_ERROR
    assert "gave a int, not true or false" in not_bool.message


def test_conditions_are_evaluated_only_for_the_rules_that_have_them(
    tmp_path: Path, scratch: Path
) -> None:
    # Applies to every route naming data sources, and fails whenever it is evaluated.
    policy = policy_with(tmp_path, "- {id: broken, effect: deny, when: 'data_source.nope'}\n")
    rules = {r.id: r for r in policy.rules}
    assert [c.id for c in rules["read"].conditions] == ["broken"]
    assert rules["me"].conditions == () and rules["list"].conditions == ()
    assert decide(policy, scratch, HttpTarget("GET", "/d/plain")).reason is Reason.CONDITION_ERROR
    assert decide(policy, scratch, HttpTarget("GET", "/me")).allowed
    listing = decide(policy, scratch, HttpTarget("GET", "/d"))
    assert listing.allowed and listing.data_sources == ("other", "plain", "safe")


def test_maintenance_window_on_the_decision_time(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - id: maintenance-window
          effect: deny
          routes: [write]
          when: now.getHours("Europe/Berlin") < 2 || now.getHours("Europe/Berlin") >= 4
          message: writes only during the maintenance window (02:00-04:00 Berlin)
        """,
    )
    target = HttpTarget("PUT", "/d/plain")
    inside = decide(policy, scratch, target, now="2026-01-15T01:30:00Z")  # 02:30 in Berlin
    outside = decide(policy, scratch, target, now="2026-01-15T12:00:00Z")
    assert inside.allowed
    assert outside.reason is Reason.CONDITION_DENIED


def test_conditions_see_the_request_principal_and_rule(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - id: everything
          effect: allow
          routes: [read]
          when: >-
            request.method == "GET" && request.path == "/d/pl%61in"
            && request.params.dsn == "plain" && request.query.mode == ["a", "b"]
            && request.headers["x-site"] == "north" && request.data_sources == ["plain"]
            && principal.sub == "alice" && principal.client_id == "app"
            && "DataRead" in principal.scopes
            && rule.id == "read" && rule.action == "d.read" && rule.access == "read"
            && data_source.name == "plain" && data_source.access == "write"
        """,
    )
    target = HttpTarget("GET", "/d/pl%61in", "mode=a&mode=b", {"x-site": "north"})
    assert decide(policy, scratch, target).allowed
    other = HttpTarget("GET", "/d/pl%61in", "mode=a", {"x-site": "north"})
    assert decide(policy, scratch, other).reason is Reason.CONDITION_DENIED


def test_action_requests_are_held_to_the_same_conditions(tmp_path: Path, scratch: Path) -> None:
    policy = policy_with(tmp_path, SAFETY)
    target = ActionTarget("d.write", ("plain", "safe"))
    assert decide(policy, scratch, target).reason is Reason.CONDITION_DENIED


def test_explain_shows_where_data_sources_came_from_and_each_condition(
    tmp_path: Path, scratch: Path
) -> None:
    policy = policy_with(tmp_path, SAFETY)
    engine, token = Runner(policy, scratch).engine(Fixture(ALICE, GRANTS, None, LABELS))
    explained = engine.explain(CheckInput(token, HttpTarget("PUT", "/d/safe")))
    engine.facts.store.close()
    assert explained.decision.reason is Reason.CONDITION_DENIED
    assert [(name, getattr(ref, "where", ref)) for name, ref in explained.trace.data_sources] == [
        ("safe", "path")
    ]
    assert [(c.name, c.passed) for c in explained.trace.checks] == [
        ("token", True),
        ("token id", True),
        ("app", True),
        ("consent", True),
        ("route", True),
        ("scopes", True),
        ("data source safe", True),
        ("conditions", False),
    ]
    [step] = explained.trace.conditions
    assert (step.condition.id, step.data_source, step.result) == (
        "no-safety-writes",
        "safe",
        "true",
    )


def test_one_program_evaluated_by_many_threads_keeps_their_variables_apart() -> None:
    program = cel.compile_expression('principal.sub == "t" + string(principal.n)')
    macro = cel.compile_expression("principal.scopes.exists(s, s == principal.sub)")
    wrong: list[int] = []

    def work(n: int) -> None:
        mine = cel.to_cel({"sub": f"t{n}", "n": n, "scopes": [f"t{n}"]})
        for _ in range(300):
            if not (program.evaluate({"principal": mine}) and macro.evaluate({"principal": mine})):
                wrong.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_engine_reads_the_policy_once_per_decision(tmp_path: Path, scratch: Path) -> None:
    policy = load_policy(Path(__file__).resolve().parent.parent / "policies")
    engine: Engine
    engine, token = Runner(policy, scratch).engine(Fixture(ALICE, {"plain": Access.READ}))
    try:
        decision = engine.decide(CheckInput(token, HttpTarget("GET", "/api/data/tags/plain")))
        assert decision.allowed and decision.policy_version == policy.version
        engine.policy = policy_with(tmp_path, SAFETY)
        swapped = engine.decide(CheckInput(token, HttpTarget("GET", "/api/data/tags/plain")))
        assert swapped.reason is Reason.NO_ROUTE
        assert swapped.policy_version == engine.policy.version != policy.version
    finally:
        engine.facts.store.close()
