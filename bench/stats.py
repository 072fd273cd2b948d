"""Small statistics helpers and in-process timing loops."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    frac = pos - low
    return sorted_values[low] * (1 - frac) + sorted_values[high] * frac


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def time_per_call(fn: Callable[[], object], calls: int, repeats: int = 3) -> float:
    """Median over `repeats` runs of the CPU time per call of fn(), in microseconds.

    Process CPU time rather than wall time, so that other processes on the machine do not
    inflate the figure (the bench runs these loops while no server is busy).
    """
    per_call: list[float] = []
    for _ in range(repeats):
        start = time.process_time_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.process_time_ns() - start) / calls / 1000)
    return median(per_call)


def time_per_call_cold(fn: Callable[[], object], calls: int, flush_bytes: int = 8 << 20) -> float:
    """Median CPU time of one fn() call, in microseconds, with the CPU caches cold: before
    each call, write one byte per 64-byte cache line of a `flush_bytes` buffer (evicting
    L1/L2). Only the call itself is timed (this thread's CPU clock). A server runs the
    decision between the gRPC stack's own work, which evicts it in the same way."""
    buf = bytearray(flush_bytes)
    lines = len(buf[::64])
    samples: list[float] = []
    for i in range(calls):
        buf[::64] = bytes([i & 0xFF]) * lines
        start = time.thread_time_ns()
        fn()
        samples.append((time.thread_time_ns() - start) / 1000)
    return median(samples)
