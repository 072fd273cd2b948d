"""The Prometheus `/metrics` endpoint of `policyd serve` (docs/metrics.md).

The process that owns `server.address` (a lone server, or the supervisor of several
workers) makes the folder every process counts into (core/metrics.py), serves its sum on
`metrics.address`, and removes the folder when it stops.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Any

from policyd.config import Config
from policyd.core import metrics, net
from policyd.core.errors import ConfigError

log = logging.getLogger("policyd.metrics")


class MetricsEndpoint:
    """The folder of this run's counts and the HTTP server that sums them."""

    def __init__(self, config: Config) -> None:
        self.address = config.metrics.address
        where = net.parse("metrics.address", self.address)
        net.ensure_free("metrics.address", self.address)
        self.directory = tempfile.mkdtemp(prefix="policyd-metrics-")
        self._server: Any = None
        try:
            try:
                metrics.enable(self.directory)
            except RuntimeError as exc:
                raise ConfigError(str(exc)) from None
            from prometheus_client import start_http_server

            registry = metrics.collect_registry(self.directory)
            self._server, _ = start_http_server(where.port, where.host, registry)
        except OSError as exc:
            self.close()
            raise ConfigError(
                f"metrics.address: cannot listen on {self.address}: {exc.strerror}"
            ) from None
        except BaseException:
            self.close()
            raise
        log.info(
            "serving Prometheus metrics on http://%s/metrics (counting in %s)",
            self.address,
            self.directory,
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        metrics.disable()
        shutil.rmtree(self.directory, ignore_errors=True)


def start(config: Config) -> MetricsEndpoint | None:
    return MetricsEndpoint(config) if config.metrics.address else None
