"""Pieces of the soak test (tests/test_soak.py): the processes it runs and the call loops.

A `Proc` is one long-running process (policyd serve, the hub) with its output in a file.
A `CallLoop` is a thread that sends the same request through one door again and again and
records, for every call, when it started and ended (time.monotonic()) and its outcome:
"allow", "deny <REASON>" or "error <what went wrong>". The outcomes are interned per loop
and the times kept in arrays, so that a few hundred thousand calls cost a few megabytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from policyd.core.reasons import Reason
from tests.helpers import check_request, child_pids, cmdline, decision_stub

ALLOW = "allow"
GRPC_TIMEOUT_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 30.0


Door = tuple[Callable[[int], str], Callable[[], None]]


def deny(reason: str) -> str:
    return f"deny {reason}"


# -- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    """A process the test started, its output in `log_path`, and the children it started
    that the test must not leave behind (the audit indexer runs in a session of its own)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    children: dict[int, bytes] = field(default_factory=dict)  # pid -> its command line

    @classmethod
    def start(cls, name: str, args: list[str], env: Mapping[str, str], cwd: Path) -> Proc:
        log_path = Path(env["POLICYD_STORE_PATH"]).parent / f"{name}.log"
        with open(log_path, "wb") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=dict(env)
            )
        return cls(name, process, log_path)

    def note_children(self) -> None:
        """Remember the children running now, to stop them even if this process dies."""
        if self.process.poll() is None:
            for pid in child_pids(self.process.pid):
                command = cmdline(pid)
                if command:  # (empty once it has exited)
                    self.children.setdefault(pid, command)

    def exited(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            return f"{self.name} was killed by {signal.Signals(-code).name} ({code})"
        return f"{self.name} exited with code {code}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; then the same for its leftover children."""
        self.note_children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, command in self.children.items():
            _stop_pid(pid, command, timeout)
        return self.process.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no output: {exc})"

    def tail(self, lines: int = 40) -> str:
        text = self.log().splitlines()[-lines:]
        state = self.exited() or f"{self.name} running"
        return f"--- {self.name} (pid {self.process.pid}; {state}), last lines:\n" + "\n".join(text)


def _stop_pid(pid: int, command: bytes, timeout: float) -> None:
    """Stop a process by its id, only while it is still the one that was recorded."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if cmdline(pid) != command:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cmdline(pid) != command:
                return
            time.sleep(0.05)


@contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Whatever happens, stop every process in `procs` (in reverse order of start)."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def wait_http(url: str, procs: list[Proc], timeout: float = 60.0) -> None:
    """Wait until `url` answers 200, failing at once when a process of `procs` has exited."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        dead = [p.tail() for p in procs if p.exited()]
        if dead:
            raise AssertionError(f"a process exited while waiting for {url}:\n" + "\n".join(dead))
        try:
            reply = httpx.get(url, timeout=2.0)
            if reply.status_code == 200:
                return
            last = f"HTTP {reply.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(
        f"{url} not ready in {timeout}s ({last}):\n" + "\n".join(p.tail() for p in procs)
    )


# -- the call loops ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    loop: str
    started: float
    ended: float
    outcome: str

    def describe(self, since: float | None = None, label: str = "") -> str:
        when = "" if since is None else f", started {self.started - since:+.4f}s after {label}"
        return f"{self.loop}: {self.outcome} (took {self.ended - self.started:.4f}s{when})"


class CallLoop:
    """Sends one request through one door in a loop, in a thread, until stopped."""

    def __init__(self, name: str, door: Door, pause: float = 0.0) -> None:
        self.name = name
        self._call, self._close = door
        self._pause = pause
        self._lock = threading.Lock()
        self._starts = array("d")
        self._ends = array("d")
        self._codes = array("I")
        self._outcomes: list[str] = []
        self._index: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 60.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.name}: the loop did not stop"

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                outcome = self._call(n)
            except Exception as exc:  # a failed call is recorded, never fatal to the loop
                outcome = f"error {type(exc).__name__}: {exc}"[:500]
            ended = time.monotonic()
            with self._lock:
                code = self._index.get(outcome)
                if code is None:
                    code = self._index[outcome] = len(self._outcomes)
                    self._outcomes.append(outcome)
                self._starts.append(started)
                self._ends.append(ended)
                self._codes.append(code)
            if self._pause:
                self._stop.wait(self._pause)

    def __len__(self) -> int:
        return len(self._starts)

    def outcomes(self) -> list[str]:
        """Every distinct outcome seen so far."""
        with self._lock:
            return list(self._outcomes)

    def calls(self, after: float, before: float = float("inf")) -> list[Call]:
        """The calls that started after `after` and before `before` (they run one after
        another, so their start times are in order)."""
        with self._lock:
            lo = bisect_right(self._starts, after)
            hi = bisect_left(self._starts, before, lo)
            return [
                Call(self.name, self._starts[i], self._ends[i], self._outcomes[self._codes[i]])
                for i in range(lo, hi)
            ]

    def first(self, outcome: str, after: float) -> Call | None:
        """The first call with this outcome among those that started after `after`."""
        with self._lock:
            code = self._index.get(outcome)
            if code is None:
                return None
            for i in range(bisect_right(self._starts, after), len(self._starts)):
                if self._codes[i] == code:
                    return Call(self.name, self._starts[i], self._ends[i], outcome)
        return None


# -- the doors ---------------------------------------------------------------------------------
# Each makes a call (its argument numbers the call, for the request id; it returns the
# outcome) and a function that closes its connection once the loop ends.


def _grpc_error(exc: grpc.RpcError) -> str:
    """A failed gRPC call, as a loop records it."""
    if isinstance(exc, grpc.Call):
        return f"error gRPC {exc.code()}: {exc.details()}"
    return "error gRPC None: "


def decision_api(address: str, token: str, path: str) -> Door:
    """policyd.v1.Decision/Check, on a channel of the loop's own."""
    channel = grpc.insecure_channel(address)
    stub = decision_stub(channel)
    request = check_request(token, path=path)

    def call(n: int) -> str:
        request.request_id = f"soak-{n}"
        try:
            reply = stub.Check(request, timeout=GRPC_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            return _grpc_error(exc)
        return ALLOW if reply.allowed else deny(Reason(reply.reason).name)

    return call, channel.close


def envoy_door(address: str, token: str, path: str) -> Door:
    """envoy.service.auth.v3.Authorization/Check, as Envoy's ext_authz filter sends it."""
    channel = grpc.insecure_channel(address)
    stub: Any = external_auth_pb2_grpc.AuthorizationStub(channel)
    request: Any = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = "GET"
    http.path = path
    http.host = "hub.test"
    http.protocol = "HTTP/1.1"
    http.headers.update({"authorization": f"Bearer {token}", ":authority": "hub.test"})

    def call(n: int) -> str:
        http.id = f"soak-{n}"
        try:
            reply = stub.Check(request, timeout=GRPC_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            return _grpc_error(exc)
        if reply.status.code == 0 and reply.HasField("ok_response"):
            return ALLOW
        status = reply.denied_response.status.code
        if status >= 500:
            return f"error HTTP {status} {reply.status.message}"
        return deny(str(reply.status.message))

    return call, channel.close


def hub(url: str, token: str) -> Door:
    """The hub's data API, behind its ASGI middleware (which asks policyd)."""
    client = httpx.Client(
        headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_SECONDS
    )

    def call(n: int) -> str:
        reply = client.get(url, headers={"x-request-id": f"soak-{n}"})
        if reply.status_code == 200:
            data_source = reply.json().get("data_source")
            return ALLOW if data_source == url.rsplit("/", 1)[1] else f"error 200 {reply.text}"
        try:  # a denial's reason, or what the hub says went wrong (without the decision id)
            body = json.loads(reply.text)
            said = str(body.get("reason") or body.get("error"))
        except (ValueError, AttributeError):
            said = reply.text[:200]
        if reply.status_code == 403 and said in Reason.__members__:
            return deny(said)
        return f"error HTTP {reply.status_code} {said}"

    return call, client.close
