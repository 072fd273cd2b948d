"""How long the event loop was kept from running: a probe of the loop's worst stall.

Throughput hides a blocked loop (every request waits while one call holds it), so a host
that decides in its own process (adapters/embedded/) measures the stall itself: a task
sleeps `interval` seconds, again and again, and records how late each wake-up came
(`lateness = woke - (slept + interval)`). The worst lateness since it was last taken is
what the loop could not do for that long.

    probe = LoopStall(0.001)
    probe.start()              # in the running loop (say, at lifespan startup)
    ...
    worst = probe.take()       # seconds: the worst lateness since the last take(), reset

With `collector(probe)` registered in a prometheus_client registry, a scrape reads
`policyd_loop_stall_seconds` (the worst since the previous scrape, reset by it) and
`policyd_loop_stall_max_seconds` (the worst since start). A 1 ms probe wakes the loop
1,000 times a second: a few µs each, so it is on only where asked (the hub:
POLICYD_HUB_LOOP_PROBE_MS).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric


class LoopStall:
    """The worst lateness of a sleeping task in one event loop."""

    def __init__(self, interval: float = 0.001) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be above 0, not {interval}")
        self.interval = interval
        self.worst = 0.0  # since the last take()
        self.worst_ever = 0.0
        self.wakes = 0
        self._lock = threading.Lock()  # take() may be called from another thread (a scrape)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing the running loop (again after stop())."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-stall")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def take(self) -> float:
        """The worst lateness (seconds) since the previous take(); resets it."""
        with self._lock:
            worst, self.worst = self.worst, 0.0
        return worst

    async def _run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock is libuv's, in whole milliseconds.
        # Its timers are too, so under uvloop a lateness below about 1 ms is not seen.
        clock = time.perf_counter
        interval = self.interval
        while True:
            before = clock()
            await asyncio.sleep(interval)
            late = clock() - before - interval
            self.wakes += 1
            if late > self.worst:
                with self._lock:
                    self.worst = max(self.worst, late)
                    self.worst_ever = max(self.worst_ever, late)


class _Collector:
    def __init__(self, probe: LoopStall) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        probe = self.probe
        yield GaugeMetricFamily(
            "policyd_loop_stall_seconds",
            "The event loop's worst stall (lateness of a sleeping probe task) since the"
            " previous scrape; each scrape resets it.",
            value=probe.take(),
        )
        yield GaugeMetricFamily(
            "policyd_loop_stall_max_seconds",
            "The event loop's worst stall since the probe started.",
            value=probe.worst_ever,
        )
        yield CounterMetricFamily(
            "policyd_loop_stall_probes",
            "Wake-ups of the loop-stall probe.",
            value=probe.wakes,
        )


def collector(probe: LoopStall) -> _Collector:
    """A prometheus_client collector of the probe (register it: REGISTRY.register)."""
    return _Collector(probe)
