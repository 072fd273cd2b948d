"""Route rules: which action an HTTP request is, what it needs, and which data sources it names.

A route rule maps methods + a path template (`/api/data/tags/{dsn}`) to an action, the
scopes it requires, the access level it needs, and where the data-source names are: a path
parameter, a query parameter, or a JSON pointer into the body (the keys of an object, the
elements of an array, or one string). Matching walks a trie of path segments, so its cost
does not grow with the number of rules; a literal segment wins over a parameter.

Paths are matched after strict percent-decoding of each segment. Anything that could be
read two ways is refused (PATH_AMBIGUOUS) rather than guessed: an encoded '/' or '\\', a
'.' or '..' segment, an empty segment, a bad escape, control characters. Bodies must be
JSON without duplicate keys and within the size limit.

The rules themselves come from policy files (policy.py, policies/). BUILTIN_RULES is no
longer served: it is the reference table that tests compare policies/hub.yaml against.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from policyd.core.conditions import Condition
from policyd.core.model import Access
from policyd.core.reasons import Denied, Reason

_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNSAFE_RAW = re.compile(r"[?#\\\x00-\x20\x7f]")
_UNSAFE_DECODED = re.compile(r"[\\\x00-\x1f\x7f]")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_INDEX = re.compile(r"0|[1-9][0-9]*")
# A literal template segment: RFC 3986 pchar without percent-escapes (matched decoded).
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]+$")


class RequestProblem(Denied):
    """The request cannot be decided as given; carries the deny reason."""


@dataclass(frozen=True, slots=True)
class DataSourceRef:
    """Where a rule finds data-source names in a request."""

    where: Literal["path", "query", "body"]
    # The path parameter name, the query parameter name, or a JSON pointer (RFC 6901).
    name: str
    # For body refs: the names are the object's keys, the array's items, or one string.
    shape: Literal["keys", "items", "value"] = "value"


@dataclass(frozen=True, slots=True)
class RouteRule:
    id: str
    methods: frozenset[str]
    path: str
    action: str
    scopes_all: frozenset[str] = frozenset()
    scopes_any: frozenset[str] = frozenset()
    access: Access | None = None
    data_sources: tuple[DataSourceRef, ...] = ()
    # The action lists data sources: the decision reports every data source granted.
    lists_granted: bool = False
    public: bool = False
    # Allow/deny conditions (policy files), evaluated after the built-in checks.
    conditions: tuple[Condition, ...] = field(default=(), compare=False)
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.path.strip("/").split("/")))

    @property
    def needs_body(self) -> bool:
        return any(ref.where == "body" for ref in self.data_sources)

    @property
    def params(self) -> tuple[str, ...]:
        """The names of the template's path parameters, in order."""
        return tuple(m.group(1) for seg in self.segments if (m := _PARAM.match(seg)))


def template_problem(path: str) -> str | None:
    """What is wrong with a path template, or None when it is usable."""
    if not path.startswith("/"):
        return "must start with '/'"
    if path == "/":
        return None
    names: set[str] = set()
    for seg in path[1:].split("/"):
        if not seg:
            return "has an empty segment ('//' or a trailing '/')"
        m = _PARAM.match(seg)
        if m:
            if m.group(1) in names:
                return f"names the parameter {{{m.group(1)}}} twice"
            names.add(m.group(1))
        elif "{" in seg or "}" in seg:
            return f"segment {seg!r}: a parameter must be a whole segment, like {{name}}"
        elif seg in (".", ".."):
            return "has a dot segment"
        elif not _LITERAL.match(seg):
            return (
                f"segment {seg!r} has a character that is not allowed"
                " (write literals decoded, without '%', spaces or '?#')"
            )
    return None


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    param_name: str = ""
    rules: dict[str, RouteRule] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Match:
    rule: RouteRule
    params: dict[str, str]


def split_path(raw: str) -> list[str]:
    """Decode a request path into segments, refusing anything ambiguous."""
    if not raw.startswith("/"):
        raise RequestProblem(Reason.REQUEST_INVALID, "path must start with '/'")
    if _UNSAFE_RAW.search(raw):
        raise RequestProblem(
            Reason.PATH_AMBIGUOUS, "path has '?', '#', a backslash or control characters"
        )
    if raw == "/":
        return []
    segments = raw[1:].split("/")
    if "%" in raw:
        if _ESCAPE.search(raw):
            raise RequestProblem(Reason.PATH_AMBIGUOUS, "path has a malformed percent-escape")
        try:
            segments = [unquote(part, errors="strict") for part in segments]
        except UnicodeDecodeError:
            raise RequestProblem(Reason.PATH_AMBIGUOUS, "path is not UTF-8") from None
        for seg in segments:
            if "/" in seg or _UNSAFE_DECODED.search(seg):
                raise RequestProblem(
                    Reason.PATH_AMBIGUOUS, "path has an encoded slash or control character"
                )
    for seg in segments:
        if not seg:
            raise RequestProblem(Reason.PATH_AMBIGUOUS, "path has an empty segment")
        if seg == "." or seg == "..":
            raise RequestProblem(Reason.PATH_AMBIGUOUS, "path has a dot segment")
    return segments


class RouteTable:
    """Rules indexed for matching by path trie and by action name."""

    def __init__(self, rules: list[RouteRule] | tuple[RouteRule, ...]) -> None:
        self.rules = tuple(rules)
        self._root = _Node()
        self._actions: dict[str, RouteRule] = {}
        for rule in self.rules:
            self._insert(rule)
            self._actions.setdefault(rule.action, rule)
        canonical = json.dumps([_canonical(r) for r in self.rules], sort_keys=True)
        self.version = "builtin-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def _insert(self, rule: RouteRule) -> None:
        node = self._root
        for seg in rule.segments if rule.path != "/" else ():
            m = _PARAM.match(seg)
            if m:
                if node.param is None:
                    node.param = _Node(param_name=m.group(1))
                elif node.param.param_name != m.group(1):
                    raise ValueError(
                        f"rule {rule.id}: parameter {{{m.group(1)}}} conflicts with"
                        f" {{{node.param.param_name}}} at the same place"
                    )
                node = node.param
            else:
                node = node.literal.setdefault(seg, _Node())
        for method in rule.methods:
            if method in node.rules:
                raise ValueError(f"rules {node.rules[method].id} and {rule.id} overlap")
            node.rules[method] = rule

    def match(self, method: str, segments: list[str]) -> Match | None:
        params: dict[str, str] = {}
        rule = self._find(self._root, method, segments, 0, params)
        return None if rule is None else Match(rule, params)

    def _find(
        self, node: _Node, method: str, segments: list[str], i: int, params: dict[str, str]
    ) -> RouteRule | None:
        """The rule for method at segments[i:] below node; a literal beats a parameter."""
        if i == len(segments):
            return node.rules.get(method)
        child = node.literal.get(segments[i])
        if child is not None:
            found = self._find(child, method, segments, i + 1, params)
            if found is not None:
                return found
        if node.param is not None:
            found = self._find(node.param, method, segments, i + 1, params)
            if found is not None:
                params[node.param.param_name] = segments[i]
                return found
        return None

    def by_action(self, action: str) -> RouteRule | None:
        return self._actions.get(action)


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two rules that cannot both be in one table; `second` comes later in the rule list."""

    first: RouteRule
    second: RouteRule
    message: str


@dataclass(slots=True)
class _ShapeNode:
    literal: dict[str, _ShapeNode] = field(default_factory=dict)
    param: _ShapeNode | None = None
    param_name: str = ""
    param_rule: RouteRule | None = None
    rules: list[RouteRule] = field(default_factory=list)


def find_conflicts(rules: list[RouteRule] | tuple[RouteRule, ...]) -> list[Conflict]:
    """Every pair of rules that a table cannot order, like Go's ServeMux does.

    Two rules conflict when they share a method and some path matches both templates, and
    neither is more specific (its literal segments a strict superset of the other's). A more
    specific rule simply wins (a literal beats a parameter); an identical template, or two
    templates each with a literal where the other has a parameter (`/a/{x}/c` and
    `/a/b/{y}` both match `/a/b/c`), is ambiguous. Also refused: two parameter names at the
    same place, which the trie cannot hold. Walks a trie, so it does not compare every pair.
    """
    root = _ShapeNode()
    found: list[Conflict] = []
    for rule in rules:
        segs = rule.segments if rule.path != "/" else ()
        for other in _overlapping(root, segs, 0):
            if other.methods & rule.methods:
                problem = _ambiguity(other, rule)
                if problem:
                    found.append(Conflict(other, rule, problem))
        node = root
        for seg in segs:
            m = _PARAM.match(seg)
            if m:
                if node.param is None:
                    node.param = _ShapeNode()
                    node.param_name, node.param_rule = m.group(1), rule
                elif node.param_name != m.group(1) and node.param_rule is not None:
                    found.append(
                        Conflict(
                            node.param_rule,
                            rule,
                            f"parameter {{{m.group(1)}}} of rule {rule.id} is"
                            f" {{{node.param_name}}} in rule {node.param_rule.id} at the same"
                            " place; use one name",
                        )
                    )
                node = node.param
            else:
                node = node.literal.setdefault(seg, _ShapeNode())
        node.rules.append(rule)
    return found


def _overlapping(node: _ShapeNode, segs: tuple[str, ...], i: int) -> list[RouteRule]:
    """Rules below node whose templates match some path that segs[i:] also matches."""
    if i == len(segs):
        return list(node.rules)
    out: list[RouteRule] = []
    if _PARAM.match(segs[i]):
        for child in node.literal.values():
            out += _overlapping(child, segs, i + 1)
    elif (same := node.literal.get(segs[i])) is not None:
        out += _overlapping(same, segs, i + 1)
    if node.param is not None:
        out += _overlapping(node.param, segs, i + 1)
    return out


def _ambiguity(a: RouteRule, b: RouteRule) -> str | None:
    """Why two overlapping rules with a common method conflict, or None if one wins."""
    lit_a = {i for i, s in enumerate(a.segments) if not _PARAM.match(s)}
    lit_b = {i for i, s in enumerate(b.segments) if not _PARAM.match(s)}
    if lit_a < lit_b or lit_b < lit_a:
        return None  # one is more specific and wins
    methods = " ".join(sorted(a.methods & b.methods))
    if lit_a == lit_b:
        return f"rules {a.id} and {b.id} both match {methods} {b.path}"
    example = "/" + "/".join(
        a.segments[i] if i in lit_a else b.segments[i] for i in range(len(a.segments))
    )
    return (
        f"rules {a.id} ({a.path}) and {b.id} ({b.path}) both match {methods} {example}"
        " and neither is more specific"
    )


def _canonical(rule: RouteRule) -> dict[str, Any]:
    """A rule as JSON-able data with sets sorted, so the version hash is stable."""
    return {
        "id": rule.id,
        "methods": sorted(rule.methods),
        "path": rule.path,
        "action": rule.action,
        "scopes_all": sorted(rule.scopes_all),
        "scopes_any": sorted(rule.scopes_any),
        "access": rule.access.label if rule.access else None,
        "data_sources": [[r.where, r.name, r.shape] for r in rule.data_sources],
        "lists_granted": rule.lists_granted,
        "public": rule.public,
        "conditions": [c.id for c in rule.conditions],
    }


def _no_constants(name: str) -> Any:
    raise RequestProblem(Reason.BODY_INVALID, f"body has the non-JSON number {name}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestProblem(Reason.BODY_INVALID, f"body has duplicate key {key[:40]!r}")
        out[key] = value
    return out


def parse_body(body: bytes, limit: int) -> Any:
    if len(body) > limit:
        raise RequestProblem(Reason.BODY_TOO_LARGE, f"body is larger than {limit} bytes")
    if not body:
        raise RequestProblem(Reason.BODY_INVALID, "body is empty; this route needs JSON")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestProblem(Reason.BODY_INVALID, "body is not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except RequestProblem:
        raise
    except (ValueError, RecursionError):
        raise RequestProblem(Reason.BODY_INVALID, "body is not valid JSON") from None


def pointer_problem(pointer: str) -> str | None:
    """What is wrong with an RFC 6901 JSON pointer, or None."""
    if pointer and not pointer.startswith("/"):
        return "a JSON pointer must be empty or start with '/'"
    if re.search(r"~(?![01])", pointer):
        return "'~' in a JSON pointer must be followed by 0 or 1 (~0 is '~', ~1 is '/')"
    return None


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901 JSON pointer lookup; a missing member is a BODY_INVALID problem."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer must be empty or start with '/': {pointer!r}")
    node = doc
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and _INDEX.fullmatch(token) and int(token) < len(node):
            node = node[int(token)]
        else:
            raise RequestProblem(Reason.BODY_INVALID, f"body has nothing at {pointer}")
    return node


def extract_data_sources(
    rule: RouteRule, params: dict[str, str], query: str, body: bytes, body_limit: int
) -> tuple[str, ...]:
    """The data-source names an HTTP request names, in first-seen order, without repeats."""
    found = extract_with_sources(rule, params, query, body, body_limit)
    return tuple(dict.fromkeys(name for name, _ref in found))


def extract_with_sources(
    rule: RouteRule, params: dict[str, str], query: str, body: bytes, body_limit: int
) -> list[tuple[str, DataSourceRef]]:
    """Each data-source name with the reference it came from, repeats included."""
    found: list[tuple[str, DataSourceRef]] = []
    doc: Any = None
    for ref in rule.data_sources:
        if ref.where == "path":
            found.append((params[ref.name], ref))
        elif ref.where == "query":
            values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == ref.name]
            if not values:
                raise RequestProblem(Reason.REQUEST_INVALID, f"query parameter {ref.name} missing")
            found.extend((v, ref) for v in values)
        else:
            if doc is None:
                doc = parse_body(body, body_limit)
            value = resolve_pointer(doc, ref.name)
            if ref.shape == "keys":
                if not isinstance(value, dict):
                    raise RequestProblem(Reason.BODY_INVALID, f"{ref.name} must be an object")
                found.extend((k, ref) for k in value)
            elif ref.shape == "items":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise RequestProblem(
                        Reason.BODY_INVALID, f"{ref.name} must be an array of strings"
                    )
                found.extend((v, ref) for v in value)
            else:
                if not isinstance(value, str):
                    raise RequestProblem(Reason.BODY_INVALID, f"{ref.name} must be a string")
                found.append((value, ref))
    if not found:
        raise RequestProblem(Reason.REQUEST_INVALID, "the request names no data source")
    for name, _ref in found:
        if not name:
            raise RequestProblem(Reason.REQUEST_INVALID, "empty data-source name")
        try:
            name.encode()
        except UnicodeEncodeError:
            raise RequestProblem(Reason.BODY_INVALID, "data-source name is not text") from None
    return found


_READ = Access.READ
_WRITE = Access.WRITE
_BODY_TAGS = (DataSourceRef("body", "/tags", "keys"),)
_PATH_DSN = (DataSourceRef("path", "dsn"),)
_GET = frozenset({"GET"})
_POST = frozenset({"POST"})
_PUT = frozenset({"PUT"})
_READ_SCOPE = frozenset({"DataRead"})
_WRITE_SCOPE = frozenset({"DataWrite"})


def _body_read(rule_id: str, path: str, action: str) -> RouteRule:
    return RouteRule(
        rule_id, _POST, path, action, _READ_SCOPE, access=_READ, data_sources=_BODY_TAGS
    )


BUILTIN_RULES: tuple[RouteRule, ...] = (
    RouteRule("service-info", _GET, "/api/info", "service.info", public=True),
    RouteRule("user-profile", _GET, "/api/user/me", "user.profile", frozenset({"UserInfo"})),
    RouteRule(
        "datasources-list",
        _GET,
        "/api/data/datasources",
        "datasources.list",
        _READ_SCOPE,
        access=_READ,
        lists_granted=True,
    ),
    RouteRule(
        "datasources-get",
        _GET,
        "/api/data/datasources/{dsn}",
        "datasources.get",
        _READ_SCOPE,
        access=_READ,
        data_sources=_PATH_DSN,
    ),
    RouteRule(
        "tags-search",
        _GET,
        "/api/data/tags/{dsn}",
        "tags.search",
        _READ_SCOPE,
        access=_READ,
        data_sources=_PATH_DSN,
    ),
    RouteRule(
        "tags-get",
        _GET,
        "/api/data/tags/{dsn}/{tag}",
        "tags.get",
        _READ_SCOPE,
        access=_READ,
        data_sources=_PATH_DSN,
    ),
    _body_read("values-snapshot", "/api/data/v2/snapshot", "values.snapshot"),
    _body_read("values-raw", "/api/data/v2/raw", "values.raw"),
    _body_read("values-plot", "/api/data/v2/plot", "values.plot"),
    _body_read("values-processed", "/api/data/v2/processed", "values.processed"),
    _body_read("values-at-times", "/api/data/v2/values-at-times", "values.at_times"),
    RouteRule(
        "values-write-snapshot",
        _PUT,
        "/api/data/v2/snapshot/{dsn}",
        "values.write_snapshot",
        _WRITE_SCOPE,
        access=_WRITE,
        data_sources=_PATH_DSN,
    ),
    RouteRule(
        "values-write-history",
        _PUT,
        "/api/data/v2/history/{dsn}",
        "values.write_history",
        _WRITE_SCOPE,
        access=_WRITE,
        data_sources=_PATH_DSN,
    ),
    RouteRule(
        "account-debit", _POST, "/api/account/debit", "account.debit", frozenset({"AccountDebit"})
    ),
    RouteRule(
        "account-refund",
        _POST,
        "/api/account/refund",
        "account.refund",
        frozenset({"AccountDebit"}),
    ),
)

# Scopes known to the built-in policy; True when the scope needs data-source grants.
BUILTIN_SCOPES: dict[str, bool] = {
    "UserInfo": False,
    "DataRead": True,
    "DataWrite": True,
    "AccountDebit": False,
}
