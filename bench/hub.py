"""`python -m bench.hub [--quick]`: the reference hub's requests/s with and without the ASGI
middleware, measured in the same run.

Three processes besides this one: `policyd serve` on a demo store, and two copies of the hub
(`python -m examples.hub`, uvicorn, one process each): *protected*, behind the
PolicydMiddleware, and *unprotected*, trusting x-policyd-* headers as it would behind Envoy.
The unprotected hub is sent the headers a gateway would add, so both do the same work except
asking policyd. A fourth process, the load generator (`python -m bench.hub load`), keeps
`connections` HTTP/1.1 keep-alive connections busy with back-to-back requests, one window per
hub in each round, in an order rotated from round to round, so drift on the shared machine
hits every hub alike. Each window: a warm-up, then `duration` seconds timed; only responses
completed inside the window count. Around each window it reads the CPU time of the hub and
of policyd (/proc/PID/stat). The rounds are shared among sets of fresh processes (FULL: a
set for each round): one process can be faster or slower than its identical twin for its
whole life. The hubs are pinned to one CPU, the rest (load generator, policyd serve, the
audit indexers) to the others, as bench/check.py pins its servers. A hub's req/s and CPU
per request are over all its windows; the ratios are of those, with each round's shown.

A third hub, *embedded*, decides in its own process (the middleware's embedded mode,
docs/asgi.md: the same engine, store, audit journal and policy as `policyd serve`, its own
audit indexer as a child): the issue-18 goal is embedded/unprotected >= 0.9. Its "policyd
CPU" is the audit indexers' (the one that leads the shared journal folder indexes its
records: docs/audit.md, "Indexers"); the protected hub's is policyd serve's and the
indexers'. Every hub runs
the event loop's stall probe (POLICYD_HUB_LOOP_PROBE_MS=1, the same small cost for all
three) and the load generator reads the worst stall of each window from the hub's metrics
port (`policyd_loop_stall_seconds`, reset by each scrape).

Workloads: `tag` (GET /api/data/tags/{dsn}/{tag}: the data source is in the path) and
`snapshot` (POST /api/data/v2/snapshot with a JSON body naming two data sources, so the
middleware buffers the body and policyd parses it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.check import client_cpus, server_cpu
from bench.procs import ROOT, child_pids, clean_env, cpu_seconds, free_port, pin_threads, stop
from bench.stats import median, percentile

CONNECTIONS = 16
SIDES = ("protected", "unprotected", "embedded")
GOAL_EMBEDDED = 0.9  # issue 18: embedded / unprotected throughput, both workloads
RESPONSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Durations:
    rounds: int
    warmup: float
    duration: float
    processes: int = 1  # sets of fresh processes the rounds are shared among


# The hub's speed on the shared VM swings by a third from one half second to the next (the
# host's load), and one hub process can run 5-10 % faster or slower than its identical twin
# for its whole life (memory layout, hash seeds: an unprotected hub against another,
# docs/benchmarks.md). So: twenty short windows a hub in rotated order, each round in a set
# of fresh processes of its own, as pyperf spreads a benchmark over many processes.
FULL = Durations(rounds=20, warmup=0.5, duration=2.0, processes=20)
QUICK = Durations(rounds=1, warmup=0.3, duration=1.0)


# -- the load generator (its own process) -----------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    hub_pid: int
    # policyd's processes whose CPU this target's requests cost (none: 0 and ()): the
    # server and the audit indexers following its journals (docs/audit.md, "Indexers":
    # one of them, the leader, indexes every journal of the folder).
    policyd_pid: int
    request: str  # the raw HTTP/1.1 request, latin-1
    metrics_port: int = 0  # the hub's metrics port: its loop's worst stall per window
    also_pids: tuple[int, ...] = ()  # more of policyd's processes (as policyd_pid)


@dataclass
class Window:
    target: str
    round: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_us: float
    p99_us: float
    hub_cpu_us_per_request: float
    policyd_cpu_us_per_request: float
    loop_stall_ms: float = float("nan")  # the hub's event loop: its worst stall in the window


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; returns its status. Bodies have a Content-Length (uvicorn)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _loop_stall(port: int) -> float:
    """The hub's worst loop stall since the last read (seconds; its metrics port)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await reader.read()
    finally:
        writer.close()
    for line in data.decode().splitlines():
        if line.startswith("policyd_loop_stall_seconds "):
            return float(line.split()[1])
    raise RuntimeError(f"no policyd_loop_stall_seconds on the hub's metrics port {port}")


async def _window(target: Target, round_: int, connections: int, d: Durations) -> Window:
    request = target.request.encode("latin-1")
    latencies: list[float] = []
    errors = 0
    counting = False
    stop_at = float("inf")

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        try:
            while time.monotonic() < stop_at:
                sent = time.monotonic()
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), RESPONSE_TIMEOUT)
                done = time.monotonic()
                if counting and done <= stop_at:
                    if status == 200:
                        latencies.append(done - sent)
                    else:
                        errors += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection()) for _ in range(connections)]
    await asyncio.sleep(d.warmup)
    if target.metrics_port:
        await _loop_stall(target.metrics_port)  # the warm-up's: dropped
    hub0 = cpu_seconds(target.hub_pid)
    pd_pids = [pid for pid in (target.policyd_pid, *target.also_pids) if pid]
    pd0 = sum(map(cpu_seconds, pd_pids))
    started = time.monotonic()
    counting = True
    stop_at = started + d.duration
    await asyncio.sleep(d.duration)
    seconds = time.monotonic() - started
    hub1 = cpu_seconds(target.hub_pid)
    pd1 = sum(map(cpu_seconds, pd_pids))
    stall = await _loop_stall(target.metrics_port) if target.metrics_port else float("nan")
    await asyncio.gather(*tasks)
    n = len(latencies)
    us = sorted(x * 1e6 for x in latencies)
    return Window(
        target=target.name,
        round=round_,
        requests=n,
        errors=errors,
        seconds=round(seconds, 3),
        requests_per_s=n / seconds,
        p50_us=percentile(us, 0.5),
        p99_us=percentile(us, 0.99),
        hub_cpu_us_per_request=(hub1 - hub0) / n * 1e6 if n else float("nan"),
        policyd_cpu_us_per_request=(pd1 - pd0) / n * 1e6 if n else 0.0,
        loop_stall_ms=stall * 1000,
    )


async def _load(spec: dict[str, Any]) -> list[Window]:
    d = Durations(**spec["durations"])
    targets = [Target(**t) for t in spec["targets"]]
    windows: list[Window] = []
    first = spec.get("first_round", 0)
    for round_ in range(first, first + d.rounds):
        for target in _round_order(targets, round_) if spec.get("rotate") else targets:
            windows.append(await _window(target, round_, spec["connections"], d))
    return windows


def _round_order(targets: list[Target], round_: int) -> list[Target]:
    """The targets in round `round_`: workload after workload (the part of a name before
    "/"), each workload's targets rotated by one place a round, so that none always comes
    first, or always right after the same one."""
    workloads: dict[str, list[Target]] = {}
    for target in targets:
        workloads.setdefault(target.name.split("/")[0], []).append(target)
    ordered: list[Target] = []
    for group in workloads.values():
        shift = round_ % len(group)
        ordered += group[shift:] + group[:shift]
    return ordered


def load_main() -> int:
    """`python -m bench.hub load`: LoadSpec JSON on stdin, windows JSON on stdout. The
    spec's `cpus`, when given, are the CPUs the load generator runs on."""
    spec = json.load(sys.stdin)
    if spec.get("cpus"):
        os.sched_setaffinity(0, set(spec["cpus"]))
    windows = asyncio.run(_load(spec))
    json.dump([asdict(w) for w in windows], sys.stdout)
    return 0


# -- the servers ---------------------------------------------------------------------------------


def _http_request(
    method: str, path: str, token: str, body: bytes = b"", extra: dict[str, str] | None = None
) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return "\r\n".join(lines) + "\r\n\r\n" + body.decode("latin-1")


def _gateway_headers(data_sources: list[str]) -> dict[str, str]:
    """What a gateway in front of the unprotected hub adds to an allowed request."""
    return {
        "x-policyd-sub": "alice",
        "x-policyd-client-id": "demo-app",
        "x-policyd-scopes": "UserInfo DataRead",
        "x-policyd-data-sources": json.dumps(data_sources),
        "x-policyd-decision-id": "bench",
    }


def _first_tag(data_source: str) -> str:
    from examples.hub.catalogue import make_data_source

    return next(iter(make_data_source(data_source).tags))


def _seed(home: Path, tokens: str = "", extra: str = "") -> tuple[Path, str]:
    """A policyd config and demo store under home; a token for alice. `tokens`: more lines
    of the [tokens] section; `extra`: more sections (bench/link.py's authorization server)."""
    from policyd.cli import demo
    from policyd.config import Config, load_config
    from policyd.decision.tokens import issue_token
    from policyd.decision.wiring import token_settings
    from policyd.store.keys import KeyRing
    from policyd.store.sqlite import SqliteStore

    config_path = home / "policyd.toml"
    text = f'[store]\npath = "{home / "policyd.db"}"\n[tokens]\nkey_dir = "{home / "keys"}"\n'
    text += tokens
    # Sections of newer policyd versions: the repo's policy files, the audit log in home.
    sections = {f.name for f in dataclasses.fields(Config)}
    if "policy" in sections:
        text += f'[policy]\ndir = "{ROOT / "policies"}"\n'
    if "audit" in sections:
        text += f'[audit]\npath = "{home / "audit.db"}"\nkey_file = "{home / "audit.key"}"\n'
    config_path.write_text(text + extra)
    config = load_config(config_path, env={})
    store = SqliteStore(Path(config.store.path))
    ring = KeyRing(store, config.tokens.key_dir)
    demo.seed(store, ring, config.tokens.algorithm)
    token, _ = issue_token(
        ring,
        token_settings(config),
        sub="alice",
        client_id=demo.DEMO_APP,
        scopes=["UserInfo", "DataRead"],
        ttl_seconds=3600,
    )
    return config_path, token


def _wait_http(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited:\n{log.read_text(errors='replace')}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/api/info")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"server on {port} not ready:\n{log.read_text(errors='replace')}")


def _wait_grpc(address: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"policyd exited with {process.returncode}")
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
    raise TimeoutError(f"policyd at {address} not ready")


@contextmanager
def _process(
    args: list[str], log: Path, cwd: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )
    try:
        yield process
    finally:
        stop(process)


@contextmanager
def _hub(
    name: str, work: Path, gateway: str, policyd_address: str, **extra: str
) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """A hub process: its port, its metrics port and the process."""
    port, metrics_port = free_port(), free_port()
    env = clean_env()
    env.update(
        POLICYD_HUB_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        POLICYD_HUB_LOOP_PROBE_MS="1",
        **extra,
    )
    env.update(
        POLICYD_HUB_PORT=str(port),
        POLICYD_HUB_DATA_DIR=str(work / name),
        POLICYD_HUB_GATEWAY=gateway,
        POLICYD_HUB_POLICYD_ADDRESS=policyd_address,
        # The deadline protects the hub from a hung policyd; a loaded 2-core machine is
        # not hung, and a 503 in the middle of a window would spoil the figure.
        POLICYD_HUB_TIMEOUT_SECONDS="5",
    )
    log = work / f"{name}.log"
    with _process(["-m", "examples.hub"], log, ROOT, env) as process:
        _wait_http(port, process, log)
        yield port, metrics_port, process


def _indexer_of(pid: int) -> int:
    """The audit indexer an embedded hub started (its child)."""
    for child in child_pids(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"audit\0index" in command:
            return child
    raise RuntimeError(f"hub {pid} has no audit indexer child")


def run(quick: bool, connections: int = CONNECTIONS) -> dict[str, Any]:
    """Run the benchmark; returns the figures per workload and hub, and the ratios."""
    d = QUICK if quick else FULL
    windows: list[Window] = []
    workloads: list[str] = []
    cpu: int | None = None
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        work = Path(tmp)
        config_path, token = _seed(work)
        # Each set of processes gets its share of the rounds (docs/benchmarks.md: one
        # process can be a few per cent faster or slower than its twin for its whole life).
        per_set = max(1, d.rounds // d.processes)
        for first in range(0, d.rounds, per_set):
            rounds = min(per_set, d.rounds - first)
            more, workloads, cpu = _run_once(
                work, config_path, token, connections, d, first, rounds
            )
            windows += more
    return _summarize(windows, workloads, connections, d, cpu)


def _run_once(
    work: Path,
    config_path: Path,
    token: str,
    connections: int,
    d: Durations,
    first_round: int,
    rounds: int,
) -> tuple[list[Window], list[str], int | None]:
    """Start policyd serve and the three hubs, run rounds first_round.. of the load, stop
    them: the windows, the workloads and the CPU the hubs ran on."""
    address = f"127.0.0.1:{free_port()}"
    policyd_args = ["-m", "policyd", "--config", str(config_path), "serve"]
    with _process(
        [*policyd_args, "--address", address], work / "policyd.log", work, clean_env()
    ) as policyd:
        _wait_grpc(address, policyd)
        with (
            _hub("protected", work, "asgi", address) as (p_port, p_metrics, p_proc),
            _hub("unprotected", work, "envoy", address) as (u_port, u_metrics, u_proc),
            _hub(
                "embedded",
                work,
                "asgi",
                address,
                POLICYD_HUB_MODE="embedded",
                POLICYD_HUB_POLICYD_CONFIG=str(config_path),
            ) as (e_port, e_metrics, e_proc),
        ):
            # Every indexer follows the one journal folder; whichever leads indexes the
            # records of both policyd's and the embedded hub's windows.
            e_indexer, pd_indexer = _indexer_of(e_proc.pid), _indexer_of(policyd.pid)
            indexers = (e_indexer, pd_indexer)
            edge, lab = (_first_tag(ds) for ds in ("edge-historian", "lab-lims"))
            tag = f"/api/data/tags/edge-historian/{edge}"
            body = json.dumps({"tags": {"edge-historian": [edge], "lab-lims": [lab]}}).encode()
            workloads = {
                "tag": (("GET", tag, b""), ["edge-historian"]),
                "snapshot": (
                    ("POST", "/api/data/v2/snapshot", body),
                    ["edge-historian", "lab-lims"],
                ),
            }
            targets: list[dict[str, Any]] = []
            for wl, ((method, path, payload), sources) in workloads.items():
                targets.append(
                    asdict(
                        Target(
                            f"{wl}/protected",
                            p_port,
                            p_proc.pid,
                            policyd.pid,
                            _http_request(method, path, token, payload),
                            p_metrics,
                            indexers,
                        )
                    )
                )
                targets.append(
                    asdict(
                        Target(
                            f"{wl}/embedded",
                            e_port,
                            e_proc.pid,
                            e_indexer,
                            _http_request(method, path, token, payload),
                            e_metrics,
                            (pd_indexer,),
                        )
                    )
                )
                targets.append(
                    asdict(
                        Target(
                            f"{wl}/unprotected",
                            u_port,
                            u_proc.pid,
                            0,
                            _http_request(method, path, token, payload, _gateway_headers(sources)),
                            u_metrics,
                        )
                    )
                )
            # Every hub on one CPU, everything else on the others (bench/check.py's
            # server_cpu and client_cpus): docs/benchmarks.md, "2026-12-06, evening",
            # says why.
            cpu, clients = server_cpu(), client_cpus()
            if cpu is not None and clients:
                for hub in (p_proc, u_proc, e_proc):
                    pin_threads(hub.pid, {cpu})
                for pid in (policyd.pid, *indexers):
                    pin_threads(pid, set(clients))
            spec = {
                "targets": targets,
                "connections": connections,
                "durations": asdict(dataclasses.replace(d, rounds=rounds)),
                "first_round": first_round,
                "rotate": True,
                "cpus": clients,
            }
            windows = run_load(spec)
    return windows, list(workloads), cpu


def run_load(spec: dict[str, Any]) -> list[Window]:
    """Run this module's load generator (`python -m bench.hub load`) over `spec` in a
    process of its own; its windows."""
    loader = subprocess.run(
        [sys.executable, "-m", "bench.hub", "load"],
        input=json.dumps(spec).encode(),
        capture_output=True,
        cwd=ROOT,
        env=clean_env(),
        timeout=600,
        check=False,
    )
    if loader.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{loader.stderr.decode()}")
    return [Window(**w) for w in json.loads(loader.stdout)]


def _summarize(
    windows: list[Window],
    workloads: list[str],
    connections: int,
    d: Durations,
    hub_cpu: int | None = None,
) -> dict[str, Any]:
    """Per workload and hub: requests/s and CPU per request over all its windows (their
    requests over their seconds: every window weighs by its length), the medians of the
    windows' latencies; and the ratios to the unprotected hub, with each round's."""
    out: dict[str, Any] = {
        "connections": connections,
        "durations": asdict(d),
        "hub_cpu": hub_cpu,
        "workloads": {},
    }
    for wl in workloads:
        entry: dict[str, Any] = {}
        for side in SIDES:
            mine = [w for w in windows if w.target == f"{wl}/{side}"]
            requests = sum(w.requests for w in mine)
            entry[side] = {
                "requests_per_s": requests / sum(w.seconds for w in mine),
                "requests_per_s_by_round": [round(w.requests_per_s, 1) for w in mine],
                "p50_us": median([w.p50_us for w in mine]),
                "p99_us": median([w.p99_us for w in mine]),
                "hub_cpu_us_per_request": _per_request(mine, "hub_cpu_us_per_request"),
                "policyd_cpu_us_per_request": _per_request(mine, "policyd_cpu_us_per_request"),
                "errors": sum(w.errors for w in mine),
                "loop_stall_ms_by_round": [round(w.loop_stall_ms, 2) for w in mine],
                "loop_stall_ms_max": max(w.loop_stall_ms for w in mine),
            }
        u = entry["unprotected"]
        for side, name in (("protected", "ratio"), ("embedded", "embedded_ratio")):
            e = entry[side]
            by_round = [
                a / b if b else float("nan")
                for a, b in zip(
                    e["requests_per_s_by_round"], u["requests_per_s_by_round"], strict=True
                )
            ]
            entry[name] = {
                "throughput": e["requests_per_s"] / u["requests_per_s"],
                "throughput_by_round": [round(r, 3) for r in by_round],
                "hub_cpu_per_request": e["hub_cpu_us_per_request"] / u["hub_cpu_us_per_request"],
            }
        out["workloads"][wl] = entry
    return out


def _per_request(windows: list[Window], field: str) -> float:
    """A per-request figure of windows, over all their requests."""
    requests = sum(w.requests for w in windows)
    if not requests:
        return float("nan")
    return float(sum(getattr(w, field) * w.requests for w in windows)) / requests


def report(summary: dict[str, Any]) -> str:
    rows = [
        [
            "workload",
            "hub",
            "req/s",
            "p50 ms",
            "p99 ms",
            "hub CPU us/req",
            "policyd CPU us/req",
            "worst loop stall ms",
        ]
    ]
    ratios: list[str] = []
    for wl, entry in summary["workloads"].items():
        for side in ("unprotected", "protected", "embedded"):
            e = entry[side]
            rows.append(
                [
                    wl,
                    side,
                    f"{e['requests_per_s']:.0f}",
                    f"{e['p50_us'] / 1000:.2f}",
                    f"{e['p99_us'] / 1000:.2f}",
                    f"{e['hub_cpu_us_per_request']:.0f}",
                    f"{e['policyd_cpu_us_per_request']:.0f}" if side != "unprotected" else "-",
                    f"{e['loop_stall_ms_max']:.1f}",
                ]
            )
            if e["errors"]:
                rows[-1][2] += f" ({e['errors']} errors)"
        r = entry["ratio"]
        ratios.append(
            f"{wl}: throughput protected/unprotected = {r['throughput']:.2f};"
            f" hub CPU per request x{r['hub_cpu_per_request']:.2f}"
        )
        r = entry["embedded_ratio"]
        verdict = "meets" if r["throughput"] >= GOAL_EMBEDDED else "MISSES"
        rounds = sorted(r["throughput_by_round"])
        ratios.append(
            f"{wl}: throughput embedded/unprotected = {r['throughput']:.2f}"
            f" ({verdict} the goal >= {GOAL_EMBEDDED});"
            f" hub CPU per request x{r['hub_cpu_per_request']:.2f};"
            f" by round {rounds[0]:.2f}-{rounds[-1]:.2f}, median {median(rounds):.2f}"
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )
    d = summary["durations"]
    cpu = summary.get("hub_cpu")
    pinned = (
        f"; every hub pinned to CPU {cpu}, the load generator, policyd serve and the audit"
        " indexers to the others"
        if cpu is not None
        else ""
    )
    head = (
        f"Hub (uvicorn, 1 process): unprotected, protected (the ASGI middleware asking"
        f" policyd over gRPC) and embedded (deciding in the hub's process);"
        f" {summary['connections']} keep-alive connections; {d['rounds']} rounds of"
        f" {d['duration']:g} s windows, in rotated order (req/s and CPU over all windows,"
        f" latencies their medians){pinned}"
    )
    return "\n".join([head, table, *ratios])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["load"]:
        return load_main()
    parser = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    ns = parser.parse_args(args)
    started = time.monotonic()
    summary = run(ns.quick, ns.connections)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["nproc"] = os.cpu_count()
    if ns.json:
        ns.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    print(f"({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
