"""The whole grant lifecycle in a real headless Chromium (Debian's, driven by Playwright).

`policyd serve` (Decision API + authorization server) and the reference hub (protected by
the ASGI middleware) run as real processes on free ports, over the `make run` demo data.
Alice signs in, ticks two of her three data sources, the app exchanges the code (PKCE) and
reads through the hub; she revokes one source and then disconnects the app on the settings
page. Reconnecting the app shows what she already shared ticked and the rest marked new,
and Allow keeps it. The tests also write the screenshots in docs/screenshots/.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from policyd.cli.demo import PASSWORDS
from tests.helpers import ROOT, Home, free_port, run_server
from tests.oauth_support import Browser, csrf_token, pkce, query_of

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "docs" / "screenshots"
CALLBACK = "http://127.0.0.1:8090/callback"  # the demo app's redirect URI (policyd.cli.demo)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        "needs Debian's chromium (apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[Home, str, str]]:
    """policyd serve and the hub; yields (home, issuer URL, hub URL)."""
    oauth_port, hub_port = free_port(), free_port()
    home = Home(
        tmp_path,
        extra_config=(
            f'[oauth]\nenabled = true\naddress = "127.0.0.1:{oauth_port}"\n'
            f'session_key_file = "{tmp_path / "oauth.key"}"\n'
        ),
    )
    text = home.config_path.read_text()
    issuer = f"http://127.0.0.1:{oauth_port}"
    home.config_path.write_text(text.replace('"https://auth.test"', f'"{issuer}"'))
    seeded = home.cli("demo", "seed", "--token-file", str(tmp_path / "demo.token"))
    assert seeded.returncode == 0, seeded.stderr
    with run_server(home) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env.update(
            POLICYD_HUB_PORT=str(hub_port),
            POLICYD_HUB_POLICYD_ADDRESS=server.address,
            POLICYD_HUB_DATA_DIR=str(tmp_path / "hub"),
            POLICYD_HUB_TIMEOUT_SECONDS="2",
        )
        hub = subprocess.Popen(
            [sys.executable, "-m", "examples.hub"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        hub_url = f"http://127.0.0.1:{hub_port}"
        try:
            _wait(hub_url + "/api/info")
            _wait(issuer + "/.well-known/oauth-authorization-server")
            yield home, issuer, hub_url
        finally:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(timeout=15)
            except subprocess.TimeoutExpired:
                hub.kill()
                hub.wait()


def _wait(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2.0).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _read(hub: str, token: str, data_source: str) -> int:
    reply = httpx.get(
        f"{hub}/api/data/tags/{data_source}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    return reply.status_code


def _authorize_url(issuer: str, challenge: str, state: str) -> str:
    """The demo app's authorization request for UserInfo and DataRead."""
    query = {
        "response_type": "code",
        "client_id": "demo-app",
        "redirect_uri": CALLBACK,
        "scope": "UserInfo DataRead",
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return issuer + "/authorize?" + urlencode(query)


def _exchange(issuer: str, code: str, verifier: str) -> dict[str, str]:
    reply = httpx.post(
        issuer + "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "client_id": "demo-app",
            "code_verifier": verifier,
        },
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    tokens: dict[str, str] = reply.json()
    return tokens


def test_consent_read_revoke_and_disconnect_in_a_real_browser(
    system: tuple[Home, str, str],
) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    home, issuer, hub = system
    home.store.revoke_consent("alice", "demo-app")  # the demo's consent: start afresh
    verifier, challenge = pkce()
    authorize = _authorize_url(issuer, challenge, "xyzzy")
    landed: list[str] = []

    def callback(route: Route) -> None:  # the app's redirect URI, answered in the browser
        landed.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<p>connected</p>")

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # A phone-sized window: the pages must read well there.
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.route(CALLBACK + "**", callback)

            page.goto(authorize)
            assert page.url.startswith(issuer + "/login")
            assert page.get_by_text("Demo Historian Viewer").count() == 1
            page.screenshot(path=str(SHOTS / "signin.png"), full_page=True)
            page.fill("#username", "alice")
            page.fill("#password", PASSWORDS["alice"])
            page.click("button[type=submit]")

            expect(page.locator("#consent")).to_be_visible()
            assert page.url.startswith(issuer + "/authorize")
            boxes = page.locator("input[name=data_source]")
            assert boxes.count() == 3
            for i in range(3):
                assert not boxes.nth(i).is_checked(), "no data source is pre-ticked"
            page.check("input[name=data_source][value=edge-historian]")
            page.check("input[name=data_source][value=plant-mes]")
            page.screenshot(path=str(SHOTS / "consent.png"), full_page=True)
            page.click("button[value=allow]")
            page.wait_for_url(CALLBACK + "**")

            query = query_of(landed[-1])
            assert query["state"] == "xyzzy"
            tokens = httpx.post(
                issuer + "/token",
                data={
                    "grant_type": "authorization_code",
                    "code": query["code"],
                    "redirect_uri": CALLBACK,
                    "client_id": "demo-app",
                    "code_verifier": verifier,
                },
            ).json()
            access = tokens["access_token"]
            assert _read(hub, access, "edge-historian") == 200
            assert _read(hub, access, "plant-mes") == 200
            assert _read(hub, access, "lab-lims") == 403  # not ticked

            page.goto(issuer + "/settings")
            assert page.get_by_text("Connected apps").count() >= 1
            page.screenshot(path=str(SHOTS / "settings.png"), full_page=True)
            page.click("button[aria-label='Revoke edge-historian from Demo Historian Viewer']")
            expect(page.get_by_text("edge-historian is no longer shared")).to_be_visible()
            assert _read(hub, access, "edge-historian") == 403
            assert _read(hub, access, "plant-mes") == 200

            page.click("button[aria-label='Disconnect Demo Historian Viewer']")
            expect(page.get_by_text("Demo Historian Viewer is disconnected")).to_be_visible()
            assert _read(hub, access, "plant-mes") in (401, 403)
            refreshed = httpx.post(
                issuer + "/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": tokens["refresh_token"],
                    "client_id": "demo-app",
                },
            )
            assert refreshed.status_code == 400
            assert refreshed.json()["error"] == "invalid_grant"
        finally:
            browser.close()


def test_reconnecting_ticks_what_was_shared_and_allow_keeps_it_in_a_real_browser(
    system: tuple[Home, str, str],
) -> None:
    from playwright.sync_api import Page, Route, expect, sync_playwright

    home, issuer, hub = system
    store = home.store
    store.revoke_consent("alice", "demo-app")  # the demo's consent: start afresh
    landed: list[str] = []

    def callback(route: Route) -> None:
        landed.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<p>connected</p>")

    def consent(page: Page, state: str) -> str:
        """Open the consent screen for a new authorization request; returns its verifier."""
        verifier, challenge = pkce()
        page.goto(_authorize_url(issuer, challenge, state))
        if page.url.startswith(issuer + "/login"):
            page.fill("#username", "alice")
            page.fill("#password", PASSWORDS["alice"])
            page.click("button[type=submit]")
        expect(page.locator("#consent")).to_be_visible()
        return verifier

    def allow(page: Page, state: str, verifier: str) -> str:
        """Press Allow; returns the access token the app gets for the code."""
        page.click("button[value=allow]")
        page.wait_for_url(CALLBACK + "**")
        query = query_of(landed[-1])
        assert query["state"] == state
        return _exchange(issuer, query["code"], verifier)["access_token"]

    def box(page: Page, name: str, value: str) -> Any:
        return page.locator(f"input[name={name}][value={value}]")

    def new_badge(page: Page, value: str) -> Any:
        return page.locator(f"label.choice:has(input[value={value}]) .tag.new")

    def live() -> dict[str, int]:
        return {g.data_source: g.id for g in store.list_grants("alice", "demo-app")}

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.route(CALLBACK + "**", callback)

            # (a) First consent: nothing of the data sources ticked, nothing marked new.
            verifier = consent(page, "first")
            expect(page.locator("h1")).to_contain_text("Connect Demo Historian Viewer")
            assert page.locator(".tag.new").count() == 0
            for source in ("edge-historian", "plant-mes", "lab-lims"):
                assert not box(page, "data_source", source).is_checked()
            page.check("input[name=data_source][value=edge-historian]")
            page.check("input[name=data_source][value=plant-mes]")
            allow(page, "first", verifier)
            first = live()
            assert set(first) == {"edge-historian", "plant-mes"}

            # (b) Reconnect: what she shared is ticked, the source she did not is new.
            verifier = consent(page, "again")
            expect(page.locator("h1")).to_contain_text("Reconnect Demo Historian Viewer")
            for scope in ("UserInfo", "DataRead"):
                assert box(page, "scope", scope).is_checked()
                assert new_badge(page, scope).count() == 0
            for source in ("edge-historian", "plant-mes"):
                assert box(page, "data_source", source).is_checked()
                assert new_badge(page, source).count() == 0
            assert not box(page, "data_source", "lab-lims").is_checked()
            expect(new_badge(page, "lab-lims")).to_be_visible()
            expect(new_badge(page, "lab-lims")).to_have_text("new")
            expect(page.get_by_text("Untick one to take it away")).to_be_visible()
            page.screenshot(path=str(SHOTS / "consent-reconnect.png"), full_page=True)

            # (c) Allow as it stands: every earlier grant is still live (the same grant).
            access = allow(page, "again", verifier)
            assert live() == first
            assert _read(hub, access, "edge-historian") == 200
            assert _read(hub, access, "plant-mes") == 200
            assert _read(hub, access, "lab-lims") == 403

            # (d) Untick one: exactly that one is taken away, the other stays.
            verifier = consent(page, "third")
            assert box(page, "data_source", "plant-mes").is_checked()
            page.uncheck("input[name=data_source][value=plant-mes]")
            access = allow(page, "third", verifier)
            assert live() == {"edge-historian": first["edge-historian"]}
            revoked = store.list_grants("alice", "demo-app", "plant-mes", include_revoked=True)
            assert [g.revoked_at is not None for g in revoked] == [True]
            assert _read(hub, access, "edge-historian") == 200
            assert _read(hub, access, "plant-mes") == 403
        finally:
            browser.close()


def test_sample_client_completes_the_flow_and_reads_the_hub(
    system: tuple[Home, str, str],
) -> None:
    home, issuer, hub = system
    port = free_port()
    client_url = f"http://127.0.0.1:{port}"
    home.store.add_app(
        "sample",
        "Sample Client",
        redirect_uris=[client_url + "/callback"],
        scopes=["UserInfo", "DataRead"],
        confidential=False,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(
        POLICYD_CLIENT_PORT=str(port),
        POLICYD_CLIENT_ISSUER=issuer,
        POLICYD_CLIENT_HUB=hub,
        POLICYD_CLIENT_ID="sample",
        POLICYD_CLIENT_REDIRECT_URI=client_url + "/callback",
    )
    client = subprocess.Popen([sys.executable, "-m", "examples.client"], cwd=ROOT, env=env)
    user = Browser(issuer)
    try:
        _wait(client_url + "/")
        start = httpx.get(client_url + "/").text
        found = re.search(r'href="([^"]+/authorize\?[^"]+)"', start)
        assert found, start
        link = html.unescape(found[1])
        assert user.sign_in("alice", PASSWORDS["alice"]).status_code == 303
        consent = user.http.get(link)
        form = {
            "csrf_token": csrf_token(consent.text),
            "scope": ["UserInfo", "DataRead"],
            "data_source": ["plant-mes"],
            "decision": "allow",
        }
        back = user.http.post(link, data=form)
        assert back.status_code == 302
        page = httpx.get(back.headers["location"], timeout=20).text
        assert "<b>plant-mes</b>: 200" in page
        assert "<b>edge-historian</b>: 403" in page
    finally:
        user.close()
        client.send_signal(signal.SIGTERM)
        client.wait(timeout=15)
