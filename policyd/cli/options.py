"""The request-target options of `policyd check` and `policyd policy explain`, and token input.

One definition of --method, --path, --query, --body, --action and --data-source (the two
commands describe a request the same way) and of how their values become a target.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from policyd.core.errors import InvalidInput
from policyd.core.model import ActionTarget, HttpTarget

F = TypeVar("F", bound=Callable[..., object])

_REQUEST_TARGET_OPTIONS = [
    click.option("--method", default="GET", show_default=True),
    click.option("--path", help="Request path, e.g. /api/data/tags/edge-historian."),
    click.option("--query", default="", help="Raw query string."),
    click.option("--body", default=None, help="JSON body; @FILE reads a file."),
    click.option("--action", help="An action name instead of --path."),
    click.option("--data-source", "data_sources", multiple=True, help="With --action; repeatable."),
]


def request_target_options(f: F) -> F:
    """--method, --path, --query, --body, --action, --data-source, in this order."""
    for option in reversed(_REQUEST_TARGET_OPTIONS):
        f = option(f)
    return f


def require_one_target(path: str | None, action: str | None) -> None:
    if bool(path) == bool(action):
        raise click.UsageError("give exactly one of --path and --action")


def request_target(
    method: str,
    path: str | None,
    query: str,
    body: str | None,
    action: str | None,
    data_sources: tuple[str, ...],
) -> HttpTarget | ActionTarget:
    """The target of a command-line decision: --path (and --body, @FILE or text) or --action."""
    if path:
        raw_body = b""
        if body is not None:
            raw_body = Path(body[1:]).read_bytes() if body.startswith("@") else os.fsencode(body)
        return HttpTarget(method.upper(), path, query.lstrip("?"), {}, raw_body)
    assert action is not None
    return ActionTarget(action, data_sources)


def read_token(token: str) -> str:
    if token == "-":
        if sys.stdin.isatty():
            raise InvalidInput("give the token as an argument or on stdin")
        return sys.stdin.read().strip()
    if token.startswith("@"):
        try:
            return Path(token[1:]).read_text().strip()
        except UnicodeDecodeError:
            raise InvalidInput(f"token file {token[1:]} is not text") from None
    return token.strip()
