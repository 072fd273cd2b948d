"""`python -m bench.envoy [--quick]`: what authorizing a request costs in Envoy, three ways,
measured in one run over loopback with `wrk` (Debian's package):

* `plain`: Envoy alone;
* `jwt`: Envoy's own `jwt_authn` filter (RS256, local JWKS inline, no JWT cache);
* `extauthz`: Envoy's `ext_authz` filter asking `policyd serve` (the full decision, audit
  log on as configured by default), plus variants that show where the time goes:
  `extauthz-noaudit` (the same policyd with `audit.enabled = false`) and
  `extauthz-workers2` (`server.workers = 2`, audit on);
* `extauthz-http`: the same ext_authz filter in HTTP mode (`http_service`, the filter of
  adapters/envoy/envoy-http.yaml) asking the `policyd` above on its HTTP/1.1 door
  (`envoy.http_address`, policyd/doors/envoy_http.py), audit on;
* `extauthz-uds`: the same, asking another policyd whose door listens on a Unix socket,
  and `extauthz-uds-noaudit`, the same again with `audit.enabled = false` (what the audit
  record costs this door).

Every configuration has the same upstream, an Envoy `direct_response` (200, a small JSON
body), so the hub's Python cost does not mask the cost of the check. One Envoy process
serves one listener per configuration (docs/envoy.md, docs/benchmarks.md). The request is
`GET /api/data/tags/edge-historian` with alice's token, which policyd allows.

Each listener is measured at 1 connection (`wrk -t1 -c1`) and 16 (`wrk -t2 -c16`) in
alternating windows (plain, jwt, extauthz, ..., plain, ...), then at a fixed rate of 1,000
requests/s (an open-loop pacer in this process, one thread per connection: latency counts
from each request's scheduled send time, so a stall is not hidden). Around every window
the CPU time of policyd (all its processes) and of Envoy is read from /proc, wrk's from
this process's children's usage, and how busy the machine's CPUs were from /proc/stat.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bench.hub import _process, _seed, _wait_grpc
from bench.procs import (
    ROOT,
    clean_env,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    stop,
    tree_cpu_seconds,
)
from bench.stats import median, percentile

ENVOY = Path(sys.executable).parent / "envoy"
PATH = "/api/data/tags/edge-historian"
CONNECTIONS = (1, 16)
PACED_RATE = 1000
GOAL_RATIO = 0.5
GOAL_P99_US = 2000.0
# Listener name -> the policyd it asks ("" = none); the order of the windows.
TARGETS = {
    "plain": "",
    "jwt": "",
    "extauthz": "policyd",
    "extauthz-noaudit": "policyd-noaudit",
    "extauthz-workers2": "policyd-workers2",
    "extauthz-http": "policyd",
    "extauthz-uds": "policyd-uds",
    "extauthz-uds-noaudit": "policyd-uds-noaudit",
}
PACED = (
    "jwt",
    "extauthz",
    "extauthz-noaudit",
    "extauthz-workers2",
    "extauthz-http",
    "extauthz-uds",
)
# The ext_authz listeners compared with jwt in the verdict lines.
VERDICT = ("extauthz", "extauthz-http", "extauthz-uds")
HTTP_CLUSTER = "policyd-http"  # the Envoy cluster of policyd's HTTP door
UDS_CLUSTER = "policyd-http-uds"  # the same door of another policyd, on a Unix socket
UDS_FILE = "door.sock"
UDS_NOAUDIT_CLUSTER = "policyd-http-uds-noaudit"  # the same, of a policyd with no audit log
UDS_NOAUDIT_FILE = "door-noaudit.sock"


@dataclass(frozen=True)
class Durations:
    rounds: int
    duration: int  # seconds per wrk window
    paced_seconds: float


FULL = Durations(rounds=3, duration=4, paced_seconds=5.0)
QUICK = Durations(rounds=1, duration=1, paced_seconds=1.0)


@dataclass
class Window:
    target: str
    connections: int
    round: int
    requests: int
    non_2xx: int
    requests_per_s: float
    p50_us: float
    p99_us: float
    policyd_cpu_us_per_request: float
    envoy_cpu_us_per_request: float
    wrk_cpu_us_per_request: float
    busy_cpus: float  # CPU seconds per second of all the machine's CPUs (/proc/stat)


# -- configuration ---------------------------------------------------------------------------


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _rs256() -> tuple[str, str]:
    """An RSA key's JWKS (JSON) and an RS256 token signed with it, valid for a day."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    jwks = {
        "keys": [
            {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench",
             "n": _b64(numbers.n), "e": _b64(numbers.e)}
        ]
    }  # fmt: skip
    now = int(time.time())
    claims = {"iss": "https://bench.test", "aud": "hub", "sub": "alice", "iat": now,
              "exp": now + 86400}  # fmt: skip
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"})
    return json.dumps(jwks), token


def _direct_route() -> dict[str, Any]:
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": '{"ok":true}'}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
    }


def _listener(name: str, port: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "codec_type": "AUTO",
                            "route_config": {
                                "virtual_hosts": [
                                    {"name": name, "domains": ["*"], "routes": [_direct_route()]}
                                ]
                            },
                            "http_filters": [*filters, router],
                        },
                    }
                ]
            }
        ],
    }


def _jwt_filter(jwks: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
            "JwtAuthentication",
            "providers": {
                "bench": {
                    "issuer": "https://bench.test",
                    "audiences": ["hub"],
                    "local_jwks": {"inline_string": jwks},
                    "forward": True,
                    # No jwt_cache_config: every request verifies the signature.
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }


def _ext_authz_filter(sample: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The ext_authz filter of adapters/envoy/envoy.yaml, pointed at `cluster`."""
    hcm = sample["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext = json.loads(json.dumps(hcm["typed_config"]["http_filters"][0]))
    ext["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
    assert ext["name"] == "envoy.filters.http.ext_authz"
    return dict(ext)


def _ext_authz_http_filter(sample: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The ext_authz filter of adapters/envoy/envoy-http.yaml, pointed at `cluster`."""
    hcm = sample["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext = json.loads(json.dumps(hcm["typed_config"]["http_filters"][0]))
    ext["typed_config"]["http_service"]["server_uri"]["cluster"] = cluster
    assert ext["name"] == "envoy.filters.http.ext_authz"
    return dict(ext)


def _policyd_cluster(sample: dict[str, Any], name: str, port: int) -> dict[str, Any]:
    from adapters.envoy.config import _cluster

    cluster = json.loads(json.dumps(_cluster(sample, "policyd")))
    cluster["name"] = name
    cluster["load_assignment"]["cluster_name"] = name
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = port
    return dict(cluster)


def _unix_cluster(cluster: dict[str, Any], path: str) -> dict[str, Any]:
    """The cluster, its one endpoint a Unix socket (Envoy's `pipe` address)."""
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"] = {"pipe": {"path": path}}
    return cluster


def envoy_bootstrap(
    admin_port: int,
    ports: dict[str, int],
    policyd_ports: dict[str, int],
    jwks: str,
    http_port: int,
    uds_paths: dict[str, str],
) -> dict[str, Any]:
    """`uds_paths`: the Unix socket of each Unix-socket cluster (UDS_CLUSTER,
    UDS_NOAUDIT_CLUSTER)."""
    from adapters.envoy.config import HTTP, load

    sample = load()
    http_sample = load(HTTP)
    listeners = []
    for name, port in ports.items():
        policyd = TARGETS[name]
        if name == "plain":
            filters: list[dict[str, Any]] = []
        elif name == "jwt":
            filters = [_jwt_filter(jwks)]
        elif name == "extauthz-http":
            filters = [_ext_authz_http_filter(http_sample, HTTP_CLUSTER)]
        elif name == "extauthz-uds":
            filters = [_ext_authz_http_filter(http_sample, UDS_CLUSTER)]
        elif name == "extauthz-uds-noaudit":
            filters = [_ext_authz_http_filter(http_sample, UDS_NOAUDIT_CLUSTER)]
        else:
            filters = [_ext_authz_filter(sample, policyd)]
        listeners.append(_listener(name, port, filters))
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                *(_policyd_cluster(sample, n, p) for n, p in policyd_ports.items()),
                _policyd_cluster(http_sample, HTTP_CLUSTER, http_port),
                *(
                    _unix_cluster(_policyd_cluster(http_sample, cluster, 0), path)
                    for cluster, path in uds_paths.items()
                ),
            ],
        },
    }


# -- measuring -------------------------------------------------------------------------------


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _micros(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests, requests/s, non-2xx count, p50 and p99 (us) from `wrk --latency` output."""
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    pct = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", out, re.M))
    return {
        "requests": requests,
        "requests_per_s": rate,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "p50_us": _micros(pct["50"]),
        "p99_us": _micros(pct["99"]),
    }


def _wrk(port: int, token: str, connections: int, seconds: int) -> str:
    threads = 1 if connections == 1 else 2
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    )  # fmt: skip
    return result.stdout


PACER_CONNECTIONS = 32


def _paced(port: int, token: str, rate: int, seconds: float) -> dict[str, float]:
    """Open loop at `rate` requests/s over PACER_CONNECTIONS keep-alive connections;
    latency from each request's scheduled time, so a stall (every connection busy) is
    counted, not hidden.

    One thread per connection takes the next scheduled time from a shared queue, sleeps
    until it (time.sleep: nanosleep, about 0.1 ms late at worst here) and sends. An asyncio
    pacer was used before: its timers have millisecond granularity, so it sent requests up
    to 1 ms late and that lateness counted as latency. How late each send was is reported
    (`send_lag_p99_us`): the pacer's own floor."""
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    n = int(rate * seconds)
    start = time.monotonic() + 0.2
    schedule: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    for i in range(n):
        schedule.put(start + i / rate)
    latencies: list[float] = []
    lags: list[float] = []
    errors = [0]

    def connection() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = sock.makefile("rb")
            while (at := schedule.get()) is not None:
                delay = at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent = time.monotonic()
                sock.sendall(request)
                status = _read_response_sync(stream)
                done = time.monotonic()
                lags.append(sent - at)  # list.append: atomic under the GIL
                if status == 200:
                    latencies.append(done - at)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=connection) for _ in range(PACER_CONNECTIONS)]
    for _ in threads:
        schedule.put(None)  # after every scheduled time: one stop per thread
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    us = sorted(x * 1e6 for x in latencies)
    lag_us = sorted(max(0.0, x) * 1e6 for x in lags)
    return {
        "requests": len(us),
        "errors": errors[0],
        "p50_us": percentile(us, 0.5),
        "p99_us": percentile(us, 0.99),
        "max_us": us[-1] if us else float("nan"),
        "send_lag_p99_us": percentile(lag_us, 0.99),
    }


def _read_response_sync(stream: BinaryIO) -> int:
    """Read one response; returns its status. Bodies have a Content-Length."""
    status_line = stream.readline()
    status = int(status_line[9:12])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    stream.read(length)
    return status


# -- processes -------------------------------------------------------------------------------


def _wait_envoy(admin_port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import http.client

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited:\n{log.read_text(errors='replace')}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"envoy not ready:\n{log.read_text(errors='replace')}")


@contextmanager
def _envoy(work: Path, bootstrap: dict[str, Any], admin_port: int, log: Path) -> Iterator[int]:
    config = work / "envoy.json"
    config.write_text(json.dumps(bootstrap))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_envoy(admin_port, process, log)
        yield process.pid
    finally:
        stop(process)


def _policyd_configs(work: Path, base: Path, http_port: int) -> dict[str, Path]:
    text = base.read_text() + "[oauth]\nenabled = false\n"
    variants = {
        "policyd": "",
        "policyd-noaudit": "enabled = false\n",
        "policyd-workers2": "",
        "policyd-uds": "",
        "policyd-uds-noaudit": "enabled = false\n",
    }
    out = {}
    for name, audit_extra in variants.items():
        # Each its own audit log: indexers of one log share its journals' work, which
        # would put one policyd's indexing on another's CPU figure.
        body = text.replace(f'"{work / "audit.db"}"', f'"{work / f"audit-{name}.db"}"')
        if body == text:
            raise RuntimeError("the seeded config has no audit.path to give each policyd")
        if audit_extra:
            body = body.replace("[audit]\n", "[audit]\n" + audit_extra, 1)
        if name.endswith("workers2"):
            body += "[server]\nworkers = 2\n"
        if name == "policyd":  # also the HTTP door, for extauthz-http
            body += f'[envoy]\nhttp_address = "127.0.0.1:{http_port}"\n'
        if name == "policyd-uds":  # the HTTP door on a Unix socket, for extauthz-uds
            body += f'[envoy]\nhttp_address = "unix:{work / UDS_FILE}"\n'
        if name == "policyd-uds-noaudit":  # the same with no audit log: its cost, apart
            body += f'[envoy]\nhttp_address = "unix:{work / UDS_NOAUDIT_FILE}"\n'
        path = work / f"{name}.toml"
        path.write_text(body)
        out[name] = path
    return out


# -- the run ---------------------------------------------------------------------------------


def run(quick: bool, log_dir: Path | None = None) -> dict[str, Any]:
    """Run the benchmark; returns medians per listener and connection count, and ratios.
    The logs of Envoy and of each policyd go to `log_dir` (envoy-*.log), kept after the
    run; without one, to the run's temporary folder."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk; see .ci/run)")
    d = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as tmp, ExitStack() as running:
        work = Path(tmp)
        logs = log_dir or work
        logs.mkdir(parents=True, exist_ok=True)
        base_config, token = _seed(work)
        jwks, jwt_token = _rs256()
        policyd_ports = {name: free_port() for name in set(TARGETS.values()) if name}
        http_port = free_port()
        pids: dict[str, int] = {}
        for name, path in _policyd_configs(work, base_config, http_port).items():
            address = f"127.0.0.1:{policyd_ports[name]}"
            proc = running.enter_context(
                _process(
                    ["-m", "policyd", "--config", str(path), "serve", "--address", address],
                    logs / f"envoy-{name}.log",
                    work,
                    clean_env(),
                )
            )
            _wait_grpc(address, proc)
            pids[name] = proc.pid
        ports = {name: free_port() for name in TARGETS}
        admin = free_port()
        envoy_pid = running.enter_context(
            _envoy(
                work,
                envoy_bootstrap(
                    admin,
                    ports,
                    policyd_ports,
                    jwks,
                    http_port,
                    {
                        UDS_CLUSTER: str(work / UDS_FILE),
                        UDS_NOAUDIT_CLUSTER: str(work / UDS_NOAUDIT_FILE),
                    },
                ),
                admin,
                logs / "envoy-envoy.log",
            )
        )
        tokens = {name: jwt_token if name == "jwt" else token for name in TARGETS}
        for name, port in ports.items():  # warm: connections, policyd's caches
            first = parse_wrk(_wrk(port, tokens[name], 2, 1))
            if first["non_2xx"]:
                raise RuntimeError(f"{name}: {first['non_2xx']} refused requests while warming")
        windows: list[Window] = []
        for connections in CONNECTIONS:
            for round_ in range(d.rounds):
                for name, port in ports.items():
                    pd = pids.get(TARGETS[name], 0)
                    pd0 = tree_cpu_seconds(pd) if pd else 0.0
                    e0 = cpu_seconds(envoy_pid)
                    c0, m0, t0 = _children_cpu_seconds(), machine_busy_seconds(), time.monotonic()
                    w = parse_wrk(_wrk(port, tokens[name], connections, d.duration))
                    c1, m1, t1 = _children_cpu_seconds(), machine_busy_seconds(), time.monotonic()
                    pd1 = tree_cpu_seconds(pd) if pd else 0.0
                    e1 = cpu_seconds(envoy_pid)
                    n = max(int(w["requests"]), 1)
                    windows.append(
                        Window(
                            name,
                            connections,
                            round_,
                            int(w["requests"]),
                            int(w["non_2xx"]),
                            w["requests_per_s"],
                            w["p50_us"],
                            w["p99_us"],
                            (pd1 - pd0) / n * 1e6,
                            (e1 - e0) / n * 1e6,
                            (c1 - c0) / n * 1e6,
                            (m1 - m0) / (t1 - t0),
                        )
                    )
        paced: dict[str, Any] = {}
        for name in PACED:
            pd = pids.get(TARGETS[name], 0)
            pd0 = tree_cpu_seconds(pd) if pd else 0.0
            result = _paced(ports[name], tokens[name], PACED_RATE, d.paced_seconds)
            pd1 = tree_cpu_seconds(pd) if pd else 0.0
            result["policyd_cpu_us_per_request"] = (
                (pd1 - pd0) / result["requests"] * 1e6 if pd and result["requests"] else 0.0
            )
            paced[name] = result
        in_process = _in_process(base_config, token)
    return _summarize(windows, paced, in_process, d)


def _children_cpu_seconds() -> float:
    """User + system CPU of this process's waited-for children (each wrk, once it exits)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _in_process(config_path: Path, token: str, calls: int = 2000) -> dict[str, float]:
    """CPU us per call of the ext_authz servicer's parts, in this process (warm)."""
    from envoy.service.auth.v3 import external_auth_pb2

    from bench.stats import time_per_call
    from policyd.audit.journal import Indexer
    from policyd.config import load_config
    from policyd.decision.wiring import build_decider
    from policyd.doors import envoy_servicer as servicer

    config = load_config(config_path, env={})
    decider = build_decider(config)
    if decider.audit is not None:
        decider.audit.start()  # as in the server: one journal line per record
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.protocol = "GET", PATH, "HTTP/1.1"
    http.headers.update(
        {":authority": "127.0.0.1", ":method": "GET", ":path": PATH, ":scheme": "http",
         "authorization": f"Bearer {token}", "user-agent": "wrk",
         "x-forwarded-proto": "http", "x-request-id": "0a1b2c3d-bench"}
    )  # fmt: skip
    raw = request.SerializeToString()
    s = servicer.AuthorizationServicer(decider)
    check = servicer.to_input(request)
    decision = decider.check(check, time.perf_counter_ns())
    assert decision.allowed, decision
    response = servicer.allow(decision, http.headers, False)
    answered = s.Check(request, None)  # type: ignore[arg-type]
    # A remembered allow is answered already encoded (policyd.doors.service.add_unary).
    out = answered if isinstance(answered, bytes) else answered.SerializeToString()
    try:
        return {
            "CheckRequest.FromString": time_per_call(
                lambda: external_auth_pb2.CheckRequest.FromString(raw), calls
            ),
            "to_input": time_per_call(lambda: servicer.to_input(request), calls),
            "Decider.check (remembered decision + journal line)": time_per_call(
                lambda: decider.check(check, time.perf_counter_ns()), calls // 4
            ),
            "Engine.decide (not remembered)": time_per_call(
                lambda: decider.engine.decide(check), calls
            ),
            "allow (build OkHttpResponse)": time_per_call(
                lambda: servicer.allow(decision, http.headers, False), calls
            ),
            "CheckResponse.SerializeToString": time_per_call(response.SerializeToString, calls),
            "AuthorizationServicer.Check (all of the above)": time_per_call(
                lambda: s.Check(request, None),  # type: ignore[arg-type]
                calls // 4,
            ),
            "request bytes": float(len(raw)),
            "response bytes": float(len(out)),
        }
    finally:
        if decider.audit is not None:
            decider.audit.close()
            Indexer(config.audit.path, decider.audit.key).run_once()


def _summarize(
    windows: list[Window], paced: dict[str, Any], in_process: dict[str, float], d: Durations
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": PATH,
        "durations": asdict(d),
        "by_connections": {},
        "paced": {"rate": PACED_RATE, "seconds": d.paced_seconds, "by_target": paced},
        "in_process_us": in_process,
    }
    for connections in CONNECTIONS:
        entry: dict[str, Any] = {}
        for name in TARGETS:
            mine = [w for w in windows if w.target == name and w.connections == connections]
            entry[name] = {
                "requests_per_s": median([w.requests_per_s for w in mine]),
                "requests_per_s_by_round": [round(w.requests_per_s) for w in mine],
                "p50_us": median([w.p50_us for w in mine]),
                "p99_us": median([w.p99_us for w in mine]),
                "policyd_cpu_us_per_request": median([w.policyd_cpu_us_per_request for w in mine]),
                "envoy_cpu_us_per_request": median([w.envoy_cpu_us_per_request for w in mine]),
                "wrk_cpu_us_per_request": median([w.wrk_cpu_us_per_request for w in mine]),
                "busy_cpus": median([w.busy_cpus for w in mine]),
                "non_2xx": sum(w.non_2xx for w in mine),
            }
        jwt = entry["jwt"]["requests_per_s"]
        ratios = {f"{name}/jwt": entry[name]["requests_per_s"] / jwt for name in TARGETS}
        ratios["jwt/plain"] = jwt / entry["plain"]["requests_per_s"]
        out["by_connections"][str(connections)] = {"targets": entry, "ratios": ratios}
    return out


def report(summary: dict[str, Any]) -> str:
    rows = [["conns", "listener", "req/s", "p50 us", "p99 us", "vs jwt", "policyd CPU us/req",
             "envoy CPU us/req", "wrk CPU us/req", "CPUs busy", "non-2xx"]]  # fmt: skip
    lines = [
        f"Envoy: GET {summary['path']} through Envoy, upstream a direct_response; wrk"
        f" {summary['durations']['duration']} s windows, medians of"
        f" {summary['durations']['rounds']} alternating rounds"
    ]
    for connections, entry in summary["by_connections"].items():
        for name, e in entry["targets"].items():
            rows.append(
                [connections, name, f"{e['requests_per_s']:,.0f}", f"{e['p50_us']:.0f}",
                 f"{e['p99_us']:.0f}", f"{entry['ratios'][f'{name}/jwt']:.2f}",
                 f"{e['policyd_cpu_us_per_request']:.0f}" if TARGETS[name] else "",
                 f"{e['envoy_cpu_us_per_request']:.1f}", f"{e['wrk_cpu_us_per_request']:.1f}",
                 f"{e['busy_cpus']:.2f}", str(e["non_2xx"])]
            )  # fmt: skip
    from bench.report import table

    lines.append(table(rows))
    for connections, entry in summary["by_connections"].items():
        for name in VERDICT:
            r = entry["ratios"][f"{name}/jwt"]
            verdict = "meets" if r >= GOAL_RATIO else "MISSES"
            lines.append(
                f"{connections:>2} connections: {name}/jwt = {r:.2f} ({verdict} the goal >="
                f" {GOAL_RATIO}); jwt/plain = {entry['ratios']['jwt/plain']:.2f}"
            )
    p = summary["paced"]
    lines += ["", f"Paced at {p['rate']:,} requests/s for {p['seconds']:.0f} s (open loop):"]
    prow = [["listener", "requests", "errors", "p50 us", "p99 us", "max us", "send lag p99 us",
             "policyd CPU us/req"]]  # fmt: skip
    for name, e in p["by_target"].items():
        prow.append(
            [name, str(e["requests"]), str(e["errors"]), f"{e['p50_us']:.0f}",
             f"{e['p99_us']:.0f}", f"{e['max_us']:.0f}", f"{e['send_lag_p99_us']:.0f}",
             f"{e['policyd_cpu_us_per_request']:.0f}" if TARGETS[name] else ""]
        )  # fmt: skip
    lines.append(table(prow))
    for name in VERDICT:
        p99 = p["by_target"][name]["p99_us"]
        lines.append(
            f"{name} p99 at {p['rate']:,}/s = {p99:.0f} us"
            f" ({'meets' if p99 < GOAL_P99_US else 'MISSES'} the goal < {GOAL_P99_US:.0f} us)"
        )
    lines += ["", "In-process CPU per call of the ext_authz servicer's parts (warm):"]
    lines.append(
        table(
            [["what", "us/call"]] + [[k, f"{v:.1f}"] for k, v in summary["in_process_us"].items()]
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.envoy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = run(args.quick, ROOT / "var" / "bench" / "logs")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
