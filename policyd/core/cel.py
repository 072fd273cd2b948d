"""CEL (Common Expression Language) for policy conditions, on cel-python (`celpy`).

An expression is compiled once per policy load: parsed, checked for names the policy
cannot provide (an undefined variable, an unknown function), and transpiled to Python.
Evaluation is then a call of that Python code with the decision's variables.

Why not celpy's own runners: its `CompiledRunner` keeps the activation of an evaluation
in a module global and `exec`s into the module's namespace, so two threads evaluating at
once (grpc's thread pool) could read each other's variables; its `InterpretedRunner` is
safe but over ten times slower (bench/policy.py measures both). `Program` runs the same
transpiled code in a namespace of its own, with the activation as an argument, so nothing
is shared between evaluations. This leans on the transpiler's output format of the pinned
cel-python version; `compile_expression` checks that format and fails loudly if it moved.
"""

from __future__ import annotations

import datetime
import re
import threading
from typing import Any

import celpy
import celpy.adapter
import celpy.celtypes
import celpy.evaluation
from celpy.celparser import CELParseError, CELParser
from lark import Token, Tree

# The variables a condition may use (docs/policy.md describes each).
VARIABLES = frozenset({"request", "principal", "rule", "data_source", "now"})
# Macros take an expression, not a value; the first argument of the comprehensions binds
# a variable of its own.
_MACROS = frozenset({"has", "dyn", "all", "exists", "exists_one", "map", "filter"})
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_FUNCTIONS = frozenset(
    name for name in celpy.evaluation.base_functions if name[0].isalpha()
) | frozenset({"string", "int", "uint", "double", "bool", "bytes", "list", "map", "type"})

_lock = threading.Lock()
_environment: celpy.Environment | None = None


class CelError(Exception):
    """An expression that cannot be used; line and column are 1-based, in the expression."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class CelEvalError(Exception):
    """An evaluation that did not produce a value (a missing key, a type error, ...)."""


def _env() -> celpy.Environment:
    global _environment
    if _environment is None:
        # celpy builds one parser per process, with the tree class of the first
        # Environment; the transpiler needs its own tree class.
        parser = CELParser.CEL_PARSER
        if parser is not None and parser.options.tree_class is not celpy.evaluation.TranspilerTree:
            CELParser.CEL_PARSER = None
        _environment = celpy.Environment(runner_class=celpy.CompiledRunner)
    return _environment


class Program:
    """One compiled expression. Thread-safe: evaluations share nothing mutable."""

    __slots__ = ("_base", "_entry", "_macros", "source", "variables")

    def __init__(
        self,
        source: str,
        transpiler: celpy.evaluation.Transpiler,
        variables: frozenset[str],
        macros: bool,
    ) -> None:
        self.source = source
        self.variables = variables
        self._macros = macros
        lines = transpiler.source_text.rstrip().splitlines()
        if not lines or not lines[-1].startswith("CEL = "):
            raise RuntimeError("cel-python's transpiler output changed; check the pinned version")
        code = "\n".join(
            [*lines[:-1], "def _policyd_entry(base_activation):", f"    return {lines[-1][6:]}"]
        )
        namespace = dict(celpy.evaluation.result.__globals__)
        exec(compile(code, "<cel>", "exec"), namespace)
        self._entry = namespace["_policyd_entry"]
        self._base = transpiler.base_activation

    def evaluate(self, variables: dict[str, Any]) -> Any:
        """The expression's value for these variables (CEL values, see `to_cel`)."""
        if self._macros:
            # Macros evaluate in nested scopes, which resolve names through `identifiers`.
            activation = self._base.clone()
            activation.identifiers.load_values(variables)
        else:
            # A shallow copy (without copy.copy, which celpy's __getattr__ recurses on):
            # nothing the evaluation changes is shared.
            activation = object.__new__(celpy.evaluation.Activation)
            activation.__dict__.update(self._base.__dict__)
        # The values as plain attributes: `activation.request` in the transpiled code then
        # skips celpy's __getattr__ (~30 us a name, in typing checks).
        activation.__dict__.update(variables)
        try:
            value = self._entry(activation)
        except celpy.evaluation.CELEvalError as exc:
            raise CelEvalError(_eval_message(exc)) from None
        except Exception as exc:  # a Python error inside celpy: still the expression's fault
            raise CelEvalError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(value, celpy.evaluation.CELEvalError):
            raise CelEvalError(_eval_message(value))
        return value


def _eval_message(exc: celpy.evaluation.CELEvalError) -> str:
    text = str(exc.args[0]) if exc.args else "evaluation error"
    # celpy writes values as StringType('x'); the author wrote 'x'.
    return re.sub(r"[A-Za-z]+Type\(('[^']*'|[^()]*)\)", r"\1", text)[:200]


def compile_expression(source: str) -> Program:
    """Parse, check and transpile one expression; CelError says what and where."""
    if not source.strip():
        raise CelError("the expression is empty")
    with _lock:
        env = _env()
        try:
            ast = env.compile(source)
        except CELParseError as exc:
            token = getattr(exc.__context__, "token", None)
            if getattr(token, "type", "") == "$END":
                message = "syntax error: the expression ends too early"
            else:
                message = _parse_message(source, exc.line, exc.column)
            raise CelError(message, exc.line or 1, exc.column or 1) from None
        variables, macros = _check_names(ast)
        # Transpile without celpy's runner, which logs the generated code at INFO.
        base = celpy.evaluation.Activation(annotations=env.annotations, package=env.package)
        assert isinstance(ast, celpy.evaluation.TranspilerTree)
        transpiler = celpy.evaluation.Transpiler(ast=ast, activation=base)
        transpiler.transpile()
        return Program(source, transpiler, variables, macros)


def _parse_message(source: str, line: int | None, column: int | None) -> str:
    if line is None or column is None:
        return "syntax error"
    lines = source.splitlines() or [""]
    text = lines[line - 1] if line - 1 < len(lines) else ""
    if column > len(text.rstrip()):
        return "syntax error: the expression ends too early"
    return f"syntax error at {text[column - 1 : column + 11]!r}"


def _check_names(ast: Tree[Any]) -> tuple[frozenset[str], bool]:
    """Refuse undefined variables and unknown functions; the variables used, and whether
    the expression has macros (which bind variables of their own)."""
    bound: set[str] = set()
    for node in ast.iter_subtrees():
        if node.data == "member_dot_arg":
            method = node.children[1]
            if isinstance(method, Token) and str(method) in _BINDING_MACROS:
                first = _first_ident(node.children[2])
                if first is not None:
                    bound.add(first)
    used: set[str] = set()
    for node in ast.iter_subtrees():
        if node.data in ("ident", "dot_ident"):
            token = node.children[0]
            assert isinstance(token, Token)
            name = str(token)
            if name not in VARIABLES and name not in bound:
                raise CelError(
                    f"undefined variable {name!r} (one of {', '.join(sorted(VARIABLES))})",
                    token.line or 1,
                    token.column or 1,
                )
            used.add(name)
        elif node.data in ("ident_arg", "dot_ident_arg", "member_dot_arg"):
            token = node.children[1 if node.data == "member_dot_arg" else 0]
            assert isinstance(token, Token)
            name = str(token)
            if name not in _FUNCTIONS and name not in _MACROS:
                raise CelError(f"unknown function {name!r}", token.line or 1, token.column or 1)
    macros = any(
        n.data == "member_dot_arg" and str(n.children[1]) in _MACROS for n in ast.iter_subtrees()
    ) or any(n.data == "ident_arg" and str(n.children[0]) in _MACROS for n in ast.iter_subtrees())
    return frozenset(used & VARIABLES), macros


def _first_ident(exprlist: Any) -> str | None:
    """The name if the first expression of a macro's arguments is a bare identifier."""
    if not isinstance(exprlist, Tree) or not exprlist.children:
        return None
    first = exprlist.children[0]
    idents = (
        [n for n in first.iter_subtrees() if n.data == "ident"] if isinstance(first, Tree) else []
    )
    if len(idents) == 1 and isinstance(idents[0].children[0], Token):
        return str(idents[0].children[0])
    return None


def as_bool(value: Any) -> bool | None:
    """A CEL bool as a Python bool; None for any other value."""
    if isinstance(value, celpy.celtypes.BoolType | bool):
        return bool(value)
    return None


def to_cel(value: Any) -> Any:
    """Plain JSON-like Python data as CEL values.

    Direct constructors for the types the engine passes; celpy's json_to_cel does the same
    at several times the cost (typing checks on every value).
    """
    kind = type(value)
    if kind is str:
        return celpy.celtypes.StringType(value)
    if kind is dict:
        return celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): to_cel(v) for k, v in value.items()}
        )
    if kind is list or kind is tuple:
        return celpy.celtypes.ListType([to_cel(v) for v in value])
    if kind is bool:
        return celpy.celtypes.BoolType(value)
    if kind is int:
        return celpy.celtypes.IntType(value)
    return celpy.adapter.json_to_cel(value)


def timestamp(seconds: float) -> Any:
    """A CEL timestamp (UTC) for seconds since the epoch."""
    return celpy.celtypes.TimestampType(datetime.datetime.fromtimestamp(seconds, datetime.UTC))
