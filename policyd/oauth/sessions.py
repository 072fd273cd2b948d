"""Who is signed in: a session cookie naming a server-side session, or a trusted header.

The cookie holds a random id; the store keeps its SHA-256 hash with the user and expiry
(storage.py), so signing out or expiry ends a session for good. Cookies are HttpOnly,
SameSite=Lax, and Secure when the issuer is https. Signing in always starts a new session
id (no session fixation).

The hook for a trusted upstream identity: with `oauth.trusted_user_header` set, the user
is whoever that header names (a fronting proxy that does single sign-on sets it and strips
it from clients); local sign-in is then off. The user must exist in the store.

Sign-in failures are rate limited per user name and per client address (LoginThrottle).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from starlette.requests import Request
from starlette.responses import Response

from policyd.oauth.storage import OAuthStorage, new_secret

COOKIE = "policyd_session"


class Sessions:
    def __init__(
        self,
        storage: OAuthStorage,
        *,
        ttl_seconds: int,
        secure: bool,
        path: str,
        trusted_user_header: str = "",
    ) -> None:
        self.storage = storage
        self.ttl_seconds = ttl_seconds
        self.secure = secure
        self.path = path or "/"
        self.trusted_user_header = trusted_user_header

    @property
    def local_sign_in(self) -> bool:
        return not self.trusted_user_header

    def browser_id(self, request: Request) -> str | None:
        value = request.cookies.get(COOKIE)
        return value if value and len(value) <= 100 else None

    def user(self, request: Request) -> str | None:
        """The signed-in user (blocking: reads the store)."""
        if self.trusted_user_header:
            name = request.headers.get(self.trusted_user_header, "").strip()
            return name if name and self.storage.user_exists(name) else None
        session_id = self.browser_id(request)
        return self.storage.session_user(session_id) if session_id else None

    def start(self, request: Request, user_id: str) -> str:
        """Sign in: end any old session, return a new id for set_cookie (blocking)."""
        old = self.browser_id(request)
        if old:
            self.storage.end_session(old)
        session_id = new_secret()
        self.storage.new_session(session_id, user_id, self.ttl_seconds)
        return session_id

    def end(self, request: Request) -> None:
        session_id = self.browser_id(request)
        if session_id:
            self.storage.end_session(session_id)

    def set_cookie(self, response: Response, session_id: str) -> None:
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=self.ttl_seconds,
            path=self.path,
            secure=self.secure,
            httponly=True,
            samesite="lax",
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(
            COOKIE, path=self.path, secure=self.secure, httponly=True, samesite="lax"
        )


class LoginThrottle:
    """At most `max_failures` failed sign-ins per user name and per address per window."""

    MAX_KEYS = 100_000

    def __init__(self, max_failures: int, window_seconds: float) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def blocked(self, user_id: str, address: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(
                len(self._recent(key, now)) >= self.max_failures
                for key in (f"user:{user_id}", f"addr:{address}")
            )

    def failed(self, user_id: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self.MAX_KEYS:
                self._failures.clear()  # crude bound; an attacker gains a window at most
            for key in (f"user:{user_id}", f"addr:{address}"):
                self._recent(key, now)
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user_id: str) -> None:
        with self._lock:
            self._failures.pop(f"user:{user_id}", None)
