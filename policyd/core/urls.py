"""Database URLs in messages: never with their password (store.url, the audit index)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(url: str) -> bool:
    """A PostgreSQL connection URL (store.url, the audit index's)?"""
    return url.startswith(POSTGRES_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password (user:***@, password=***), for messages."""
    url = re.sub(r"(password=)[^&\s]*", r"\1***", url)
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, slashes, userinfo = head.partition("//")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{slashes}{userinfo}@{tail}"


def _password(url: str) -> str:
    try:
        password = urlsplit(url).password or ""
    except ValueError:
        password = ""
    found = re.search(r"password=([^&\s]*)", url)
    return password or (found.group(1) if found else "")


def problem(url: str, exc: BaseException) -> str:
    """A driver's message about `url`: its first line, without the password."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.removeprefix("connection failed: ")
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    return text
