"""The load generator: one client process that drives every server of a benchmark.

`python -m bench.loadgen` reads a LoadSpec as JSON on stdin and writes the list of Window
results as JSON on stdout. For each caller count, it runs `rounds` rounds; each round runs
one timed window per target, in the order given (A, B, A, B, ...), so drift on the shared
machine hits every target alike. A window starts `callers` threads that each make blocking
unary calls back to back on one shared channel per target; after `warmup` seconds it reads
the target server's CPU time (/proc/PID/stat) and its own, waits `duration` seconds, reads
them again, then stops the threads. Only calls that completed inside the timed window count
(throughput and latency percentiles).

Requests and responses travel as raw bytes (no (de)serializers on the client), so the client
does the same work for every target; the servers parse and serialize as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from bench.procs import ROOT, clean_env, machine_busy_seconds, tree_cpu_seconds
from bench.stats import percentile

CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    pid: int
    method: str  # full method path, e.g. "/policyd.v1.Decision/Check"
    request_hex: str  # serialized request


@dataclass(frozen=True)
class LoadSpec:
    targets: list[Target]
    callers: list[int]
    rounds: int
    warmup: float
    duration: float
    # The CPUs the load generator runs on (None: wherever the kernel puts it), so that it
    # can be kept off the CPU the servers are pinned to, as a client on another host.
    cpus: list[int] | None = None


@dataclass
class Window:
    target: str
    callers: int
    round: int
    calls: int
    errors: int
    seconds: float
    calls_per_s: float
    p50_us: float
    p99_us: float
    server_cpu_us_per_call: float
    server_cpu_util: float  # server CPU seconds per wall second (1.0 = one core busy)
    client_cpu_us_per_call: float
    client_cpu_util: float
    # CPU the rest of the machine used meanwhile: other processes and kernel work charged
    # to no process, e.g. loopback softirq (1.0 = one core busy).
    other_cpu_util: float
    # CPU seconds the other (idle) servers used during the window: should be ~0.
    idle_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadResult:
    windows: list[Window]
    responses: dict[str, str]  # target name -> one response (hex), taken before measuring
    first_error: str = ""


def _window(
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes],
    request: bytes,
    target: Target,
    others: list[Target],
    callers: int,
    round_no: int,
    spec: LoadSpec,
) -> tuple[Window, str]:
    stop = threading.Event()
    ends = [array("q") for _ in range(callers)]
    lats = [array("q") for _ in range(callers)]
    errors = [0] * callers
    first_error: list[str] = []

    def caller(i: int) -> None:
        end_i, lat_i = ends[i], lats[i]
        clock = time.perf_counter_ns
        while not stop.is_set():
            t0 = clock()
            try:
                call(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{target.name}: {exc}")
                time.sleep(0.01)
                continue
            t1 = clock()
            end_i.append(t1)
            lat_i.append(t1 - t0)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    try:
        time.sleep(spec.warmup)
        idle0 = {o.name: tree_cpu_seconds(o.pid) for o in others}
        busy0 = machine_busy_seconds()
        client0 = time.process_time()
        server0 = tree_cpu_seconds(target.pid)  # with policyd's audit indexer
        t_start = time.perf_counter_ns()
        time.sleep(spec.duration)
        t_stop = time.perf_counter_ns()
        server1 = tree_cpu_seconds(target.pid)
        client1 = time.process_time()
        busy1 = machine_busy_seconds()
        idle1 = {o.name: tree_cpu_seconds(o.pid) for o in others}
    finally:
        stop.set()
        for t in threads:
            t.join()
    window_lats: list[int] = []
    for end_i, lat_i in zip(ends, lats, strict=True):
        window_lats.extend(
            lat for end, lat in zip(end_i, lat_i, strict=True) if t_start <= end < t_stop
        )
    window_lats.sort()
    calls = len(window_lats)
    seconds = (t_stop - t_start) / 1e9
    server_cpu = server1 - server0
    client_cpu = client1 - client0
    idle_cpu = {name: idle1[name] - idle0[name] for name in idle0}
    other_cpu = busy1 - busy0 - server_cpu - client_cpu - sum(idle_cpu.values())
    per_call = 1e6 / calls if calls else float("nan")
    window = Window(
        target=target.name,
        callers=callers,
        round=round_no,
        calls=calls,
        errors=sum(errors),
        seconds=seconds,
        calls_per_s=calls / seconds,
        p50_us=percentile(window_lats, 0.50) / 1000,
        p99_us=percentile(window_lats, 0.99) / 1000,
        server_cpu_us_per_call=server_cpu * per_call,
        server_cpu_util=server_cpu / seconds,
        client_cpu_us_per_call=client_cpu * per_call,
        client_cpu_util=client_cpu / seconds,
        other_cpu_util=max(other_cpu, 0.0) / seconds,
        idle_cpu=idle_cpu,
    )
    return window, (first_error[0] if first_error else "")


def call_once(address: str, method: str, request: bytes) -> bytes:
    """One unary call of raw bytes on a new channel (set-up checks, not measuring)."""
    with grpc.insecure_channel(address) as channel:
        reply: bytes = channel.unary_unary(method, None, None)(request, timeout=CALL_TIMEOUT)
    return reply


def run(spec: LoadSpec) -> LoadResult:
    """Run the spec in this process (the load generator process)."""
    channels = {t.name: grpc.insecure_channel(t.address) for t in spec.targets}
    try:
        calls: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {
            t.name: channels[t.name].unary_unary(t.method, None, None) for t in spec.targets
        }
        requests = {t.name: bytes.fromhex(t.request_hex) for t in spec.targets}
        responses: dict[str, str] = {}
        for t in spec.targets:  # connect, and keep one response to check its size
            reply: bytes = calls[t.name](requests[t.name], timeout=CALL_TIMEOUT)
            responses[t.name] = reply.hex()
        windows: list[Window] = []
        first_error = ""
        for callers in spec.callers:
            for round_no in range(spec.rounds):
                for t in spec.targets:
                    others = [o for o in spec.targets if o is not t]
                    window, error = _window(
                        calls[t.name], requests[t.name], t, others, callers, round_no, spec
                    )
                    windows.append(window)
                    first_error = first_error or error
        return LoadResult(windows, responses, first_error)
    finally:
        for channel in channels.values():
            channel.close()


def _spec_from_json(data: dict[str, Any]) -> LoadSpec:
    return LoadSpec(
        targets=[Target(**t) for t in data["targets"]],
        callers=[int(c) for c in data["callers"]],
        rounds=int(data["rounds"]),
        warmup=float(data["warmup"]),
        duration=float(data["duration"]),
        cpus=None if data.get("cpus") is None else [int(c) for c in data["cpus"]],
    )


def _result_from_json(data: dict[str, Any]) -> LoadResult:
    return LoadResult(
        windows=[Window(**w) for w in data["windows"]],
        responses=dict(data["responses"]),
        first_error=str(data["first_error"]),
    )


def run_in_process(spec: LoadSpec) -> LoadResult:
    """Run the spec in a new load generator process and return its results."""
    windows = len(spec.callers) * spec.rounds * len(spec.targets)
    budget = 60 + windows * (spec.warmup + spec.duration + CALL_TIMEOUT)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(asdict(spec)).encode(),
        capture_output=True,
        timeout=budget,
        cwd=ROOT,
        env=clean_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"load generator failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}"
        )
    result = _result_from_json(json.loads(proc.stdout))
    if result.first_error or any(w.errors for w in result.windows):
        raise RuntimeError(f"calls failed during the benchmark: {result.first_error}")
    return result


def main() -> int:
    spec = _spec_from_json(json.loads(sys.stdin.read()))
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)  # before any thread starts: they inherit it
    result = run(spec)
    json.dump(asdict(result), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
