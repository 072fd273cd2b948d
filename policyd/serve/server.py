"""`policyd serve`: the gRPC server with the Decision API, health checking and reflection.

The server is grpcio's synchronous server on a thread pool. Measured on the 2-core dev
machine (bench/grpc_stack.py), an empty unary call costs the same server CPU with the
sync server as with grpc.aio (about 240 µs each), and the decision itself is synchronous
SQLite and dict work that would block an event loop, so sync is the simpler fit; see
docs/architecture.md.

To use more than one core, `server.workers = N` starts N processes that each bind the same
address with SO_REUSEPORT; the kernel spreads connections between them. They share the
store file, and its generation counter keeps their caches exact (facts.py).

SIGTERM or SIGINT: health turns NOT_SERVING, the port stops accepting, calls in flight
finish (up to server.grace_seconds), then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policyd.config import Config, TLSConfig
from policyd.core import metrics, net, tracing
from policyd.core.errors import ConfigError, PolicydError
from policyd.core.policy import load_policy
from policyd.decision.decider import Decider
from policyd.decision.wiring import build_decider
from policyd.doors import envoy_servicer
from policyd.doors.envoy_http import HttpDoor
from policyd.doors.service import SERVICE_NAME, DecisionServicer, add_unary
from policyd.gen.v1 import decision_pb2
from policyd.oauth.server import start_authorization_server
from policyd.policy.reload import Reloading
from policyd.serve import affinity
from policyd.serve import metrics as metrics_endpoint
from policyd.serve.indexer import IndexerProcess
from policyd.serve.signals import Signals

log = logging.getLogger("policyd.server")

WORKER_ENV = "POLICYD_WORKER_INDEX"


def _pem(key: str, path: str, private: bool = False) -> bytes:
    """Read a PEM file, refusing (with the config key named) anything that isn't one."""
    try:
        data = Path(path).read_bytes()
        if private:
            serialization.load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        kind = "an unencrypted PEM private key" if private else "PEM certificates"
        raise ConfigError(f"{key}: {path} does not hold {kind}") from None
    return data


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    if not tls.cert_file:
        return None
    chain = _pem("server.tls.cert_file", tls.cert_file)
    key = _pem("server.tls.key_file", tls.key_file, private=True)
    if tls.client_ca_file:
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=_pem("server.tls.client_ca_file", tls.client_ca_file),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials([(key, chain)])


class Server:
    """One serving process: the gRPC server and its health status."""

    def __init__(self, config: Config, decider: Decider | None = None) -> None:
        self.config = config
        self.decider = decider or build_decider(config, serving=True)
        if self.decider.audit is not None:
            self.decider.audit.start()
        self.engine = self.decider.engine
        self.health = health.HealthServicer()
        self.stopping = threading.Event()
        # Only the workers of one supervisor share a port; a lone server must own it.
        worker = WORKER_ENV in os.environ
        if not worker:
            net.ensure_free("server.address", config.server.address)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.threads),
            options=[("grpc.so_reuseport", int(worker))],
        )
        servicer = DecisionServicer(self.decider)
        add_unary(self.grpc, SERVICE_NAME, "Check", servicer.Check, decision_pb2.CheckRequest)
        services = [SERVICE_NAME]
        if config.envoy.enabled:
            envoy = envoy_servicer.AuthorizationServicer(
                self.decider, remove_authorization=config.envoy.remove_authorization
            )
            add_unary(
                self.grpc,
                envoy_servicer.SERVICE_NAME,
                "Check",
                envoy.Check,
                external_auth_pb2.CheckRequest,
            )
            services.append(envoy_servicer.SERVICE_NAME)
        self.services = tuple(services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        creds = server_credentials(config.server.tls)
        address = config.server.address
        try:
            if creds is None:
                self.port = self.grpc.add_insecure_port(address)
            else:
                self.port = self.grpc.add_secure_port(address, creds)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        # Envoy's ext_authz over HTTP/1.1 (http_service), on its own port, loop and thread.
        self.http_door: HttpDoor | None = None
        if config.envoy.http_address:
            self.http_door = HttpDoor(
                self.decider,
                config.envoy.http_address,
                remove_authorization=config.envoy.remove_authorization,
                reuse_port=worker,
            )

    def start(self) -> None:
        self.grpc.start()
        if self.http_door is not None:
            self.http_door.start()
        for name in ("", *self.services):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let calls in flight finish, then stop."""
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.server.grace_seconds if grace is None else grace
        self.grpc.stop(grace).wait()
        if self.http_door is not None:
            self.http_door.stop()
        if self.decider.audit is not None:
            self.decider.audit.close()
        metrics.flush()  # the last answers' counts, before the process goes


def serve(config: Config, config_path: str | None = None) -> int:
    """Run until SIGTERM/SIGINT. With workers > 1, supervise that many serving processes.

    The process that owns the address serves /metrics (metrics.address) for itself and
    every child: its workers and the audit indexer count into the folder it made."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not fatal while starting; Reloading takes it
    if WORKER_ENV in os.environ:
        metrics.enable_inherited()
        return _serve(config, None)
    # Said before anything else is touched.
    net.ensure_free("server.address", config.server.address)
    endpoint = metrics_endpoint.start(config)
    try:
        return _serve_top(config, config_path)
    finally:
        if endpoint is not None:
            endpoint.close()


def _serve_top(config: Config, config_path: str | None) -> int:
    if config.server.workers > 1:
        return _supervise(config, config_path)
    # A lone server: the audit indexer is its child.
    serving = affinity.serving_cpus(config.server.cpu_affinity, None)
    cpu = min(serving) if serving else None
    indexer = IndexerProcess.start_for(config, config_path, affinity.spare(serving))
    try:
        return _serve(config, indexer, cpu)
    finally:
        if indexer is not None:
            indexer.stop()


def _serve(config: Config, indexer: IndexerProcess | None, cpu: int | None = None) -> int:
    # Before any server thread starts, so that every thread inherits the CPU (affinity.py).
    worker = os.environ.get(WORKER_ENV)
    cpu = affinity.pin_worker(config.server.cpu_affinity, int(worker) if worker else None, cpu)
    server = Server(config)
    # The authorization server (HTTP, its own port) runs in one process only: worker 0.
    oauth = None
    if os.environ.get(WORKER_ENV, "0") == "0":
        oauth = start_authorization_server(config)
    server.start()
    reloading = Reloading(server.engine, config)  # policy: watch the folder, SIGHUP reloads
    reloading.start()
    if cpu is not None:  # again, for any thread not started by this one
        affinity.pin(cpu)
    signals = Signals()
    signals.install()
    janitor = threading.Thread(target=_maintain, args=(server,), daemon=True)
    janitor.start()
    tls = config.server.tls
    mode = "mTLS" if tls.client_ca_file else ("TLS" if tls.cert_file else "plaintext")
    log.info(
        "serving %s on %s (%s, pid %d, %s)",
        SERVICE_NAME,
        config.server.address,
        mode,
        os.getpid(),
        "unpinned" if cpu is None else f"CPU {cpu}",
    )
    supervisor = os.getppid() if worker else None

    def tick() -> bool:
        if indexer is not None:
            indexer.keep_running()
        # A worker whose supervisor is gone (killed) stops too, rather than hold the port
        # with no indexer behind it (it would soon deny every decision: AUDIT_UNAVAILABLE).
        return supervisor is not None and os.getppid() != supervisor

    signum = signals.wait(on_hup=reloading.request_reload, on_tick=tick)
    if signum:
        log.info("received %s: finishing calls in flight", signal.Signals(signum).name)
    else:
        log.warning("the supervisor is gone: finishing calls in flight")
    reloading.stop()
    server.stop()  # closes the audit journal: the indexer then finishes it
    tracing.shutdown()  # sends the spans still queued
    if oauth is not None:
        oauth.stop()
    log.info("stopped")
    return 0


def _maintain(server: Server) -> None:
    """Background upkeep: forget expired revocations (the audit retention is applied by the
    audit indexer process)."""
    store = server.engine.facts.store
    config = server.config
    failures: tuple[type[Exception], ...] = (PolicydError, *store.errors)
    while not server.stopping.wait(300):  # every 5 minutes is plenty
        try:
            store.purge_expired_revocations(time.time(), config.tokens.leeway_seconds)
        except failures as exc:
            log.warning("maintenance failed: %s", exc)


def _supervise(config: Config, config_path: str | None) -> int:
    """Start config.server.workers copies of `policyd serve` sharing one port."""
    # A CPU list naming a missing CPU is said once, here.
    serving = affinity.serving_cpus(config.server.cpu_affinity, config.server.workers)
    load_policy(config.policy.dir)  # an invalid policy stops here, said once, not per worker
    # Handlers first: a SIGTERM while the indexer or the workers start must still stop
    # every one of them.
    signals = Signals()
    signals.install()
    indexer = IndexerProcess.start_for(config, config_path, affinity.spare(serving))
    try:
        return _run_workers(config, config_path, indexer, signals)
    finally:
        if indexer is not None:
            indexer.stop()


def _run_workers(
    config: Config, config_path: str | None, indexer: IndexerProcess | None, signals: Signals
) -> int:
    children: list[subprocess.Popen[bytes]] = []

    def forward_hup() -> None:
        for child in children:  # SIGHUP (reload the policy) goes to every worker
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    command = [sys.executable, "-m", "policyd"]
    if config_path:
        command += ["--config", config_path]
    command += ["serve", "--address", config.server.address, "--workers", "1"]
    for index in range(config.server.workers):
        if signals.stops:
            break
        env = dict(os.environ, **{WORKER_ENV: str(index)})
        children.append(subprocess.Popen(command, env=env))
    log.info("supervising %d workers on %s", len(children), config.server.address)
    failed = False
    if not signals.stops:

        def exited() -> bool:
            if indexer is not None:
                indexer.keep_running()
            return any(child.poll() is not None for child in children)

        if signals.wait(on_hup=forward_hup, on_tick=exited) == 0:
            log.error("a worker exited; stopping the others")
            failed = True
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        child.wait()
        # A worker stopped by our SIGTERM before its handler was installed is a clean stop.
        if child.returncode not in (0, -signal.SIGTERM):
            failed = True
    return 1 if failed else 0
