"""`python -m examples.hub`: serve the hub with uvicorn on POLICYD_HUB_HOST:POLICYD_HUB_PORT."""

from __future__ import annotations

import logging
import sys

import uvicorn

from examples.hub.app import create_app
from examples.hub.settings import HubSettings, SettingsError
from policyd.core import net


def serve_metrics(address: str) -> None:
    """The middleware's counters (prometheus_client's default registry) on their own
    address, in a thread: never on the data API, which answers only what policyd allows."""
    from prometheus_client import start_http_server

    where = net.parse("POLICYD_HUB_METRICS_ADDRESS", address)
    start_http_server(where.port, where.host)
    print(f"hub: serving metrics on http://{address}/metrics", file=sys.stderr, flush=True)


def main() -> int:
    try:
        settings = HubSettings.from_env()
    except SettingsError as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    if settings.metrics_address:
        try:
            serve_metrics(settings.metrics_address)
        except OSError as exc:
            print(
                f"hub: error: cannot listen on {settings.metrics_address}: {exc.strerror}",
                file=sys.stderr,
            )
            return 2
    print(
        f"hub: serving on http://{settings.host}:{settings.port}"
        + (
            ", trusting the gateway's x-policyd-* headers"
            if settings.gateway != "asgi"
            else f", asking policyd at {settings.policyd_address}"
            if settings.mode == "remote"
            else f", deciding in process ({settings.policyd_config or 'policyd config'})"
        ),
        file=sys.stderr,
        flush=True,
    )
    if settings.link_address:
        # The link's own lines: connectors connected, refused (with the reason), closed.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s hub %(levelname)s %(message)s"))
        link_log = logging.getLogger("adapters.link")
        link_log.addHandler(handler)
        link_log.setLevel(logging.INFO)
        link_log.propagate = False
        scheme = "https" if settings.link_cert_file else "http"
        print(
            f"hub: serving the link for connectors on {scheme}://{settings.link_address}"
            + (" (mutual TLS)" if settings.link_client_ca_file else "")
            + (" (INSECURE: plain HTTP, development only)" if scheme == "http" else ""),
            file=sys.stderr,
            flush=True,
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
