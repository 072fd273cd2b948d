"""`policyd serve`."""

from __future__ import annotations

import sys

import click

from policyd.cli.context import Context, pass_ctx
from policyd.core import logs


@click.command()
@click.option("--address", help="HOST:PORT to listen on (overrides server.address).")
@click.option("--workers", type=click.IntRange(1, 64), help="Processes sharing the port.")
@pass_ctx
def serve(obj: Context, address: str | None, workers: int | None) -> None:
    """Serve the Decision API over gRPC until SIGTERM or Ctrl-C."""
    # Imported here, not at the top: the server brings grpc's server side, Envoy's protos
    # (xds-protos) and uvicorn, which every other command would otherwise load: 0.05 s of
    # CPU at every start (docs/architecture.md, "Layers").
    from policyd.serve.server import serve as run

    config = obj.config
    if address:
        config.server.address = address
    if workers:
        config.server.workers = workers
    config.validate()
    logs.configure(config.log.format)
    sys.exit(run(config, obj.config_path))
