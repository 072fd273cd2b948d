"""Test support for the authorization server: a home with it enabled, PKCE, a browser-less
user agent (httpx) that signs in and answers the consent screen."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from policyd.config import load_config
from policyd.oauth.passwords import hash_password
from policyd.oauth.server import RunningAuthorizationServer
from policyd.oauth.storage import OAuthStorage
from tests.helpers import Home, free_port

PASSWORD = "correct horse battery"
PUBLIC_REDIRECT = "http://127.0.0.1:9/cb"
CONFIDENTIAL_REDIRECT = "https://app1.test/cb"


def oauth_home(root: Path, store_url: str = "", **oauth: Any) -> tuple[Home, str]:
    """The standard seeded home (tests/helpers.py) with the authorization server on a free
    port, its issuer URL as tokens.issuer; alice and bob have the password PASSWORD; `pub` is
    a public app registered for UserInfo and DataRead. Returns the home and app1's secret.
    `store_url`: a PostgreSQL database for the store ("" = SQLite under root)."""
    port = free_port()
    settings = {
        "enabled": True,
        "address": f"127.0.0.1:{port}",
        "session_key_file": str(root / "oauth-session.key"),
        **oauth,
    }
    lines = "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
    home = Home(root, extra_config="[oauth]\n" + lines, store_url=store_url)
    text = home.config_path.read_text()
    home.config_path.write_text(
        text.replace('issuer = "https://auth.test"', f'issuer = "http://127.0.0.1:{port}"')
    )
    home.config = load_config(home.config_path, env={})
    home.seed()
    home.store.add_app(
        "pub",
        "Public Viewer",
        redirect_uris=[PUBLIC_REDIRECT],
        scopes=["UserInfo", "DataRead"],
        confidential=False,
    )
    storage = OAuthStorage(home.store)
    for user in ("alice", "bob"):
        storage.set_password_hash(user, hash_password(PASSWORD))
    return home, home.store.rotate_secret("app1")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


@contextmanager
def running(home: Home) -> Iterator[str]:
    """Serve the home's authorization server (real uvicorn, in a thread); yields its URL."""
    server = RunningAuthorizationServer(home.config)
    server.start()
    try:
        yield home.config.tokens.issuer
    finally:
        server.stop()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class Flow:
    """One authorization request's parameters."""

    client_id: str = "app1"
    redirect_uri: str = CONFIDENTIAL_REDIRECT
    scope: str = "UserInfo DataRead"
    state: str = "st-123"
    verifier: str = ""
    challenge: str = ""
    method: str = "S256"

    def __post_init__(self) -> None:
        if not self.verifier:
            self.verifier, self.challenge = pkce()

    def params(self, **overrides: str | None) -> dict[str, str]:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "state": self.state,
            "code_challenge": self.challenge,
            "code_challenge_method": self.method,
            **overrides,
        }
        return {k: v for k, v in params.items() if v is not None}


class Browser:
    """A user agent without JavaScript: cookies, forms, no automatic redirects."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=10)

    def close(self) -> None:
        self.http.close()

    def sign_in(self, user: str = "alice", password: str = PASSWORD) -> httpx.Response:
        page = self.http.get("/login")
        return self.http.post(
            "/login",
            data={
                "username": user,
                "password": password,
                "next": "/settings",
                "csrf_token": csrf_token(page.text),
            },
        )

    def consent_page(self, flow: Flow, **overrides: str | None) -> httpx.Response:
        return self.http.get("/authorize?" + urlencode(flow.params(**overrides)))

    def authorize(
        self,
        flow: Flow,
        *,
        scopes: list[str] | None = None,
        data_sources: tuple[str, ...] = (),
        decision: str = "allow",
    ) -> dict[str, str]:
        """Answer the consent screen; returns the redirect's query (code, state or error)."""
        page = self.consent_page(flow)
        assert page.status_code == 200, page.text
        found = re.search(r'<form method="post" action="([^"]+)" id="consent"', page.text)
        assert found, "no consent form"
        action = html.unescape(found[1])
        offered = re.findall(r'name="scope" value="([^"]+)"', page.text)
        form: dict[str, str | list[str]] = {
            "csrf_token": csrf_token(page.text),
            "scope": offered if scopes is None else scopes,
            "data_source": list(data_sources),
            "decision": decision,
        }
        reply = self.http.post(action, data=form)
        assert reply.status_code == 302, reply.text
        location = reply.headers["location"]
        assert location.startswith(flow.redirect_uri + "?"), location
        return query_of(location)


def exchange(
    base: str,
    code: str,
    flow: Flow,
    *,
    secret: str | None = None,
    verifier: str | None = None,
    **extra: str,
) -> httpx.Response:
    """POST the code to the token endpoint (client_secret_basic when a secret is given)."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": flow.redirect_uri,
        "code_verifier": flow.verifier if verifier is None else verifier,
        **extra,
    }
    if not data["code_verifier"]:
        del data["code_verifier"]
    auth = (flow.client_id, secret) if secret else None
    if auth is None:
        data.setdefault("client_id", flow.client_id)
    return httpx.post(base + "/token", data=data, auth=auth, timeout=10)


def refresh(
    base: str, client_id: str, refresh_token: str, secret: str | None = None
) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if secret is None:
        data["client_id"] = client_id
    auth = (client_id, secret) if secret else None
    return httpx.post(base + "/token", data=data, auth=auth, timeout=10)


@dataclass
class Choice:
    """One checkbox of the consent screen, as the page shows it."""

    name: str  # "scope" or "data_source"
    value: str
    checked: bool
    new: bool  # marked with the "new" badge


class _ChoiceParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.choices: list[Choice] = []
        self._in_label = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        classes = (found.get("class") or "").split()
        if tag == "label" and "choice" in classes:
            self._in_label = True
        elif tag == "input" and self._in_label and found.get("type") == "checkbox":
            self.choices.append(
                Choice(found.get("name") or "", found.get("value") or "", "checked" in found, False)
            )
        elif tag == "span" and self._in_label and {"tag", "new"} <= set(classes) and self.choices:
            self.choices[-1].new = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._in_label = False


def consent_choices(page: str) -> dict[str, Choice]:
    """The consent screen's checkboxes by value (scope names and data source names)."""
    parser = _ChoiceParser()
    parser.feed(page)
    return {c.value: c for c in parser.choices}
