"""Token introspection and the hub's decisions give one answer (liveness.py, facts.View).

For each kind of revocation, a token that was active and allowed is introspected (RFC 7662,
the real authorization server over a socket) and checked by the engine: introspection says
`active` exactly when the engine lets the token's principal through, and lists a data
source, at a level, exactly when the engine allows reading it (and writing it, at `write`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from policyd.core.model import Access, CheckInput, Decision, HttpTarget
from policyd.core.reasons import Reason
from policyd.decision.engine import Engine
from policyd.decision.wiring import build_engine
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.helpers import Home
from tests.oauth_support import Browser, Flow, exchange, oauth_home, refresh, running

SOURCES = ("ds-a", "ds-b", "ds-c")
SCOPES = ("UserInfo", "DataRead", "DataWrite")


@dataclass
class Hub:
    home: Home
    secret: str
    base: str
    engine: Engine

    def introspect(self, token: str) -> dict[str, Any]:
        reply = httpx.post(
            self.base + "/introspect",
            data={"token": token},
            auth=("app1", self.secret),
            timeout=10,
        )
        result: dict[str, Any] = reply.json()
        return result

    def check(self, token: str, method: str, path: str) -> Decision:
        return self.engine.decide(CheckInput(token, HttpTarget(method, path), "liveness"))


@pytest.fixture
def hub(tmp_path: Path, store_url: str) -> Iterator[Hub]:
    home, secret = oauth_home(tmp_path, store_url)
    with running(home) as base:
        # The hub's engine as a server holds it: on PostgreSQL, a replica's.
        yield Hub(home, secret, base, build_engine(home.config, home.store, serving=True))


def _both_faces(hub: Hub, token: str) -> tuple[dict[str, Any], dict[str, Decision]]:
    """Introspection's answer and the engine's decisions, asserting that they agree."""
    info = hub.introspect(token)
    decisions = {"me": hub.check(token, "GET", "/api/user/me")}
    listed = hub.check(token, "GET", "/api/data/datasources")
    for ds in SOURCES:
        decisions[f"read {ds}"] = hub.check(token, "GET", f"/api/data/tags/{ds}")
        decisions[f"write {ds}"] = hub.check(token, "PUT", f"/api/data/v2/snapshot/{ds}")
    active = info.get("active") is True
    assert active == decisions["me"].allowed, (info, decisions["me"])
    shared = {d["name"]: d["access"] for d in info.get("data_sources", [])} if active else {}
    for ds in SOURCES:
        read, write = decisions[f"read {ds}"].allowed, decisions[f"write {ds}"].allowed
        assert (ds in shared) == read, (ds, info, decisions[f"read {ds}"])
        assert (shared.get(ds) == "write") == write, (ds, info, decisions[f"write {ds}"])
    # The engine's own list of granted data sources (a `dataSources: granted` rule).
    assert listed.data_sources == (tuple(shared) if listed.allowed else ())
    return info, decisions


def _revoke_token(hub: Hub, token: str) -> None:
    verified = hub.engine.verifier.verify(hub.engine.facts.view(), token)
    hub.home.store.revoke_token(verified.principal.jti, verified.claims["exp"])


def _retire_key(hub: Hub, _token: str) -> None:
    old = hub.home.keyring.ensure_active()
    hub.home.keyring.rotate()
    hub.home.keyring.retire(old)


# Each kind of revocation: how it is made, the engine's reason for /api/user/me after it,
# and the reasons of the data-source decisions it changes while the principal stays live.
Revocation = Callable[[Hub, str], object]
CASES: dict[str, tuple[Revocation, Reason, dict[str, Reason]]] = {
    "grant revoked": (
        lambda h, _t: h.home.store.revoke_grant("alice", "app1", "ds-b"),
        Reason.ALLOWED,
        {"read ds-b": Reason.DATA_SOURCE_NOT_GRANTED},
    ),
    "grant lowered to read": (
        lambda h, _t: h.home.store.add_grant("alice", "app1", "ds-a", Access.READ),
        Reason.ALLOWED,
        {"read ds-a": Reason.ALLOWED, "write ds-a": Reason.DATA_SOURCE_ACCESS_INSUFFICIENT},
    ),
    "user's own access removed": (
        lambda h, _t: h.home.store.remove_user_access("alice", "ds-b"),
        Reason.ALLOWED,
        {"read ds-b": Reason.USER_ACCESS_MISSING},
    ),
    "user's own access lowered to read": (
        lambda h, _t: h.home.store.set_user_access("alice", "ds-a", Access.READ),
        Reason.ALLOWED,
        {"read ds-a": Reason.ALLOWED, "write ds-a": Reason.USER_ACCESS_MISSING},
    ),
    "consent revoked (disconnect)": (
        lambda h, _t: h.home.store.disconnect("alice", "app1"),
        Reason.CONSENT_MISSING,
        {},
    ),
    "consent narrowed": (
        lambda h, _t: h.home.store.set_consent("alice", "app1", ["UserInfo", "DataRead"]),
        Reason.CONSENT_INSUFFICIENT,
        {},
    ),
    "token id revoked": (_revoke_token, Reason.TOKEN_REVOKED, {}),
    "app disabled": (
        lambda h, _t: h.home.store.set_app_enabled("app1", False),
        Reason.APP_DISABLED,
        {},
    ),
    "signing key retired": (_retire_key, Reason.TOKEN_KEY_UNKNOWN, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_introspection_is_inactive_or_omits_a_source_exactly_when_the_engine_denies(
    hub: Hub, case: str
) -> None:
    revoke, reason, source_reasons = CASES[case]
    token = hub.home.token(scopes=SCOPES)
    info, decisions = _both_faces(hub, token)
    assert info["active"] is True
    assert info["data_sources"] == [
        {"name": "ds-a", "access": "write"},
        {"name": "ds-b", "access": "read"},
    ]

    revoke(hub, token)

    info, decisions = _both_faces(hub, token)
    assert decisions["me"].reason == reason, decisions["me"]
    for check, expected in source_reasons.items():
        assert decisions[check].reason == expected, (check, decisions[check])
    if reason != Reason.ALLOWED:
        assert info.get("active") is not True
        assert not any(d.allowed for d in decisions.values())


def test_a_refresh_token_introspects_inactive_once_the_refresh_grant_would_refuse_it(
    hub: Hub,
) -> None:
    """A narrowed consent leaves the family live; the refresh grant refuses a refresh
    token whose scopes the consent no longer covers, and introspection says so too."""
    browser = Browser(hub.base)
    try:
        assert browser.sign_in().status_code == 303
        flow = Flow(scope="UserInfo DataRead")
        code = browser.authorize(flow, data_sources=("ds-a",))["code"]
    finally:
        browser.close()
    tokens = exchange(hub.base, code, flow, secret=hub.secret).json()
    assert hub.introspect(tokens["refresh_token"])["active"] is True

    hub.home.store.set_consent("alice", "app1", ["UserInfo"])

    assert hub.introspect(tokens["refresh_token"]) == {"active": False}
    assert hub.introspect(tokens["access_token"]) == {"active": False}
    reply = refresh(hub.base, "app1", tokens["refresh_token"], hub.secret)
    assert (reply.status_code, reply.json()["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(("past_exp", "active"), [(10.0, True), (40.0, False)])
def test_introspection_calls_a_token_expired_when_the_hub_does(
    hub: Hub, past_exp: float, active: bool
) -> None:
    """The engine accepts a token until exp plus the verifier's leeway (30 s); introspection
    used exp alone, and said inactive while the hub still let the token in."""
    leeway = hub.home.config.tokens.leeway_seconds
    assert 10.0 < leeway < 40.0
    ttl = 60
    token = hub.home.token(client_id="app1", ttl_seconds=ttl, now=time.time() - ttl - past_exp)
    info = hub.introspect(token)
    decision = hub.check(token, "GET", "/api/user/me")
    assert (info["active"], decision.allowed) == (active, active), (info, decision)
    if not active:
        assert decision.reason is Reason.TOKEN_EXPIRED
