"""Sync vs asyncio gRPC: the cost of the server stack alone, for an empty unary call.

The same empty handler (bytes in, empty bytes out, no protobuf) is served by grpcio's
synchronous server on a ThreadPoolExecutor (policyd's stack: the default thread count and
the options of policyd.serve.server.Server) and by grpc.aio, each in its own process. One load
generator process drives both, alternating windows (sync, aio, sync, aio, ...), at 1 and 16
concurrent callers. The figure that matters is the server CPU time per call, read from
/proc/PID/stat; calls/s on this 2-core machine also depends on the client sharing the cores.

`python -m bench.grpc_stack serve --kind sync|aio --port N` runs one such server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bench.empty_server import SERVER_OPTIONS
from bench.loadgen import LoadSpec, Target, run_in_process
from bench.procs import free_port, server_process
from bench.report import summarize
from policyd.config import ServerConfig

SERVICE = "bench.Empty"
METHOD = f"/{SERVICE}/Call"


def _empty(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b""


async def _empty_async(request: bytes, context: Any) -> bytes:
    return b""


def serve_sync(port: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(_empty)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


async def _serve_aio(port: int) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(_empty_async)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)


def run(
    log_dir: Path,
    *,
    callers: list[int],
    rounds: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Start both servers, drive them from one load generator process, summarize."""
    threads = ServerConfig().threads
    sync_port, aio_port = _ports()
    module = ["-m", "bench.grpc_stack", "serve"]
    with (
        server_process(
            "sync",
            [*module, "--kind", "sync", "--port", str(sync_port), "--threads", str(threads)],
            sync_port,
            log_dir,
        ) as sync,
        server_process(
            "aio", [*module, "--kind", "aio", "--port", str(aio_port)], aio_port, log_dir
        ) as aio,
    ):
        spec = LoadSpec(
            targets=[
                Target("sync", sync.address, sync.pid, METHOD, ""),
                Target("aio", aio.address, aio.pid, METHOD, ""),
            ],
            callers=callers,
            rounds=rounds,
            warmup=warmup,
            duration=duration,
        )
        result = run_in_process(spec)
    summary = summarize(result, ["sync", "aio"], [("aio", "sync")])
    summary["server_threads"] = threads
    return summary


def _ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_stack")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one empty server until SIGTERM")
    serve.add_argument("--kind", choices=("sync", "aio"), required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--threads", type=int, default=ServerConfig().threads)
    args = parser.parse_args(argv)
    if args.kind == "sync":
        serve_sync(args.port, args.threads)
    else:
        asyncio.run(_serve_aio(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
