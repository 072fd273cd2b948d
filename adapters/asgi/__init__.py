"""ASGI middleware that protects a Python service (Starlette, FastAPI, any ASGI app) with policyd.

    app = PolicydMiddleware(app, "127.0.0.1:50051")

See docs/asgi.md for the options, the status mapping and `scope["auth"]`.
"""

from adapters.asgi.middleware import (
    DEFAULT_FORWARD_HEADERS,
    STRIP_HEADER_PREFIXES,
    STRIP_HEADERS,
    AuthInfo,
    PolicydMiddleware,
)
from policyd.doors.denials import UNAVAILABLE, status_of

__all__ = [
    "DEFAULT_FORWARD_HEADERS",
    "STRIP_HEADERS",
    "STRIP_HEADER_PREFIXES",
    "UNAVAILABLE",
    "AuthInfo",
    "PolicydMiddleware",
    "status_of",
]
