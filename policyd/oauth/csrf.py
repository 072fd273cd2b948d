"""CSRF tokens for every form: an HMAC of the browser's session cookie under a server key.

Each browser that is shown a form gets a random session cookie (signed in or not); the
form carries HMAC-SHA256(key, cookie). A forged cross-site POST has the cookie (SameSite=Lax
withholds it from cross-site POSTs anyway) but cannot read the page to learn the token.
The key is 32 random bytes in `oauth.session_key_file`, mode 0600, made on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from policyd.core.files import create_whole

FIELD = "csrf_token"


def load_or_create_key(path: str | Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        create_whole(path, secrets.token_bytes(32))  # or another process made it first
        return load_or_create_key(path)
    if len(data) != 32:
        raise ValueError(f"{path} must hold exactly 32 bytes")
    return data


class Csrf:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def token(self, session_id: str) -> str:
        return hmac.new(self._key, b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()

    def valid(self, session_id: str | None, token: str | None) -> bool:
        if not session_id or not token:
            return False
        return hmac.compare_digest(self.token(session_id), token)
