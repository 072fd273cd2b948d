"""Steady background Check load for the cluster benchmark (bench/cluster.py).

`python -m bench.cluster_load` reads one line of JSON on stdin (a LoadSpec), then calls
Check on every target from `threads` threads each, paced to `rate` calls/s per target in
all, until stdin reaches end of file (the orchestrator closes it); then it writes a JSON
object per target on stdout: calls, allows, answers by reason, failed calls by gRPC status,
the slowest call. Pacing keeps the load moderate: on a 2-core machine an unpaced client
would starve the replicas' lease threads, which is not what is being measured. A thread that
falls behind (a frozen replica) does not catch up in a burst afterwards.

Requests travel as raw bytes; each answer is parsed (allowed, reason) to be counted.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from policyd.gen.v1 import decision_pb2

METHOD = "/policyd.v1.Decision/Check"
CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class LoadTarget:
    name: str
    address: str
    request_hex: str


@dataclass(frozen=True)
class LoadSpec:
    targets: list[LoadTarget]
    threads: int  # per target
    rate: float  # calls/s per target, all its threads together


@dataclass
class Tally:
    calls: int = 0
    allowed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    max_ms: float = 0.0

    def merge(self, other: Tally) -> None:
        self.calls += other.calls
        self.allowed += other.allowed
        self.reasons.update(other.reasons)
        self.errors.update(other.errors)
        self.max_ms = max(self.max_ms, other.max_ms)


def spec_to_json(spec: LoadSpec) -> str:
    return json.dumps(asdict(spec))


def spec_from_json(text: str) -> LoadSpec:
    data: dict[str, Any] = json.loads(text)
    return LoadSpec(
        targets=[LoadTarget(**t) for t in data["targets"]],
        threads=int(data["threads"]),
        rate=float(data["rate"]),
    )


def _caller(
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes],
    request: bytes,
    interval: float,
    stop: threading.Event,
    tally: Tally,
) -> None:
    next_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        elif now - next_at > interval:
            next_at = now  # behind (the server stalled): no burst to catch up
        next_at += interval
        t0 = time.perf_counter()
        try:
            reply: bytes = call(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            tally.errors[str(code)] += 1
            time.sleep(0.01)
            continue
        tally.max_ms = max(tally.max_ms, (time.perf_counter() - t0) * 1000)
        response = decision_pb2.CheckResponse.FromString(reply)
        tally.calls += 1
        tally.allowed += response.allowed
        tally.reasons[decision_pb2.Reason.Name(response.reason)] += 1


def run(spec: LoadSpec, stop: threading.Event) -> dict[str, Any]:
    """Load every target until `stop` is set; the tallies by target."""
    channels = {t.name: grpc.insecure_channel(t.address) for t in spec.targets}
    tallies: dict[str, list[Tally]] = {t.name: [] for t in spec.targets}
    threads: list[threading.Thread] = []
    started = time.monotonic()
    try:
        for t in spec.targets:
            call = channels[t.name].unary_unary(METHOD, None, None)
            request = bytes.fromhex(t.request_hex)
            for _ in range(spec.threads):
                tally = Tally()
                tallies[t.name].append(tally)
                thread = threading.Thread(
                    target=_caller,
                    args=(call, request, spec.threads / spec.rate, stop, tally),
                    daemon=True,
                )
                thread.start()
                threads.append(thread)
        stop.wait()
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT + 5)
    finally:
        for channel in channels.values():
            channel.close()
    seconds = time.monotonic() - started
    out: dict[str, Any] = {}
    for name, parts in tallies.items():
        total = Tally()
        for part in parts:
            total.merge(part)
        out[name] = {
            "calls": total.calls,
            "calls_per_s": total.calls / seconds if seconds else 0.0,
            "allowed": total.allowed,
            "reasons": dict(total.reasons),
            "errors": dict(total.errors),
            "max_ms": round(total.max_ms, 1),
            "seconds": round(seconds, 1),
        }
    return out


def main() -> int:
    spec = spec_from_json(sys.stdin.readline())
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()  # returns when the orchestrator closes our stdin
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    json.dump(run(spec, stop), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
