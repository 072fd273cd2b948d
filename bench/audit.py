"""Audit-log queries over a generated log of 10 million records (1 million with --quick).

The log is generated inside SQLite (a recursive CTE, so generation takes about a minute,
not an hour of Python) into the real schema that `policyd.audit.open_log_file` creates,
then queried through `AuditReader.query` exactly as `policyd audit query` does (default
limit 100): by user, by data source, by app, and by a one-hour time window. The generated
records are realistic in shape (1,000 users, 20 apps, 100 data sources, 1-2 data sources
per record, 30 days of history) but their hash links are placeholders: the chain's cost
is the writer's, measured by bench/check.py (audit on vs off), not a query cost.

The generated file is kept in var/bench/ and reused when it has the wanted size.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from policyd.audit import AuditReader, Query, open_log_file

DAYS = 30
USERS = 1000
APPS = 20
DATA_SOURCES = 100
REPEATS = 5

_GENERATE = """
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < :count)
INSERT INTO audit (seq, id, ts, decision, reason, rule_id, policy_version, client_id,
                   user_id, scopes, data_sources, action, method, path, door, request_id,
                   jti, latency_us, message, prev_hash, hash)
SELECT x,
       printf('%012x-7000-8000-%012x', CAST((:start + x * :step) * 1000 AS INTEGER), x),
       :start + x * :step,
       CASE WHEN x % 7 = 0 THEN 'deny' ELSE 'allow' END,
       CASE WHEN x % 7 = 0 THEN 'DATA_SOURCE_NOT_GRANTED' ELSE 'ALLOWED' END,
       'tags-search', 'bench', 'app-' || (x % :apps), 'user-' || ((x * 7919) % :users),
       'UserInfo DataRead',
       CASE WHEN x % 3 = 0
            THEN '["ds-' || (x % :ds) || '","ds-' || ((x + 1) % :ds) || '"]'
            ELSE '["ds-' || (x % :ds) || '"]' END,
       'tags.search', 'GET', '/api/data/tags/ds-' || (x % :ds), 'envoy', 'req-' || x,
       'jti-' || x, 150, 'allowed', printf('%064x', x - 1), printf('%064x', x)
FROM n
"""


def generated_log(count: int) -> Path:
    """A log file with `count` records (made once, then reused)."""
    path = ROOT / "var" / "bench" / f"audit-{count}.db"
    if path.exists():
        conn = sqlite3.connect(path)
        try:
            have = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
        except sqlite3.Error:
            have = -1
        conn.close()
        if have == count:
            return path
        for stale in path.parent.glob(path.name + "*"):
            stale.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"bench audit: generating {count:,} records in {path} ...", file=sys.stderr, flush=True)
    conn = open_log_file(path, "normal")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")  # 256 MiB while generating
    start = time.time() - DAYS * 86400
    conn.execute("BEGIN")
    conn.execute(
        _GENERATE,
        {
            "count": count,
            "start": start,
            "step": DAYS * 86400 / count,
            "apps": APPS,
            "users": USERS,
            "ds": DATA_SOURCES,
        },
    )
    conn.execute(
        "INSERT INTO audit_data_sources (data_source, ts, seq)"
        " SELECT j.value, a.ts, a.seq FROM audit a, json_each(a.data_sources) j"
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(f"bench audit: generated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return path


def _time(reader: AuditReader, query: Query) -> dict[str, Any]:
    times, found = [], 0
    for _ in range(REPEATS):
        started = time.perf_counter()
        found = len(reader.query(query))
        times.append(time.perf_counter() - started)
    return {
        "median_ms": statistics.median(times) * 1000,
        "max_ms": max(times) * 1000,
        "first_ms": times[0] * 1000,
        "records": found,
    }


def run(quick: bool) -> dict[str, Any]:
    count = 1_000_000 if quick else 10_000_000
    path = generated_log(count)
    reader = AuditReader(path)
    now = time.time()
    queries = {
        "by user": Query(user_id="user-42"),
        "by data source": Query(data_source="ds-7"),
        "by app, last 7 days": Query(client_id="app-3", since=now - 7 * 86400),
        "by time window (1 h, 10 days ago)": Query(
            since=now - 10 * 86400 - 3600, until=now - 10 * 86400
        ),
        "by user and data source, 2 days": Query(
            user_id="user-42", data_source="ds-42", since=now - 2 * 86400
        ),
        "denies of one app, last day": Query(client_id="app-5", decision="deny", since=now - 86400),
    }
    results = {name: _time(reader, q) for name, q in queries.items()}
    reader.close()
    return {"records": count, "file_bytes": path.stat().st_size, "queries": results}


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"audit queries over {summary['records']:,} records "
        f"({summary['file_bytes'] / 1e9:.1f} GB), limit 100, median of {REPEATS} "
        "(goal: under 1 s each)",
    ]
    for name, r in summary["queries"].items():
        verdict = "ok" if r["max_ms"] < 1000 else "MISSES GOAL"
        lines.append(
            f"  {name:36} {r['median_ms']:8.1f} ms  (first {r['first_ms']:7.1f} ms,"
            f" {r['records']:3d} records)  {verdict}"
        )
    return "\n".join(lines)


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    print(report(run(quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
