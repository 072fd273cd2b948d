"""The baseline for the Check benchmark: policyd's server stack with an empty Decision handler.

`python -m bench.empty_server --config FILE --address HOST:PORT --response-file FILE`

It builds the gRPC server the way policyd.serve.server.Server does (grpcio's sync server on a
ThreadPoolExecutor of `server.threads` threads read from the same config file, pinned to a
CPU by the same `server.cpu_affinity` rule, the same server options, and the same Health
and reflection services next to Decision), but its
Check handler returns the bytes of a real allow response that the benchmark captured from
policyd, through the same handler registration (policyd.doors.service.add_unary, whose
serializer passes encoded responses through, as policyd's remembered answers are), so both
servers parse the same request and send a response of the same size. The difference between
the two is the decision itself (and the service layer around it).
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policyd.config import load_config
from policyd.doors.service import SERVICE_NAME, add_unary
from policyd.gen.v1 import decision_pb2
from policyd.serve import affinity

# The options policyd.serve.server.Server passes to grpc.server() for a lone server (not one of
# several `server.workers` sharing a port). Keep in step with policyd/serve/server.py.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


class EmptyDecision:
    def __init__(self, response: bytes) -> None:
        self.response = response

    def Check(self, request: decision_pb2.CheckRequest, context: grpc.ServicerContext) -> bytes:
        return self.response


def build(threads: int, address: str, response: bytes) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=SERVER_OPTIONS)
    add_unary(
        server, SERVICE_NAME, "Check", EmptyDecision(response).Check, decision_pb2.CheckRequest
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(address)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.empty_server")
    parser.add_argument("--config", required=True, help="the policyd config (for server.threads)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--response-file", required=True, type=Path)
    args = parser.parse_args(argv)
    config = load_config(args.config, env={})
    response = args.response_file.read_bytes()
    decision_pb2.CheckResponse.FromString(response)  # it is one
    affinity.pin_worker(config.server.cpu_affinity, None)  # as a lone `policyd serve` does
    server = build(config.server.threads, args.address, response)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
