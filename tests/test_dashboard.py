"""The Grafana dashboard (docs/grafana/policyd.json) queries only metrics that a real
`policyd serve` exposes: each panel's PromQL is read for the metric names it selects, and
every one must be among the series a scrape returns after some traffic."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc

from tests.helpers import ROOT, check_request, decision_stub, run_server
from tests.metrics_support import exposition, with_metrics
from tests.oauth_support import oauth_home

DASHBOARD = ROOT / "docs" / "grafana" / "policyd.json"

# Names followed by "(" are functions or aggregations; these words are PromQL's own.
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A name not followed by "(" (a function's or aggregation's); not inside a number or $var.
_NAME = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub('""', expr)  # label values, which may look like anything
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers: label names
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges and subqueries: durations, $vars
    text = _GROUPING.sub(" ", text)  # by (...), on (...): label names
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group(1)
        if name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    assert metric_names(
        'sum by (door, le) (rate(policyd_decision_duration_seconds_bucket{door="grpc"}'
        "[$__rate_interval]))"
    ) == {"policyd_decision_duration_seconds_bucket"}
    assert metric_names(
        'sum(rate(a_total{result="hit"}[5m])) / sum(rate(a_total[5m])) > bool 0.5'
    ) == {"a_total"}
    assert metric_names("time() - max(policyd_policy_last_load_timestamp_seconds)") == {
        "policyd_policy_last_load_timestamp_seconds"
    }
    assert metric_names(
        'up == 0 and on (instance) b:recorded offset 5m unless c{job="rate(x)"}'
    ) == {"up", "b:recorded", "c"}
    assert metric_names("histogram_quantile(0.99, sum(rate(x_bucket[1m])) by (le))") == {"x_bucket"}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            exprs.append(target["expr"])
    return exprs


def exposed_names(text: str) -> set[str]:
    """The series names of an exposition (histograms: _bucket, _count, _sum)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def unexposed(exprs: list[str], exposed: set[str]) -> dict[str, set[str]]:
    """The names each expression queries that are not exposed (empty when all are)."""
    missing = {e: metric_names(e) - exposed for e in exprs}
    return {e: names for e, names in missing.items() if names}


def test_every_metric_the_dashboard_queries_is_exposed_by_policyd_serve(tmp_path: Path) -> None:
    home, _ = oauth_home(tmp_path)  # the authorization server's series too
    address = with_metrics(home)
    token = home.token()
    with run_server(home) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = decision_stub(channel)
            for path in ("/api/data/tags/ds-a", "/api/data/tags/ds-a", "/api/data/tags/ds-c"):
                stub.Check(check_request(token, path=path), timeout=10)
        deadline = time.monotonic() + 15
        # The indexer's gauges come with its first pass, the decisions' counts with the
        # serving process's next flush (metrics.FLUSH_SECONDS).
        wanted = {"policyd_audit_lag_seconds", "policyd_decisions_total"}
        while True:
            exposed = exposed_names(exposition(address))
            if wanted <= exposed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    assert unexposed(exprs, exposed) == {}
    # The same check catches a name policyd does not expose.
    typo = "sum(rate(policyd_decisons_total[5m]))"
    assert unexposed([*exprs, typo], exposed) == {typo: {"policyd_decisons_total"}}
