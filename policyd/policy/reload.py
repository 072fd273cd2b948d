"""Hot reload of the policy while serving, and the status file that `policyd policy status` reads.

The server's reloader thread looks at the policy folder every `policy.watch_seconds` and
on SIGHUP. A new version (content hash) is compiled off the request path, then swapped in
with one attribute assignment (`engine.policy = new`): a decision reads that attribute
once, so every request is decided by exactly one version, and no call in flight fails. A
policy that does not validate is rejected and logged with file:line:column, and the last
good one keeps serving. The watcher loads a change only once it has stayed the same for
one more look, so a file caught half-written is not loaded; SIGHUP loads at once.

Each serving process writes its state to a JSON file beside the store
(`policy-status-<address>[-w<worker>].json`, replaced atomically): the version serving,
when it was loaded, and the last reload's result and problems.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyd.config import Config
from policyd.core import metrics
from policyd.core.policy import PolicyInvalid, compile_policy, read_policy_files, version_of
from policyd.decision.engine import Engine

log = logging.getLogger("policyd.reload")

STATUS_GLOB = "policy-status-*.json"


def status_path(store_path: str | Path, address: str, worker: str | None) -> Path:
    """The status file of one serving process."""
    name = address.replace(":", "_").replace("[", "").replace("]", "")
    suffix = f"-w{worker}" if worker is not None else ""
    return Path(store_path).parent / f"policy-status-{name}{suffix}.json"


@dataclass
class ReloadResult:
    result: str  # "loaded", "unchanged" or "rejected"
    version: str  # the version tried ("" when the folder could not be read)
    trigger: str  # "start", "watch" or "SIGHUP"
    at: float = field(default_factory=time.time)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "version": self.version,
            "trigger": self.trigger,
            "at": self.at,
            "problems": self.problems,
        }


class Reloader:
    """Loads new policy versions into one engine. Thread-safe; one reload at a time."""

    def __init__(
        self,
        engine: Engine,
        directory: str,
        status_file: Path | None = None,
        address: str = "",
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.status_file = status_file
        self.address = address
        self.hup = threading.Event()
        self.loaded_at = time.time()
        self.last = ReloadResult("loaded", engine.policy.version, "start", self.loaded_at)
        self._lock = threading.Lock()
        self._rejected = ""  # the version last rejected, not to be logged again
        self._pending = engine.policy.version

    def reload(self, trigger: str, *, settle: bool = False) -> ReloadResult | None:
        """Load the folder if its version changed; None while a change settles (watch)."""
        with self._lock:
            try:
                files = read_policy_files(self.directory)
                version = version_of(files)
            except PolicyInvalid as exc:
                files, version = [], ""
                problems = [str(p) for p in exc.problems]
            except OSError as exc:
                files, version = [], ""
                problems = [f"{self.directory}: cannot read: {exc.strerror or exc}"]
            current = self.engine.policy.version
            if version == current:
                self._pending = version
                self._rejected = ""
                if trigger == "watch":
                    return None
                return self._record(ReloadResult("unchanged", version, trigger))
            if settle and (version != self._pending or version == self._rejected):
                self._pending = version
                return None
            if files:
                try:
                    policy = compile_policy(files, self.directory)
                except PolicyInvalid as exc:
                    problems = [str(p) for p in exc.problems]
                else:
                    self.engine.policy = policy  # the swap: one attribute, read once per decision
                    self.loaded_at = time.time()
                    self._rejected = ""
                    _count_load(current, version, self.loaded_at)
                    log.info(
                        "policy %s loaded from %s (%s, was %s)",
                        version,
                        self.directory,
                        trigger,
                        current,
                    )
                    return self._record(ReloadResult("loaded", version, trigger))
            self._rejected = version
            metrics.safely(lambda m: m.policy_reloads.labels("failure").inc())
            log.error(
                "policy change rejected (%s); still serving %s:\n  %s",
                trigger,
                current,
                "\n  ".join(problems),
            )
            return self._record(ReloadResult("rejected", version, trigger, problems=problems))

    def _record(self, result: ReloadResult) -> ReloadResult:
        self.last = result
        self.write_status()
        return result

    def status(self) -> dict[str, Any]:
        policy = self.engine.policy
        return {
            "pid": os.getpid(),
            "address": self.address,
            "policy_dir": self.directory,
            "version": policy.version,
            "files": list(policy.files),
            "routes": len(policy.rules),
            "loaded_at": self.loaded_at,
            "last_reload": self.last.as_dict(),
        }

    def write_status(self) -> None:
        if self.status_file is None:
            return
        tmp = self.status_file.with_name(f".{self.status_file.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.status(), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.status_file)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.status_file, exc)

    def remove_status(self) -> None:
        if self.status_file is not None:
            self.status_file.unlink(missing_ok=True)

    def run(self, stop: threading.Event, every: float) -> None:
        """The reloader thread: a look every `every` seconds (0: only on SIGHUP)."""
        while not stop.is_set():
            woke = self.hup.wait(every if every > 0 else None)
            if stop.is_set():
                return
            try:
                if woke:
                    self.hup.clear()
                    self.reload("SIGHUP")
                else:
                    self.reload("watch", settle=True)
            except Exception:  # never let the thread die: the server would stop reloading
                log.exception("policy reload failed")


def _count_load(replaced: str, version: str, at: float) -> None:
    """Metrics of a good load: the version decided with now, and when it came. At start
    (`replaced` empty) it is no reload."""
    metrics.safely(lambda m: _loaded(m, replaced, version, at))


def _loaded(m: metrics.Metrics, replaced: str, version: str, at: float) -> None:
    if replaced:
        m.policy_reloads.labels("success").inc()
        m.policy_info.labels(replaced).set(0)
    else:  # both series at 0 from the start, so rates and alerts see them
        m.policy_reloads.labels("success")
        m.policy_reloads.labels("failure")
    m.policy_info.labels(version).set(1)
    m.policy_last_load.set(at)


class Reloading:
    """The reloader of a serving process and its thread; the server turns SIGHUP into
    request_reload() (an embedded engine has no SIGHUP: its host owns the signals)."""

    def __init__(self, engine: Engine, config: Config, name: str = "") -> None:
        """`name`: what the status file is named after, for a process that serves no
        address of its own (an embedded engine: serve/embedded.py); else the server's
        address and worker index."""
        worker = None if name else os.environ.get("POLICYD_WORKER_INDEX")
        address = name or config.server.address
        self.reloader = Reloader(
            engine,
            config.policy.dir,
            status_path(config.store.path, address, worker),
            address,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.reloader.run,
            args=(self._stop, config.policy.watch_seconds),
            name="policy-reloader",
            daemon=True,
        )

    def start(self) -> None:
        """Write the status and start watching. The server's main thread turns SIGHUP into
        request_reload() (serve/signals.py), never from inside a signal handler."""
        self.reloader.write_status()
        # The policy the serving process loaded as it started (wiring.build_decider).
        _count_load("", self.reloader.engine.policy.version, self.reloader.loaded_at)
        self._thread.start()

    def request_reload(self) -> None:
        self.reloader.hup.set()

    def stop(self) -> None:
        self._stop.set()
        self.reloader.hup.set()
        self._thread.join(timeout=5)
        self.reloader.remove_status()
