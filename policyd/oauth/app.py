"""The authorization server's Starlette app: the OAuth endpoints and the pages.

Routes (under the issuer's path, usually the root):

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata
    GET  /jwks.json                                the signing keys (RFC 7517)
    GET  /authorize  POST /authorize               authorization endpoint + consent screen
    POST /token                                    token endpoint
    POST /revoke                                   RFC 7009 revocation
    POST /introspect                               RFC 7662 introspection
    GET  /login  POST /login  POST /logout         sign-in for local users
    GET  /settings  POST /settings/revoke  POST /settings/disconnect   Connected apps

The protocol is authlib's (rfc6749.py and friends); this module only routes, renders and
writes what the user chose. Store and password work runs in the thread pool.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import InvalidRequestError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from policyd.config import Config
from policyd.core import metrics
from policyd.core.errors import NotFound
from policyd.core.model import Access
from policyd.decision.tokens import Verifier
from policyd.decision.wiring import keyring, open_store, token_settings
from policyd.oauth import rfc8414
from policyd.oauth.csrf import FIELD as CSRF_FIELD
from policyd.oauth.csrf import Csrf, load_or_create_key
from policyd.oauth.pages import STATIC, Pages, origin
from policyd.oauth.passwords import dummy_hash, verify_password
from policyd.oauth.requests import StarletteOAuth2Request, adapt
from policyd.oauth.rfc6749 import (
    GRANT_TYPES,
    Approval,
    AuthorizationServer,
    refuse_repeated_parameters,
)
from policyd.oauth.rfc7009 import RevocationEndpoint
from policyd.oauth.rfc7662 import IntrospectionEndpoint, live_data_sources
from policyd.oauth.scopes import ScopeInfo, scope_catalogue
from policyd.oauth.sessions import LoginThrottle, Sessions
from policyd.oauth.storage import OAuthStorage, new_secret
from policyd.oauth.tokens import TokenFinder
from policyd.store.base import Store
from policyd.store.open import facts_for

log = logging.getLogger("policyd.oauth")


@dataclass
class _Browser:
    """The browser's session cookie value, and whether this response must set it."""

    id: str
    new: bool


class AuthorizationApp:
    """Everything one authorization server needs, and its ASGI app (`.asgi`)."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        dummy_hash()  # before the first sign-in, so that it does not take twice as long
        self.config = config
        self._owns_store = store is None
        self.store = store or open_store(config)
        self.issuer = config.tokens.issuer
        self.base_url = origin(self.issuer)
        self.prefix = urlsplit(self.issuer).path.rstrip("/")
        o = config.oauth
        settings = token_settings(config)
        self.facts = facts_for(self.store)
        self.server = AuthorizationServer(
            self.store,
            self.facts,
            keyring(config, self.store),
            settings,
            code_ttl_seconds=o.code_ttl_seconds,
            refresh_ttl_seconds=o.refresh_ttl_seconds,
            scopes=self.scopes,
        )
        finder = TokenFinder(self.server, self.facts, Verifier(settings))
        self.server.register_endpoint(RevocationEndpoint(finder))
        self.server.register_endpoint(IntrospectionEndpoint(finder))
        self.storage = OAuthStorage(self.store)
        self.csrf = Csrf(load_or_create_key(o.session_key_file))
        self.sessions = Sessions(
            self.storage,
            ttl_seconds=o.session_ttl_seconds,
            secure=self.issuer.startswith("https://") or bool(o.cert_file),
            path=self.prefix or "/",
            trusted_user_header=o.trusted_user_header,
        )
        self.throttle = LoginThrottle(o.login_max_failures, o.login_window_seconds)
        self.pages = Pages(self.prefix)
        self.asgi = self._build()
        metrics.safely(_zero_series)  # every series at 0 from the start, for rates and alerts

    def close(self) -> None:
        """Close this thread's decision-time reads, and the store if this app opened it
        (a PostgreSQL store's pools: their threads and connections)."""
        self.facts.close()
        if self._owns_store:
            self.store.close()

    def scopes(self) -> dict[str, ScopeInfo]:
        """The policy's scopes, as they are now (reloaded when the policy files change)."""
        return scope_catalogue(self.config.policy.dir)

    def _build(self) -> Starlette:
        routes: list[BaseRoute] = [
            Route(rfc8414.JWKS, self.jwks, methods=["GET"]),
            Route(rfc8414.AUTHORIZE, self.authorize, methods=["GET", "POST"]),
            Route(rfc8414.TOKEN, self.token, methods=["POST"]),
            Route(rfc8414.REVOKE, self.revoke, methods=["POST"]),
            Route(rfc8414.INTROSPECT, self.introspect, methods=["POST"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route(rfc8414.SETTINGS, self.settings, methods=["GET"]),
            Route("/settings/revoke", self.settings_revoke, methods=["POST"]),
            Route("/settings/disconnect", self.settings_disconnect, methods=["POST"]),
            Route("/", self.home, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        ]
        well_known = Route(rfc8414.well_known_path(self.issuer), self.metadata, methods=["GET"])
        if self.prefix:
            return Starlette(routes=[well_known, Mount(self.prefix, routes=routes)])
        return Starlette(routes=[well_known, *routes])

    # -- helpers -----------------------------------------------------------------------

    def _browser(self, request: Request) -> _Browser:
        existing = self.sessions.browser_id(request)
        return _Browser(existing, False) if existing else _Browser(new_secret(), True)

    def _page(
        self,
        request: Request,
        browser: _Browser,
        template: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        form_targets: tuple[str, ...] = (),
    ) -> Response:
        context = {"csrf_token": self.csrf.token(browser.id), **context}
        response = self.pages.render(
            request, template, context, status=status, form_targets=form_targets
        )
        if browser.new:
            self.sessions.set_cookie(response, browser.id)
        return response

    def _csrf_ok(self, request: Request, form: dict[str, list[str]] | Any) -> bool:
        token = form.get(CSRF_FIELD)
        if isinstance(token, list):
            token = token[0] if token else None
        return self.csrf.valid(self.sessions.browser_id(request), token)

    def _forbidden(self, request: Request) -> Response:
        return self.pages.error(
            request,
            "Please try again",
            "This form has expired or did not come from this site. Go back, reload the "
            "page and send it again.",
            status=403,
        )

    def _sign_in_redirect(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(
            f"{self.prefix}/login?{urlencode({'next': target})}", status_code=303
        )

    def _safe_next(self, value: str | None) -> str:
        """Only a path on this server: never another site (no open redirect)."""
        default = self.prefix + rfc8414.SETTINGS
        if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
            return default
        if any(ord(c) < 0x20 for c in value):
            return default
        return value

    # -- metadata and keys -------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        body = rfc8414.metadata(self.issuer, list(self.scopes()))
        return JSONResponse(body, headers={"Cache-Control": "max-age=300"})

    async def jwks(self, request: Request) -> Response:
        keys = await run_in_threadpool(self.server.keyring.jwks)
        return JSONResponse(keys, headers={"Cache-Control": "max-age=60"})

    async def home(self, request: Request) -> Response:
        return RedirectResponse(self.prefix + rfc8414.SETTINGS, status_code=303)

    # -- authorization endpoint and consent ---------------------------------------------

    async def authorize(self, request: Request) -> Response:
        oreq = await adapt(request, self.base_url, from_form=False)
        return await run_in_threadpool(self._authorize, request, oreq)

    def _authorize(self, request: Request, oreq: StarletteOAuth2Request) -> Response:
        try:
            grant = self.server.get_consent_grant(oreq)
        except OAuth2Error as error:
            return self._authorize_error(request, oreq, error)
        user = self.sessions.user(request)
        if user is None:
            if not self.sessions.local_sign_in:
                return self.pages.error(
                    request, "Not signed in", "Sign in through your organisation first.", status=401
                )
            return self._sign_in_redirect(request)
        client = grant.request.client
        browser = self._browser(request)
        if request.method == "GET":
            return self._consent_page(request, browser, grant, user)
        if not self._csrf_ok(request, oreq.form):
            return self._forbidden(request)
        approval = None
        if oreq.form.get("decision") == "allow":
            approval = self._approve(grant, user, oreq.form.getlist("scope"), oreq.form)
        response: Response = self.server.create_authorization_response(
            oreq, grant_user=approval, grant=grant
        )
        log.info(
            "authorization %s for app %s by user %s",
            "granted" if approval else "denied",
            client.client_id,
            user,
        )
        return response

    def _authorize_error(
        self, request: Request, oreq: StarletteOAuth2Request, error: OAuth2Error
    ) -> Response:
        if error.redirect_uri:  # the client and redirect URI are known good
            response: Response = self.server.handle_error_response(oreq, error)
            return response
        # RFC 6749 4.1.2.1: unknown client or bad redirect URI: tell the user, never redirect.
        return self.pages.error(
            request,
            "This app cannot connect",
            error.description or "The request is not valid.",
            status=400,
            code=error.error,
        )

    def _offered(self, grant: Any) -> list[ScopeInfo]:
        names = (grant.request.scope or "").split()
        catalogue = self.scopes()
        return [catalogue[n] for n in names if n in catalogue]

    def _earlier(self, user: str, client_id: str) -> tuple[set[str] | None, dict[str, Access]]:
        """What the user already gave the app: the consented scopes (None: no consent) and
        the live grants' levels, by data source."""
        consents = self.store.list_consents(user, client_id)
        scopes = set(consents[0]["scopes"]) if consents else None
        grants = {g.data_source: g.access for g in self.store.list_grants(user, client_id)}
        return scopes, grants

    def _consent_page(self, request: Request, browser: _Browser, grant: Any, user: str) -> Response:
        client = grant.request.client
        offered = self._offered(grant)
        consented, granted = self._earlier(user, client.client_id)
        # Reconnecting: what the user already gave is ticked, the rest is marked new.
        # A first consent ticks every scope the app asks for and no data source.
        reconnect = consented is not None or bool(granted)
        scopes = [
            {"info": s, "new": reconnect and s.name not in (consented or ())} for s in offered
        ]
        data_sources = None
        data_scopes = [s for s in offered if s.needs_grants]
        if data_scopes:
            # The level the app would get: its data scopes' highest, at most the user's own.
            level = max(s.access for s in data_scopes)
            described = {d["name"]: d["description"] for d in self.store.list_data_sources()}
            data_sources = []
            for row in self.store.list_user_access(user):
                name, own = row["data_source"], Access.parse(row["role"])
                access = min(level, own)
                earlier = granted.get(name)
                data_sources.append(
                    {
                        "name": name,
                        "access": access.label,
                        "description": described.get(name, ""),
                        "checked": earlier is not None,
                        "new": reconnect and earlier is None,
                        # Shared now at another level: Allow changes it to `access`.
                        "now": min(earlier, own).label
                        if earlier is not None and min(earlier, own) != access
                        else "",
                    }
                )
        redirect_uri = grant.redirect_uri
        return self._page(
            request,
            browser,
            "consent.html",
            {
                "user": user,
                "app_name": client.app.name,
                "reconnect": reconnect,
                "scopes": scopes,
                "data_sources": data_sources,
                "action": f"{request.url.path}?{request.url.query}",
                "redirect_host": urlsplit(redirect_uri).netloc,
            },
            form_targets=(origin(redirect_uri),),
        )

    def _approve(self, grant: Any, user: str, ticked: list[str], form: Any) -> Approval | None:
        """Write what the user chose, in one transaction (Store.approve): the consent, and,
        when the page listed data sources, exactly the ticked grants (an unticked one is
        taken away; a page that listed none leaves the grants as they are)."""
        client_id = grant.request.client.client_id
        offered = self._offered(grant)
        scopes = [s for s in offered if s.name in ticked]
        if not scopes:
            return None  # nothing approved is a denial
        own = {r["data_source"]: Access.parse(r["role"]) for r in self.store.list_user_access(user)}
        data_scopes = [s for s in scopes if s.needs_grants]
        chosen: list[str] = []
        if data_scopes:
            chosen = [d for d in dict.fromkeys(form.getlist("data_source")) if d in own]
        level = max((s.access for s in data_scopes), default=Access.READ)
        grants = None
        if any(s.needs_grants for s in offered):  # the page asked which data sources
            grants = {name: min(level, own[name]) for name in chosen}
        # Scopes consented before that this request did not ask for (so the page did not
        # show them) stay consented: only an offered scope left unticked is taken away.
        asked = {s.name for s in offered}
        earlier, _ = self._earlier(user, client_id)
        kept = [name for name in sorted(earlier or ()) if name not in asked]
        self.store.approve(user, client_id, [*(s.name for s in scopes), *kept], grants)
        metrics.safely(lambda m: m.consents.labels("given").inc())
        return Approval(user, tuple(s.name for s in scopes), tuple(chosen))

    # -- token, revocation, introspection ---------------------------------------------

    async def token(self, request: Request) -> Response:
        oreq = await adapt(request, self.base_url, from_form=True)
        refused = refuse_repeated_parameters(oreq)
        if refused is not None:
            return refused
        if "grant_type" not in oreq.form:
            error = InvalidRequestError("Missing 'grant_type'.")
            response: Response = self.server.handle_error_response(oreq, error)
            return response
        result: Response = await run_in_threadpool(self.server.create_token_response, oreq)
        return result

    async def revoke(self, request: Request) -> Response:
        return await self._endpoint(request, "revocation")

    async def introspect(self, request: Request) -> Response:
        return await self._endpoint(request, "introspection")

    async def _endpoint(self, request: Request, name: str) -> Response:
        oreq = await adapt(request, self.base_url, from_form=True)
        refused = refuse_repeated_parameters(oreq)
        if refused is not None:
            return refused
        result: Response = await run_in_threadpool(self.server.create_endpoint_response, name, oreq)
        result.headers["Cache-Control"] = "no-store"
        return result

    # -- sign-in -----------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        form: dict[str, str] = {}
        if request.method == "POST":
            async with request.form() as data:
                form = {k: v for k, v in data.items() if isinstance(v, str)}
        return await run_in_threadpool(self._login, request, form)

    def _app_name_in(self, next_url: str) -> str:
        query = parse_qs(urlsplit(next_url).query)
        client_id = (query.get("client_id") or [""])[0]
        client = self.server.query_client(client_id) if client_id else None
        return client.app.name if client else ""

    def _login(self, request: Request, form: dict[str, str]) -> Response:
        if not self.sessions.local_sign_in:
            return self.pages.error(
                request, "Not signed in", "Sign in through your organisation first.", status=401
            )
        browser = self._browser(request)
        next_url = self._safe_next(form.get("next") or request.query_params.get("next"))
        context: dict[str, Any] = {
            "next": next_url,
            "app_name": self._app_name_in(next_url),
            "username": "",
        }
        if request.method == "GET":
            return self._page(request, browser, "signin.html", context)
        if not self._csrf_ok(request, form):
            return self._forbidden(request)
        username = form.get("username", "").strip()[:200]
        context["username"] = username
        address = request.client.host if request.client else "-"
        if self.throttle.blocked(username, address):
            log.warning("sign-in throttled for user %r from %s", username, address)
            return self._page(
                request,
                browser,
                "signin.html",
                {**context, "error": "Too many failed sign-ins. Wait a few minutes and retry."},
                status=429,
            )
        stored = self.storage.password_hash(username) if username else None
        if not verify_password(stored, form.get("password", "")):
            self.throttle.failed(username, address)
            log.info("failed sign-in for user %r from %s", username, address)
            metrics.safely(lambda m: m.sign_in_failures.inc())
            return self._page(
                request,
                browser,
                "signin.html",
                {**context, "error": "The user name or password is wrong."},
                status=401,
            )
        self.throttle.succeeded(username)
        session_id = self.sessions.start(request, username)
        response = RedirectResponse(next_url, status_code=303)
        self.sessions.set_cookie(response, session_id)
        return response

    async def logout(self, request: Request) -> Response:
        async with request.form() as data:
            form = {k: v for k, v in data.items() if isinstance(v, str)}
        if not self._csrf_ok(request, form):
            return self._forbidden(request)
        await run_in_threadpool(self.sessions.end, request)
        response = RedirectResponse(f"{self.prefix}/login", status_code=303)
        self.sessions.clear_cookie(response)
        return response

    # -- settings: connected apps ------------------------------------------------------

    async def settings(self, request: Request) -> Response:
        return await run_in_threadpool(self._settings, request)

    def _settings(self, request: Request) -> Response:
        user = self.sessions.user(request)
        if user is None:
            return self._sign_in_redirect(request)
        apps = []
        catalogue = self.scopes()
        with self.facts.view() as view:
            for consent in self.store.list_consents(user_id=user):
                try:
                    app = self.store.get_app(consent["client_id"])
                except NotFound:
                    continue
                scopes = [catalogue.get(s, ScopeInfo(s, s, False)) for s in consent["scopes"]]
                apps.append(
                    {
                        "client_id": app.client_id,
                        "name": app.name,
                        "scopes": scopes,
                        "data_sources": live_data_sources(view, user, app.client_id),
                    }
                )
        notice = ""
        done = request.query_params.get("done")
        subject = request.query_params.get("subject", "")[:200]
        if done == "revoked":
            notice = f"{subject} is no longer shared."
        elif done == "disconnected":
            notice = f"{subject} is disconnected."
        return self._page(
            request,
            self._browser(request),
            "settings.html",
            {"user": user, "apps": apps, "notice": notice},
        )

    async def settings_revoke(self, request: Request) -> Response:
        return await self._settings_change(request, disconnect=False)

    async def settings_disconnect(self, request: Request) -> Response:
        return await self._settings_change(request, disconnect=True)

    async def _settings_change(self, request: Request, *, disconnect: bool) -> Response:
        async with request.form() as data:
            form = {k: v for k, v in data.items() if isinstance(v, str)}
        return await run_in_threadpool(self._change, request, form, disconnect)

    def _change(self, request: Request, form: dict[str, str], disconnect: bool) -> Response:
        user = self.sessions.user(request)
        if user is None:
            return self._sign_in_redirect(request)
        if not self._csrf_ok(request, form):
            return self._forbidden(request)
        client_id = form.get("client_id", "")
        if disconnect:
            gone = self.store.disconnect(user, client_id)
            families = gone.families
            log.info("user %s disconnected app %s (%d token families)", user, client_id, families)
            if gone.consent:  # a pair with no consent left had none to lose
                metrics.safely(lambda m: m.consents.labels("revoked").inc())
            subject = self._app_label(client_id)
            done = "disconnected"
        else:
            data_source = form.get("data_source", "")
            with contextlib.suppress(NotFound):
                self.store.revoke_grant(user, client_id, data_source)
            log.info("user %s revoked %s from app %s", user, data_source, client_id)
            subject = data_source
            done = "revoked"
        query = urlencode({"done": done, "subject": subject})
        return RedirectResponse(f"{self.prefix}{rfc8414.SETTINGS}?{query}", status_code=303)

    def _app_label(self, client_id: str) -> str:
        try:
            return self.store.get_app(client_id).name
        except NotFound:
            return client_id


def _zero_series(m: metrics.Metrics) -> None:
    for grant_type in GRANT_TYPES:
        m.tokens_issued.labels(grant_type)
    for event in ("given", "revoked"):
        m.consents.labels(event)
