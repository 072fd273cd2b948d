"""Decision cost against the size of the policy, and what conditions (CEL) cost.

`python -m bench.policy [--quick]`. In-process, on one scratch store (policytest.Runner):

* **rules**: `Engine.decide` for the same allowed request (`GET /api/data/tags/{dsn}`,
  token cached) with the default policy padded to 20 route rules and to 2,000, loaded from
  generated YAML files. The policies alternate in rounds on the same engine (a swap, as a
  reload does) and each figure is the median round. Goal: 2,000 / 20 <= 1.2, because
  matching walks a trie of path segments and never scans the rule list.
* **conditions**: the same decision on a write route without a condition and with the
  default policy's safety condition (one CEL evaluation per data source), and the CEL
  evaluation alone: policyd's `Program` against celpy's own `InterpretedRunner` on the
  same expression (cel.py says why it does not use celpy's runners).
* **load**: the time to load and compile each policy (what a reload costs, off the
  request path).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from bench.stats import median, ratio, time_per_call
from policyd.core import cel
from policyd.core.model import Access, CheckInput, HttpTarget
from policyd.core.policy import Policy, load_policy
from policyd.decision.engine import Engine
from policyd.policy.policytest import Fixture, Principal, Runner, scratch_dir

GOAL_RATIO = 1.2
SIZES = (20, 2000)
HUB = ROOT / "policies" / "hub.yaml"
DSN = "edge-historian"
READ = HttpTarget("GET", f"/api/data/tags/{DSN}")
WRITE = HttpTarget("PUT", f"/api/data/v2/history/{DSN}")
CONDITION = '"class" in data_source.labels && data_source.labels["class"] == "safety"'


def padding(count: int) -> str:
    """`count` more route rules, spread like a large API: several prefixes, depths, methods."""
    lines = ["apiVersion: policyd/v1", "routes:"]
    methods = ("GET", "POST", "PUT", "DELETE")
    for i in range(count):
        group, item = divmod(i, 50)
        path = f"/api/ext/g{group}/svc{item}/{{dsn}}" + ("/items" if i % 3 == 0 else "")
        lines += [
            f"  - id: pad-{i}",
            f"    methods: {methods[i % 4]}",
            f"    path: {path}",
            f"    action: pad.{i}",
            "    scopes: [DataRead]",
            "    access: read",
            "    dataSources: [{in: path, name: dsn}]",
        ]
    return "\n".join(lines) + "\n"


def make_policy(folder: Path, rules: int) -> tuple[Policy, float]:
    """The default policy padded to `rules` route rules, and its load time in seconds."""
    folder.mkdir(parents=True)
    (folder / "hub.yaml").write_text(HUB.read_text())
    base = len(load_policy(folder).rules)
    (folder / "padding.yaml").write_text(padding(rules - base))
    start = time.perf_counter()
    policy = load_policy(folder)
    elapsed = time.perf_counter() - start
    assert len(policy.rules) == rules, len(policy.rules)
    return policy, elapsed


def _decide(engine: Engine, request: CheckInput, expect_allowed: bool = True) -> None:
    decision = engine.decide(request)
    assert decision.allowed is expect_allowed, decision


def run(quick: bool) -> dict[str, Any]:
    calls = 500 if quick else 5000
    rounds = 3 if quick else 9
    with tempfile.TemporaryDirectory() as tmp, scratch_dir() as scratch:
        policies = {n: make_policy(Path(tmp) / f"p{n}", n) for n in SIZES}
        small = policies[SIZES[0]][0]
        fixture = Fixture(
            Principal("alice", "bench-app", ("DataRead", "DataWrite")),
            {DSN: Access.WRITE},
        )
        engine, token = Runner(small, scratch).engine(fixture)
        read = CheckInput(token, READ, "bench")
        write = CheckInput(token, WRITE, "bench")
        _decide(engine, read)  # verify and cache the token once

        per_round: dict[int, list[float]] = {n: [] for n in SIZES}
        for _ in range(rounds):
            for n in SIZES:
                engine.policy = policies[n][0]
                _decide(engine, read)
                per_round[n].append(time_per_call(lambda: _decide(engine, read), calls, 1))
        decide_us = {n: median(per_round[n]) for n in SIZES}

        # A write route without conditions (small policy with the condition stripped) and
        # with the safety condition.
        engine.policy = small
        with_condition = time_per_call(lambda: _decide(engine, write), calls, rounds)
        bare = Path(tmp) / "bare"
        bare.mkdir()
        text = HUB.read_text()
        (bare / "hub.yaml").write_text(text[: text.index("\nconditions:")] + "\n")
        engine.policy = load_policy(bare)
        without_condition = time_per_call(lambda: _decide(engine, write), calls, rounds)
        engine.facts.store.close()

    program = cel.compile_expression(CONDITION)
    variables = {"data_source": cel.to_cel({"name": DSN, "labels": {"site": "north"}})}
    cel_us = time_per_call(lambda: program.evaluate(variables), calls, rounds)
    interpreted_us = _interpreted(CONDITION, variables, calls, rounds)

    big, small_n = SIZES[-1], SIZES[0]
    return {
        "calls": calls,
        "rounds": rounds,
        "decide_us": {str(n): round(v, 2) for n, v in decide_us.items()},
        "decide_rounds_us": {str(n): [round(v, 2) for v in per_round[n]] for n in SIZES},
        "ratio": round(ratio(decide_us[big], decide_us[small_n]), 3),
        "goal_ratio": GOAL_RATIO,
        "load_ms": {str(n): round(policies[n][1] * 1000, 1) for n in SIZES},
        "write_decide_us": {
            "without_condition": round(without_condition, 2),
            "with_condition": round(with_condition, 2),
        },
        "cel_eval_us": {"policyd": round(cel_us, 2), "celpy_interpreted": round(interpreted_us, 2)},
    }


def _interpreted(source: str, variables: dict[str, Any], calls: int, rounds: int) -> float:
    """celpy's own interpreter on the same expression (thread-safe, but slower)."""
    import celpy

    env = celpy.Environment(runner_class=celpy.InterpretedRunner)
    runner = env.program(env.compile(source))
    return time_per_call(lambda: runner.evaluate(variables), calls, rounds)


def report(summary: dict[str, Any]) -> str:
    d = summary["decide_us"]
    small, big = (str(n) for n in SIZES)
    verdict = "meets" if summary["ratio"] <= summary["goal_ratio"] else "MISSES"
    w = summary["write_decide_us"]
    c = summary["cel_eval_us"]
    return "\n".join(
        [
            "Policy size: Engine.decide, same allowed request, token cached (CPU us per call,"
            f" median of {summary['rounds']} rounds)",
            f"  {small:>5} rules  {d[small]:8.2f} us   (load {summary['load_ms'][small]} ms)",
            f"  {big:>5} rules  {d[big]:8.2f} us   (load {summary['load_ms'][big]} ms)",
            f"  ratio {big}/{small}: {summary['ratio']:.3f}  (goal <= {summary['goal_ratio']}:"
            f" {verdict})",
            "Conditions (CEL): PUT /api/data/v2/history/{dsn}",
            f"  without a condition   {w['without_condition']:8.2f} us",
            f"  with the safety one   {w['with_condition']:8.2f} us"
            f"   (+{w['with_condition'] - w['without_condition']:.2f} us)",
            f"  CEL evaluation alone  {c['policyd']:8.2f} us  (celpy InterpretedRunner:"
            f" {c['celpy_interpreted']:.2f} us)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    summary = run(args.quick)
    print(json.dumps(summary, indent=2) if args.json else report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
