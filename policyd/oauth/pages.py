"""Rendering of the sign-in, consent, settings and error pages, with their security headers.

Pages are plain server-rendered HTML (templates/), with one small stylesheet and no
JavaScript. Every page is sent with `X-Frame-Options: DENY` and a CSP that forbids framing,
scripts and foreign resources; the consent page's `form-action` also names the app's
redirect origin, since browsers apply it to the redirect that follows the form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def origin(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(response: Response, form_targets: tuple[str, ...] = ()) -> Response:
    form_action = " ".join(("'self'", *form_targets))
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; "
        f"form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


class Pages:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.templates = Jinja2Templates(directory=str(TEMPLATES))

    def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        form_targets: tuple[str, ...] = (),
    ) -> Response:
        values = {"prefix": self.prefix, "user": None, "csrf_token": "", **context}
        response = self.templates.TemplateResponse(request, template, values, status_code=status)
        return security_headers(response, form_targets)

    def error(
        self,
        request: Request,
        title: str,
        message: str,
        *,
        status: int = 400,
        code: str = "",
    ) -> Response:
        return self.render(
            request,
            "error.html",
            {"title": title, "message": message, "code": code},
            status=status,
        )
