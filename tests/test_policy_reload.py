"""Hot reload of the policy by real `policyd serve` processes: watched files, SIGHUP, status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from policyd.core.policy import fingerprint, load_policy
from policyd.core.reasons import Reason
from policyd.policy.reload import status_path
from tests.helpers import ROOT, Home, ServerProcess, check_request, decision_stub, run_server

TAGS = "/api/data/tags/ds-a"


@dataclass
class Setup:
    home: Home
    folder: Path

    @property
    def hub(self) -> Path:
        return self.folder / "hub.yaml"

    def write(self, text: str) -> str:
        """Replace hub.yaml atomically; the version the folder now has."""
        tmp = self.folder / ".hub.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.hub)
        return fingerprint(self.folder)

    def status(self, server: ServerProcess, worker: str | None = None) -> dict[str, Any]:
        path = status_path(self.home.config.store.path, server.address, worker)
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}


def make_setup(tmp_path: Path, watch_seconds: float) -> Setup:
    folder = tmp_path / "policies"
    folder.mkdir()
    shutil.copy(ROOT / "policies" / "hub.yaml", folder / "hub.yaml")
    home_dir = tmp_path / "home"
    home_dir.mkdir()
    home = Home(home_dir, f'[policy]\ndir = "{folder}"\nwatch_seconds = {watch_seconds}\n')
    home.seed()
    return Setup(home, folder)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def renamed(text: str, tag: str) -> str:
    """The policy with the tag search rule renamed, so a decision shows which one decided."""
    return text.replace("id: tags-search\n", f"id: tags-search-{tag}\n", 1)


def broken(text: str, tag: str) -> str:
    return text.replace("path: /api/user/me", "path: /api/user//me", 1) + f"# {tag}\n"


@pytest.fixture
def channel_to() -> Iterator[Callable[[ServerProcess], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def make(server: ServerProcess) -> grpc.Channel:
        channels.append(grpc.insecure_channel(server.address))
        return channels[-1]

    yield make
    for c in channels:
        c.close()


def check(channel: grpc.Channel, token: str, path: str = TAGS) -> Any:
    return decision_stub(channel).Check(check_request(token, path=path), timeout=10)


def test_a_changed_file_is_loaded_and_an_invalid_one_rejected_with_its_position(
    tmp_path: Path, channel_to: Callable[[ServerProcess], grpc.Channel]
) -> None:
    setup = make_setup(tmp_path, watch_seconds=0.1)
    original = setup.hub.read_text()
    first = load_policy(setup.folder).version
    token = setup.home.token()
    with run_server(setup.home) as server:
        channel = channel_to(server)
        reply = check(channel, token)
        assert (reply.allowed, reply.rule_id, reply.policy_version) == (True, "tags-search", first)
        assert setup.status(server)["version"] == first

        second = setup.write(renamed(original, "b"))
        wait_for(lambda: check(channel, token).policy_version == second, what="the change")
        reply = check(channel, token)
        assert (reply.allowed, reply.rule_id) == (True, "tags-search-b")
        wait_for(lambda: setup.status(server).get("version") == second, what="the status")
        last = setup.status(server)["last_reload"]
        assert (last["result"], last["trigger"], last["version"]) == ("loaded", "watch", second)

        bad = setup.write(broken(original, "bad"))
        wait_for(
            lambda: setup.status(server).get("last_reload", {}).get("version") == bad,
            what="the rejection",
        )
        status = setup.status(server)
        assert status["version"] == second
        assert status["last_reload"]["result"] == "rejected"
        line = original.splitlines().index("    path: /api/user/me") + 1
        [problem] = status["last_reload"]["problems"]
        assert problem.startswith(f"{setup.hub}:{line}:11: route user-profile: path template")
        # The last good policy keeps deciding.
        reply = check(channel, token)
        assert (reply.allowed, reply.policy_version) == (True, second)
        assert f"{setup.hub}:{line}:11" in server.log()

        result = setup.home.cli("policy", "status", "--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        assert (shown["version"], shown["running"], shown["current"]) == (second, True, False)
        assert shown["last_reload"]["result"] == "rejected"
        text = setup.home.cli("policy", "status").stdout
        assert f"version:      {second}  (differs from the files)" in text
        assert "last reload:  rejected" in text and f"{setup.hub}:{line}:11" in text


def test_sighup_reloads_at_once_when_watching_is_off(
    tmp_path: Path, channel_to: Callable[[ServerProcess], grpc.Channel]
) -> None:
    setup = make_setup(tmp_path, watch_seconds=0)
    original = setup.hub.read_text()
    token = setup.home.token()
    with run_server(setup.home) as server:
        channel = channel_to(server)
        first = check(channel, token).policy_version
        second = setup.write(renamed(original, "hup"))
        time.sleep(0.5)
        assert check(channel, token).policy_version == first  # not watched
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: check(channel, token).policy_version == second, what="SIGHUP")
        assert check(channel, token).rule_id == "tags-search-hup"
        server.process.send_signal(signal.SIGHUP)  # nothing changed
        wait_for(
            lambda: setup.status(server)["last_reload"]["result"] == "unchanged",
            what="the unchanged reload",
        )
    # A stopped server leaves no status behind.
    assert setup.status(server) == {}


def test_sighup_reaches_every_worker(
    tmp_path: Path, channel_to: Callable[[ServerProcess], grpc.Channel]
) -> None:
    setup = make_setup(tmp_path, watch_seconds=0)
    with run_server(setup.home, "--workers", "2") as server:
        wait_for(lambda: all(setup.status(server, w) for w in "01"), what="both workers")
        second = setup.write(renamed(setup.hub.read_text(), "w"))
        server.process.send_signal(signal.SIGHUP)
        for worker in "01":
            wait_for(
                lambda w=worker: setup.status(server, w).get("version") == second,  # type: ignore[misc]
                what=f"worker {worker}",
            )


@dataclass
class Load:
    """Callers sending Check continuously, each on its own channel."""

    address: str
    token: str
    stop: threading.Event = field(default_factory=threading.Event)
    replies: list[tuple[str, str, bool, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = decision_stub(channel)
            while not self.stop.is_set():
                try:
                    r = stub.Check(check_request(self.token, path=TAGS), timeout=10)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failures.append(str(exc))
                    continue
                with self.lock:
                    self.replies.append((r.policy_version, r.rule_id, r.allowed, r.reason))


@pytest.mark.slow
def test_one_hundred_reloads_under_load_fail_no_call_and_mix_no_versions(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, watch_seconds=0)
    original = setup.hub.read_text()
    versions = {load_policy(setup.folder).version: "tags-search"}
    loaded = rejected = 0
    with run_server(setup.home) as server:
        load = Load(server.address, setup.home.token())
        callers = [threading.Thread(target=load.run) for _ in range(4)]
        for t in callers:
            t.start()
        try:
            wait_for(lambda: len(load.replies) > 20, what="the load")
            for i in range(100):
                if i % 3 == 2:
                    version = setup.write(broken(original, f"bad-{i}"))
                else:
                    version = setup.write(renamed(original, str(i)))
                    versions[version] = f"tags-search-{i}"
                server.process.send_signal(signal.SIGHUP)
                wait_for(
                    lambda v=version: (
                        setup.status(server).get("last_reload", {}).get("version")  # type: ignore[misc]
                        == v
                    ),
                    what=f"reload {i}",
                    # A correctness test, not a timing one: on a loaded 2-core machine the
                    # reload thread can wait long for the interpreter under 4 callers.
                    timeout=60,
                )
                result = setup.status(server)["last_reload"]["result"]
                assert result == ("rejected" if i % 3 == 2 else "loaded"), (i, result)
                loaded += result == "loaded"
                rejected += result == "rejected"
            served_before = len(load.replies)
            wait_for(lambda: len(load.replies) > served_before + 20, what="more load")
        finally:
            load.stop.set()
            for t in callers:
                t.join(timeout=30)
    assert (loaded, rejected) == (67, 33)
    assert load.failures == []
    assert len(load.replies) > 500
    seen = set()
    for version, rule_id, allowed, reason in load.replies:
        assert (allowed, Reason(reason)) == (True, Reason.ALLOWED)
        # Decided by exactly one version: the rule that matched is that version's rule.
        assert versions[version] == rule_id
        seen.add(version)
    assert len(seen) > 10, "the load should have seen many versions"
