"""`python -m bench [--quick] [--only NAME]`: run the benchmarks, print a report, write JSON.

Benchmarks (docs/benchmarks.md explains each figure):
  grpc_stack  sync vs asyncio gRPC server, empty unary call (bench/grpc_stack.py)
  check       policyd Check vs an empty handler on the same stack, 1M grants (bench/check.py)
  observe     Check throughput with metrics on vs off, and tracing on, 16 callers
              (bench/observe.py)
  policy      decision cost with 20 vs 2,000 route rules (bench/policy.py)
  audit       audit-log queries over 10M generated records (bench/audit.py)
  hub         the reference hub with and without the ASGI middleware (bench/hub.py)
  link        a snapshot query over the link (WebSocket, long-polling) vs served locally;
              hub restart to the connector serving again (bench/link.py)
  embedded    what embedded decisions add to a hub request, in process (bench/embedded.py)
  envoy       Envoy alone, with jwt_authn, with policyd's ext_authz; wrk (bench/envoy.py)
  cluster     PostgreSQL vs SQLite throughput; revoke latency on 3 replicas, one frozen
              (bench/cluster.py; skipped without PostgreSQL's initdb)
  peer        policyd against the Cerbos PDP on the same CPU, audit off and on
              (bench/peer.py, bench/cerbos.py; fetches a pinned Cerbos binary, skipped
              when it cannot)

Results go to var/bench/results.json (--out to change); server logs to logs/ beside it.
Progress goes to stderr: a bar over the benchmarks on a terminal, else a line per benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import audit as audit_bench
from bench import check, grpc_stack
from bench import cluster as cluster_bench
from bench import embedded as embedded_bench
from bench import envoy as envoy_bench
from bench import hub as hub_bench
from bench import link as link_bench
from bench import observe as observe_bench
from bench import peer as peer_bench
from bench import policy as policy_bench
from bench.procs import ROOT
from bench.report import load_table, table
from policyd.cli.progress import progress

NAMES = (
    "grpc_stack",
    "check",
    "observe",
    "policy",
    "audit",
    "hub",
    "link",
    "embedded",
    "envoy",
    "cluster",
    "peer",
)
GOAL_THROUGHPUT_RATIO = 0.9


@dataclass(frozen=True)
class Durations:
    rounds: int
    warmup: float
    duration: float
    stack_duration: float
    micro_calls: int
    grants: int


FULL = Durations(
    rounds=7, warmup=0.5, duration=2.0, stack_duration=1.5, micro_calls=20_000, grants=1_000_000
)
QUICK = Durations(
    rounds=2, warmup=0.2, duration=0.5, stack_duration=0.4, micro_calls=1_000, grants=100_000
)
CALLERS = [1, 16]


def _machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "revision": _revision(),
    }


def _revision() -> str:
    """The git commit of the tree measured, with "+dirty" when it has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _report_stack(summary: dict[str, Any]) -> str:
    return "\n".join(
        [
            "gRPC server stack: empty unary call, sync (ThreadPoolExecutor, "
            f"{summary['server_threads']} threads) vs grpc.aio",
            load_table(summary, ["sync", "aio"]),
        ]
    )


def _report_check(summary: dict[str, Any]) -> str:
    store = summary["store"]
    lines = [
        f"Check: {summary['request']}; store: {store['grants']:,} grants, {store['users']:,}"
        f" users, {store['apps']} apps, {store['data_sources']} data sources"
        f" (inserted in {summary['insert_seconds']:.1f} s); request {summary['request_bytes']} B,"
        f" response {next(iter(summary['response_bytes'].values()))} B;"
        f" {summary['server_threads']} server threads; policyd audit.sync ="
        f" {summary['audit_sync']}, policyd-noaudit has the audit log off",
        load_table(summary, check.NAMES),
    ]
    for callers, entry in summary["by_callers"].items():
        # The goals: the decision against the transport (policyd-noaudit/empty), and the
        # audit log's cost (policyd, audit on, against policyd-noaudit).
        calls = {name: entry[name]["calls_per_s"] for name in check.NAMES}
        for label, r in (
            ("the decision, policyd-noaudit/empty", calls["policyd-noaudit"] / calls["empty"]),
            (
                "audit on vs off, policyd/policyd-noaudit",
                calls["policyd"] / calls["policyd-noaudit"],
            ),
        ):
            verdict = "meets" if r >= GOAL_THROUGHPUT_RATIO else "MISSES"
            lines.append(
                f"{callers:>2} callers: {label} = {r:.3f}"
                f" ({verdict} the goal >= {GOAL_THROUGHPUT_RATIO})"
            )
    lines += ["", "In-process CPU per call (same store, before the servers start):"]
    lines.append(
        table(
            [["what", "us/call"]]
            + [[name, f"{us:.2f}"] for name, us in summary["in_process_us"].items()]
        )
    )
    return "\n".join(lines)


def _run_one(
    name: str, args: argparse.Namespace, d: Durations, grants: int, log_dir: Path
) -> tuple[dict[str, Any], str]:
    """Run the benchmark `name`: its summary (results.json) and its report (the text)."""
    if name == "grpc_stack":
        summary = grpc_stack.run(
            log_dir,
            callers=CALLERS,
            rounds=d.rounds,
            warmup=d.warmup,
            duration=d.stack_duration,
        )
        report = _report_stack(summary)
    elif name == "policy":
        summary = policy_bench.run(args.quick)
        report = policy_bench.report(summary)
    elif name == "audit":
        summary = audit_bench.run(args.quick)
        report = audit_bench.report(summary)
    elif name == "hub":
        summary = hub_bench.run(args.quick)
        report = hub_bench.report(summary)
    elif name == "link":
        summary = link_bench.run(args.quick)
        report = link_bench.report(summary)
    elif name == "embedded":
        summary = embedded_bench.run(args.quick)
        report = embedded_bench.report(summary)
    elif name == "envoy":
        summary = envoy_bench.run(args.quick, log_dir)
        report = envoy_bench.report(summary)
    elif name == "observe":
        summary = observe_bench.run(
            log_dir, grants=grants, rounds=d.rounds, warmup=d.warmup, duration=d.duration
        )
        report = observe_bench.report(summary)
    elif name == "cluster":
        summary = cluster_bench.run(
            log_dir,
            quick=args.quick,
            rounds=d.rounds,
            warmup=d.warmup,
            duration=d.duration,
        )
        report = cluster_bench.report(summary)
    elif name == "peer":
        summary = peer_bench.run(
            log_dir,
            grants=grants,
            callers=CALLERS,
            rounds=d.rounds,
            warmup=d.warmup,
            duration=d.duration,
        )
        report = peer_bench.report(summary)
    else:
        summary = check.run(
            log_dir,
            grants=grants,
            callers=CALLERS,
            rounds=d.rounds,
            warmup=d.warmup,
            duration=d.duration,
            micro_calls=d.micro_calls,
        )
        report = _report_check(summary)
    return summary, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--only", choices=NAMES, help="run one benchmark")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "var" / "bench" / "results.json", help="JSON results"
    )
    parser.add_argument("--grants", type=int, help="grants in the store (default 1M; quick 100k)")
    args = parser.parse_args(argv)
    d = QUICK if args.quick else FULL
    grants = args.grants if args.grants is not None else d.grants
    if grants < 1:
        parser.error("--grants must be at least 1")
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    names = [args.only] if args.only else list(NAMES)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": _machine(),
        "settings": {**d.__dict__, "grants": grants, "callers": CALLERS},
    }
    reports: list[str] = []
    with progress("benchmarks", machine=False) as bar:
        for done, name in enumerate(names):
            if bar is None:
                print(f"running {name} ...", file=sys.stderr, flush=True)
            else:
                bar.note(name)
                bar(done, len(names))
            t0 = time.monotonic()
            summary, report = _run_one(name, args, d, grants, log_dir)
            reports.append(report)
            summary["seconds"] = round(time.monotonic() - t0, 1)
            results[name] = summary
        if bar is not None:
            bar.note("")
            bar(len(names), len(names))
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(
        f"policyd benchmarks, {results['date']}, {m['nproc']} CPUs ({m['cpu']}),"
        f" Python {m['python']}, grpcio {m['grpcio']}, revision {m['revision']}"
        f"{' [quick: short runs, not for comparison]' if args.quick else ''}\n"
    )
    print("\n\n".join(reports))
    # (Each benchmark's report says how many rounds its medians are of.)
    print(f"\n({results['seconds']:.0f} s; {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
