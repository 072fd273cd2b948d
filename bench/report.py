"""Turning load-generator windows into medians, ratios and a plain-text table."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from bench.loadgen import LoadResult, Window
from bench.stats import median, ratio

METRICS = (
    "calls_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_us_per_call",
    "server_cpu_util",
    "client_cpu_us_per_call",
    "client_cpu_util",
    "other_cpu_util",
)


def _medians(windows: list[Window]) -> dict[str, Any]:
    out: dict[str, Any] = {m: median([float(getattr(w, m)) for w in windows]) for m in METRICS}
    out["rounds"] = len(windows)
    out["calls_per_s_by_round"] = [round(w.calls_per_s, 1) for w in windows]
    out["server_cpu_us_per_call_by_round"] = [round(w.server_cpu_us_per_call, 1) for w in windows]
    return out


def summarize(
    result: LoadResult, names: list[str], ratios: list[tuple[str, str]]
) -> dict[str, Any]:
    """Per caller count: the median of each metric over the rounds of each target, and for
    each (a, b) in `ratios` the ratios a/b of those medians (throughput and server CPU per
    call), under the key "a/b"."""
    by_callers: dict[str, Any] = {}
    for callers in sorted({w.callers for w in result.windows}):
        entry: dict[str, Any] = {}
        for name in names:
            entry[name] = _medians(
                [w for w in result.windows if w.callers == callers and w.target == name]
            )
        entry["ratios"] = {
            f"{a}/{b}": {
                "throughput": ratio(entry[a]["calls_per_s"], entry[b]["calls_per_s"]),
                "server_cpu_per_call": ratio(
                    entry[a]["server_cpu_us_per_call"], entry[b]["server_cpu_us_per_call"]
                ),
            }
            for a, b in ratios
        }
        by_callers[str(callers)] = entry
    return {
        "by_callers": by_callers,
        "response_bytes": {name: len(h) // 2 for name, h in result.responses.items()},
        "windows": [asdict(w) for w in result.windows],
    }


def _fmt(value: float, digits: int = 0) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_table(summary: dict[str, Any], names: list[str]) -> str:
    """One row per (callers, server) plus one ratio row per caller count."""
    rows = [
        [
            "callers / server",
            "calls/s",
            "p50 us",
            "p99 us",
            "srv CPU us/call",
            "srv CPU %",
            "cli CPU us/call",
            "cli CPU %",
            "other CPU %",
        ]
    ]
    for callers, entry in summary["by_callers"].items():
        for name in names:
            m = entry[name]
            rows.append(
                [
                    f"{callers:>2} {name}",
                    _fmt(m["calls_per_s"]),
                    _fmt(m["p50_us"]),
                    _fmt(m["p99_us"]),
                    _fmt(m["server_cpu_us_per_call"]),
                    _fmt(100 * m["server_cpu_util"]),
                    _fmt(m["client_cpu_us_per_call"]),
                    _fmt(100 * m["client_cpu_util"]),
                    _fmt(100 * m["other_cpu_util"]),
                ]
            )
        for name, r in entry["ratios"].items():
            rows.append(
                [
                    f"{callers:>2} ratio {name}",
                    _fmt(r["throughput"], 2),
                    "",
                    "",
                    _fmt(r["server_cpu_per_call"], 2),
                    "",
                    "",
                    "",
                    "",
                ]
            )
    return table(rows)
