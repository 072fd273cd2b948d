"""Pin a serving process to one CPU (`server.cpu_affinity`).

A CPython process runs Python on one core at a time (the GIL), but grpcio's sync server
passes every call between threads: the poller thread that reads the socket, a pool thread
that runs the handler, and back. When the kernel spreads those threads over two cores, each
hand-off of the GIL is a cross-core wake-up: a futex, a migration, and caches that are cold
on the core that wakes. Measured on the 2-core dev machine (docs/benchmarks.md), that
hand-off, not the decision, was most of the gap between Check and an empty handler; pinned
to one core, the same server spends about a third less CPU per call. More cores are used the way
nginx and HAProxy do it: several processes (`server.workers`), each pinned to its own CPU.

`server.cpu_affinity`:
- "auto" (default): worker i runs on the i-th CPU this process may use (wrapping around);
  a lone server (no `server.workers`) stays on the CPU it started on, so that several
  lone servers on one host do not all crowd onto the first. Where only one CPU is allowed,
  nothing changes.
- "none": no pinning; the kernel places the threads.
- a CPU list such as "1", "0,2" or "0-3": worker i runs on the i-th CPU of the list.

Background work (the audit indexer process) runs on the CPUs no serving process is pinned
to, when there are any (`spare`): it then never takes a serving process's core.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from policyd.core.cpus import KEY, parse
from policyd.core.errors import ConfigError

log = logging.getLogger(__name__)


def choose(
    setting: str, worker: int | None, allowed: set[int] | None = None, current: int | None = None
) -> int | None:
    """The CPU for worker number `worker` (None: a lone server), or None to stay unpinned."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    if setting.strip().lower() == "none":
        return None
    listed = parse(setting)
    if listed is None:  # auto
        if len(allowed) < 2:
            return None
        ordered = sorted(allowed)
        if worker is None:
            cpu = current_cpu() if current is None else current
            return cpu if cpu in allowed else ordered[0]
        return ordered[worker % len(ordered)]
    missing = [c for c in listed if c not in allowed]
    if missing:
        raise ConfigError(
            f"{KEY}: CPU {missing[0]} is not available to this process"
            f" (allowed: {','.join(map(str, sorted(allowed)))})"
        )
    return listed[(worker or 0) % len(listed)]


def current_cpu() -> int | None:
    """The CPU this process last ran on (field 39 of /proc/self/stat), or None."""
    try:
        stat = Path("/proc/self/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2 :].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def pin(cpu: int) -> None:
    """Pin this thread (so the threads it starts later) and every thread already running."""
    os.sched_setaffinity(0, {cpu})
    try:
        tasks = [int(name) for name in os.listdir(Path("/proc/self/task"))]
    except OSError:
        return
    for tid in tasks:
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            os.sched_setaffinity(tid, {cpu})


def spare(serving: set[int], allowed: set[int] | None = None) -> set[int]:
    """The CPUs for background work beside serving processes pinned to `serving`: the
    allowed ones none of them is pinned to, or all allowed when that leaves none."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    return (allowed - serving) or allowed


def serving_cpus(setting: str, workers: int | None) -> set[int]:
    """The CPUs the serving processes will be pinned to: `workers` workers, or (None) a
    lone server, which is pinned to the CPU choose() gives it now (pin_worker's `cpu`)."""
    if workers is None:
        cpu = choose(setting, None)
        return set() if cpu is None else {cpu}
    chosen = (choose(setting, worker) for worker in range(workers))
    return {cpu for cpu in chosen if cpu is not None}


def pin_worker(setting: str, worker: int | None, cpu: int | None = None) -> int | None:
    """Apply the setting for this worker (None: a lone server); returns the CPU, or None
    when not pinned. `cpu`: the CPU already chosen for it (serving_cpus), if any.

    A CPU the kernel refuses (for example a cgroup change since start) is logged and
    leaves the process unpinned: a slower server is better than none."""
    if cpu is None:
        cpu = choose(setting, worker)
    if cpu is None:
        return None
    try:
        pin(cpu)
    except OSError as exc:
        log.warning("%s: cannot pin to CPU %d: %s; running unpinned", KEY, cpu, exc.strerror)
        return None
    return cpu
