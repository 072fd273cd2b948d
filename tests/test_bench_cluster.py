"""The cluster benchmark's pure parts (bench/cluster.py): its tallies and its report."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench import cluster
from bench.cluster_load import LoadSpec, LoadTarget, spec_from_json, spec_to_json
from bench.loadgen import LoadResult, Window
from bench.report import summarize


def test_checks_count_allows_as_stale() -> None:
    checks = cluster.Checks(Counter())
    checks.add(False, "DATA_SOURCE_NOT_GRANTED")
    checks.add(False, "STORE_UNAVAILABLE")
    checks.add(True, "ALLOWED")
    assert (checks.total, checks.stale) == (3, 1)
    assert checks.answers["ALLOW ALLOWED"] == 1


def test_ms_summarises_seconds_in_milliseconds() -> None:
    m = cluster._ms([0.010, 0.020, 0.030])
    assert (m["n"], m["p50_ms"], m["max_ms"]) == (3, 20.0, 30.0)
    assert 29.0 < m["p99_ms"] <= 30.0


def test_background_spec_round_trips() -> None:
    spec = LoadSpec([LoadTarget("a", "127.0.0.1:1", "0a")], threads=2, rate=200.0)
    assert spec_from_json(spec_to_json(spec)) == spec


def test_a_skipped_run_says_why() -> None:
    assert cluster.report({"skipped": "no initdb"}) == "Cluster: skipped: no initdb"


def _window(target: str, calls_per_s: float) -> Window:
    return Window(
        target=target,
        callers=cluster.CALLERS,
        round=0,
        calls=int(calls_per_s),
        errors=0,
        seconds=1.0,
        calls_per_s=calls_per_s,
        p50_us=1000.0,
        p99_us=3000.0,
        server_cpu_us_per_call=100.0,
        server_cpu_util=0.9,
        client_cpu_us_per_call=50.0,
        client_cpu_util=0.5,
        other_cpu_util=0.1,
    )


def _summary(stale: int, first_max_ms: float, live_p99_ms: float) -> dict[str, Any]:
    result = LoadResult([_window("sqlite", 5000.0), _window("postgres", 4900.0)], {})
    throughput = summarize(result, cluster.NAMES, cluster.RATIOS)
    throughput.update(server_cpu=0, client_cpus=[1], audit_sync="normal", seconds=40.0)
    throughput["audit_records"] = {"sqlite": 6000, "postgres": 5900}
    throughput["timed_calls"] = {"sqlite": 5000, "postgres": 4900}

    def ms(p50: float, p99: float, top: float, n: int) -> dict[str, float]:
        return {"n": n, "p50_ms": p50, "p99_ms": p99, "max_ms": top}

    frozen = {
        "frozen": "replica-c",
        "first_revoke": ms(1700.0, first_max_ms, first_max_ms, 5),
        "later_revoke": ms(10.0, 12.0, 12.0, 5),
        "bound_seconds": 2.5,
        "live_checks": 20,
        "live_stale_allows": 0,
        "resumed_checks": 25,
        "resumed_stale_allows": stale,
        "resumed_answers": {"DATA_SOURCE_NOT_GRANTED": 25 - stale, "ALLOW ALLOWED": stale},
        "recovery": ms(30.0, 40.0, 40.0, 5),
        "watchdog_resumed": 0,
        "failures": [],
    }
    live = {
        "revoke": ms(10.0, live_p99_ms, live_p99_ms, 50),
        "write": ms(5.0, 8.0, 9.0, 50),
        "ack_wait": ms(5.0, live_p99_ms - 8.0, live_p99_ms - 8.0, 50),
        "cpus_busy": 1.5,
        "cpus_ours": 1.2,
        "checks": 150,
        "stale_allows": 0,
        "answers": {"DATA_SOURCE_NOT_GRANTED": 150},
        "lease_lapses": 0,
    }
    background = {
        "replica-a": {
            "calls_per_s": 200.0,
            "reasons": {"ALLOWED": 9000},
            "errors": {},
            "max_ms": 20.0,
        }
    }
    return {
        "postgresql": "15",
        "settings": {"rounds": 7, "duration": 2.0},
        "throughput": throughput,
        "revocations": {
            "lease_seconds": 2.0,
            "live": live,
            "frozen": frozen,
            "background": background,
            "replicas_alive_at_end": {"replica-a": True},
            "seconds": 45.0,
        },
    }


def test_the_report_gives_each_goal_a_verdict() -> None:
    text = cluster.report(_summary(stale=0, first_max_ms=1900.0, live_p99_ms=20.0))
    assert "postgres/sqlite = 0.980 (meets the goal >= 0.9)" in text
    assert "revoke p99 = 20.0 ms (meets the goal < 50 ms)" in text
    assert "max 1900 ms (within lease + 0.5 s = 2500 ms)" in text
    assert "stale allows: 0 (meets the goal 0)" in text
    assert "sqlite 6,000 / 5,000, postgres 5,900 / 4,900" in text


def test_the_report_flags_misses() -> None:
    text = cluster.report(_summary(stale=2, first_max_ms=2600.0, live_p99_ms=60.0))
    assert "MISSES the goal < 50 ms" in text
    assert "OVER lease" in text
    assert "stale allows: 2 (MISSES the goal 0)" in text
