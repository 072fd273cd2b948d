"""The authorization server's protocol: RFC 6749 code flow with PKCE (RFC 7636), refresh
rotation, RFC 7009 revocation, RFC 7662 introspection, RFC 8414 metadata; every error
branch. Real uvicorn over a socket; the user agent is httpx (the browser test drives pages)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import pytest
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from policyd.core.model import CONNECTOR_ATTACH, ActionTarget, CheckInput, HttpTarget
from policyd.core.reasons import Reason
from policyd.decision.tokens import Verifier
from policyd.decision.wiring import build_engine, token_settings
from policyd.oauth.storage import CodeState, OAuthStorage
from policyd.store.open import facts_for
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.conftest import new_database
from tests.helpers import Home, dump_store
from tests.oauth_support import (
    PUBLIC_REDIRECT,
    Browser,
    Flow,
    exchange,
    oauth_home,
    query_of,
    refresh,
    running,
)


class AS:
    def __init__(self, home: Home, secret: str, base: str) -> None:
        self.home = home
        self.secret = secret
        self.base = base
        self.browser = Browser(base)
        assert self.browser.sign_in().status_code == 303

    def code(self, flow: Flow, data_sources: tuple[str, ...] = ("ds-a",)) -> str:
        return self.browser.authorize(flow, data_sources=data_sources)["code"]

    def tokens(self, flow: Flow | None = None) -> tuple[Flow, dict[str, Any]]:
        flow = flow or Flow()
        reply = exchange(self.base, self.code(flow), flow, secret=self.secret)
        assert reply.status_code == 200, reply.text
        return flow, reply.json()

    def revoked(self, access_token: str) -> bool:
        claims = (
            Verifier(token_settings(self.home.config))
            .verify(facts_for(self.home.store).view(), access_token)
            .claims
        )
        with self.home.store.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM revoked_tokens WHERE jti = ?", (claims["jti"],)
            ).fetchone()
        return row is not None

    def post(self, path: str, data: dict[str, str], secret: str | None = None) -> httpx.Response:
        auth = ("app1", self.secret if secret is None else secret)
        return httpx.post(self.base + path, data=data, auth=auth, timeout=10)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, store_backend: str
) -> Iterator[AS]:
    url = new_database(request, store_backend)
    home, secret = oauth_home(tmp_path_factory.mktemp("oauth"), store_url=url)
    with running(home) as base:
        a = AS(home, secret, base)
        yield a
        a.browser.close()


def _error(reply: httpx.Response, status: int, error: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.json()["error"] == error
    assert reply.headers["cache-control"] == "no-store"


# -- metadata and keys ---------------------------------------------------------------------


def test_metadata_is_valid_rfc8414_and_names_this_issuer(server: AS) -> None:
    reply = httpx.get(server.base + "/.well-known/oauth-authorization-server")
    assert reply.status_code == 200
    meta = AuthorizationServerMetadata(reply.json())
    meta.validate()
    assert meta["issuer"] == server.home.config.tokens.issuer == server.base
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["token_endpoint"] == server.base + "/token"


def test_jwks_serves_the_key_that_signs_access_tokens(server: AS) -> None:
    _, tokens = server.tokens()
    keys = httpx.get(server.base + "/jwks.json").json()["keys"]
    kid = __import__("jwt").get_unverified_header(tokens["access_token"])["kid"]
    assert kid in {k["kid"] for k in keys}


# -- the code flow -------------------------------------------------------------------------


def test_code_exchange_gives_an_rfc9068_token_the_decision_core_accepts(server: AS) -> None:
    asked = time.time()
    _flow, tokens = server.tokens(Flow(scope="UserInfo DataRead"))
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] in (3599, 3600)  # whole seconds left, rounded down
    assert tokens["scope"] == "UserInfo DataRead"
    assert tokens["refresh_token"]
    verified = Verifier(token_settings(server.home.config)).verify(
        facts_for(server.home.store).view(), tokens["access_token"]
    )
    assert verified.claims["sub"] == "alice"
    assert verified.claims["client_id"] == "app1"
    assert verified.claims["exp"] - verified.claims["iat"] == 3600
    # The token lives at least as long as expires_in says, counted from the request.
    assert asked + tokens["expires_in"] <= verified.claims["exp"]


def test_client_secret_post_authenticates_a_confidential_app(server: AS) -> None:
    flow = Flow()
    reply = exchange(
        server.base, server.code(flow), flow, client_id="app1", client_secret=server.secret
    )
    assert reply.status_code == 200, reply.text


def test_public_app_authenticates_with_pkce_alone(server: AS) -> None:
    flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT)
    reply = exchange(server.base, server.code(flow), flow)
    assert reply.status_code == 200, reply.text


def test_missing_code_verifier_is_invalid_request(server: AS) -> None:
    flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT)
    _error(exchange(server.base, server.code(flow), flow, verifier=""), 400, "invalid_request")


def test_wrong_code_verifier_is_invalid_grant(server: AS) -> None:
    flow = Flow()
    code = server.code(flow)
    wrong = Flow().verifier
    _error(
        exchange(server.base, code, flow, secret=server.secret, verifier=wrong),
        400,
        "invalid_grant",
    )


def test_authorization_request_without_pkce_is_refused_by_redirect(server: AS) -> None:
    flow = Flow()
    for overrides in (
        {"code_challenge": None, "code_challenge_method": None},
        {"code_challenge_method": "plain"},
        {"code_challenge_method": None},
    ):
        reply = server.browser.consent_page(flow, **overrides)
        assert reply.status_code == 302
        query = query_of(reply.headers["location"])
        assert reply.headers["location"].startswith(flow.redirect_uri)
        assert (query["error"], query["state"]) == ("invalid_request", flow.state)


def test_unknown_client_or_unregistered_redirect_uri_gets_an_error_page_not_a_redirect(
    server: AS,
) -> None:
    flow = Flow()
    for overrides in (
        {"client_id": "nobody"},
        {"redirect_uri": "https://evil.test/cb"},
        {"redirect_uri": "https://app1.test/cb/"},
        {"redirect_uri": None},
    ):
        reply = server.browser.consent_page(flow, **overrides)
        assert reply.status_code == 400
        assert "location" not in reply.headers
        assert "cannot connect" in reply.text


def test_unsupported_response_type_is_redirected_with_its_error(server: AS) -> None:
    reply = server.browser.consent_page(Flow(), response_type="token")
    assert reply.status_code == 302
    assert query_of(reply.headers["location"])["error"] == "unsupported_response_type"


def test_scopes_the_app_is_not_registered_for_are_never_offered(server: AS) -> None:
    flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT, scope="UserInfo DataWrite")
    page = server.browser.consent_page(flow)
    assert 'value="UserInfo"' in page.text
    assert 'value="DataWrite"' not in page.text
    assert "Write tag values" not in page.text
    only_unregistered = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT, scope="DataWrite")
    reply = server.browser.consent_page(only_unregistered)
    assert query_of(reply.headers["location"])["error"] == "invalid_scope"
    unknown = server.browser.consent_page(Flow(scope="UserInfo Nonsense"))
    assert query_of(unknown.headers["location"])["error"] == "invalid_scope"


def test_denying_consent_redirects_access_denied_with_state(server: AS) -> None:
    query = server.browser.authorize(Flow(), decision="deny")
    assert (query["error"], query["state"]) == ("access_denied", "st-123")
    assert "code" not in query


def test_redirect_uri_differing_at_the_token_endpoint_is_invalid_grant(server: AS) -> None:
    flow = Flow()
    code = server.code(flow)
    _error(
        exchange(server.base, code, flow, secret=server.secret, redirect_uri="https://x.test/cb"),
        400,
        "invalid_grant",
    )


def test_replayed_code_is_refused_and_revokes_the_tokens_issued_from_it(server: AS) -> None:
    flow = Flow()
    code = server.code(flow)
    first = exchange(server.base, code, flow, secret=server.secret)
    assert first.status_code == 200
    tokens = first.json()
    _error(exchange(server.base, code, flow, secret=server.secret), 400, "invalid_grant")
    assert server.revoked(tokens["access_token"])
    _error(
        refresh(server.base, "app1", tokens["refresh_token"], server.secret), 400, "invalid_grant"
    )


def test_a_code_redeemed_from_many_threads_at_once_leaves_no_token_active(server: AS) -> None:
    """RFC 6749 section 4.1.2 and the Security BCP: every token issued from a replayed code
    is revoked. A replay that lands between the first redemption's claim of the code and the
    save of its tokens used to leave that access token live until it expired."""
    engine = build_engine(server.home.config, server.home.store)
    attempts, rounds = 8, 12
    redeemed = 0
    for r in range(rounds + 1):
        flow = Flow()
        code = server.code(flow)
        start = threading.Barrier(attempts)
        # The last round's replays wait for the first redemption's answer: a token is issued
        # and then revoked by them, so the checks below run whatever the machine's speed
        # (on a busy one, every replay of the racing rounds may land inside the issuing).
        first_answered = threading.Event()
        if r < rounds:
            first_answered.set()

        def redeem(
            n: int,
            code: str = code,
            flow: Flow = flow,
            start: threading.Barrier = start,
            first_answered: threading.Event = first_answered,
            spread: float = 0.0003 * (1 + r),
        ) -> httpx.Response:
            start.wait(10)
            if n == 0:
                try:
                    return exchange(server.base, code, flow, secret=server.secret)
                finally:
                    first_answered.set()
            first_answered.wait(10)
            # Replays spread over the first redemption's issuing, wider each round.
            time.sleep(n * spread)
            return exchange(server.base, code, flow, secret=server.secret)

        with ThreadPoolExecutor(attempts) as pool:
            replies = list(pool.map(redeem, range(attempts)))
        issued = [r.json()["access_token"] for r in replies if r.status_code == 200]
        assert len(issued) <= 1, [r.text for r in replies]
        redeemed += len(issued)
        for reply in replies:
            if reply.status_code != 200:
                _error(reply, 400, "invalid_grant")
        # The others were replays: nothing issued from the code is active, anywhere.
        for token in issued:
            assert server.post("/introspect", {"token": token}).json() == {"active": False}
            decision = engine.decide(
                CheckInput(token, HttpTarget("GET", "/api/user/me"), "replay", "test")
            )
            assert (decision.allowed, decision.reason) == (False, Reason.TOKEN_REVOKED)
    # Not vacuous: some codes were redeemed (at least the last round's, alone at first).
    assert redeemed > 0


def test_a_replay_between_a_codes_claim_and_the_save_of_its_tokens_kills_them(
    server: AS,
) -> None:
    """The interleaving the concurrent test above can only hit by chance, made exact: the
    first redemption claimed the code, a replay revoked the family, and only then does the
    first redemption save the access token it signed. The save must refuse (the token is
    never handed out) and the token id must be revoked all the same."""
    home = server.home
    storage = OAuthStorage(home.store)
    code = "code-" + secrets.token_hex(8)
    family = storage.save_code(
        code,
        client_id="app1",
        user_id="alice",
        redirect_uri=Flow().redirect_uri,
        scopes=["UserInfo", "DataRead"],
        data_sources=["ds-a"],
        code_challenge="x",
        code_challenge_method="S256",
        ttl_seconds=60,
    )
    assert storage.claim_code(code, "app1")[0] == CodeState.OK
    assert storage.claim_code(code, "app1")[0] == CodeState.REPLAYED
    token = home.token(client_id="app1")
    claims = jwt.decode(token, options={"verify_signature": False})
    saved = storage.save_tokens(
        family,
        jti=claims["jti"],
        access_expires_at=claims["exp"],
        refresh_token="refresh-" + secrets.token_hex(8),
        scopes=["UserInfo", "DataRead"],
        refresh_ttl_seconds=3600,
    )
    assert saved is False
    decision = build_engine(home.config, home.store).decide(
        CheckInput(token, HttpTarget("GET", "/api/user/me"), "replay", "test")
    )
    assert (decision.allowed, decision.reason) == (False, Reason.TOKEN_REVOKED)


def test_expired_code_is_invalid_grant(server: AS) -> None:
    flow = Flow()
    code = server.code(flow)
    with server.home.store.write() as conn:
        conn.execute("UPDATE oauth_codes SET expires_at = ? WHERE used_at IS NULL", (time.time(),))
    _error(exchange(server.base, code, flow, secret=server.secret), 400, "invalid_grant")


def test_codes_live_sixty_seconds_by_default(server: AS) -> None:
    server.code(Flow())
    with server.home.store.read() as conn:
        row = conn.execute(
            "SELECT expires_at - created_at FROM oauth_codes ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
    assert row[0] == pytest.approx(60)


def test_codes_and_refresh_tokens_are_stored_only_hashed(server: AS) -> None:
    flow = Flow()
    code = server.code(flow)
    tokens = exchange(server.base, code, flow, secret=server.secret).json()
    dump = dump_store(server.home.store)
    assert code not in dump
    assert tokens["refresh_token"] not in dump


def test_bad_client_secret_is_invalid_client(server: AS) -> None:
    flow = Flow()
    code = server.code(flow)
    reply = exchange(server.base, code, flow, secret="wrong-secret")
    _error(reply, 401, "invalid_client")
    assert reply.headers["www-authenticate"].startswith("Basic")
    posted = exchange(server.base, code, flow, client_id="app1", client_secret="wrong")
    assert posted.json()["error"] == "invalid_client"


def test_confidential_app_cannot_skip_its_secret(server: AS) -> None:
    flow = Flow()
    reply = exchange(server.base, server.code(flow), flow)  # client_id + PKCE only
    assert reply.json()["error"] == "invalid_client"


def test_unsupported_grant_type(server: AS) -> None:
    reply = server.post("/token", {"grant_type": "password", "username": "a", "password": "b"})
    _error(reply, 400, "unsupported_grant_type")


def test_missing_or_repeated_parameters_are_invalid_request(server: AS) -> None:
    _error(server.post("/token", {"code": "x"}), 400, "invalid_request")
    repeated = httpx.post(
        server.base + "/token",
        content="grant_type=refresh_token&grant_type=authorization_code",
        headers={"content-type": "application/x-www-form-urlencoded"},
        auth=("app1", server.secret),
    )
    _error(repeated, 400, "invalid_request")


# -- refresh tokens ------------------------------------------------------------------------


def test_refresh_rotates_and_reuse_of_the_old_token_revokes_the_family(server: AS) -> None:
    _, first = server.tokens()
    second = refresh(server.base, "app1", first["refresh_token"], server.secret)
    assert second.status_code == 200, second.text
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["scope"] == first["scope"]
    # The old one again: refused, and everything of the family is revoked.
    _error(
        refresh(server.base, "app1", first["refresh_token"], server.secret), 400, "invalid_grant"
    )
    _error(
        refresh(server.base, "app1", rotated["refresh_token"], server.secret), 400, "invalid_grant"
    )
    assert server.revoked(first["access_token"])
    assert server.revoked(rotated["access_token"])


def test_refresh_may_narrow_but_not_widen_the_scope(server: AS) -> None:
    _, tokens = server.tokens(Flow(scope="UserInfo DataRead"))
    data = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    wider = server.post("/token", {**data, "scope": "UserInfo DataWrite"})
    _error(wider, 400, "invalid_scope")
    narrower = server.post("/token", {**data, "scope": "UserInfo"})
    assert narrower.json()["scope"] == "UserInfo"


def test_refresh_token_of_another_app_is_invalid_grant(server: AS) -> None:
    flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT)
    tokens = exchange(server.base, server.code(flow), flow).json()
    _error(
        refresh(server.base, "app1", tokens["refresh_token"], server.secret), 400, "invalid_grant"
    )


# -- RFC 7009 revocation -------------------------------------------------------------------


def test_revoking_an_unknown_token_answers_200(server: AS) -> None:
    for token in ("nonsense", "a.b.c", "x" * 50):
        reply = server.post("/revoke", {"token": token})
        assert reply.status_code == 200
        assert reply.json() == {}


def test_revocation_needs_client_authentication(server: AS) -> None:
    _error(server.post("/revoke", {"token": "x"}, secret="wrong"), 401, "invalid_client")


def test_revoking_an_access_token_denies_it(server: AS) -> None:
    _, tokens = server.tokens()
    reply = server.post(
        "/revoke", {"token": tokens["access_token"], "token_type_hint": "access_token"}
    )
    assert reply.status_code == 200
    assert server.revoked(tokens["access_token"])


def test_revoking_a_refresh_token_revokes_its_family(server: AS) -> None:
    _, tokens = server.tokens()
    assert server.post("/revoke", {"token": tokens["refresh_token"]}).status_code == 200
    assert server.revoked(tokens["access_token"])
    _error(
        refresh(server.base, "app1", tokens["refresh_token"], server.secret), 400, "invalid_grant"
    )


def test_public_app_revokes_its_own_token_without_a_secret(server: AS) -> None:
    flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT)
    tokens = exchange(server.base, server.code(flow), flow).json()
    reply = httpx.post(
        server.base + "/revoke", data={"token": tokens["refresh_token"], "client_id": "pub"}
    )
    assert reply.status_code == 200
    _error(refresh(server.base, "pub", tokens["refresh_token"]), 400, "invalid_grant")


# -- RFC 7662 introspection ----------------------------------------------------------------


def test_introspection_reports_the_token_and_the_live_granted_data_sources(server: AS) -> None:
    flow = Flow(scope="UserInfo DataRead")
    code = server.browser.authorize(flow, data_sources=("ds-a", "ds-b"))["code"]
    tokens = exchange(server.base, code, flow, secret=server.secret).json()
    info = server.post("/introspect", {"token": tokens["access_token"]}).json()
    assert info["active"] is True
    assert (info["sub"], info["client_id"], info["scope"]) == ("alice", "app1", "UserInfo DataRead")
    assert info["token_type"] == "Bearer"
    assert info["data_sources"] == [
        {"name": "ds-a", "access": "read"},
        {"name": "ds-b", "access": "read"},
    ]
    server.home.store.revoke_grant("alice", "app1", "ds-b")
    again = server.post("/introspect", {"token": tokens["refresh_token"]}).json()
    assert again["active"] is True
    assert again["data_sources"] == [{"name": "ds-a", "access": "read"}]


def test_introspection_of_revoked_expired_and_unknown_tokens_is_inactive(server: AS) -> None:
    _, tokens = server.tokens()
    server.post("/revoke", {"token": tokens["access_token"]})
    assert server.post("/introspect", {"token": tokens["access_token"]}).json() == {"active": False}
    expired = server.home.token(client_id="app1", now=time.time() - 7200)
    assert server.post("/introspect", {"token": expired}).json() == {"active": False}
    assert server.post("/introspect", {"token": "unknown"}).json() == {"active": False}
    _, other = server.tokens()
    server.post("/revoke", {"token": other["refresh_token"]})
    assert server.post("/introspect", {"token": other["refresh_token"]}).json() == {"active": False}


def test_introspection_of_another_apps_token_is_inactive(server: AS) -> None:
    flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT)
    tokens = exchange(server.base, server.code(flow), flow).json()
    assert server.post("/introspect", {"token": tokens["access_token"]}).json() == {"active": False}


def test_introspection_needs_a_confidential_client(server: AS) -> None:
    reply = httpx.post(server.base + "/introspect", data={"token": "x", "client_id": "pub"})
    assert reply.json()["error"] == "invalid_client"


def test_tokens_never_reach_the_log(server: AS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    flow = Flow()
    code = server.code(flow)
    tokens = exchange(server.base, code, flow, secret=server.secret).json()
    refresh(server.base, "app1", tokens["refresh_token"], server.secret)
    servers = ("policyd", "authlib", "uvicorn", "starlette")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(servers))
    assert "authorization granted for app app1 by user alice" in text
    for secret in (code, tokens["access_token"], tokens["refresh_token"], server.secret):
        assert secret not in text


def test_cli_consent_revoke_also_refuses_the_apps_refresh_token(
    tmp_path_factory: pytest.TempPathFactory, store_url: str
) -> None:
    home, secret = oauth_home(tmp_path_factory.mktemp("oauth-cli"), store_url)
    with running(home) as base:
        a = AS(home, secret, base)
        try:
            _, tokens = a.tokens()
            result = home.cli("consents", "revoke", "alice", "app1")
            assert result.returncode == 0, result.stderr
            assert "and 1 refresh-token family" in result.stdout
            # Like Disconnect on the Connected apps page: nothing of the pair lives on.
            refused = refresh(base, "app1", tokens["refresh_token"], secret)
            _error(refused, 400, "invalid_grant")
            assert a.revoked(tokens["access_token"])
        finally:
            a.browser.close()


# -- client credentials: connectors (RFC 6749 section 4.4, docs/connectors.md) ------------


@pytest.fixture(scope="module")
def plant(server: AS) -> str:
    """A connector plant-1 serving hist-1 (returns its secret), and plant-off, disabled."""
    store = server.home.store
    secret = store.add_connector("plant-1", "Plant One")
    store.add_data_source("hist-1", connector="plant-1")
    store.add_connector("plant-off")
    store.set_connector_enabled("plant-off", False)
    return secret


def _credentials(
    server: AS, client_id: str, secret: str, *, post: bool = False, **extra: str
) -> httpx.Response:
    """A client credentials request: client_secret_basic, or with `post` client_secret_post."""
    data = {"grant_type": "client_credentials", **extra}
    if post:
        data.update(client_id=client_id, client_secret=secret)
        return httpx.post(server.base + "/token", data=data, timeout=10)
    return httpx.post(server.base + "/token", data=data, auth=(client_id, secret), timeout=10)


def test_metadata_offers_the_client_credentials_grant(server: AS) -> None:
    meta = httpx.get(server.base + "/.well-known/oauth-authorization-server").json()
    assert meta["grant_types_supported"] == [
        "authorization_code",
        "refresh_token",
        "client_credentials",
    ]


def test_client_credentials_give_a_connector_a_token_for_the_link_alone(
    server: AS, plant: str
) -> None:
    asked = time.time()
    reply = _credentials(server, "plant-1", plant)
    assert reply.status_code == 200, reply.text
    assert reply.headers["cache-control"] == "no-store"
    body = reply.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["scope"]) == ("Bearer", "connector")
    assert body["expires_in"] in (3599, 3600)
    token = body["access_token"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    settings = token_settings(server.home.config)
    assert settings.link_audience == "policyd-link"  # the default
    with facts_for(server.home.store).view() as view:
        claims = Verifier(settings.for_link()).verify(view, token).claims
    assert (claims["sub"], claims["client_id"], claims["aud"]) == (
        "plant-1",
        "plant-1",
        "policyd-link",
    )
    assert claims["scope"] == "connector"
    assert claims["exp"] - claims["iat"] == 3600
    assert asked + body["expires_in"] <= claims["exp"]  # renewing in time is possible
    engine = build_engine(server.home.config, server.home.store)
    attach = engine.decide(
        CheckInput(token, ActionTarget(CONNECTOR_ATTACH, ("hist-1",)), door="link")
    )
    assert (attach.reason, attach.data_sources) == (Reason.ALLOWED, ("hist-1",))
    as_app = engine.decide(CheckInput(token, HttpTarget("GET", "/api/user/me")))
    assert as_app.reason is Reason.TOKEN_AUDIENCE_MISMATCH


def test_client_credentials_by_post_may_ask_for_the_connector_scope_only(
    server: AS, plant: str
) -> None:
    reply = _credentials(server, "plant-1", plant, post=True, scope="connector")
    assert reply.status_code == 200, reply.text
    assert reply.json()["scope"] == "connector"
    _error(_credentials(server, "plant-1", plant, scope="DataRead"), 400, "invalid_scope")
    _error(_credentials(server, "plant-1", plant, scope="connector x"), 400, "invalid_scope")


def test_client_credentials_refuse_a_wrong_secret_an_unknown_or_disabled_connector(
    server: AS, plant: str
) -> None:
    _error(_credentials(server, "plant-1", plant + "x"), 401, "invalid_client")
    _error(_credentials(server, "plant-1", "wrong", post=True), 401, "invalid_client")
    _error(_credentials(server, "nobody", plant), 401, "invalid_client")
    # plant-off's secret is unknown here: a disabled connector fails before its secret.
    _error(_credentials(server, "plant-off", plant), 401, "invalid_client")
    store = server.home.store
    secret = store.rotate_connector_secret("plant-off")
    _error(_credentials(server, "plant-off", secret), 401, "invalid_client")
    store.set_connector_enabled("plant-off", True)
    try:
        assert _credentials(server, "plant-off", secret).status_code == 200
    finally:
        store.set_connector_enabled("plant-off", False)


def test_apps_may_not_use_client_credentials_nor_connectors_the_other_grants(
    server: AS, plant: str
) -> None:
    _error(_credentials(server, "app1", server.secret), 400, "unauthorized_client")
    _error(_credentials(server, "pub", "anything"), 401, "invalid_client")
    _error(refresh(server.base, "plant-1", "any-refresh-token", plant), 401, "invalid_client")
    flow = Flow(client_id="plant-1")
    _error(exchange(server.base, "any-code", flow, secret=plant), 401, "invalid_client")


def test_connector_secrets_and_tokens_never_reach_the_log(
    server: AS, plant: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    token = _credentials(server, "plant-1", plant).json()["access_token"]
    servers = ("policyd", "authlib", "uvicorn", "starlette")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(servers))
    assert token not in text and plant not in text
