"""The authorization server's pages: sign-in, consent and Connected apps; CSRF, headers,
cookies, sign-in throttling, the trusted-header hook, and `policyd users add` passwords."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from policyd.oauth.passwords import verify_password
from policyd.oauth.sessions import COOKIE
from policyd.oauth.storage import OAuthStorage
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.conftest import new_database
from tests.helpers import Home
from tests.oauth_support import (
    PASSWORD,
    PUBLIC_REDIRECT,
    Browser,
    Flow,
    consent_choices,
    csrf_token,
    exchange,
    oauth_home,
    refresh,
    running,
)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, store_backend: str
) -> Iterator[tuple[Home, str, str]]:
    url = new_database(request, store_backend)
    home, secret = oauth_home(tmp_path_factory.mktemp("pages"), store_url=url)
    with running(home) as base:
        yield home, secret, base


@pytest.fixture
def browser(served: tuple[Home, str, str]) -> Iterator[Browser]:
    b = Browser(served[2])
    yield b
    b.close()


def _framing_forbidden(reply: httpx.Response) -> None:
    assert reply.headers["x-frame-options"] == "DENY"
    csp = reply.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "script-src" not in csp and "default-src 'none'" in csp
    assert reply.headers["cache-control"] == "no-store"


def test_pages_forbid_framing_and_scripts(browser: Browser) -> None:
    _framing_forbidden(browser.http.get("/login"))
    browser.sign_in()
    _framing_forbidden(browser.consent_page(Flow()))
    _framing_forbidden(browser.http.get("/settings"))


def test_consent_form_may_post_to_the_apps_redirect_origin_only(browser: Browser) -> None:
    browser.sign_in()
    csp = browser.consent_page(Flow()).headers["content-security-policy"]
    assert "form-action 'self' https://app1.test;" in csp


def test_session_cookie_is_httponly_lax_and_renewed_at_sign_in(browser: Browser) -> None:
    page = browser.http.get("/login")
    before = page.cookies[COOKIE]
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain http on loopback; https issuers get Secure
    reply = browser.http.post(
        "/login",
        data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_token(page.text)},
    )
    assert reply.status_code == 303
    after = reply.cookies[COOKIE]
    assert after != before
    assert "HttpOnly" in reply.headers["set-cookie"]


def test_sign_in_without_the_csrf_token_is_refused(browser: Browser) -> None:
    browser.http.get("/login")
    reply = browser.http.post("/login", data={"username": "alice", "password": PASSWORD})
    assert reply.status_code == 403
    forged = browser.http.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": "0" * 64}
    )
    assert forged.status_code == 403


def test_consent_without_the_csrf_token_is_refused_and_writes_nothing(
    served: tuple[Home, str, str], browser: Browser
) -> None:
    home = served[0]
    browser.sign_in("bob")
    flow = Flow(scope="UserInfo")
    page = browser.consent_page(flow)
    assert page.status_code == 200
    reply = browser.http.post(
        "/authorize", params=flow.params(), data={"scope": "UserInfo", "decision": "allow"}
    )
    assert reply.status_code == 403
    assert home.store.list_consents("bob", "app1") == []


def test_wrong_password_and_unknown_user_get_the_same_answer(browser: Browser) -> None:
    wrong = browser.sign_in("alice", "not the password")
    unknown = browser.sign_in("mallory", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert "user name or password is wrong" in wrong.text
    assert "user name or password is wrong" in unknown.text


def test_sign_in_redirects_only_to_this_server(browser: Browser) -> None:
    page = browser.http.get("/login", params={"next": "//evil.test/x"})
    reply = browser.http.post(
        "/login",
        data={
            "username": "alice",
            "password": PASSWORD,
            "next": "https://evil.test/",
            "csrf_token": csrf_token(page.text),
        },
    )
    assert reply.headers["location"] == "/settings"


def test_authorize_sends_a_signed_out_user_to_sign_in_and_back(browser: Browser) -> None:
    flow = Flow()
    reply = browser.consent_page(flow)
    assert reply.status_code == 303
    assert reply.headers["location"].startswith("/login?next=%2Fauthorize%3F")
    page = browser.http.get(reply.headers["location"])
    assert "App One" in page.text  # the app asking is named on the sign-in page


def test_settings_lists_revokes_and_disconnects(
    served: tuple[Home, str, str], browser: Browser
) -> None:
    home, secret, base = served
    browser.sign_in()
    flow = Flow()
    code = browser.authorize(flow, data_sources=("ds-a", "ds-b"))["code"]
    tokens = exchange(base, code, flow, secret=secret).json()
    page = browser.http.get("/settings")
    assert "App One" in page.text and "ds-a" in page.text and "ds-b" in page.text
    token = csrf_token(page.text)

    reply = browser.http.post(
        "/settings/revoke", data={"client_id": "app1", "data_source": "ds-b", "csrf_token": token}
    )
    assert reply.status_code == 303
    assert [g.data_source for g in home.store.list_grants("alice", "app1")] == ["ds-a"]
    assert "ds-b is no longer shared" in browser.http.get(reply.headers["location"]).text

    reply = browser.http.post(
        "/settings/disconnect", data={"client_id": "app1", "csrf_token": token}
    )
    assert reply.status_code == 303
    assert home.store.list_consents("alice", "app1") == []
    assert home.store.list_grants("alice", "app1") == []
    assert refresh(base, "app1", tokens["refresh_token"], secret).json()["error"] == (
        "invalid_grant"
    )
    # As `policyd consents revoke` does (Store.disconnect): the pair's access tokens too.
    jti = jwt.decode(tokens["access_token"], options={"verify_signature": False})["jti"]
    with home.store.read() as conn:
        revoked = conn.execute("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)).fetchone()
    assert revoked is not None
    assert "App One is disconnected" in browser.http.get(reply.headers["location"]).text


def test_reconsent_ticks_what_was_given_marks_the_rest_new_and_keeps_it_on_allow(
    tmp_path: Path, store_url: str
) -> None:
    home, _ = oauth_home(tmp_path, store_url)
    store = home.store
    with running(home) as base:
        browser = Browser(base)
        try:
            browser.sign_in()
            flow = Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT, scope="UserInfo DataRead")

            first = browser.consent_page(flow).text
            assert "<h1>Connect " in first
            choices = consent_choices(first)
            assert [c for c in choices.values() if c.new] == []
            assert {v for v, c in choices.items() if c.checked} == {"UserInfo", "DataRead"}
            browser.authorize(flow, data_sources=("ds-a", "ds-b"))
            before = {g.data_source: g for g in store.list_grants("alice", "pub")}
            assert set(before) == {"ds-a", "ds-b"}

            again = browser.consent_page(flow).text
            assert "<h1>Reconnect " in again
            assert "replaces any earlier choice" not in again
            assert "Untick one to take it away" in again
            choices = consent_choices(again)
            assert {v for v, c in choices.items() if c.checked} == {
                "UserInfo",
                "DataRead",
                "ds-a",
                "ds-b",
            }
            assert {v for v, c in choices.items() if c.new} == {"ds-c"}

            # Allow as shown: every earlier grant stays live, untouched.
            shown = tuple(v for v, c in choices.items() if c.name == "data_source" and c.checked)
            browser.authorize(flow, data_sources=shown)
            assert {g.data_source: g for g in store.list_grants("alice", "pub")} == before

            # A request whose page lists no data sources leaves the grants alone, and the
            # scopes it did not ask for (DataRead) stay consented: the app's tokens that
            # carry them stay usable.
            browser.authorize(Flow(client_id="pub", redirect_uri=PUBLIC_REDIRECT, scope="UserInfo"))
            assert sorted(store.list_consents("alice", "pub")[0]["scopes"]) == [
                "DataRead",
                "UserInfo",
            ]
            assert {g.data_source: g for g in store.list_grants("alice", "pub")} == before

            # A scope not consented before is ticked and marked new; the grants stay ticked.
            store.set_consent("alice", "pub", ["UserInfo"])  # consented without DataRead
            choices = consent_choices(browser.consent_page(flow).text)
            assert (choices["DataRead"].checked, choices["DataRead"].new) == (True, True)
            assert (choices["UserInfo"].checked, choices["UserInfo"].new) == (True, False)
            assert choices["ds-a"].checked and choices["ds-b"].checked

            # The explicit untick takes exactly that one away.
            browser.authorize(flow, data_sources=("ds-a",))
            assert [g.data_source for g in store.list_grants("alice", "pub")] == ["ds-a"]
            assert store.list_grants("alice", "pub")[0] == before["ds-a"]
            choices = consent_choices(browser.consent_page(flow).text)
            assert (choices["ds-b"].checked, choices["ds-b"].new) == (False, True)

            # A grant shared at another level than the page would give says so.
            page = browser.consent_page(Flow(scope="UserInfo DataRead")).text  # app1: ds-a write
            assert "(shared now: write)" in page
        finally:
            browser.close()


def test_settings_changes_need_the_csrf_token(
    served: tuple[Home, str, str], browser: Browser
) -> None:
    browser.sign_in()
    reply = browser.http.post("/settings/disconnect", data={"client_id": "app1"})
    assert reply.status_code == 403


def test_sign_out_ends_the_session(browser: Browser) -> None:
    browser.sign_in()
    page = browser.http.get("/settings")
    assert page.status_code == 200
    reply = browser.http.post("/logout", data={"csrf_token": csrf_token(page.text)})
    assert reply.status_code == 303
    assert browser.http.get("/settings").status_code == 303


def test_sign_in_is_throttled_per_user_and_address(tmp_path: Path, store_url: str) -> None:
    home, _ = oauth_home(tmp_path, store_url, login_max_failures=3)
    with running(home) as base:
        browser = Browser(base)
        for _ in range(3):
            assert browser.sign_in("alice", "wrong password").status_code == 401
        blocked = browser.sign_in("alice", PASSWORD)
        assert blocked.status_code == 429
        assert "Too many failed sign-ins" in blocked.text
        # The address is throttled too: another user from it is refused as well.
        assert browser.sign_in("bob", PASSWORD).status_code == 429
        browser.close()


def test_trusted_upstream_header_names_the_user_and_turns_local_sign_in_off(
    tmp_path: Path, store_url: str
) -> None:
    home, _ = oauth_home(tmp_path, store_url, trusted_user_header="X-Forwarded-User")
    with running(home) as base:
        http = httpx.Client(base_url=base, follow_redirects=False)
        assert http.get("/login").status_code == 401
        assert http.get("/authorize", params=Flow().params()).status_code == 401
        page = http.get("/authorize", params=Flow().params(), headers={"X-Forwarded-User": "alice"})
        assert page.status_code == 200 and "alice" in page.text
        http.close()


def test_users_add_hashes_the_password_from_stdin_with_argon2(home: Home) -> None:
    result = home.cli("users", "add", "carol", "--password-stdin", stdin="s3cret-pass\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "added user carol with a password\n"
    stored = OAuthStorage(home.store).password_hash("carol")
    assert stored is not None and stored.startswith("$argon2id$")
    assert "s3cret-pass" not in stored
    assert verify_password(stored, "s3cret-pass")
    assert not verify_password(stored, "other-pass")
    short = home.cli("users", "add", "dave", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "8-1024 characters" in short.stderr
    reset = home.cli("users", "set-password", "carol", "--password-stdin", stdin="n3w-password\n")
    assert reset.returncode == 0, reset.stderr
    assert verify_password(OAuthStorage(home.store).password_hash("carol"), "n3w-password")
