"""A peer: policyd against the Cerbos PDP, deciding the same request on the same CPU.

Cerbos (https://cerbos.dev, Go) is fetched in the set-up (bench/cerbos.py: a pinned
binary from the npm registry, cached in var/bench/); where it cannot be had the benchmark
is skipped with one line and the others run.

The question is the check benchmark's: may user u000000, through a token with the scopes
UserInfo and DataRead, read data source ds007? Cerbos decides it with a resource policy
(kind `datasource`, action `read`, role `user`) whose CEL condition reads attributes the
caller sends: `"DataRead" in P.attr.scopes && R.id in P.attr.granted`. So the caller sends
the token's scopes and the user's granted data sources with every request (the list read
here from the check benchmark's store, as policyd sees it: 100 data sources), and Cerbos
looks nothing up. policyd gets the token and the path: it verifies the token (cached after
the first call), then reads the live grant, consent, app and revocation in its store, and
with its audit log on writes the record to its journal before answering.

Servers, one process each, all pinned to the same CPU (bench/check.py's server_cpu), the
load generator on the others; one load generator drives them in alternating windows at 1
and 16 callers, as in the check benchmark:

* `policyd`: `policyd serve`, default configuration (audit log on), Decision API Check;
* `policyd-noaudit`: the same with `audit.enabled = false`;
* `policyd-envoy`: another `policyd serve` (audit on, its own audit log), asked on its
  Envoy ext_authz v3 door (`envoy.service.auth.v3.Authorization/Check`);
* `cerbos`: `cerbos server`, audit off (its default), CheckResources over gRPC;
* `cerbos-audit`: the same with its audit log on (access and decision logs, the `file`
  backend: newline-delimited JSON to a file);
* `cerbos-audit-local`: the same with the `local` backend (an embedded Badger database that
  `cerbosctl audit` can query, batched and committed every second).

The set-up fails unless every server allows the bench request, and each Cerbos also
denies a data source that is not in the granted list. Goal (issue 18): policyd's server CPU
per decision at most Cerbos's, audit off against off and on against on (GOAL_PAIRS).
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from bench import cerbos
from bench.check import (
    APP,
    DATA_SOURCE,
    METHOD,
    PATH,
    SCOPES,
    USER,
    _fetch_response,
    _policyd,
    _ports,
    check_request,
    client_cpus,
    seed,
)
from bench.loadgen import LoadSpec, Target, call_once, run_in_process
from bench.observe import _variant
from bench.report import load_table, summarize
from policyd.gen.v1 import decision_pb2

ENVOY_METHOD = "/envoy.service.auth.v3.Authorization/Check"
NOT_GRANTED = "ds-not-granted"

NAMES = [
    "policyd",
    "policyd-noaudit",
    "policyd-envoy",
    "cerbos",
    "cerbos-audit",
    "cerbos-audit-local",
]
# The goal's pairs: policyd's server CPU per decision at most Cerbos's, audit off vs off
# and on vs on (the Decision API and the Envoy door, each against Cerbos's file backend).
GOAL_PAIRS = [
    ("policyd-noaudit", "cerbos"),
    ("policyd", "cerbos-audit"),
    ("policyd-envoy", "cerbos-audit"),
]
RATIOS = [*GOAL_PAIRS, ("policyd", "cerbos-audit-local")]

# -- the requests -----------------------------------------------------------------------------


def granted_data_sources(db_path: Path, user: str = USER, app: str = APP) -> list[str]:
    """The data sources the user granted to the app, as policyd's store holds them."""
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT data_source FROM grants WHERE user_id = ? AND client_id = ?"
            " AND revoked_at IS NULL ORDER BY data_source",
            (user, app),
        ).fetchall()
    finally:
        conn.close()
    return [str(r[0]) for r in rows]


def cerbos_request(granted: list[str], resource_id: str = DATA_SOURCE) -> bytes:
    """The bench request for Cerbos: the principal with the token's scopes and the granted
    data sources as attributes, `read` on the data source."""
    return cerbos.check_resources_request(
        USER,
        [cerbos.ROLE],
        {"scopes": list(SCOPES), "granted": granted},
        cerbos.RESOURCE_KIND,
        resource_id,
        cerbos.ACTION,
    )


def envoy_request(token: str) -> external_auth_pb2.CheckRequest:
    """What Envoy's ext_authz filter sends for `GET PATH` with the token."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", PATH, "hub.bench", "http"
    http.protocol = "HTTP/1.1"
    http.headers.update({"authorization": f"Bearer {token}", ":authority": "hub.bench"})
    return request


def check_cerbos(address: str, granted: list[str]) -> None:
    """Fail unless Cerbos allows the bench request and denies a data source not granted."""
    allowed = cerbos.decide(address, cerbos_request(granted))
    denied = cerbos.decide(address, cerbos_request(granted, NOT_GRANTED))
    if allowed != {DATA_SOURCE: {cerbos.ACTION: "EFFECT_ALLOW"}}:
        raise RuntimeError(f"Cerbos did not allow the bench request: {allowed}")
    if denied != {NOT_GRANTED: {cerbos.ACTION: "EFFECT_DENY"}}:
        raise RuntimeError(f"Cerbos did not deny a data source not granted: {denied}")


# -- the run ----------------------------------------------------------------------------------


def run(
    log_dir: Path,
    *,
    grants: int,
    callers: list[int],
    rounds: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    try:
        binary = cerbos.binary_path()
    except cerbos.Unavailable as exc:
        return {"skipped": str(exc)}
    with tempfile.TemporaryDirectory(prefix="policyd-bench-peer-") as tmp:
        root = Path(tmp)
        seeded = seed(root, grants)
        seeded.store.close()
        audited, unaudited, config = seeded.audited, seeded.unaudited, seeded.config
        counts, token = seeded.counts, seeded.token
        granted = granted_data_sources(Path(config.store.path))
        if DATA_SOURCE not in granted:
            raise RuntimeError(f"{USER} has not granted {DATA_SOURCE} to {APP} in the store")
        decision = check_request(token).SerializeToString()
        envoy = envoy_request(token).SerializeToString()
        for_cerbos = cerbos_request(granted)
        envoy_config = _variant(audited, "envoy", "")  # its own audit log
        policies = cerbos.write_policies(root)
        ports = _ports(9)
        cerbos_configs = {
            name: cerbos.config(root, name, ports[3 + 2 * i], ports[4 + 2 * i], policies, audit)
            for i, (name, audit) in enumerate(
                (("cerbos", None), ("cerbos-audit", "file"), ("cerbos-audit-local", "local"))
            )
        }
        requests = {
            "policyd": (METHOD, decision),
            "policyd-noaudit": (METHOD, decision),
            "policyd-envoy": (ENVOY_METHOD, envoy),
            **{name: (cerbos.METHOD, for_cerbos) for name in cerbos_configs},
        }
        with contextlib.ExitStack() as stack:
            servers = [
                stack.enter_context(_policyd(name, path, port, log_dir))
                for name, path, port in (
                    ("policyd", audited, ports[0]),
                    ("policyd-noaudit", unaudited, ports[1]),
                    ("policyd-envoy", envoy_config, ports[2]),
                )
            ]
            servers += [
                stack.enter_context(cerbos.server(binary, path, name, ports[3 + 2 * i], log_dir))
                for i, (name, path) in enumerate(cerbos_configs.items())
            ]
            for server in servers[:2]:
                _fetch_response(server.address, check_request(token))
            _check_envoy_allows(call_once(servers[2].address, ENVOY_METHOD, envoy))
            for server in servers[3:]:
                check_cerbos(server.address, granted)
            spec = LoadSpec(
                targets=[
                    Target(s.name, s.address, s.pid, *_hex(requests[s.name])) for s in servers
                ],
                callers=callers,
                rounds=rounds,
                warmup=warmup,
                duration=duration,
                cpus=client_cpus(),
            )
            result = run_in_process(spec)
            audit_sizes = _audit_sizes(root)
        cerbos_yaml = cerbos_configs["cerbos-audit"].read_text()
    for name, reply in result.responses.items():
        _check_reply(name, bytes.fromhex(reply))
    summary = summarize(result, NAMES, RATIOS)
    summary.update(
        cerbos=f"{cerbos.PACKAGE}@{cerbos.VERSION}",
        store=counts,
        granted=len(granted),
        request=f"GET {PATH} as {USER} via {APP}",
        request_bytes={name: len(body) for name, (_, body) in requests.items()},
        audit_bytes=audit_sizes,
        cerbos_config=cerbos_yaml,
    )
    return summary


def _hex(method_and_body: tuple[str, bytes]) -> tuple[str, str]:
    method, body = method_and_body
    return method, body.hex()


def _check_envoy_allows(reply: bytes) -> None:
    response = external_auth_pb2.CheckResponse.FromString(reply)
    if response.status.code != 0 or not response.HasField("ok_response"):
        raise RuntimeError(f"policyd's Envoy door did not allow the bench request: {response}")


def _check_reply(name: str, reply: bytes) -> None:
    """Every server answered the load generator's first call with an allow."""
    if name.startswith("cerbos"):
        effects = cerbos.effects(reply)
        if effects != {DATA_SOURCE: {cerbos.ACTION: "EFFECT_ALLOW"}}:
            raise RuntimeError(f"{name} did not answer allow: {effects}")
    elif name == "policyd-envoy":
        _check_envoy_allows(reply)
    elif not decision_pb2.CheckResponse.FromString(reply).allowed:
        raise RuntimeError(f"{name} did not answer allow")


def _audit_sizes(root: Path) -> dict[str, int]:
    """Bytes of disk each audit log takes at the end, so a side that logged nothing shows
    (allocated blocks: Badger's value log is a sparse file of 1 GB from the start)."""
    sizes: dict[str, int] = {}
    for path in sorted(root.iterdir()):
        if "audit" in path.name and not path.name.endswith((".toml", ".yaml", ".key")):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sizes[path.name] = sum(p.stat().st_blocks * 512 for p in files)
    return sizes


def report(summary: dict[str, Any]) -> str:
    if "skipped" in summary:
        return f"peer: skipped: {summary['skipped']}"
    sizes = summary["request_bytes"]
    lines = [
        f"Peer: policyd against {summary['cerbos']} (CheckResources), {summary['request']};"
        f" store: {summary['store']['grants']:,} grants; Cerbos is sent the user's"
        f" {summary['granted']} granted data sources; request bytes: policyd {sizes['policyd']},"
        f" Envoy door {sizes['policyd-envoy']}, Cerbos {sizes['cerbos']}",
        load_table(summary, NAMES),
    ]
    for callers, entry in summary["by_callers"].items():
        for a, b in RATIOS:
            r = entry["ratios"][f"{a}/{b}"]
            goal = ""
            if (a, b) in GOAL_PAIRS:
                met = r["server_cpu_per_call"] <= 1.0
                goal = f" ({'meets' if met else 'MISSES'} the goal <= 1)"
            lines.append(
                f"{callers:>2} callers: server CPU per decision, {a}/{b} ="
                f" {r['server_cpu_per_call']:.2f}{goal}; calls/s {r['throughput']:.2f}"
            )
    lines.append(
        "audit logs at the end (bytes): "
        + ", ".join(f"{k} {v:,}" for k, v in summary["audit_bytes"].items())
    )
    return "\n".join(lines)
