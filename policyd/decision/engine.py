"""The decision engine: `Engine.decide(CheckInput) -> Decision`.

Plain Python over plain data; no transport is imported here. The checks run in a fixed
order and the first that fails decides the reason code:

 1. the route, found first only so that public routes need no token;
 2. token present and well-formed; key, algorithm and signature; typ, claims, iss, aud and
    time (tokens.py);
 3. token id not revoked;
 4. app registered, then enabled;
 5. consent of (user, app) present and covering the token's scopes;
 6. a route rule for the request (else NO_ROUTE, or the request's shape problem);
 7. the rule's required scopes in the token;
 8. every data source the request names granted to (user, app) at the needed access level,
    and still accessible to the user at that level;
 9. the rule's allow/deny conditions (CEL, policy files), only for rules that have them.

Checks 3 to 5 are one function, liveness.principal_denial, which token introspection asks
too: RFC 7662 `active` and these decisions cannot disagree.

The built-in action `connector.attach` (docs/connectors.md) has no policy rule; it asks
whether the connector holding the token may serve all the named data sources now:

 1. the token, as above but for the link's audience (tokens.link_audience), so that an
    app's token is TOKEN_AUDIENCE_MISMATCH here and a connector's token is that for every
    other request; and its sub the same as its client_id (else TOKEN_CLAIM_INVALID);
 2. token id not revoked;
 3. the token's client a registered connector (CONNECTOR_UNKNOWN), then enabled
    (CONNECTOR_DISABLED);
 4. data sources named (else REQUEST_INVALID), each served by that connector
    (DATA_SOURCE_NOT_OWNED; an unknown data source is served by no one).

The policy (route table, scopes, compiled conditions, version) is one immutable object in
one attribute: a decision reads it once, so a reload that swaps it mid-request never mixes
two versions in one decision. `explain` runs the same code with a trace of every check.

Any exception is a deny: STORE_UNAVAILABLE when the store cannot be read, INTERNAL_ERROR
otherwise. Nothing here raises to the caller.

`decide_keyed` remembers allow decisions, each under a key that holds the whole request
(everything `decide` reads from it), and answers a repeat of the request from memory while
that answer is exactly what `decide` would say (docs/architecture.md, "Remembered
decisions"):
- it lives in the caches of one store generation (facts.py), so any store write (a revoked
  grant, consent or token, a disabled app, a retired key) forgets it before the write
  returns, in every process;
- it names the policy object that made it, so a reload forgets it;
- it ends when its token expires (exp + leeway);
- a decision whose conditions read `now` is never remembered, nor is a deny.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from policyd.core import conditions as cond
from policyd.core.errors import StoreMoved, StoreUnavailable
from policyd.core.ids import new_id
from policyd.core.model import (
    CONNECTOR_ATTACH,
    CONNECTOR_ATTACH_RULE,
    ActionTarget,
    CheckInput,
    Decision,
    HttpTarget,
    Principal,
)
from policyd.core.policy import Policy
from policyd.core.reasons import Denied, Reason
from policyd.core.routes import (
    DataSourceRef,
    Match,
    RequestProblem,
    RouteRule,
    RouteTable,
    extract_with_sources,
    split_path,
)
from policyd.decision.liveness import principal_denial
from policyd.decision.tokens import TokenError, Verifier
from policyd.store.facts import Facts, View

log = logging.getLogger(__name__)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class EngineSettings:
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class Check:
    """One check of an explained decision: passed (True), failed (False) or not run."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class Trace:
    """What `Engine.explain` records while deciding."""

    checks: list[Check] = field(default_factory=list)
    # Each data-source name with where it came from (a DataSourceRef, or "action").
    data_sources: list[tuple[str, DataSourceRef | str]] = field(default_factory=list)
    conditions: list[cond.Step] = field(default_factory=list)
    match: Match | None = None

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))


@dataclass(slots=True, eq=False)
class Remembered:
    """An allow decision for one request, valid while `policy` is the engine's policy and
    until `expires` (time.time()), in the store generation whose caches hold it.

    Compared and hashed by identity. What others build once from it (the decider's audit
    line, a door's encoded answer) they keep in `kept`, under themselves as the key: it
    goes when the caches drop the entry, and finding it is one dict lookup (a weak map's
    cost three times that, on every remembered answer)."""

    decision: Decision  # its decision_id is ""; each answer gets a new one
    policy: Policy
    expires: float
    kept: dict[object, Any] = field(default_factory=dict)


def _holding(entry: Remembered | None, policy: Policy) -> Remembered | None:
    """The entry if it still answers for a request keyed under `policy`: made by that
    policy object (a reload forgets it) and not expired."""
    if entry is not None and entry.policy is policy and time.time() < entry.expires:
        return entry
    return None


@dataclass(slots=True)
class _Bounds:
    """What a decision depended on beyond the request and the store generation."""

    expires: float = float("inf")
    uses_clock: bool = False


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    policy: Policy
    trace: Trace


class Engine:
    def __init__(
        self,
        facts: Facts,
        verifier: Verifier,
        policy: Policy | RouteTable,
        settings: EngineSettings | None = None,
    ) -> None:
        self.facts = facts
        self.verifier = verifier
        # Connectors' tokens (connector.attach): the link's audience, a cache of its own.
        self.link_verifier = Verifier(verifier.settings.for_link(), cache_tag="link\0")
        # Swapped whole by a reload (reload.py); read once per decision.
        self.policy = policy if isinstance(policy, Policy) else Policy.of_routes(policy)
        self.settings = settings or EngineSettings()
        # The `now` of conditions; policy tests set a fixed time.
        self.clock: Callable[[], float] = time.time

    @property
    def routes(self) -> RouteTable:
        return self.policy.routes

    def decide(self, request: CheckInput) -> Decision:
        try:
            return self._decide(request, None, retry=True)
        except StoreMoved:
            self._end_view()
            return self._decide(request, None)  # once more, on the newer generation
        finally:
            self._end_view()

    def decide_keyed(
        self, key: Hashable, policy: Policy, make_input: Callable[[], CheckInput]
    ) -> tuple[Decision, Remembered | None]:
        """Decide the request that `key` stands for under `policy` (the engine's policy, read
        once by the caller to make the key); `make_input()` builds it when needed.

        The key must determine everything a decision under that policy reads from the
        CheckInput (the caller's request id aside): with `policy.reads_headers` false, the
        headers may be left out. Returns the decision and, for a remembered allow, its
        Remembered entry."""
        for retry in (True, False):
            try:
                view = self.facts.view()
            except StoreUnavailable:
                return self.decide(make_input()), None  # the same deny, with its logging
            try:
                entry = _holding(view.remembered(key), policy)
                if entry is not None:
                    return entry.decision._replace(decision_id=new_id()), entry
                bounds = _Bounds()
                decision = self._decide(make_input(), None, policy, view, bounds, retry=retry)
                if not decision.allowed or bounds.uses_clock:
                    return decision, None
                entry = Remembered(decision._replace(decision_id=""), policy, bounds.expires)
                view.remember(key, entry)
                return decision, entry
            except StoreMoved:
                continue  # once more, on the newer generation (the second does not raise)
            finally:
                self._end_view()
        raise AssertionError("unreachable: the second attempt does not raise StoreMoved")

    def _end_view(self) -> None:
        """The decision's snapshot ends (Facts.end); a store that cannot say so already
        denied the decision, or will deny the next."""
        try:
            self.facts.end()
        except StoreUnavailable as exc:
            log.warning("ending a decision's read of the store: %s", exc)

    def recall(
        self, key: Hashable, policy: Policy, confirm: bool = False, batch: object = None
    ) -> Remembered | None:
        """The remembered allow for the request `key` stands for under `policy`, while it
        holds as in decide_keyed; else None. The hot path of a door, which answers it
        without building the request or a Decision; a None (not remembered, expired, a
        write since, or a store that cannot be read) is answered by decide_keyed.
        `confirm`: the calling thread never decides (Facts.recall)."""
        return _holding(self.facts.recall(key, confirm, batch), policy)

    def explain(self, request: CheckInput) -> Explanation:
        """Decide, recording the rule, the data sources and every check on the way."""
        policy = self.policy
        trace = Trace()
        try:
            decision = self._decide(request, trace, policy, retry=True)
        except StoreMoved:
            self._end_view()
            trace = Trace()
            decision = self._decide(request, trace, policy)
        finally:
            self._end_view()
        return Explanation(decision, policy, trace)

    def _decide(
        self,
        request: CheckInput,
        trace: Trace | None,
        policy: Policy | None = None,
        view: View | None = None,
        bounds: _Bounds | None = None,
        *,
        retry: bool = False,
    ) -> Decision:
        """Decide. With `retry`, a StoreMoved (the store moved on under the caches this
        decision used, PostgreSQL only) is raised for the caller to decide once more on a
        fresh view; without, it is a STORE_UNAVAILABLE deny like any unreadable store."""
        decision_id = new_id()
        policy = policy or self.policy  # one policy for the whole decision, even across a reload
        principal: Principal | None = None
        rule: RouteRule | None = None
        target = request.target
        attach = isinstance(target, ActionTarget) and target.action == CONNECTOR_ATTACH
        stage = "route"
        try:
            if attach:
                assert isinstance(target, ActionTarget)
                if trace is not None:
                    trace.ok("route", f"{CONNECTOR_ATTACH_RULE}: a built-in action")
                stage = "token"
                if view is None:
                    view = self.facts.view()
                verified = self.link_verifier.verify(view, request.token)
                if verified.principal.sub != verified.principal.client_id:
                    raise TokenError(
                        Reason.TOKEN_CLAIM_INVALID, "a connector's token has sub = client_id"
                    )
                principal = verified.principal
                if bounds is not None:
                    bounds.expires = verified.claims["exp"] + self.verifier.settings.leeway_seconds
                stage = "connector"
                names = self._attach(view, target, principal, trace)
                return Decision(
                    True,
                    Reason.ALLOWED,
                    "allowed",
                    decision_id,
                    principal,
                    CONNECTOR_ATTACH_RULE,
                    CONNECTOR_ATTACH,
                    names,
                    policy.version,
                )
            match, problem = self._route(policy.routes, request)
            rule = match.rule if match else None
            if trace is not None:
                trace.match = match
            if rule is not None and rule.public:
                if trace is not None:
                    trace.ok("route", f"{rule.id} is public: no token needed")
                return Decision(
                    True,
                    Reason.ALLOWED,
                    "public route",
                    decision_id,
                    rule_id=rule.id,
                    action=rule.action,
                    policy_version=policy.version,
                )
            stage = "token"
            if view is None:
                view = self.facts.view()
            verified = self.verifier.verify(view, request.token)
            principal = verified.principal
            if bounds is not None:
                bounds.expires = verified.claims["exp"] + self.verifier.settings.leeway_seconds
            if trace is not None:
                trace.ok("token", f"verified: user {principal.sub}, app {principal.client_id}")
            stage = "principal"
            self._check_principal(view, principal, trace)
            stage = "route"
            if problem is not None:
                raise problem
            assert match is not None and rule is not None
            if trace is not None:
                trace.ok("route", f"{rule.id} (action {rule.action})")
            stage = "scopes"
            self._check_scopes(rule, principal)
            if trace is not None:
                trace.ok("scopes", _scopes_text(rule) or "none required")
            stage = "data sources"
            data_sources = self._check_data_sources(view, rule, match, request, principal, trace)
            if rule.conditions:
                stage = "conditions"
                self._check_conditions(
                    view, rule, match, request, principal, data_sources, trace, bounds
                )
                if trace is not None:
                    trace.ok("conditions", ", ".join(c.id for c in rule.conditions))
            return Decision(
                True,
                Reason.ALLOWED,
                "allowed",
                decision_id,
                principal,
                rule.id,
                rule.action,
                data_sources,
                policy.version,
            )
        except Denied as deny:
            reason, message = deny.reason, deny.message
        except StoreUnavailable as exc:
            if retry and isinstance(exc, StoreMoved):
                raise
            reason, message = Reason.STORE_UNAVAILABLE, "the policy store is unavailable"
            log.error("decision %s: %s", decision_id, exc, extra={"decision_id": decision_id})
        except Exception:
            reason, message = Reason.INTERNAL_ERROR, "internal error"
            log.exception("decision %s failed", decision_id, extra={"decision_id": decision_id})
        if trace is not None:
            trace.checks.append(Check(stage, False, f"{reason.name}: {message}"))
        return Decision(
            False,
            reason,
            message,
            decision_id,
            principal,
            rule.id if rule else CONNECTOR_ATTACH_RULE if attach else "",
            rule.action if rule else CONNECTOR_ATTACH if attach else "",
            (),
            policy.version,
        )

    @staticmethod
    def _route(
        routes: RouteTable, request: CheckInput
    ) -> tuple[Match | None, RequestProblem | None]:
        """The matching rule, or the problem to report once the token has been checked."""
        target = request.target
        try:
            if isinstance(target, HttpTarget):
                if target.method not in _METHODS:
                    raise RequestProblem(Reason.REQUEST_INVALID, "unknown HTTP method")
                match = routes.match(target.method, split_path(target.path))
                if match is None:
                    raise RequestProblem(
                        Reason.NO_ROUTE, f"no route for {target.method} {target.path[:200]}"
                    )
                return match, None
            if isinstance(target, ActionTarget):
                rule = routes.by_action(target.action)
                if rule is None:
                    raise RequestProblem(Reason.NO_ROUTE, f"unknown action {target.action[:80]!r}")
                return Match(rule, {}), None
            raise RequestProblem(Reason.REQUEST_INVALID, "request names neither http nor action")
        except RequestProblem as problem:
            return None, problem

    @staticmethod
    def _check_principal(view: View, p: Principal, trace: Trace | None) -> None:
        """Checks 3 to 5, as introspection asks them too (liveness.py)."""
        denied = principal_denial(view, p)
        if denied is not None:
            raise denied
        if trace is not None:
            trace.ok("token id", f"{p.jti} not revoked")
            trace.ok("app", f"{p.client_id} registered and enabled")
            trace.ok("consent", f"covers {' '.join(p.scopes) or 'no scopes'}")

    @staticmethod
    def _attach(
        view: View, target: ActionTarget, p: Principal, trace: Trace | None
    ) -> tuple[str, ...]:
        """connector.attach, checks 2 to 4: the data sources the connector may serve."""
        if view.token_revoked(p.jti):
            raise TokenError(Reason.TOKEN_REVOKED, "token has been revoked")
        enabled = view.connector_enabled(p.client_id)
        if enabled is None:
            raise Denied(
                Reason.CONNECTOR_UNKNOWN, f"connector {p.client_id[:80]!r} is not registered"
            )
        if not enabled:
            raise Denied(Reason.CONNECTOR_DISABLED, f"connector {p.client_id!r} is disabled")
        if trace is not None:
            trace.ok("token id", f"{p.jti} not revoked")
            trace.ok("connector", f"{p.client_id} registered and enabled")
        names = tuple(dict.fromkeys(target.data_sources))
        if trace is not None:
            trace.data_sources.extend((name, "action") for name in target.data_sources)
        if not names or not all(names):
            raise Denied(Reason.REQUEST_INVALID, f"{CONNECTOR_ATTACH} needs the data sources")
        for name in names:
            served = view.served_by(name)
            if served is None or served[0] != p.client_id:
                raise Denied(
                    Reason.DATA_SOURCE_NOT_OWNED,
                    f"data source {name[:80]!r} is not served by connector {p.client_id!r}",
                )
            if trace is not None:
                trace.ok(f"data source {name}", f"served by {p.client_id}")
        return names

    @staticmethod
    def _check_scopes(rule: RouteRule, p: Principal) -> None:
        have = p.scopes
        missing = [s for s in rule.scopes_all if s not in have]
        if missing:
            raise Denied(Reason.SCOPE_MISSING, f"requires scope {' '.join(sorted(missing))}")
        if rule.scopes_any and not any(s in have for s in rule.scopes_any):
            raise Denied(
                Reason.SCOPE_MISSING,
                f"requires one of the scopes {' '.join(sorted(rule.scopes_any))}",
            )

    def _check_data_sources(
        self,
        view: View,
        rule: RouteRule,
        match: Match,
        request: CheckInput,
        p: Principal,
        trace: Trace | None,
    ) -> tuple[str, ...]:
        need = rule.access
        if need is None:
            return ()
        if rule.lists_granted:
            listed = view.granted(p.sub, p.client_id, need)
            if trace is not None:
                trace.ok("data sources", f"lists those granted: {', '.join(listed) or 'none'}")
            return listed
        target = request.target
        if isinstance(target, HttpTarget):
            found = extract_with_sources(
                rule, match.params, target.query, target.body, self.settings.max_body_bytes
            )
            names = tuple(dict.fromkeys(name for name, _ref in found))
            if trace is not None:
                trace.data_sources.extend(found)
        else:
            assert isinstance(target, ActionTarget)
            names = tuple(dict.fromkeys(target.data_sources))
            if trace is not None:
                trace.data_sources.extend((name, "action") for name in target.data_sources)
            if not names or not all(names):
                raise Denied(
                    Reason.REQUEST_INVALID,
                    f"action {rule.action} needs the data sources it touches",
                )
        for name in names:
            granted = view.grant(p.sub, p.client_id, name)
            if granted is None:
                raise Denied(
                    Reason.DATA_SOURCE_NOT_GRANTED,
                    f"data source {name[:80]!r} is not granted to this app",
                )
            if granted < need:
                raise Denied(
                    Reason.DATA_SOURCE_ACCESS_INSUFFICIENT,
                    f"data source {name!r} is granted for {granted.label}, not {need.label}",
                )
            own = view.user_access(p.sub, name)
            if own is None or own < need:
                raise Denied(
                    Reason.USER_ACCESS_MISSING, f"the user has no {need.label} access to {name!r}"
                )
            if trace is not None:
                trace.ok(
                    f"data source {name}",
                    f"granted {granted.label}, the user has {own.label}; needs {need.label}",
                )
        return names

    def _check_conditions(
        self,
        view: View,
        rule: RouteRule,
        match: Match,
        request: CheckInput,
        p: Principal,
        names: tuple[str, ...],
        trace: Trace | None,
        bounds: _Bounds | None = None,
    ) -> None:
        """The rule's conditions over CEL values of only the variables they use."""
        used: set[str] = set()
        for c in rule.conditions:
            used |= c.program.variables
        variables: dict[str, Any] = {}
        if "request" in used:
            variables["request"] = cond.request_value(request, match.params, names)
        if "principal" in used:
            variables["principal"] = cond.principal_value(p)
        if "rule" in used:
            variables["rule"] = cond.rule_value(rule.id, rule.action, rule.access)
        if "now" in used:
            variables["now"] = cond.now_value(self.clock())
            if bounds is not None:
                bounds.uses_clock = True

        def data_source(name: str) -> Callable[[], Any]:
            granted = view.grant(p.sub, p.client_id, name)
            # Built once per store generation: making CEL values costs more than using them.
            key = f"cel-data-source\0{name}\0{granted.label if granted else ''}"
            return lambda: view.derived(
                key,
                lambda: cond.data_source_value(name, view.data_source_labels(name), granted),
            )

        steps = trace.conditions if trace is not None else None
        cond.evaluate(rule.conditions, variables, [(n, data_source(n)) for n in names], steps)


def _scopes_text(rule: RouteRule) -> str:
    parts = []
    if rule.scopes_all:
        parts.append("has " + " ".join(sorted(rule.scopes_all)))
    if rule.scopes_any:
        parts.append("has one of " + " ".join(sorted(rule.scopes_any)))
    return "; ".join(parts)
