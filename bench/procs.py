"""Processes for the benchmarks: free ports, CPU time from /proc, start/wait/stop servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    # Field 2 (comm) may contain spaces; the fields after it start after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (policyd's workers, its audit indexer)."""
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        with suppress(OSError):
            total += cpu_seconds(child)
    return total


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread a process has now to `cpus`; threads it starts later inherit the
    mask of the thread that starts them (a server's pools are started by pinned threads)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task), cpus)


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid` (PostgreSQL's backends, policyd's indexer)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry))
    return sorted(found)


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy (not idle or iowait), from /proc/stat."""
    with open("/proc/stat", "rb") as fh:
        fields = fh.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def clean_env() -> dict[str, str]:
    """The environment for child processes: no POLICYD_* overrides, this repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


@dataclass
class ServerProcess:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_ready(server: ServerProcess, timeout: float = 30.0) -> None:
    """Wait until the server accepts an HTTP/2 connection (or fail with its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with grpc.insecure_channel(server.address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
    raise TimeoutError(f"{server.name} at {server.address} not ready:\n{server.log_tail()}")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; always reaps the process."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def server_process(
    name: str,
    args: Sequence[str],
    port: int,
    log_dir: Path,
    cwd: Path | None = None,
    *,
    program: str = sys.executable,
    cpu: int | None = None,
) -> Iterator[ServerProcess]:
    """Start `program <args>` (python by default) listening on 127.0.0.1:port; wait until
    ready; always stop it. `cpu`: pin the process, and every thread it starts, to that CPU
    from its first instruction (for a server that cannot pin itself, unlike policyd)."""
    log_path = log_dir / f"{name}.log"
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [program, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or ROOT,
            env=clean_env(),
            preexec_fn=pin,
        )
    server = ServerProcess(name, f"127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(process)
