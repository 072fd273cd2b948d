"""`python -m bench.link [--quick]`: the link's cost (docs/link.md), measured in one run,
with every decision asked of a real `policyd serve`.

A snapshot query (POST /api/data/v2/snapshot for one tag of plant-mes, alice's token) three
ways, with the same load generator as bench/hub.py (keep-alive connections, back-to-back
requests, alternating windows so drift on the shared machine hits all alike):

* *local*: the reference hub holds plant-mes itself, behind the PolicydMiddleware asking
  policyd (bench/hub.py's protected hub);
* *websocket*: a hub protected the same way that does not hold plant-mes: the middleware
  asks policyd about the app's request, then LinkForward asks policyd `connector.attach`
  for the connector (GrpcAuthorizer, as before every forward) and sends the request down
  the link to `policyd-connector`, which replays it against the plant's upstream (a hub
  holding plant-mes, trusting the decision headers the hub sends along) over WebSocket;
* *polling*: the same over the long-polling fallback (the hub refuses WebSocket:
  POLICYD_HUB_LINK_TRANSPORTS=polling).

ratio = link / local (throughput; p50): what the link really costs a request, its extra
Check included. The connector is the demo's `plant-connector` (owning plant-mes), its
token from policyd's own token endpoint (client credentials).

Then the time from a hub restart (SIGTERM, a new process on the same ports) to the
connector serving again through it, with the connector's reconnection back-off at
delay_seconds 0.5, delay_max_seconds 2 (the figure is mostly that back-off).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.hub import (
    Durations,
    Target,
    Window,
    _first_tag,
    _http_request,
    _seed,
    _wait_grpc,
    run_load,
)
from bench.procs import ROOT, clean_env, free_port, stop
from bench.stats import median
from policyd.cli import demo
from policyd.config import load_config
from policyd.core.model import Access
from policyd.store.sqlite import SqliteStore

CONNECTIONS = 8
SIDES = ("local", "websocket", "polling")
FULL = Durations(rounds=3, warmup=1.0, duration=4.0)
QUICK = Durations(rounds=1, warmup=0.3, duration=1.0)
DATA_SOURCE = "plant-mes"


# -- policyd ---------------------------------------------------------------------------------


def _policyd_home(work: Path) -> tuple[Path, str, str, str]:
    """The demo store with the authorization server on: the config, alice's token, the demo
    connector's secret and policyd's token endpoint."""
    oauth_port = free_port()
    issuer = f"http://127.0.0.1:{oauth_port}"
    config_path, token = _seed(
        work,
        tokens=f'issuer = "{issuer}"\n',
        extra=(
            f'[oauth]\nenabled = true\naddress = "127.0.0.1:{oauth_port}"\n'
            f'session_key_file = "{work / "oauth-session.key"}"\n'
        ),
    )
    config = load_config(config_path, env={})
    store = SqliteStore(Path(config.store.path))
    try:
        # The demo grants plant-mes to bob alone; alice's token reads it here.
        store.add_grant("alice", demo.DEMO_APP, DATA_SOURCE, Access.READ)
        secret = store.rotate_connector_secret(demo.DEMO_CONNECTOR)
    finally:
        store.close()
    return config_path, token, secret, f"{issuer}/token"


# -- the processes ----------------------------------------------------------------------------


def _hub_env(work: Path, name: str, port: int, data_sources: str, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.update(
        POLICYD_HUB_PORT=str(port),
        POLICYD_HUB_DATA_DIR=str(work / "data"),  # one hub.db: the same values everywhere
        POLICYD_HUB_DATA_SOURCES=data_sources,
        **extra,
    )
    return env


def _protected(address: str) -> dict[str, str]:
    """A hub behind the PolicydMiddleware asking policyd at `address` (as bench/hub.py's
    protected hub: a deadline no loaded 2-core machine reaches)."""
    return {
        "POLICYD_HUB_GATEWAY": "asgi",
        "POLICYD_HUB_MODE": "remote",
        "POLICYD_HUB_POLICYD_ADDRESS": address,
        "POLICYD_HUB_TIMEOUT_SECONDS": "5",
    }


def _snapshot_ok(port: int, request: bytes) -> bool:
    """One snapshot query (alice's token) answered 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(request)
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(what)
        time.sleep(0.01)
    return time.monotonic() - started


@dataclass
class Front:
    port: int
    link_port: int
    env: dict[str, str]
    log: Path


def _front(work: Path, name: str, transports: str, address: str) -> Front:
    """A protected hub without plant-mes, its link on a plain loopback listener."""
    port, link_port = free_port(), free_port()
    env = _hub_env(
        work,
        name,
        port,
        "edge-historian",
        POLICYD_HUB_LINK_ADDRESS=f"127.0.0.1:{link_port}",
        POLICYD_HUB_LINK_INSECURE="1",
        POLICYD_HUB_LINK_TRANSPORTS=transports,
        **_protected(address),
    )
    return Front(port, link_port, env, work / f"{name}.log")


def _connector_config(work: Path, name: str, front: Front, upstream: int, token_url: str) -> Path:
    secret = work / "secret"
    path = work / f"{name}.toml"
    path.write_text(
        f'hub_url = "http://127.0.0.1:{front.link_port}"\n'
        f'token_url = "{token_url}"\n'
        f'client_id = "{demo.DEMO_CONNECTOR}"\nclient_secret_file = "{secret}"\n'
        "insecure_dev = true\n"
        "[reconnect]\ndelay_seconds = 0.5\ndelay_max_seconds = 2\nrandomization_factor = 0.1\n"
        f'[sources.{DATA_SOURCE}]\nurl = "http://127.0.0.1:{upstream}"\n'
    )
    return path


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )


def run(quick: bool, connections: int = CONNECTIONS) -> dict[str, Any]:
    d = QUICK if quick else FULL
    running: dict[str, subprocess.Popen[bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
        work = Path(tmp)
        try:
            config_path, token, secret, token_url = _policyd_home(work)
            (work / "secret").write_text(secret)
            (work / "secret").chmod(0o600)
            body = json.dumps({"tags": {DATA_SOURCE: [_first_tag(DATA_SOURCE)]}}).encode()
            request = _http_request("POST", "/api/data/v2/snapshot", token, body)
            raw = request.encode("latin-1")
            address = f"127.0.0.1:{free_port()}"
            running["policyd"] = _start(
                ["-m", "policyd", "--config", str(config_path), "serve", "--address", address],
                work / "policyd.log",
                clean_env(),
            )
            _wait_grpc(address, running["policyd"])
            local_port, upstream_port = free_port(), free_port()
            running["local"] = _start(
                ["-m", "examples.hub"],
                work / "local.log",
                _hub_env(work, "local", local_port, DATA_SOURCE, **_protected(address)),
            )
            # The plant: trusts the decision headers the hub sends down the link.
            running["upstream"] = _start(
                ["-m", "examples.hub"],
                work / "upstream.log",
                _hub_env(work, "upstream", upstream_port, DATA_SOURCE, POLICYD_HUB_GATEWAY="envoy"),
            )
            fronts = {
                "websocket": _front(work, "websocket", "polling,websocket", address),
                "polling": _front(work, "polling", "polling", address),
            }
            for side, front in fronts.items():
                running[side] = _start(["-m", "examples.hub"], front.log, front.env)
                config = _connector_config(work, side, front, upstream_port, token_url)
                running[f"{side}-connector"] = _start(
                    ["-m", "adapters.link.connector", "--config", str(config)],
                    work / f"{side}-connector.log",
                    clean_env(),
                )
            _wait(lambda: _snapshot_ok(local_port, raw), "the local hub")
            for side, front in fronts.items():
                _wait(functools.partial(_snapshot_ok, front.port, raw), f"the {side} link")
            ports = {"local": local_port, **{s: f.port for s, f in fronts.items()}}
            targets = [
                asdict(
                    Target(
                        side,
                        ports[side],
                        running[side].pid,
                        running[f"{side}-connector"].pid if side != "local" else 0,
                        request,
                    )
                )
                for side in SIDES
            ]
            spec = {"durations": asdict(d), "connections": connections, "targets": targets}
            windows = run_load(spec)
            restart = _restart(running, fronts["websocket"], raw, 1 if quick else 3)
        finally:
            for process in reversed(running.values()):
                stop(process)
    return _summarize(windows, connections, d, restart)


def _restart(
    running: dict[str, subprocess.Popen[bytes]], front: Front, request: bytes, times: int
) -> dict[str, list[float]]:
    """Stop the websocket side's hub and start a new one on the same ports: seconds until it
    listens, and until the connector serves through it again."""
    listening: list[float] = []
    serving: list[float] = []
    for _ in range(times):
        stop(running["websocket"])
        started = time.monotonic()
        running["websocket"] = _start(["-m", "examples.hub"], front.log, front.env)
        _wait(lambda: _listening(front.port), "the restarted hub")
        listening.append(time.monotonic() - started)
        _wait(lambda: _snapshot_ok(front.port, request), "the connector serving again")
        serving.append(time.monotonic() - started)
    return {"listening_s": listening, "serving_s": serving}


def _listening(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/api/info")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _summarize(
    windows: list[Window], connections: int, d: Durations, restart: dict[str, list[float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"connections": connections, "durations": asdict(d), "sides": {}}
    for side in SIDES:
        mine = [w for w in windows if w.target == side]
        out["sides"][side] = {
            "requests_per_s": median([w.requests_per_s for w in mine]),
            "requests_per_s_by_round": [round(w.requests_per_s, 1) for w in mine],
            "p50_us": median([w.p50_us for w in mine]),
            "p99_us": median([w.p99_us for w in mine]),
            "hub_cpu_us_per_request": median([w.hub_cpu_us_per_request for w in mine]),
            "connector_cpu_us_per_request": median([w.policyd_cpu_us_per_request for w in mine]),
            "errors": sum(w.errors for w in mine),
        }
    local = out["sides"]["local"]
    out["ratio"] = {
        side: {
            "throughput": out["sides"][side]["requests_per_s"] / local["requests_per_s"],
            "p50": out["sides"][side]["p50_us"] / local["p50_us"],
        }
        for side in ("websocket", "polling")
    }
    out["restart"] = {
        **restart,
        "serving_s_median": median(restart["serving_s"]),
        "listening_s_median": median(restart["listening_s"]),
    }
    return out


def report(summary: dict[str, Any]) -> str:
    rows = [["path", "req/s", "p50 ms", "p99 ms", "hub CPU us/req", "connector CPU us/req"]]
    for side in SIDES:
        e = summary["sides"][side]
        rows.append(
            [
                side,
                f"{e['requests_per_s']:.0f}" + (f" ({e['errors']} errors)" if e["errors"] else ""),
                f"{e['p50_us'] / 1000:.2f}",
                f"{e['p99_us'] / 1000:.2f}",
                f"{e['hub_cpu_us_per_request']:.0f}",
                f"{e['connector_cpu_us_per_request']:.0f}" if side != "local" else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )
    d = summary["durations"]
    head = (
        f"Link: a snapshot query served by the hub itself (local) and over the link to a"
        f" connector (WebSocket, long-polling), every hub behind the middleware asking"
        f" policyd, the link asking it too before each forward; {summary['connections']} keep-alive"
        f" connections; medians of {d['rounds']} alternating {d['duration']:g} s windows"
    )
    ratios = [
        f"{side}: throughput link/local = {r['throughput']:.2f}; p50 x{r['p50']:.2f}"
        for side, r in summary["ratio"].items()
    ]
    r = summary["restart"]
    ratios.append(
        f"hub restart: listening after {r['listening_s_median']:.2f} s, the connector serving"
        f" through it after {r['serving_s_median']:.2f} s (median of {len(r['serving_s'])})"
    )
    return "\n".join([head, table, *ratios])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.link")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    args = parser.parse_args(argv)
    summary = run(args.quick)
    print(report(summary))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
