"""`python -m bench.embedded [--quick]`: what embedded decisions add to a hub request, in
process (no server, no sockets): the ASGI app called directly, CPU time per request.

Three pairs, each measured alternately in the same process (A, B, A, B, ...):

* *empty app*: an ASGI app that answers 200 at once, alone and behind the PolicydMiddleware
  in embedded mode (docs/asgi.md, "Embedded mode"): the middleware's whole per-request path
  for a remembered allow (bearer token, forwarded headers, request id, the request's key,
  the store's data_version check, the decision id, the journal line, AuthInfo, the app's
  copy of the scope);
* *hub tag read* and *hub snapshot read*: the reference hub's app (examples/hub) answering
  the two requests of the hub benchmark (bench/hub.py: a GET of one tag; a POST whose JSON
  body names two data sources, which the middleware reads and policyd parses), unprotected
  (trusting a gateway's x-policyd-* headers, sent as a gateway would) and embedded. The
  hub answers the snapshot read in worker threads (Starlette's run_in_threadpool), so its
  figures include thread hand-offs and move more from run to run; a quarter of the calls.

The difference of each pair is what embedded decisions cost that request; the hub
benchmark's budget for it is a tenth of the unprotected hub's CPU per request in uvicorn
(its tag read: about 150 us, so 15 us). Per request: process CPU time over `calls`
requests, started in waves of WAVE tasks as a busy server starts them (they share a loop
iteration's store check), median of `rounds` rounds, after a warm-up that makes the
decision remembered; and with the CPU caches cold (8 MB written before each request, then
the request timed on the thread's CPU clock; the median of `cold_calls` such requests a
round, median of the rounds), which is closer to a server's cost: between two requests
uvicorn's own work evicts the middleware's code and data. A cold request runs alone, so
it always asks the store (the first request of a loop iteration does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.stats import median

Message = MutableMapping[str, Any]
App = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


@dataclass(frozen=True)
class Durations:
    rounds: int
    calls: int
    cold_calls: int


FULL = Durations(rounds=7, calls=20_000, cold_calls=1_000)
QUICK = Durations(rounds=2, calls=2_000, cold_calls=200)


async def _empty_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@dataclass(frozen=True)
class Side:
    """One side of a pair: the app, the request's scope, and its body."""

    app: App
    scope: dict[str, Any]
    body: bytes = b""


def _scope(path: str, headers: dict[str, str], method: str = "GET") -> dict[str, Any]:
    """An HTTP request's scope as uvicorn makes it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()],
        "state": {},
    }


# Requests started together, each in a task of its own, as a server with this many busy
# keep-alive connections starts them (the hub benchmark's 16): one loop iteration decides
# them, and they share its store check (docs/asgi.md, "One store check per loop iteration").
WAVE = 16


async def _time(side: Side, calls: int) -> float:
    """CPU microseconds per request of `calls` requests (each answered 200), in waves of
    WAVE tasks."""
    app, scope, body = side.app, side.scope, side.body
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    calls -= calls % WAVE
    started = time.process_time()
    for _ in range(calls // WAVE):
        await asyncio.gather(*(app(dict(scope), receive, send) for _ in range(WAVE)))
    spent = time.process_time() - started
    if statuses.count(200) != calls:
        raise RuntimeError(f"not every request was answered 200: {sorted(set(statuses))}")
    return spent / calls * 1e6


async def _time_cold(side: Side, calls: int) -> float:
    """Median CPU microseconds of one request with the CPU caches cold (as
    stats.time_per_call_cold: 8 MB written first, then only the request timed), as in a
    server, where the server's own work between two requests evicts the middleware's."""
    app, scope, body = side.app, side.scope, side.body
    buf = bytearray(8 << 20)
    lines = len(buf[::64])
    samples: list[float] = []
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for i in range(calls):
        buf[::64] = bytes([i & 0xFF]) * lines
        copy = dict(scope)
        started = time.thread_time_ns()
        await app(copy, receive, send)
        samples.append((time.thread_time_ns() - started) / 1000)
    if statuses.count(200) != calls:
        raise RuntimeError(f"not every request was answered 200: {sorted(set(statuses))}")
    return median(samples)


async def _measure(d: Durations, work: Path) -> dict[str, Any]:
    from adapters.asgi import PolicydMiddleware
    from adapters.embedded import EmbeddedPolicyd
    from bench.hub import _first_tag, _gateway_headers, _seed
    from examples.hub.app import create_app
    from examples.hub.settings import HubSettings
    from policyd.config import load_config

    config_path, token = _seed(work)
    # Answers on one core outrun the audit indexer on a loaded 2-core machine; more than
    # audit.timeout_seconds behind, decisions are denied. The indexer is not measured here.
    config = load_config(config_path, env={"POLICYD_AUDIT_TIMEOUT_SECONDS": "3600"})
    policyd = EmbeddedPolicyd(config)
    await policyd.start()
    try:
        path = f"/api/data/tags/edge-historian/{_first_tag('edge-historian')}"
        asked = {"Host": "127.0.0.1", "Authorization": f"Bearer {token}"}
        hub = HubSettings(data_dir=work / "hub")
        snapshot = json.dumps(
            {"tags": {ds: [_first_tag(ds)] for ds in ("edge-historian", "lab-lims")}}
        ).encode()
        posted = asked | {"Content-Type": "application/json", "Content-Length": str(len(snapshot))}
        unprotected = create_app(HubSettings(data_dir=work / "hub", gateway="envoy"))
        embedded_hub = PolicydMiddleware(create_app_unwrapped(hub), embedded=policyd)
        snapshot_path = "/api/data/v2/snapshot"
        pairs: dict[str, tuple[Side, Side]] = {
            "empty app": (
                Side(_empty_app, _scope(path, asked)),
                Side(PolicydMiddleware(_empty_app, embedded=policyd), _scope(path, asked)),
            ),
            "hub tag read": (
                Side(unprotected, _scope(path, asked | _gateway_headers(["edge-historian"]))),
                Side(embedded_hub, _scope(path, asked)),
            ),
            "hub snapshot read": (
                Side(
                    unprotected,
                    _scope(
                        snapshot_path,
                        posted | _gateway_headers(["edge-historian", "lab-lims"]),
                        "POST",
                    ),
                    snapshot,
                ),
                Side(embedded_hub, _scope(snapshot_path, posted, "POST"), snapshot),
            ),
        }
        # The snapshot read costs ten times the tag read: a quarter of the calls.
        share = {"hub snapshot read": 4}
        out: dict[str, Any] = {}
        for name, (plain, protected) in pairs.items():
            n, cold_n = d.calls // share.get(name, 1), d.cold_calls // share.get(name, 1)
            n -= n % WAVE  # (_time runs whole waves)
            for side in (plain, protected):
                await _time(side, 200)  # warm: the allow is remembered from here on
            inline_before = policyd.answered_inline
            base: list[float] = []
            embedded: list[float] = []
            base_cold: list[float] = []
            embedded_cold: list[float] = []
            for _ in range(d.rounds):
                base.append(await _time(plain, n))
                embedded.append(await _time(protected, n))
                base_cold.append(await _time_cold(plain, cold_n))
                embedded_cold.append(await _time_cold(protected, cold_n))
            inline = policyd.answered_inline - inline_before
            calls = d.rounds * (n + cold_n)
            out[name] = {
                "without_us": median(base),
                "embedded_us": median(embedded),
                "added_us": median(embedded) - median(base),
                "cold_without_us": median(base_cold),
                "cold_embedded_us": median(embedded_cold),
                "cold_added_us": median(embedded_cold) - median(base_cold),
                "without_us_by_round": [round(x, 2) for x in base],
                "embedded_us_by_round": [round(x, 2) for x in embedded],
                "answered_inline": inline,
                "answered_in_pool": calls - inline,
            }
        return out
    finally:
        await policyd.stop()


def create_app_unwrapped(settings: Any) -> App:
    """The hub's app as create_app wraps it, without the middleware (which _measure adds
    around it, embedded)."""
    from examples.hub.app import DecisionIdHeader, create_starlette

    return DecisionIdHeader(create_starlette(settings))


def run(quick: bool) -> dict[str, Any]:
    d = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
        summary = asyncio.run(_measure(d, Path(tmp)))
    return {"durations": asdict(d), "pairs": summary}


def report(summary: dict[str, Any]) -> str:
    d = summary["durations"]
    lines = [
        "Embedded decisions in process (the ASGI app called directly; CPU us per request,"
        f" medians of {d['rounds']} alternating rounds of {d['calls']:,} requests):"
    ]
    for name, e in summary["pairs"].items():
        lines.append(
            f"  {name}: without {e['without_us']:.1f} us, embedded {e['embedded_us']:.1f} us,"
            f" added {e['added_us']:.1f} us; CPU caches cold: {e['cold_without_us']:.1f},"
            f" {e['cold_embedded_us']:.1f}, added {e['cold_added_us']:.1f} us"
            f" (answered on the loop: {e['answered_inline']:,},"
            f" in the pool: {e['answered_in_pool']:,})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.embedded", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    summary = run(ns.quick)
    summary["nproc"] = os.cpu_count()
    if ns.json:
        ns.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
