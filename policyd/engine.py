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
    and still accessible to the user at that level.

Any exception is a deny: STORE_UNAVAILABLE when the store cannot be read, INTERNAL_ERROR
otherwise. Nothing here raises to the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from policyd.errors import StoreUnavailable
from policyd.facts import Facts, View
from policyd.ids import new_id
from policyd.model import ActionTarget, CheckInput, Decision, HttpTarget, Principal
from policyd.reasons import Reason
from policyd.routes import (
    Match,
    RequestProblem,
    RouteRule,
    RouteTable,
    extract_data_sources,
    split_path,
)
from policyd.tokens import TokenError, Verifier

log = logging.getLogger(__name__)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class EngineSettings:
    max_body_bytes: int = 1 << 20


class _Deny(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Engine:
    def __init__(
        self,
        facts: Facts,
        verifier: Verifier,
        routes: RouteTable,
        settings: EngineSettings | None = None,
    ) -> None:
        self.facts = facts
        self.verifier = verifier
        self.routes = routes
        self.settings = settings or EngineSettings()

    def decide(self, request: CheckInput) -> Decision:
        decision_id = new_id()
        routes = self.routes  # one table for the whole decision, even across a reload
        principal: Principal | None = None
        rule: RouteRule | None = None
        try:
            match, problem = self._route(routes, request)
            rule = match.rule if match else None
            if rule is not None and rule.public:
                return Decision(
                    True,
                    Reason.ALLOWED,
                    "public route",
                    decision_id,
                    rule_id=rule.id,
                    action=rule.action,
                    policy_version=routes.version,
                )
            view = self.facts.view()
            principal = self.verifier.verify(view, request.token).principal
            self._check_principal(view, principal)
            if problem is not None:
                raise _Deny(problem.reason, problem.message)
            assert match is not None and rule is not None
            self._check_scopes(rule, principal)
            data_sources = self._check_data_sources(view, rule, match, request, principal)
            return Decision(
                True,
                Reason.ALLOWED,
                "allowed",
                decision_id,
                principal,
                rule.id,
                rule.action,
                data_sources,
                routes.version,
            )
        except (_Deny, TokenError, RequestProblem) as deny:
            reason, message = deny.reason, deny.message
        except StoreUnavailable as exc:
            reason, message = Reason.STORE_UNAVAILABLE, "the policy store is unavailable"
            log.error("decision %s: %s", decision_id, exc)
        except Exception:
            reason, message = Reason.INTERNAL_ERROR, "internal error"
            log.exception("decision %s failed", decision_id)
        return Decision(
            False,
            reason,
            message,
            decision_id,
            principal,
            rule.id if rule else "",
            rule.action if rule else "",
            (),
            routes.version,
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
    def _check_principal(view: View, p: Principal) -> None:
        if view.token_revoked(p.jti):
            raise _Deny(Reason.TOKEN_REVOKED, "token has been revoked")
        app = view.app(p.client_id)
        if app is None:
            raise _Deny(Reason.APP_UNKNOWN, f"app {p.client_id[:80]!r} is not registered")
        if not app.enabled:
            raise _Deny(Reason.APP_DISABLED, f"app {p.client_id!r} is disabled")
        consent = view.consent(p.sub, p.client_id)
        if consent is None:
            raise _Deny(Reason.CONSENT_MISSING, "the user has not consented to this app")
        missing = [s for s in p.scopes if s not in consent]
        if missing:
            raise _Deny(
                Reason.CONSENT_INSUFFICIENT,
                f"the user's consent does not cover {' '.join(missing)[:200]}",
            )

    @staticmethod
    def _check_scopes(rule: RouteRule, p: Principal) -> None:
        have = p.scopes
        missing = [s for s in rule.scopes_all if s not in have]
        if missing:
            raise _Deny(Reason.SCOPE_MISSING, f"requires scope {' '.join(sorted(missing))}")
        if rule.scopes_any and not any(s in have for s in rule.scopes_any):
            raise _Deny(
                Reason.SCOPE_MISSING,
                f"requires one of the scopes {' '.join(sorted(rule.scopes_any))}",
            )

    def _check_data_sources(
        self, view: View, rule: RouteRule, match: Match, request: CheckInput, p: Principal
    ) -> tuple[str, ...]:
        need = rule.access
        if need is None:
            return ()
        if rule.lists_granted:
            return view.granted(p.sub, p.client_id, need)
        target = request.target
        if isinstance(target, HttpTarget):
            names = extract_data_sources(
                rule, match.params, target.query, target.body, self.settings.max_body_bytes
            )
        else:
            assert isinstance(target, ActionTarget)
            names = tuple(dict.fromkeys(target.data_sources))
            if not names or not all(names):
                raise _Deny(
                    Reason.REQUEST_INVALID,
                    f"action {rule.action} needs the data sources it touches",
                )
        for name in names:
            granted = view.grant(p.sub, p.client_id, name)
            if granted is None:
                raise _Deny(
                    Reason.DATA_SOURCE_NOT_GRANTED,
                    f"data source {name[:80]!r} is not granted to this app",
                )
            if granted < need:
                raise _Deny(
                    Reason.DATA_SOURCE_ACCESS_INSUFFICIENT,
                    f"data source {name!r} is granted for {granted.label}, not {need.label}",
                )
            own = view.user_access(p.sub, name)
            if own is None or own < need:
                raise _Deny(
                    Reason.USER_ACCESS_MISSING, f"the user has no {need.label} access to {name!r}"
                )
        return names
