"""What observing policyd costs: Check throughput with Prometheus metrics on against off,
and with tracing on (every decision a span, exported over OTLP/HTTP), at 16 callers.

Set-up: the check benchmark's store (bench/check.py: `grants` live grants) and request, and
three `policyd serve` processes on it, each with its own audit log (on, as by default),
pinned to the same CPU: `policyd` (metrics and tracing off, the defaults),
`policyd-metrics` (metrics.address set: every decision counted, its latency observed, in
prometheus-client's multiprocess files) and `policyd-tracing` (tracing on, sample ratio 1,
exporting to bench/otlp_sink.py, which drops what it receives). One load generator drives
them in alternating windows; the summary takes the medians over the rounds. Goal:
policyd-metrics / policyd >= 0.97 (docs/metrics.md); tracing is reported, with no goal.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.check import (
    APP,
    METHOD,
    PATH,
    USER,
    _fetch_response,
    _policyd,
    _ports,
    check_request,
    client_cpus,
    seed,
)
from bench.loadgen import LoadSpec, Target, run_in_process
from bench.procs import ROOT, clean_env, stop
from bench.report import load_table, summarize
from policyd.gen.v1 import decision_pb2

NAMES = ["policyd", "policyd-metrics", "policyd-tracing"]
RATIOS = [("policyd-metrics", "policyd"), ("policyd-tracing", "policyd")]
GOAL_METRICS_RATIO = 0.97
CALLERS = [16]


@contextlib.contextmanager
def _sink(port: int, log_dir: Path) -> Iterator[None]:
    with open(log_dir / "otlp-sink.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_sink", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=clean_env(),
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the OTLP sink did not start") from None
                time.sleep(0.05)
        yield
    finally:
        stop(process)


def _variant(base: Path, name: str, extra: str) -> Path:
    """A copy of the audited config with its own audit log and `extra` settings."""
    root = base.parent
    text = base.read_text().replace(str(root / "audit."), str(root / f"{name}-audit."))
    path = root / f"{name}.toml"
    path.write_text(text + extra)
    return path


def run(
    log_dir: Path, *, grants: int, rounds: int, warmup: float, duration: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="policyd-bench-observe-") as tmp:
        root = Path(tmp)
        seeded = seed(root, grants)
        seeded.store.close()
        audited, counts = seeded.audited, seeded.counts
        request = check_request(seeded.token)
        base_port, metrics_port, tracing_port, scrape_port, sink_port = _ports(5)
        metered = _variant(audited, "metrics", f'[metrics]\naddress = "127.0.0.1:{scrape_port}"\n')
        traced = _variant(
            audited,
            "tracing",
            "[tracing]\nenabled = true\nsample_ratio = 1.0\n"
            f'endpoint = "http://127.0.0.1:{sink_port}/v1/traces"\n',
        )
        base = _variant(audited, "base", "")
        with contextlib.ExitStack() as stack:
            stack.enter_context(_sink(sink_port, log_dir))
            servers = [
                stack.enter_context(_policyd(name, path, port, log_dir))
                for name, path, port in (
                    ("policyd", base, base_port),
                    ("policyd-metrics", metered, metrics_port),
                    ("policyd-tracing", traced, tracing_port),
                )
            ]
            for server in servers:
                _fetch_response(server.address, request)  # each allows it
            spec = LoadSpec(
                targets=[
                    Target(s.name, s.address, s.pid, METHOD, request.SerializeToString().hex())
                    for s in servers
                ],
                callers=CALLERS,
                rounds=rounds,
                warmup=warmup,
                duration=duration,
                cpus=client_cpus(),
            )
            result = run_in_process(spec)
    for name, h in result.responses.items():
        if not decision_pb2.CheckResponse.FromString(bytes.fromhex(h)).allowed:
            raise RuntimeError(f"{name} did not answer allow")
    summary = summarize(result, NAMES, RATIOS)
    summary.update(store=counts, request=f"GET {PATH} as {USER} via {APP}")
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"Observability: {summary['request']}, {summary['store']['grants']:,} grants; audit on"
        " everywhere; metrics on (multiprocess files), tracing on (ratio 1, OTLP/HTTP)",
        load_table(summary, NAMES),
    ]
    for callers, entry in summary["by_callers"].items():
        metrics = entry["ratios"]["policyd-metrics/policyd"]["throughput"]
        tracing = entry["ratios"]["policyd-tracing/policyd"]["throughput"]
        verdict = "meets" if metrics >= GOAL_METRICS_RATIO else "MISSES"
        lines.append(
            f"{callers:>2} callers: metrics on vs off = {metrics:.3f}"
            f" ({verdict} the goal >= {GOAL_METRICS_RATIO}); tracing on vs off = {tracing:.3f}"
            " (reported, no goal)"
        )
    return "\n".join(lines)
