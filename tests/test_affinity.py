"""`server.cpu_affinity`: which CPU a serving process runs on (policyd/serve/affinity.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from policyd.core.cpus import parse as parse_cpus
from policyd.core.errors import ConfigError
from policyd.serve import affinity
from tests.helpers import Home, ServerProcess, child_pids, cmdline, run_server


def thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of the process: its allowed CPUs as the kernel lists them."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[int(tid)] = line.split(":", 1)[1].strip()
    return out


def cpu_list(cpus: set[int]) -> str:
    """The kernel's spelling of a CPU set, for sets of one or of consecutive CPUs."""
    lo, hi = min(cpus), max(cpus)
    assert cpus == set(range(lo, hi + 1))
    return str(lo) if lo == hi else f"{lo}-{hi}"


@pytest.mark.parametrize(
    ("setting", "cpus"),
    [
        ("auto", None),
        ("none", None),
        (" Auto ", None),
        ("1", [1]),
        ("0,2", [0, 2]),
        ("0-3", [0, 1, 2, 3]),
        ("3,0-1", [3, 0, 1]),
        ("1,1", [1]),
    ],
)
def test_parse_reads_auto_none_and_cpu_lists(setting: str, cpus: list[int] | None) -> None:
    assert parse_cpus(setting) == cpus


@pytest.mark.parametrize("setting", ["fast", "", "1,x", "3-1", "-1", "0-", "1.5", "0-999999"])
def test_parse_refuses_anything_else_naming_the_key(setting: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.cpu_affinity"):
        parse_cpus(setting)


def test_auto_gives_worker_i_the_i_th_allowed_cpu_wrapping_around() -> None:
    allowed = {2, 5, 7}
    assert [affinity.choose("auto", w, allowed) for w in range(4)] == [2, 5, 7, 2]


def test_auto_keeps_a_lone_server_on_the_cpu_it_started_on() -> None:
    assert affinity.choose("auto", None, {0, 1, 2}, current=2) == 2
    assert affinity.choose("auto", None, {0, 1, 2}, current=7) == 0  # not allowed: the first


def test_the_current_cpu_is_one_this_process_may_use() -> None:
    assert affinity.current_cpu() in os.sched_getaffinity(0)


def test_auto_leaves_a_process_with_one_allowed_cpu_unpinned() -> None:
    assert affinity.choose("auto", 0, {3}) is None
    assert affinity.choose("auto", None, {3}) is None


def test_none_never_pins() -> None:
    assert affinity.choose("none", 1, {0, 1}) is None


def test_a_cpu_list_gives_worker_i_the_i_th_listed_cpu() -> None:
    assert [affinity.choose("1,0", w, {0, 1}) for w in range(3)] == [1, 0, 1]


def test_a_cpu_list_naming_a_cpu_the_process_may_not_use_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"CPU 4 is not available .*allowed: 0,1"):
        affinity.choose("0,4", 0, {0, 1})


def _logged(server: ServerProcess, text: str, timeout: float = 10.0) -> bool:
    """Whether the server's log says `text` within `timeout`: its "serving" line comes a
    moment after it starts answering health checks."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="pinning needs at least two usable CPUs"
)


@needs_two_cpus
def test_serve_runs_every_thread_on_one_cpu_by_default(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with run_server(home) as server:
        cpus = thread_cpus(server.process.pid)
        assert len(cpus) > 3  # the main thread, grpc's threads, the reloader, ...
        [cpu] = set(cpus.values())
        assert int(cpu) in os.sched_getaffinity(0)
        assert _logged(server, f"CPU {cpu})")


@needs_two_cpus
def test_serve_with_affinity_none_leaves_the_threads_unpinned(tmp_path: Path) -> None:
    home = Home(tmp_path, extra_config='[server]\ncpu_affinity = "none"\n')
    allowed = cpu_list(set(os.sched_getaffinity(0)))
    with run_server(home) as server:
        assert set(thread_cpus(server.process.pid).values()) == {allowed}
        assert _logged(server, "unpinned)")


@needs_two_cpus
def test_serve_on_a_listed_cpu(tmp_path: Path) -> None:
    last = max(os.sched_getaffinity(0))
    home = Home(tmp_path, extra_config=f'[server]\ncpu_affinity = "{last}"\n')
    with run_server(home) as server:
        assert set(thread_cpus(server.process.pid).values()) == {str(last)}


def test_spare_cpus_are_those_no_serving_process_holds_or_else_all() -> None:
    assert affinity.spare({1}, {0, 1}) == {0}
    assert affinity.spare({0, 2}, {0, 1, 2, 3}) == {1, 3}
    assert affinity.spare({0, 1}, {0, 1}) == {0, 1}
    assert affinity.spare(set(), {0, 1}) == {0, 1}


def test_serving_cpus_are_where_the_workers_or_the_lone_server_get_pinned() -> None:
    last = max(os.sched_getaffinity(0))
    assert affinity.serving_cpus(f"{last}", None) == {last}
    assert affinity.serving_cpus(f"{last}", 3) == {last}
    assert affinity.serving_cpus("none", None) == set()
    assert affinity.serving_cpus("none", 2) == set()
    allowed = sorted(os.sched_getaffinity(0))
    expected = {allowed[0], allowed[1]} if len(allowed) >= 2 else set()
    assert affinity.serving_cpus("auto", 2) == expected


@needs_two_cpus
def test_the_audit_indexer_runs_on_the_cpus_the_server_is_not_pinned_to(
    tmp_path: Path,
) -> None:
    allowed = set(os.sched_getaffinity(0))
    first = min(allowed)
    home = Home(tmp_path, extra_config=f'[server]\ncpu_affinity = "{first}"\n')
    with run_server(home) as server:
        [indexer] = [
            pid for pid in child_pids(server.process.pid) if b"audit\0index" in cmdline(pid)
        ]
        for cpus in thread_cpus(indexer).values():
            assert set(parse_cpus(cpus) or ()) == allowed - {first}
        assert set(thread_cpus(server.process.pid).values()) == {str(first)}
