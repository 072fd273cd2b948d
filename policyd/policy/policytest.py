"""Policy tests: `*_test.yaml` suites beside the policy, run by `policyd policy test`.

Each test is a request (method, path, query, body; or an action), a principal (sub,
client_id, scopes; null for no token), the grants in force, and the decision and reason
code expected. A test runs through the real engine on a scratch store made for it: the
app registered for the principal's scopes, the user's consent to them, the data sources
with their labels, the user's own access (the grants, unless `userAccess` says otherwise),
the grants, and a token signed by a fresh key. Nothing is mocked; only the store is new.

The suite format is in docs/policy.md ("Tests"). Suites are validated like policy files:
every problem with file:line:column (`SuiteInvalid`).
"""

from __future__ import annotations

import calendar
import json
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from policyd.core.errors import PolicydError
from policyd.core.ids import new_id
from policyd.core.model import Access, ActionTarget, CheckInput, Decision, HttpTarget
from policyd.core.policy import API_VERSION, METHODS, Policy, Problem, Reader, suite_files
from policyd.core.reasons import Reason
from policyd.decision.engine import Engine, EngineSettings, Explanation
from policyd.decision.tokens import TokenSettings, Verifier, issue_token
from policyd.store.facts import Facts
from policyd.store.keys import KeyRing
from policyd.store.sqlite import SqliteStore

_SETTINGS = TokenSettings(issuer="https://policy-test.invalid", audience="policy-test")
_FIXTURES = ("principal", "grants", "userAccess", "dataSources", "now")


class SuiteInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Principal:
    sub: str
    client_id: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Fixture:
    """The state a test runs in."""

    principal: Principal | None = None
    grants: dict[str, Access] = field(default_factory=dict)
    user_access: dict[str, Access] | None = None
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    now: float | None = None


@dataclass(frozen=True)
class Expect:
    allowed: bool
    reason: Reason | None
    data_sources: tuple[str, ...] | None = None
    rule: str | None = None


@dataclass(frozen=True)
class Case:
    suite: str
    name: str
    location: str
    target: HttpTarget | ActionTarget
    fixture: Fixture
    expect: Expect


@dataclass(frozen=True)
class Result:
    case: Case
    decision: Decision
    failures: tuple[str, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.failures


# -- reading suites ------------------------------------------------------------------------


def load_suites(directory: str | Path) -> list[Case]:
    """Every test of every suite in the folder; SuiteInvalid lists every problem."""
    problems: list[Problem] = []
    cases: list[Case] = []
    for path in suite_files(directory):
        cases += _read_suite(str(path), path.read_bytes(), problems)
    if problems:
        raise SuiteInvalid(problems)
    return cases


def _read_suite(file: str, data: bytes, problems: list[Problem]) -> list[Case]:
    r = Reader(file, problems)
    root = r.compose(data)
    if root is None:
        return []
    top = r.mapping(root, "test suite", ("apiVersion", "tests"), ("name", "defaults"))
    if top is None:
        return []
    if "apiVersion" in top:
        version = r.string(top["apiVersion"], "apiVersion")
        if version and version != API_VERSION:
            r.problem(top["apiVersion"], f"apiVersion must be {API_VERSION}, not {version!r}")
    suite = r.string(top["name"], "name") if "name" in top else Path(file).stem
    defaults: dict[str, yaml.Node] = {}
    if "defaults" in top:
        defaults = r.mapping(top["defaults"], "defaults", (), _FIXTURES) or {}
    cases = []
    for item in r.sequence(top["tests"], "tests") if "tests" in top else []:
        f = r.mapping(item, "test", ("name", "request", "expect"), _FIXTURES)
        if f is None:
            continue
        name = r.string(f["name"], "test name") if "name" in f else ""
        target = _request(r, f["request"]) if "request" in f else None
        fixture = _fixture(r, {**defaults, **{k: v for k, v in f.items() if k in _FIXTURES}})
        expect = _expect(r, f["expect"]) if "expect" in f else None
        if name and target is not None and expect is not None:
            cases.append(Case(suite, name, r.where(item), target, fixture, expect))
    return cases


def _request(r: Reader, node: yaml.Node) -> HttpTarget | ActionTarget | None:
    f = r.mapping(
        node,
        "request",
        (),
        ("method", "path", "query", "headers", "body", "bodyText", "action", "dataSources"),
    )
    if f is None:
        return None
    if "action" in f:
        for key in ("method", "path", "query", "headers", "body", "bodyText"):
            if key in f:
                r.problem(f[key], f"request: {key} goes with path, not action")
        action = r.string(f["action"], "action")
        names = (
            [n for n, _ in r.strings(f["dataSources"], "dataSources")] if "dataSources" in f else []
        )
        return ActionTarget(action, tuple(names)) if action else None
    if "path" not in f:
        r.problem(node, "request: needs a path (or an action)")
        return None
    if "dataSources" in f:
        r.problem(f["dataSources"], "request: dataSources goes with action")
    method = r.choice(f["method"], "method", METHODS) if "method" in f else "GET"
    path = r.string(f["path"], "path")
    query = _text(r, f["query"], "query") if "query" in f else ""
    headers: dict[str, str] = {}
    if "headers" in f:
        value = _construct(r, f["headers"])
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            headers = {str(k).lower(): v for k, v in value.items()}
        else:
            r.problem(f["headers"], "headers must map names to strings")
    body = b""
    if "body" in f and "bodyText" in f:
        r.problem(f["bodyText"], "request: give body or bodyText, not both")
    elif "body" in f:
        body = json.dumps(_construct(r, f["body"])).encode()
    elif "bodyText" in f:
        body = _text(r, f["bodyText"], "bodyText").encode()
    if not (method and path):
        return None
    return HttpTarget(method, path, query.lstrip("?"), headers, body)


def _text(r: Reader, node: yaml.Node, what: str) -> str:
    """A string that may be empty."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        return str(node.value)
    r.problem(node, f"{what} must be a string")
    return ""


def _construct(r: Reader, node: yaml.Node) -> Any:
    try:
        return SafeConstructor().construct_document(node)
    except ConstructorError as exc:
        r.problem(node, f"cannot read this value: {exc.problem}")
        return None


def _fixture(r: Reader, f: dict[str, yaml.Node]) -> Fixture:
    principal = None
    if "principal" in f:
        node = f["principal"]
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
            p = r.mapping(node, "principal", ("sub", "client_id"), ("scopes",))
            if p is not None and "sub" in p and "client_id" in p:
                scopes = (
                    tuple(s for s, _ in r.strings(p["scopes"], "scopes")) if "scopes" in p else ()
                )
                principal = Principal(
                    r.string(p["sub"], "sub"), r.string(p["client_id"], "client_id"), scopes
                )
    grants = _access_map(r, f["grants"], "grants") if "grants" in f else {}
    user_access = _access_map(r, f["userAccess"], "userAccess") if "userAccess" in f else None
    labels: dict[str, dict[str, str]] = {}
    if "dataSources" in f:
        value = _construct(r, f["dataSources"])
        if isinstance(value, dict) and all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
            for v in value.values()
        ):
            labels = {str(k): {str(a): b for a, b in v.items()} for k, v in value.items()}
        else:
            r.problem(f["dataSources"], "dataSources maps names to their labels ({key: value})")
    now = None
    if "now" in f:
        text = _text(r, f["now"], "now")
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise ValueError("no time zone")
            now = float(calendar.timegm(parsed.utctimetuple()))
        except ValueError:
            r.problem(f["now"], f"now must be an RFC 3339 time with a zone, not {text!r}")
    return Fixture(principal, grants, user_access, labels, now)


def _access_map(r: Reader, node: yaml.Node, what: str) -> dict[str, Access]:
    if not isinstance(node, yaml.MappingNode):
        r.problem(node, f"{what} maps data-source names to read or write")
        return {}
    out: dict[str, Access] = {}
    for key, value in node.value:
        name = r.string(key, f"{what}: data source")
        level = r.choice(value, f"{what}: access of {name}", ("read", "write"))
        if name in out:
            r.problem(key, f"{what}: {name} is listed twice")
        elif name and level:
            out[name] = Access.parse(level)
    return out


def _expect(r: Reader, node: yaml.Node) -> Expect | None:
    f = r.mapping(node, "expect", ("decision",), ("reason", "dataSources", "rule"))
    if f is None or "decision" not in f:
        return None
    decision = r.choice(f["decision"], "decision", ("allow", "deny"))
    reason = None
    if "reason" in f:
        name = r.string(f["reason"], "reason")
        if name and name not in Reason.__members__:
            r.problem(f["reason"], f"unknown reason code {name!r} (docs/reason-codes.md)")
        elif name:
            reason = Reason[name]
            if (reason is Reason.ALLOWED) != (decision == "allow"):
                r.problem(f["reason"], f"decision {decision} cannot have reason {name}")
    names = None
    if "dataSources" in f:
        value = _construct(r, f["dataSources"])
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            names = tuple(value)
        else:
            r.problem(f["dataSources"], "dataSources must be a list of names")
    rule = r.string(f["rule"], "rule") if "rule" in f else None
    if not decision:
        return None
    return Expect(decision == "allow", reason, names, rule)


# -- running -------------------------------------------------------------------------------


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder, in memory when the machine has /dev/shm (store writes fsync)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="policyd-test-", dir=base) as tmp:
        yield Path(tmp)


class Runner:
    """Runs requests against a policy on scratch stores under one folder."""

    def __init__(self, policy: Policy, folder: Path) -> None:
        self.policy = policy
        self.folder = folder

    def engine(self, fixture: Fixture) -> tuple[Engine, str]:
        """An engine over a new store holding the fixture, and the principal's token."""
        store = SqliteStore(self.folder / f"store-{new_id()}.db")
        keyring = KeyRing(store, self.folder / "keys")
        keyring.rotate("ES256")
        p = fixture.principal
        grants = fixture.grants
        own = fixture.user_access if fixture.user_access is not None else grants
        for name in {*grants, *own, *fixture.labels}:
            store.add_data_source(name, "", fixture.labels.get(name, {}))
        token = ""
        if p is not None:
            scopes = sorted({*self.policy.scopes, *p.scopes})
            store.add_app(
                p.client_id, p.client_id, redirect_uris=[], scopes=scopes, confidential=False
            )
            store.add_user(p.sub)
            for name, level in own.items():
                store.set_user_access(p.sub, name, level)
            store.set_consent(p.sub, p.client_id, list(p.scopes))
            for name, level in grants.items():
                store.add_grant(p.sub, p.client_id, name, level)
            token, _ = issue_token(
                keyring, _SETTINGS, sub=p.sub, client_id=p.client_id, scopes=list(p.scopes)
            )
        engine = Engine(Facts(store), Verifier(_SETTINGS), self.policy, EngineSettings())
        if fixture.now is not None:
            fixed = fixture.now
            engine.clock = lambda: fixed
        return engine, token

    def run(self, case: Case) -> Result:
        start = time.perf_counter()
        try:
            engine, token = self.engine(case.fixture)
        except PolicydError as exc:  # e.g. a sub the store refuses: this test fails, not all
            decision = Decision(False, Reason.INTERNAL_ERROR, str(exc), "")
            failure = f"cannot set up the test: {exc}"
            return Result(case, decision, (failure,), time.perf_counter() - start)
        try:
            decision = engine.decide(CheckInput(token, case.target, "policy-test", "test"))
        finally:
            _discard(engine)
        return Result(case, decision, _compare(case.expect, decision), time.perf_counter() - start)

    def explain(self, fixture: Fixture, target: HttpTarget | ActionTarget) -> Explanation:
        engine, token = self.engine(fixture)
        try:
            return engine.explain(CheckInput(token, target, "policy-explain", "cli"))
        finally:
            _discard(engine)


def _discard(engine: Engine) -> None:
    """Close and delete a scratch store. Its connections (this thread's: the store's and
    the decisions') are closed first; SQLite removes its `-wal` and `-shm` files as the
    last one closes, and they are never deleted under an open connection."""
    store = engine.facts.store
    engine.facts.close()
    store.close()
    assert isinstance(store, SqliteStore)  # Runner.engine made it
    for suffix in ("", ".migrate-lock"):
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)


def _compare(expect: Expect, d: Decision) -> tuple[str, ...]:
    failures = []
    got = f"{'allow' if d.allowed else 'deny'} {d.reason.name}"
    if d.allowed != expect.allowed or (expect.reason is not None and d.reason is not expect.reason):
        want = "allow" if expect.allowed else "deny"
        if expect.reason is not None:
            want += f" {expect.reason.name}"
        failures.append(f"expected {want}, got {got}: {d.message}")
    if expect.data_sources is not None and d.data_sources != expect.data_sources:
        failures.append(
            f"expected data sources {list(expect.data_sources)}, got {list(d.data_sources)}"
        )
    if expect.rule is not None and d.rule_id != expect.rule:
        failures.append(f"expected rule {expect.rule!r}, got {d.rule_id or 'none'!r}")
    return tuple(failures)


def run_suites(policy: Policy, cases: list[Case]) -> list[Result]:
    with scratch_dir() as folder:
        runner = Runner(policy, folder)
        return [runner.run(case) for case in cases]


# -- reports -------------------------------------------------------------------------------


def as_json(policy: Policy, results: list[Result]) -> dict[str, Any]:
    return {
        "policy_version": policy.version,
        "passed": sum(r.passed for r in results),
        "failed": sum(not r.passed for r in results),
        "uncovered_routes": uncovered_routes(policy, results),
        "tests": [
            {
                "suite": r.case.suite,
                "name": r.case.name,
                "location": r.case.location,
                "passed": r.passed,
                "failures": list(r.failures),
                "decision": "allow" if r.decision.allowed else "deny",
                "reason": r.decision.reason.name,
                "rule": r.decision.rule_id,
                "seconds": round(r.seconds, 6),
            }
            for r in results
        ],
    }


def as_junit(policy: Policy, results: list[Result]) -> str:
    """JUnit XML: one <testsuite> per suite, one <testcase> per test."""
    root = ET.Element("testsuites", name=f"policyd policy {policy.version}")
    suites: dict[str, list[Result]] = {}
    for r in results:
        suites.setdefault(r.case.suite, []).append(r)
    for name, items in suites.items():
        suite = ET.SubElement(
            root,
            "testsuite",
            name=name,
            tests=str(len(items)),
            failures=str(sum(not r.passed for r in items)),
            errors="0",
            time=f"{sum(r.seconds for r in items):.6f}",
        )
        for r in items:
            file, line = r.case.location.rsplit(":", 2)[:2]
            case = ET.SubElement(
                suite,
                "testcase",
                classname=name,
                name=r.case.name,
                file=file,
                line=line,
                time=f"{r.seconds:.6f}",
            )
            if not r.passed:
                failure = ET.SubElement(case, "failure", message=r.failures[0])
                failure.text = "\n".join(r.failures)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def uncovered_routes(policy: Policy, results: list[Result]) -> list[str]:
    """Rules that no test reached with an allow, or (non-public) with a deny."""
    allowed = {r.decision.rule_id for r in results if r.decision.allowed}
    denied = {r.decision.rule_id for r in results if not r.decision.allowed}
    out = []
    for rule in policy.rules:
        missing = []
        if rule.id not in allowed:
            missing.append("allow")
        if rule.id not in denied and not rule.public:
            missing.append("deny")
        if missing:
            out.append(f"{rule.id} ({' and '.join(missing)})")
    return out
