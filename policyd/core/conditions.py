"""Allow and deny conditions of route rules: CEL expressions checked after the built-in checks.

A condition reads the variables `request`, `principal`, `rule`, `now` and, if it names it,
`data_source`. A condition that uses `data_source` is evaluated once for every data source
the request names; the others once per request. The outcome (docs/policy.md):

* a **deny** condition that is true (for any data source) denies: CONDITION_DENIED;
* when the rule has **allow** conditions, at least one must hold (a per-data-source one
  for every data source), else CONDITION_DENIED;
* deny conditions are evaluated first, so a deny wins over an allow;
* an expression that cannot be evaluated (a missing key, a type error) or is not a bool
  denies with CONDITION_ERROR: a broken condition never lets a request through.

Only rules that have conditions pay for them: the engine skips all of this otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from policyd.core.cel import CelEvalError, Program, as_bool, timestamp, to_cel
from policyd.core.model import Access, ActionTarget, CheckInput, HttpTarget, Principal
from policyd.core.reasons import Denied, Reason


@dataclass(frozen=True, slots=True)
class Condition:
    id: str
    effect: Literal["allow", "deny"]
    program: Program
    message: str = ""
    # Where the policy defines it (file:line:column), for explanations.
    location: str = ""

    @property
    def per_data_source(self) -> bool:
        return "data_source" in self.program.variables

    @property
    def source(self) -> str:
        return self.program.source


class ConditionProblem(Denied):
    """A condition denied the request (CONDITION_DENIED) or failed (CONDITION_ERROR)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One evaluation, for explanations: which condition, for which data source, what."""

    condition: Condition
    data_source: str | None
    result: str  # "true", "false" or "error: ..."


def evaluate(
    conditions: tuple[Condition, ...],
    variables: dict[str, Any],
    data_sources: list[tuple[str, Callable[[], Any]]],
    trace: list[Step] | None = None,
) -> None:
    """Raise ConditionProblem unless the conditions let the request pass.

    `variables` holds the CEL values of the per-request variables the conditions use;
    `data_sources` pairs each name with a function making its `data_source` value.
    """
    ds_values: list[tuple[str, Any]] | None = None

    def units(condition: Condition) -> list[tuple[str | None, dict[str, Any]]]:
        nonlocal ds_values
        if not condition.per_data_source:
            return [(None, variables)]
        if ds_values is None:
            ds_values = [(name, make()) for name, make in data_sources]
        return [(name, {**variables, "data_source": value}) for name, value in ds_values]

    def holds(condition: Condition, name: str | None, values: dict[str, Any]) -> bool:
        try:
            value = condition.program.evaluate(values)
        except CelEvalError as exc:
            if trace is not None:
                trace.append(Step(condition, name, f"error: {exc}"))
            where = f" for data source {name!r}" if name is not None else ""
            raise ConditionProblem(
                Reason.CONDITION_ERROR,
                f"condition {condition.id} could not be evaluated{where}: {exc}",
            ) from None
        result = as_bool(value)
        if result is None:
            if trace is not None:
                trace.append(Step(condition, name, "error: not a bool"))
            kind = type(value).__name__.removesuffix("Type").lower()
            raise ConditionProblem(
                Reason.CONDITION_ERROR,
                f"condition {condition.id} gave a {kind}, not true or false",
            )
        if trace is not None:
            trace.append(Step(condition, name, "true" if result else "false"))
        return result

    allows: list[Condition] = []
    for condition in conditions:
        if condition.effect == "allow":
            allows.append(condition)
            continue
        for name, values in units(condition):
            if holds(condition, name, values):
                about = f" (data source {name!r})" if name is not None else ""
                text = condition.message or f"denied by condition {condition.id}"
                raise ConditionProblem(Reason.CONDITION_DENIED, f"{text}{about}")
    if not allows:
        return
    for condition in allows:
        if all(holds(condition, name, values) for name, values in units(condition)):
            return
    names = ", ".join(c.id for c in allows)
    raise ConditionProblem(Reason.CONDITION_DENIED, f"no allow condition holds ({names})")


# -- the variables (docs/policy.md, "Conditions") ------------------------------------------


def request_value(request: CheckInput, params: dict[str, str], names: tuple[str, ...]) -> Any:
    target = request.target
    value: dict[str, Any] = {
        "method": "",
        "path": "",
        "params": dict(params),
        "query": {},
        "headers": {},
        "data_sources": list(names),
        "action": "",
    }
    if isinstance(target, HttpTarget):
        query: dict[str, list[str]] = {}
        for key, item in parse_qsl(target.query, keep_blank_values=True):
            query.setdefault(key, []).append(item)
        value.update(
            method=target.method, path=target.path, query=query, headers=dict(target.headers)
        )
    elif isinstance(target, ActionTarget):
        value["action"] = target.action
    return to_cel(value)


def principal_value(p: Principal) -> Any:
    return to_cel({"sub": p.sub, "client_id": p.client_id, "scopes": list(p.scopes)})


def rule_value(rule_id: str, action: str, access: Access | None) -> Any:
    """The `rule` variable: the matched route rule's id, action and access level."""
    return to_cel({"id": rule_id, "action": action, "access": access.label if access else ""})


def now_value(seconds: float) -> Any:
    return timestamp(seconds)


def data_source_value(name: str, labels: dict[str, str], granted: Access | None) -> Any:
    return to_cel({"name": name, "labels": labels, "access": granted.label if granted else ""})
