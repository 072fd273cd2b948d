"""Policy files: the scopes, route rules and conditions that policy authors write (policies/).

A policy is a folder of YAML files (`*.yaml`, `*.yml`; `*_test.yaml` are test suites,
policytest.py), each `apiVersion: policyd/v1` with any of `scopes`, `routes` and
`conditions`; docs/policy.md is the reference. `load_policy` reads them all and returns a
`Policy`, or raises `PolicyInvalid` listing every problem at once as `file:line:column:
message`. The YAML is composed to nodes (PyYAML) rather than loaded, so that every value
keeps its position and unknown fields, duplicate keys and wrong types can be pointed at.

A loaded `Policy` is immutable: the engine holds one in one attribute and a reload swaps it
whole (reload.py). Its version is a hash of the files' names and bytes.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from policyd.core.cel import CelError, compile_expression
from policyd.core.conditions import Condition
from policyd.core.errors import PolicydError
from policyd.core.model import CONNECTOR_ATTACH, Access
from policyd.core.routes import (
    DataSourceRef,
    RouteRule,
    RouteTable,
    find_conflicts,
    pointer_problem,
    template_problem,
)

API_VERSION = "policyd/v1"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ACTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
_SCOPE = re.compile(r"^[A-Za-z][A-Za-z0-9._:-]{0,99}$")
_STR = "tag:yaml.org,2002:str"
# libyaml's parser when PyYAML has it (3 times faster on large policies); same nodes and marks.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOOL = "tag:yaml.org,2002:bool"


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    # What the consent screen shows for it.
    description: str
    # True when the scope needs data-source grants (the consent screen asks for them).
    data_sources: bool = False


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class PolicyInvalid(PolicydError):
    """The policy does not validate; `problems` has every problem found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column, p.message))
        count = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(
            f"policy {source} does not validate ({count} problem{'s' * (count != 1)}):\n{lines}"
        )


@dataclass(frozen=True)
class Policy:
    """Everything a decision needs from the policy, fixed for the policy's lifetime."""

    version: str
    routes: RouteTable
    scopes: Mapping[str, Scope]
    conditions: tuple[Condition, ...] = ()
    source: str = ""
    files: tuple[str, ...] = ()
    # Rule id -> file:line:column of its definition.
    locations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_routes(cls, routes: RouteTable, scopes: Mapping[str, Scope] | None = None) -> Policy:
        """A policy made in code (tests, benchmarks): versioned by its rules."""
        return cls(routes.version, routes, MappingProxyType(dict(scopes or {})))

    @property
    def rules(self) -> tuple[RouteRule, ...]:
        return self.routes.rules

    @functools.cached_property
    def reads_headers(self) -> bool:
        """Whether a decision can depend on request headers: only through a condition that
        reads `request` (engine.decide_keyed leaves headers out of its key otherwise)."""
        conditions = [*self.conditions, *(c for r in self.routes.rules for c in r.conditions)]
        return any("request" in c.program.variables for c in conditions)


def policy_files(directory: str | Path) -> list[Path]:
    """The policy files of a folder, sorted by name (test suites excluded)."""
    folder = Path(directory)
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.stem.endswith("_test") and p.is_file()
    )


def suite_files(directory: str | Path) -> list[Path]:
    """The test suites of a policy folder (`*_test.yaml`), sorted by name."""
    folder = Path(directory)
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml") and p.stem.endswith("_test") and p.is_file()
    )


def read_policy_files(directory: str | Path) -> list[tuple[str, bytes]]:
    """(shown name, bytes) of each policy file; raises PolicyInvalid when there are none."""
    folder = Path(directory)
    if not folder.is_dir():
        raise PolicyInvalid(
            str(folder), [Problem(str(folder), 1, 1, "the policy folder does not exist")]
        )
    files = [(str(p), p.read_bytes()) for p in policy_files(folder)]
    if not files:
        raise PolicyInvalid(
            str(folder),
            [Problem(str(folder), 1, 1, "the policy folder has no policy files (*.yaml)")],
        )
    return files


def version_of(files: list[tuple[str, bytes]]) -> str:
    """The content hash of the files: their base names and bytes, in order."""
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(Path(name).name.encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
    return "sha256:" + digest.hexdigest()[:12]


def fingerprint(directory: str | Path) -> str:
    """The version the folder's files would load as, without loading them ('' if none)."""
    try:
        return version_of(read_policy_files(directory))
    except (PolicyInvalid, OSError):
        return ""


def load_policy(directory: str | Path) -> Policy:
    """Read, validate and compile a policy folder."""
    files = read_policy_files(directory)
    return compile_policy(files, str(directory))


def compile_policy(files: list[tuple[str, bytes]], source: str) -> Policy:
    """A Policy from (shown name, bytes) files; PolicyInvalid lists every problem."""
    builder = _Builder()
    for name, data in files:
        builder.read_file(name, data)
    return builder.finish(source, version_of(files), tuple(name for name, _ in files))


# -- reading YAML nodes ------------------------------------------------------------------


class Reader:
    """Typed access to YAML nodes, recording problems with their positions."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        self.lines: list[str] = []

    def where(self, node: yaml.Node | None) -> str:
        line, column = _position(node)
        return f"{self.file}:{line}:{column}"

    def problem(self, node: yaml.Node | None, message: str) -> None:
        line, column = _position(node)
        self.problems.append(Problem(self.file, line, column, message))

    def compose(self, data: bytes) -> yaml.Node | None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problems.append(Problem(self.file, 1, 1, f"not UTF-8 text ({exc.reason})"))
            return None
        self.lines = text.splitlines()
        try:
            node = yaml.compose(text, Loader=_LOADER)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            what = exc.problem or exc.context or "invalid YAML"
            self.problems.append(Problem(self.file, line, column, f"not valid YAML: {what}"))
            return None
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self.file, 1, 1, f"not valid YAML: {exc}"))
            return None
        if node is None:
            self.problems.append(Problem(self.file, 1, 1, "the file is empty"))
        return node

    def mapping(
        self,
        node: yaml.Node,
        what: str,
        required: tuple[str, ...],
        optional: tuple[str, ...] = (),
    ) -> dict[str, yaml.Node] | None:
        """The fields of a mapping; unknown, duplicate and missing fields are problems."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping")
            return None
        fields: dict[str, yaml.Node] = {}
        known = required + optional
        for key, value in node.value:
            if not (isinstance(key, yaml.ScalarNode) and key.tag == _STR):
                self.problem(key, f"{what}: field names must be strings")
                continue
            name = key.value
            if name in fields:
                self.problem(key, f"{what}: duplicate field {name!r}")
            elif name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.problem(
                    key,
                    f"{what}: unknown field {name!r} (fields: {', '.join(known)}){hint}",
                )
            else:
                fields[name] = value
        for name in required:
            if name not in fields:
                self.problem(node, f"{what}: missing field {name!r}")
        return fields

    def string(self, node: yaml.Node, what: str, pattern: re.Pattern[str] | None = None) -> str:
        """A non-empty string ('' after recording a problem)."""
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _STR):
            self.problem(node, f"{what} must be a string{_got(node)}")
            return ""
        if not node.value.strip():
            self.problem(node, f"{what} must not be empty")
            return ""
        if pattern is not None and not pattern.match(node.value):
            self.problem(node, f"{what} {node.value!r} is not a valid name")
            return ""
        return str(node.value)

    def choice(self, node: yaml.Node, what: str, choices: tuple[str, ...]) -> str:
        value = self.string(node, what)
        if value and value not in choices:
            self.problem(node, f"{what} must be one of {', '.join(choices)}, not {value!r}")
            return ""
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _BOOL):
            self.problem(node, f"{what} must be true or false{_got(node)}")
            return False
        return node.value.lower() in ("true", "yes", "on", "y")

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"{what} must be a list")
            return []
        return list(node.value)

    def strings(
        self, node: yaml.Node, what: str, pattern: re.Pattern[str] | None = None
    ) -> list[tuple[str, yaml.Node]]:
        """A string or a list of strings, each with its node."""
        items = [node] if isinstance(node, yaml.ScalarNode) else self.sequence(node, what)
        out = []
        for item in items:
            value = self.string(item, what, pattern)
            if value:
                out.append((value, item))
        return out


def _position(node: yaml.Node | None) -> tuple[int, int]:
    if node is None:
        return 1, 1
    return node.start_mark.line + 1, node.start_mark.column + 1


def _got(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        kind = node.tag.rsplit(":", 1)[-1]
        return f", not {kind} {node.value!r}" if kind != "str" else ""
    return ", not a list" if isinstance(node, yaml.SequenceNode) else ", not a mapping"


def expression_position(
    node: yaml.ScalarNode, lines: list[str], line: int, column: int
) -> tuple[int, int]:
    """Where in the file (`lines`) a position inside a string scalar is (folded: best effort)."""
    start = node.start_mark
    if node.style in ("|", ">"):
        # A block scalar's text starts on the next line, after its indentation.
        index = start.line + line
        indent = 0
        if index < len(lines):
            indent = len(lines[index]) - len(lines[index].lstrip(" "))
        return index + 1, indent + column
    quote = 1 if node.style in ("'", '"') else 0
    if line == 1:
        return start.line + 1, start.column + 1 + quote + column - 1
    return start.line + line, column


# -- building the policy -----------------------------------------------------------------


@dataclass
class _RuleDraft:
    rule: RouteRule
    node: yaml.Node
    reader: Reader
    scope_nodes: list[tuple[str, yaml.Node]]


@dataclass
class _ConditionDraft:
    condition: Condition
    node: yaml.Node
    reader: Reader
    routes: list[tuple[str, yaml.Node]] | None


class _Builder:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.scopes: dict[str, tuple[Scope, str]] = {}
        self.rules: dict[str, _RuleDraft] = {}
        # Ids of rules with problems: still taken, and known to conditions.
        self.broken_rules: dict[str, str] = {}
        self.conditions: dict[str, _ConditionDraft] = {}

    def read_file(self, name: str, data: bytes) -> None:
        r = Reader(name, self.problems)
        root = r.compose(data)
        if root is None:
            return
        top = r.mapping(root, "policy file", ("apiVersion",), ("scopes", "routes", "conditions"))
        if top is None:
            return
        if "apiVersion" in top:
            version = r.string(top["apiVersion"], "apiVersion")
            if version and version != API_VERSION:
                r.problem(top["apiVersion"], f"apiVersion must be {API_VERSION}, not {version!r}")
        for item in r.sequence(top["scopes"], "scopes") if "scopes" in top else []:
            self._scope(r, item)
        for item in r.sequence(top["routes"], "routes") if "routes" in top else []:
            self._route(r, item)
        for item in r.sequence(top["conditions"], "conditions") if "conditions" in top else []:
            self._condition(r, item)

    def _scope(self, r: Reader, node: yaml.Node) -> None:
        f = r.mapping(node, "scope", ("name", "description"), ("dataSources",))
        if f is None:
            return
        name = r.string(f["name"], "scope name", _SCOPE) if "name" in f else ""
        description = r.string(f["description"], "scope description") if "description" in f else ""
        grants = r.boolean(f["dataSources"], "dataSources") if "dataSources" in f else False
        if not name:
            return
        if name in self.scopes:
            r.problem(f["name"], f"scope {name} is already defined at {self.scopes[name][1]}")
            return
        self.scopes[name] = (Scope(name, description, grants), r.where(f["name"]))

    def _route(self, r: Reader, node: yaml.Node) -> None:
        f = r.mapping(
            node,
            "route",
            ("id", "methods", "path", "action"),
            ("description", "scopes", "access", "dataSources", "public"),
        )
        if f is None:
            return
        rule_id = r.string(f["id"], "route id", _ID) if "id" in f else ""
        what = f"route {rule_id}" if rule_id else "route"
        methods: set[str] = set()
        for method, m_node in r.strings(f["methods"], "methods") if "methods" in f else []:
            if method not in METHODS:
                r.problem(m_node, f"{what}: unknown method {method!r} ({', '.join(METHODS)})")
            elif method in methods:
                r.problem(m_node, f"{what}: method {method} is listed twice")
            methods.add(method)
        path = r.string(f["path"], "path") if "path" in f else ""
        if path:
            problem = template_problem(path)
            if problem:
                r.problem(f["path"], f"{what}: path template {path!r} {problem}")
                path = ""
        action = r.string(f["action"], "action", _ACTION) if "action" in f else ""
        if action == CONNECTOR_ATTACH:  # decided by the engine; a rule would never be read
            r.problem(f["action"], f"{what}: action {action} is built in (docs/connectors.md)")
            action = ""
        public = r.boolean(f["public"], "public") if "public" in f else False
        scopes_all, scopes_any, scope_nodes = self._route_scopes(r, f.get("scopes"), what)
        access: Access | None = None
        if "access" in f:
            label = r.choice(f["access"], f"{what}: access", ("read", "write"))
            access = Access.parse(label) if label else None
        refs: tuple[DataSourceRef, ...] = ()
        lists_granted = False
        if "dataSources" in f:
            refs, lists_granted = self._data_sources(r, f["dataSources"], what, path)
        if public:
            for key in ("scopes", "access", "dataSources"):
                if key in f:
                    r.problem(f[key], f"{what}: a public route needs no token, so no {key}")
        if "access" in f and not (refs or lists_granted) and "dataSources" not in f:
            r.problem(f["access"], f"{what}: access needs dataSources (where the names are)")
        if (refs or lists_granted) and "access" not in f:
            r.problem(f["dataSources"], f"{what}: dataSources needs access (read or write)")
        if rule_id in self.rules or rule_id in self.broken_rules:
            first = self.rules.get(rule_id)
            where = first.reader.where(first.node) if first else self.broken_rules[rule_id]
            r.problem(f["id"], f"duplicate route id {rule_id} (first defined at {where})")
            return
        if not (rule_id and methods and path and action):
            if rule_id:
                self.broken_rules[rule_id] = r.where(f["id"])
            return
        rule = RouteRule(
            rule_id,
            frozenset(methods),
            path,
            action,
            scopes_all,
            scopes_any,
            access=access if (refs or lists_granted) else None,
            data_sources=refs,
            lists_granted=lists_granted,
            public=public,
        )
        self.rules[rule_id] = _RuleDraft(rule, f["id"], r, scope_nodes)

    def _route_scopes(
        self, r: Reader, node: yaml.Node | None, what: str
    ) -> tuple[frozenset[str], frozenset[str], list[tuple[str, yaml.Node]]]:
        if node is None:
            return frozenset(), frozenset(), []
        if isinstance(node, yaml.MappingNode):
            f = r.mapping(node, f"{what}: scopes", (), ("allOf", "anyOf")) or {}
            all_of = r.strings(f["allOf"], "allOf", _SCOPE) if "allOf" in f else []
            any_of = r.strings(f["anyOf"], "anyOf", _SCOPE) if "anyOf" in f else []
            if not f:
                r.problem(node, f"{what}: scopes needs allOf or anyOf")
        else:
            all_of, any_of = r.strings(node, "scopes", _SCOPE), []
        return (
            frozenset(s for s, _ in all_of),
            frozenset(s for s, _ in any_of),
            all_of + any_of,
        )

    def _data_sources(
        self, r: Reader, node: yaml.Node, what: str, path: str
    ) -> tuple[tuple[DataSourceRef, ...], bool]:
        if isinstance(node, yaml.ScalarNode):
            if r.choice(node, f"{what}: dataSources", ("granted",)):
                return (), True
            return (), False
        refs: list[DataSourceRef] = []
        items = r.sequence(node, f"{what}: dataSources")
        if not items and isinstance(node, yaml.SequenceNode):
            r.problem(node, f"{what}: dataSources is empty (leave it out, or say where they are)")
        params = RouteRule("x", frozenset(), path, "x").params if path else ()
        for item in items:
            f = r.mapping(item, f"{what}: data source", ("in",), ("name", "pointer", "shape"))
            if f is None or "in" not in f:
                continue
            where = r.choice(f["in"], "in", ("path", "query", "body"))
            if where in ("path", "query"):
                for key in ("pointer", "shape"):
                    if key in f:
                        r.problem(f[key], f"{what}: {key} is for 'in: body' only")
                if "name" not in f:
                    r.problem(item, f"{what}: 'in: {where}' needs the parameter's name")
                    continue
                name = r.string(f["name"], "name")
                if where == "path" and name and path and name not in params:
                    r.problem(
                        f["name"],
                        f"{what}: the path template {path!r} has no parameter {{{name}}}",
                    )
                    continue
                if name:
                    refs.append(DataSourceRef("path" if where == "path" else "query", name))
            elif where == "body":
                if "name" in f:
                    r.problem(f["name"], f"{what}: 'in: body' takes a pointer, not a name")
                if "pointer" not in f:
                    r.problem(item, f"{what}: 'in: body' needs a JSON pointer, e.g. /tags")
                    continue
                pointer_node = f["pointer"]
                if not (isinstance(pointer_node, yaml.ScalarNode) and pointer_node.tag == _STR):
                    r.problem(pointer_node, "pointer must be a string")
                    continue
                pointer = str(pointer_node.value)
                problem = pointer_problem(pointer)
                if problem:
                    r.problem(pointer_node, f"{what}: {problem}")
                    continue
                shape: Literal["keys", "items", "value"] = "value"
                if "shape" in f:
                    chosen = r.choice(f["shape"], "shape", ("keys", "items", "value"))
                    if chosen == "keys":
                        shape = "keys"
                    elif chosen == "items":
                        shape = "items"
                refs.append(DataSourceRef("body", pointer, shape))
        return tuple(refs), False

    def _condition(self, r: Reader, node: yaml.Node) -> None:
        f = r.mapping(
            node, "condition", ("id", "effect", "when"), ("description", "routes", "message")
        )
        if f is None:
            return
        cond_id = r.string(f["id"], "condition id", _ID) if "id" in f else ""
        effect = r.choice(f["effect"], "effect", ("allow", "deny")) if "effect" in f else ""
        message = r.string(f["message"], "message") if "message" in f else ""
        routes = r.strings(f["routes"], "routes", _ID) if "routes" in f else None
        if "routes" in f and isinstance(f["routes"], yaml.SequenceNode) and not f["routes"].value:
            r.problem(f["routes"], "routes is empty (leave it out to apply to every route)")
        program = None
        when = f.get("when")
        if when is not None:
            source = r.string(when, "when")
            if source:
                try:
                    program = compile_expression(source)
                except CelError as exc:
                    assert isinstance(when, yaml.ScalarNode)
                    line, column = expression_position(when, r.lines, exc.line, exc.column)
                    self.problems.append(
                        Problem(r.file, line, column, f"condition {cond_id}: {exc.message}")
                    )
        if not (cond_id and effect and program):
            return
        if cond_id in self.conditions:
            first = self.conditions[cond_id]
            r.problem(
                f["id"],
                f"duplicate condition id {cond_id} (first defined at"
                f" {first.reader.where(first.node)})",
            )
            return
        condition = Condition(
            cond_id,
            "allow" if effect == "allow" else "deny",
            program,
            message,
            r.where(f["id"]),
        )
        self.conditions[cond_id] = _ConditionDraft(condition, f["id"], r, routes)

    def finish(self, source: str, version: str, files: tuple[str, ...]) -> Policy:
        scopes = {name: scope for name, (scope, _) in self.scopes.items()}
        for draft in self.rules.values():
            self._check_rule_scopes(draft, scopes)
        attached: dict[str, list[Condition]] = {rule_id: [] for rule_id in self.rules}
        for cd in self.conditions.values():
            cond = cd.condition
            if cd.routes is None:
                for rule_id, draft in self.rules.items():
                    rule = draft.rule
                    if rule.public or (cond.per_data_source and not rule.data_sources):
                        continue
                    attached[rule_id].append(cond)
                continue
            for rule_id, id_node in cd.routes:
                rule_draft = self.rules.get(rule_id)
                if rule_draft is None:
                    if rule_id not in self.broken_rules:
                        cd.reader.problem(id_node, f"condition {cond.id}: no route {rule_id!r}")
                elif rule_draft.rule.public:
                    cd.reader.problem(
                        id_node,
                        f"condition {cond.id}: route {rule_id} is public (no token to check)",
                    )
                elif cond.per_data_source and not rule_draft.rule.data_sources:
                    cd.reader.problem(
                        id_node,
                        f"condition {cond.id} uses data_source, but route {rule_id} names"
                        " no data sources",
                    )
                elif cond not in attached[rule_id]:
                    attached[rule_id].append(cond)
        rules = [
            _with_conditions(d.rule, tuple(attached[rule_id])) for rule_id, d in self.rules.items()
        ]
        for conflict in find_conflicts(rules):
            second = self.rules[conflict.second.id]
            first = self.rules[conflict.first.id]
            second.reader.problem(
                second.node,
                f"{conflict.message} (other rule at {first.reader.where(first.node)})",
            )
        if self.problems:
            raise PolicyInvalid(source, self.problems)
        table = RouteTable(rules)
        return Policy(
            version,
            table,
            MappingProxyType(scopes),
            tuple(cd.condition for cd in self.conditions.values()),
            source,
            files,
            MappingProxyType({i: d.reader.where(d.node) for i, d in self.rules.items()}),
        )

    def _check_rule_scopes(self, draft: _RuleDraft, scopes: dict[str, Scope]) -> None:
        rule = draft.rule
        for name, node in draft.scope_nodes:
            if name not in scopes:
                known = ", ".join(sorted(scopes)) or "none"
                draft.reader.problem(
                    node, f"route {rule.id}: undefined scope {name!r} (defined: {known})"
                )
        if not (rule.data_sources or rule.lists_granted):
            return
        grant_all = any(scopes[s].data_sources for s in rule.scopes_all if s in scopes)
        grant_any = bool(rule.scopes_any) and all(
            scopes[s].data_sources for s in rule.scopes_any if s in scopes
        )
        if not (grant_all or grant_any) and all(n in scopes for n, _ in draft.scope_nodes):
            draft.reader.problem(
                draft.node,
                f"route {rule.id} needs data-source grants, but none of its scopes has"
                " dataSources: true (the consent screen would not ask for data sources)",
            )


def _with_conditions(rule: RouteRule, conditions: tuple[Condition, ...]) -> RouteRule:
    if not conditions:
        return rule
    return RouteRule(
        rule.id,
        rule.methods,
        rule.path,
        rule.action,
        rule.scopes_all,
        rule.scopes_any,
        rule.access,
        rule.data_sources,
        rule.lists_granted,
        rule.public,
        conditions,
    )


def describe(policy: Policy) -> dict[str, Any]:
    """A JSON-able summary of a loaded policy (for `policyd policy check --json`)."""
    return {
        "version": policy.version,
        "source": policy.source,
        "files": list(policy.files),
        "scopes": len(policy.scopes),
        "routes": len(policy.rules),
        "conditions": len(policy.conditions),
    }
