"""Plain data passed into and out of the engine. No transport types here."""

from __future__ import annotations

import enum
import hashlib
import pickle
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from policyd.core.reasons import Reason

# A request whose parts add up to at most this many characters (or bytes) is its own
# remembered-decision key; a larger one is keyed by a digest (small_key).
MAX_PLAIN_KEY = 1024


def small_key(key: Hashable, size: int, tag: str, encode: Callable[[], bytes]) -> Hashable:
    """A remembered decision's key for a request (Engine.decide_keyed), the one rule every
    door's key follows: the request's own `key` when its parts add up to at most
    MAX_PLAIN_KEY (a dict compares keys whole, so two requests share an entry only when
    they are equal); else a 32-byte BLAKE2b digest of `encode()` (an exact, unambiguous
    encoding of the same parts) tagged by the door's kind, so a large token or body does not
    make a large entry and two kinds of key never meet."""
    if size <= MAX_PLAIN_KEY:
        return key
    return (tag, hashlib.blake2b(encode(), digest_size=32).digest())


class Access(enum.IntEnum):
    """An access level on a data source. A higher level includes the lower ones."""

    READ = 1
    WRITE = 2

    @classmethod
    def parse(cls, text: str) -> Access:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"access level must be 'read' or 'write', not {text!r}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """An HTTP request as the gateway saw it (path still percent-encoded)."""

    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


# The built-in action a connector's link asks before it serves data sources to the hub
# (docs/connectors.md): no policy rule, the engine decides it (Engine._attach).
CONNECTOR_ATTACH = "connector.attach"
CONNECTOR_ATTACH_RULE = "builtin:connector.attach"


@dataclass(frozen=True, slots=True)
class ActionTarget:
    """An action the caller already knows, with the data sources it touches."""

    action: str
    data_sources: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckInput:
    token: str
    target: HttpTarget | ActionTarget | None
    request_id: str = ""
    # Which door asked: "grpc", "envoy", "asgi", "embedded", "cli". For the audit log only.
    door: str = "grpc"

    def memo_key(self, with_headers: bool = True) -> Hashable:
        """What a decision (and its audit record) reads from this input, as a key
        (Engine.decide_keyed): all of it but the request id, and the headers only when
        asked. A tuple of its strings when they are small (a dict compares keys whole);
        else a digest, so that a remembered decision's key stays small whatever the size
        of the token and the body."""
        t = self.target
        if isinstance(t, HttpTarget):
            return http_memo_key(
                self.door, self.token, t.method, t.path, t.query, t.headers, t.body, with_headers
            )
        if isinstance(t, ActionTarget):
            what: tuple[Any, ...] = (t.action, t.data_sources)
            size = len(t.action) + sum(map(len, t.data_sources))
        else:
            what = ()
            size = 0
        return _input_key((self.door, self.token, type(t).__name__, *what), size + len(self.token))


def http_memo_key(
    door: str,
    token: str,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    with_headers: bool = True,
) -> Hashable:
    """CheckInput(token, HttpTarget(method, path, query, headers, body), _, door).memo_key(
    with_headers), without building the input: a door that answers a remembered allow
    from its key alone (adapters/embedded) builds the input only when it must decide."""
    items = tuple(sorted(headers.items())) if with_headers and headers else ()
    size = len(token) + len(method) + len(path) + len(query) + len(body)
    if items:
        size += sum(len(k) + len(v) for k, v in items)
    return _input_key((door, token, "HttpTarget", method, path, query, items, body), size)


def _input_key(key: tuple[Any, ...], size: int) -> Hashable:
    # pickle of str, bytes and tuples is exact and unambiguous (lengths, types).
    return small_key(key, size, "input-blake2b", lambda: pickle.dumps(key, protocol=5))


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    client_id: str
    scopes: tuple[str, ...]
    jti: str


class Decision(NamedTuple):
    """One decision. A named tuple, not a frozen dataclass: as immutable, and built in a
    third of the time (every answer builds one; docs/benchmarks.md)."""

    allowed: bool
    reason: Reason
    message: str
    decision_id: str
    principal: Principal | None = None
    rule_id: str = ""
    action: str = ""
    data_sources: tuple[str, ...] = ()
    policy_version: str = ""
