"""The demo app (`demo-app`, a public client): authorization code flow with PKCE, then the hub.

    GET /          a "Connect" link that starts the flow (state + PKCE verifier kept here)
    GET /callback  the redirect URI: checks state, exchanges the code, reads each demo data
                   source through the hub and shows what came back (200 or 403)

Run it with `python -m examples.client` (127.0.0.1:8090). Settings, all optional:
POLICYD_CLIENT_ISSUER (the authorization server, http://127.0.0.1:8080),
POLICYD_CLIENT_HUB (http://127.0.0.1:8000), POLICYD_CLIENT_ID (demo-app),
POLICYD_CLIENT_REDIRECT_URI (http://127.0.0.1:8090/callback).
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

DATA_SOURCES = ("edge-historian", "plant-mes", "lab-lims")


@dataclass(frozen=True)
class ClientSettings:
    issuer: str = "http://127.0.0.1:8080"
    hub: str = "http://127.0.0.1:8000"
    client_id: str = "demo-app"
    redirect_uri: str = "http://127.0.0.1:8090/callback"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            issuer=env.get("POLICYD_CLIENT_ISSUER", d.issuer).rstrip("/"),
            hub=env.get("POLICYD_CLIENT_HUB", d.hub).rstrip("/"),
            client_id=env.get("POLICYD_CLIENT_ID", d.client_id),
            redirect_uri=env.get("POLICYD_CLIENT_REDIRECT_URI", d.redirect_uri),
        )


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<body style='font-family:system-ui,sans-serif;max-width:34rem;margin:1.5rem auto;"
        f"padding:0 1rem'><h1>{html.escape(title)}</h1>{body}</body>",
        status_code=status,
    )


def create_app(settings: ClientSettings | None = None) -> Starlette:
    s = settings or ClientSettings.from_env()
    pending: dict[str, str] = {}  # state -> PKCE verifier (one demo process: memory is fine)

    async def home(request: Request) -> Response:
        state = secrets.token_urlsafe(16)
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        if len(pending) > 1000:
            pending.clear()
        pending[state] = verifier
        query = urlencode(
            {
                "response_type": "code",
                "client_id": s.client_id,
                "redirect_uri": s.redirect_uri,
                "scope": "UserInfo DataRead",
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        link = html.escape(f"{s.issuer}/authorize?{query}")
        return _page(
            "Demo Historian Viewer",
            "<p>This sample app reads process data from the hub for you.</p>"
            f'<p><a href="{link}">Connect to the data hub</a></p>'
            f'<p><a href="{html.escape(s.issuer)}/settings">Connected apps</a> (take access '
            "back there)</p>",
        )

    async def callback(request: Request) -> Response:
        params = request.query_params
        verifier = pending.pop(params.get("state", ""), None)
        if "error" in params:
            return _page("Not connected", f"<p>{html.escape(params['error'])}</p>", 400)
        if verifier is None or "code" not in params:
            return _page("Not connected", "<p>Unknown or reused state.</p>", 400)
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.post(
                s.issuer + "/token",
                data={
                    "grant_type": "authorization_code",
                    "code": params["code"],
                    "redirect_uri": s.redirect_uri,
                    "client_id": s.client_id,
                    "code_verifier": verifier,
                },
            )
            if reply.status_code != 200:
                return _page("Not connected", f"<pre>{html.escape(reply.text)}</pre>", 400)
            token = reply.json()
            rows = []
            for ds in DATA_SOURCES:
                read = await http.get(
                    f"{s.hub}/api/data/tags/{ds}",
                    headers={"Authorization": f"Bearer {token['access_token']}"},
                )
                verdict = "read" if read.status_code == 200 else "denied"
                rows.append(f"<li><b>{ds}</b>: {read.status_code} ({verdict})</li>")
        return _page(
            "Connected",
            f"<p>Scopes granted: {html.escape(token.get('scope', ''))}</p>"
            f"<ul>{''.join(rows)}</ul>"
            '<p><a href="/">Connect again</a></p>',
        )

    return Starlette(routes=[Route("/", home), Route("/callback", callback)])
