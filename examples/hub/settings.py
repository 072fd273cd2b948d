"""The hub's settings, from POLICYD_HUB_* environment variables (docs/hub.md lists them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from examples.hub.catalogue import DEMO_DATA_SOURCES
from policyd.core import net
from policyd.core.errors import ConfigError

GATEWAYS = ("asgi", "envoy")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class HubSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("var/hub")
    data_sources: tuple[str, ...] = tuple(DEMO_DATA_SOURCES)
    # "asgi": the PolicydMiddleware protects the hub. "envoy": a gateway in front of the hub
    # has asked policyd already; the hub trusts its x-policyd-* headers (gateway.py).
    gateway: str = "asgi"
    policyd_address: str = "127.0.0.1:50051"
    timeout_seconds: float = 0.25
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    max_body_bytes: int = 1 << 20
    # HOST:PORT of the hub's own /metrics (the middleware's counters), apart from the data
    # API; empty: no metrics, and prometheus_client is never imported.
    metrics_address: str = ""
    users: dict[str, str] = field(
        default_factory=lambda: {"alice": "Alice Operator", "bob": "Bob Engineer"}
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if env is None else env
        d = cls()

        def text(name: str, default: str) -> str:
            return env.get(f"POLICYD_HUB_{name}", default)

        def number(name: str, default: float, kind: type[int] | type[float]) -> float:
            raw = env.get(f"POLICYD_HUB_{name}")
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise SettingsError(
                    f"POLICYD_HUB_{name} must be {kind.__name__}, not {raw!r}"
                ) from None

        names = text("DATA_SOURCES", ",".join(d.data_sources))
        settings = cls(
            host=text("HOST", d.host),
            port=int(number("PORT", d.port, int)),
            data_dir=Path(text("DATA_DIR", str(d.data_dir))),
            data_sources=tuple(n.strip() for n in names.split(",") if n.strip()),
            gateway=text("GATEWAY", d.gateway),
            # Next to policyd started with POLICYD_SERVER_ADDRESS, follow it.
            policyd_address=text(
                "POLICYD_ADDRESS", env.get("POLICYD_SERVER_ADDRESS", d.policyd_address)
            ),
            timeout_seconds=float(number("TIMEOUT_SECONDS", d.timeout_seconds, float)),
            ca_file=text("CA_FILE", ""),
            cert_file=text("CERT_FILE", ""),
            key_file=text("KEY_FILE", ""),
            server_name=text("SERVER_NAME", ""),
            max_body_bytes=int(number("MAX_BODY_BYTES", d.max_body_bytes, int)),
            metrics_address=text("METRICS_ADDRESS", ""),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.gateway not in GATEWAYS:
            raise SettingsError(f"POLICYD_HUB_GATEWAY must be one of {', '.join(GATEWAYS)}")
        if not 0 < self.port < 65536:
            raise SettingsError(f"POLICYD_HUB_PORT must be a TCP port, not {self.port}")
        if not self.timeout_seconds > 0:
            raise SettingsError("POLICYD_HUB_TIMEOUT_SECONDS must be above 0")
        if self.max_body_bytes < 1:
            raise SettingsError("POLICYD_HUB_MAX_BODY_BYTES must be at least 1")
        if self.metrics_address:
            try:
                net.parse("POLICYD_HUB_METRICS_ADDRESS", self.metrics_address)
            except ConfigError as exc:
                raise SettingsError(str(exc)) from None
