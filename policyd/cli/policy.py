"""`policyd policy ...`: check, test and explain policy files; show what the servers loaded.

Exit codes beyond the other commands' (0 ok, 1 error, 2 usage): 4 the policy (or a test suite)
does not validate, 5 policy tests failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from policyd.cli.context import Context, pass_ctx
from policyd.cli.options import (
    read_token,
    request_target,
    request_target_options,
    require_one_target,
)
from policyd.core.model import Access, CheckInput
from policyd.core.policy import Policy, PolicyInvalid, Problem, describe, fingerprint, load_policy
from policyd.core.routes import DataSourceRef
from policyd.decision.engine import Explanation
from policyd.decision.wiring import build_engine
from policyd.policy.policytest import (
    Fixture,
    Principal,
    Runner,
    SuiteInvalid,
    as_json,
    as_junit,
    load_suites,
    run_suites,
    scratch_dir,
    uncovered_routes,
)
from policyd.policy.reload import STATUS_GLOB

EXIT_INVALID = 4
EXIT_TESTS_FAILED = 5


def _folder(obj: Context, directory: str | None) -> str:
    return directory or str(obj.config.policy.dir)


def _load(directory: str, with_suites: bool) -> tuple[Policy, list[Any]]:
    """The policy (and its test cases); exits 4 listing every problem when invalid."""
    problems: list[Problem] = []
    policy = None
    cases: list[Any] = []
    try:
        policy = load_policy(directory)
    except PolicyInvalid as exc:
        problems += exc.problems
    if with_suites and Path(directory).is_dir():
        try:
            cases = load_suites(directory)
        except SuiteInvalid as exc:
            problems += exc.problems
    if problems or policy is None:
        for problem in sorted(problems, key=lambda p: (p.file, p.line, p.column)):
            click.echo(str(problem), err=True)
        count = len(problems)
        click.echo(
            f"policyd: policy {directory} does not validate ({count} problem{'s' * (count != 1)})",
            err=True,
        )
        sys.exit(EXIT_INVALID)
    return policy, cases


@click.group()
def policy() -> None:
    """Policy files: check, test and explain them; show what the servers loaded."""


directory_argument = click.argument("directory", required=False, metavar="[DIR]")


@policy.command("check")
@directory_argument
@click.option("--json", "as_json_", is_flag=True, help="Print a JSON summary.")
@pass_ctx
def policy_check(obj: Context, directory: str | None, as_json_: bool) -> None:
    """Validate the policy in DIR (default: policy.dir) and its test suites.

    Every problem is printed as FILE:LINE:COLUMN: MESSAGE; the exit code is then 4.
    """
    folder = _folder(obj, directory)
    loaded, cases = _load(folder, with_suites=True)
    summary = {**describe(loaded), "tests": len(cases)}
    if as_json_:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    click.echo(
        f"policy {folder} is valid: version {loaded.version}, {summary['scopes']} scopes,"
        f" {summary['routes']} routes, {summary['conditions']} conditions,"
        f" {summary['tests']} tests"
    )


@policy.command("test")
@directory_argument
@click.option("-k", "match", help="Run only tests whose name contains this text.")
@click.option("--junit", "junit", metavar="FILE", help="Also write JUnit XML to FILE.")
@click.option("--json", "as_json_", is_flag=True, help="Print the results as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every test, not only failures.")
@pass_ctx
def policy_test(
    obj: Context,
    directory: str | None,
    match: str | None,
    junit: str | None,
    as_json_: bool,
    verbose: bool,
) -> None:
    """Run the policy's test suites (*_test.yaml in DIR). Exit 5 when a test fails."""
    folder = _folder(obj, directory)
    loaded, cases = _load(folder, with_suites=True)
    if match:
        cases = [c for c in cases if match in c.name]
    start = time.perf_counter()
    results = run_suites(loaded, cases)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.passed]
    if junit:
        Path(junit).write_text(as_junit(loaded, results))
    if as_json_:
        click.echo(json.dumps(as_json(loaded, results), sort_keys=True))
    else:
        for r in results:
            if r.passed and verbose:
                click.echo(f"ok    {r.case.suite}: {r.case.name}")
            elif not r.passed:
                click.echo(f"FAIL  {r.case.suite}: {r.case.name} ({r.case.location})")
                for failure in r.failures:
                    click.echo(f"        {failure}")
        if not match:
            for uncovered in uncovered_routes(loaded, results):
                click.echo(f"note  no test reaches route {uncovered}")
        click.echo(
            f"{len(results) - len(failed)} passed, {len(failed)} failed"
            f" ({len(results)} tests of policy {loaded.version}, {elapsed:.2f}s)"
        )
    if failed:
        sys.exit(EXIT_TESTS_FAILED)


@policy.command("explain")
@directory_argument
@request_target_options
@click.option("--token", help="A real token, decided against the configured store.")
@click.option("--sub", help="Without --token: the user of a made-up principal.")
@click.option("--client-id", default="app", show_default=True, help="With --sub: the app.")
@click.option("--scope", "scopes", multiple=True, help="With --sub: a scope; repeatable.")
@click.option(
    "--grant", "grants", multiple=True, metavar="DS=ACCESS", help="With --sub; repeatable."
)
@click.option(
    "--label", "labels", multiple=True, metavar="DS:KEY=VALUE", help="A data-source label."
)
@click.option("--json", "as_json_", is_flag=True, help="Print the explanation as JSON.")
@pass_ctx
def policy_explain(
    obj: Context,
    directory: str | None,
    method: str,
    path: str | None,
    query: str,
    body: str | None,
    action: str | None,
    data_sources: tuple[str, ...],
    token: str | None,
    sub: str | None,
    client_id: str,
    scopes: tuple[str, ...],
    grants: tuple[str, ...],
    labels: tuple[str, ...],
    as_json_: bool,
) -> None:
    """Show how one request is decided: its rule, data sources and every check.

    Shows which rule matched (and where the policy defines it), each data source and where
    in the request it came from, and each check passed or failed, conditions included.

    With --token the request is decided against the configured store, as the server would.
    With --sub (or neither: no token), against a scratch store holding just that principal,
    its --grant(s) and --label(s), like a policy test.
    """
    require_one_target(path, action)
    if token and (sub or grants):
        raise click.UsageError("--token decides against the store: no --sub or --grant")
    folder = _folder(obj, directory)
    loaded, _ = _load(folder, with_suites=False)
    target = request_target(method, path, query, body, action, data_sources)
    if token:
        raw = read_token(token) if token == "-" or token.startswith("@") else token
        engine = build_engine(obj.config, obj.store, loaded)
        explanation = engine.explain(CheckInput(raw, target, "policy-explain", "cli"))
    else:
        fixture = Fixture(
            Principal(sub, client_id, scopes) if sub else None,
            {name: level for name, level in (_pair(g, "=", "--grant", True) for g in grants)},
            None,
            _labels(labels),
        )
        with scratch_dir() as folder_path:
            explanation = Runner(loaded, folder_path).explain(fixture, target)
    _print_explanation(explanation, as_json_)


def _pair(text: str, sep: str, option: str, access: bool = False) -> tuple[str, Any]:
    key, found, value = text.partition(sep)
    if not found or not key:
        raise click.BadParameter(f"{text!r} is not NAME{sep}VALUE", param_hint=option)
    if access:
        try:
            return key, Access.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    return key, value


def _labels(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, label = _pair(item, ":", "--label")
        key, value = _pair(label, "=", "--label")
        out.setdefault(name, {})[key] = value
    return out


def _where(ref: DataSourceRef | str) -> str:
    if isinstance(ref, str):
        return "the action's data sources"
    if ref.where == "path":
        return f"path parameter {{{ref.name}}}"
    if ref.where == "query":
        return f"query parameter {ref.name}"
    return f"body {ref.name or '/'} ({ref.shape})"


def _print_explanation(e: Explanation, as_json_: bool) -> None:
    d, trace, pol = e.decision, e.trace, e.policy
    rule = trace.match.rule if trace.match else None
    params = dict(trace.match.params) if trace.match else {}
    sources = [(name, _where(ref)) for name, ref in trace.data_sources]
    data: dict[str, Any] = {
        "decision": "allow" if d.allowed else "deny",
        "reason": d.reason.name,
        "message": d.message,
        "policy_version": pol.version,
        "rule": rule.id if rule else "",
        "rule_location": pol.locations.get(rule.id, "") if rule else "",
        "action": rule.action if rule else "",
        "path_params": params,
        "data_sources": [{"name": n, "from": where} for n, where in sources],
        "checks": [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in trace.checks],
        "conditions": [
            {
                "condition": s.condition.id,
                "effect": s.condition.effect,
                "data_source": s.data_source,
                "result": s.result,
                "location": s.condition.location,
            }
            for s in trace.conditions
        ],
    }
    if as_json_:
        click.echo(json.dumps(data, sort_keys=True))
        return
    verdict = "allow" if d.allowed else "deny"
    click.echo(f"{verdict} {d.reason.name}: {d.message}")
    click.echo(f"  policy:       {pol.version} ({pol.source or 'built in'})")
    if rule is not None:
        where = pol.locations.get(rule.id, "")
        click.echo(f"  rule:         {rule.id}{f' ({where})' if where else ''}")
        click.echo(f"  action:       {rule.action}")
        methods = ",".join(sorted(rule.methods))
        click.echo(f"  matched:      {methods} {rule.path}")
        if params:
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            click.echo(f"  path params:  {shown}")
    else:
        click.echo("  rule:         none matched")
    for name, where in sources:
        click.echo(f"  data source:  {name}  from {where}")
    click.echo("  checks:")
    for c in trace.checks:
        mark = "ok  " if c.passed else "FAIL"
        click.echo(f"    {mark}  {c.name}: {c.detail}")
    for s in trace.conditions:
        about = f" [{s.data_source}]" if s.data_source is not None else ""
        click.echo(
            f"          condition {s.condition.id} ({s.condition.effect}){about}: {s.result}"
        )


@policy.command("status")
@click.option("--json", "as_json_", is_flag=True, help="One JSON object per server process.")
@pass_ctx
def policy_status(obj: Context, as_json_: bool) -> None:
    """Show the policy each running server on this store has loaded, and its last reload.

    Servers write their state beside the store (policy-status-*.json); this also reports
    the version of the files in policy.dir now, so a server that did not take a change
    shows. Exit 1 when no server is running.
    """
    config = obj.config
    on_disk = fingerprint(config.policy.dir)
    rows = []
    for path in sorted(Path(config.store.path).parent.glob(STATUS_GLOB)):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        status["running"] = _alive(int(status.get("pid", 0)))
        status["current"] = status.get("version") == on_disk
        rows.append(status)
    if as_json_:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
    else:
        click.echo(f"policy files: {config.policy.dir} (version {on_disk or 'unreadable'})")
        for row in rows:
            _print_status(row)
    if not any(row["running"] for row in rows):
        if not as_json_:
            click.echo("no running server has written a status", err=True)
        sys.exit(1)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _print_status(row: dict[str, Any]) -> None:
    state = "running" if row["running"] else "not running (stale status)"
    click.echo(f"server {row.get('address', '?')} pid {row.get('pid')}: {state}")
    note = "" if row["current"] else "  (differs from the files)"
    click.echo(f"  version:      {row.get('version')}{note}")
    click.echo(f"  loaded at:    {_when(float(row.get('loaded_at', 0)))}")
    last = row.get("last_reload") or {}
    click.echo(
        f"  last reload:  {last.get('result')} {last.get('version') or ''}"
        f" ({last.get('trigger')}, {_when(float(last.get('at', 0)))})"
    )
    for problem in last.get("problems") or []:
        click.echo(f"    {problem}")
