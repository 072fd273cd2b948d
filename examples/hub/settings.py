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
# How the middleware decides: "remote" asks policyd over gRPC, "embedded" decides in the
# hub's own process (adapters/embedded/, docs/asgi.md "Embedded mode").
MODES = ("remote", "embedded")
# The largest request body the hub takes (POLICYD_HUB_MAX_BODY_BYTES): forwarded over the
# link as base64 (4/3), it stays below the link's 16 MiB message limit.
MAX_LINK_BODY_BYTES = 11 << 20


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
    mode: str = "remote"
    policyd_address: str = "127.0.0.1:50051"
    # Embedded mode: policyd's TOML file ("": $POLICYD_CONFIG, else ./policyd.toml).
    policyd_config: str = ""
    # Embedded mode: threads deciding what may read the store.
    policyd_threads: int = 4
    # The event loop's stall probe (adapters/asgi/stall.py): its interval in ms, 0 = off.
    # Read on the metrics port (policyd_loop_stall_seconds) when that is set.
    loop_probe_ms: float = 0.0
    timeout_seconds: float = 0.25
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    max_body_bytes: int = 1 << 20
    # HOST:PORT of the hub's own /metrics (the middleware's counters), apart from the data
    # API; empty: no metrics, and prometheus_client is never imported.
    metrics_address: str = ""
    # The link (examples/hub/link.py, docs/link.md): HOST:PORT of the listener connectors
    # dial (empty: no link); its TLS (required unless link_insecure), mutual TLS with a
    # client CA; each forwarded request's deadline; how often a live link is re-checked;
    # the transports it accepts (a test switch: "polling" alone refuses WebSocket).
    link_address: str = ""
    link_cert_file: str = ""
    link_key_file: str = ""
    link_client_ca_file: str = ""
    link_insecure: bool = False
    link_timeout_seconds: float = 10.0
    link_recheck_seconds: float = 0.5
    link_transports: tuple[str, ...] = ("polling", "websocket")
    # Engine.IO's heartbeat: a ping every link_ping_seconds; a link that does not answer
    # within link_ping_timeout_seconds more is dead (its requests fail with 503).
    link_ping_seconds: float = 10.0
    link_ping_timeout_seconds: float = 5.0
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
            mode=text("MODE", d.mode),
            policyd_config=text("POLICYD_CONFIG", env.get("POLICYD_CONFIG", "")),
            policyd_threads=int(number("POLICYD_THREADS", d.policyd_threads, int)),
            loop_probe_ms=float(number("LOOP_PROBE_MS", d.loop_probe_ms, float)),
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
            link_address=text("LINK_ADDRESS", ""),
            link_cert_file=text("LINK_CERT_FILE", ""),
            link_key_file=text("LINK_KEY_FILE", ""),
            link_client_ca_file=text("LINK_CLIENT_CA_FILE", ""),
            link_insecure=text("LINK_INSECURE", "") not in ("", "0", "false", "no"),
            link_timeout_seconds=float(
                number("LINK_TIMEOUT_SECONDS", d.link_timeout_seconds, float)
            ),
            link_recheck_seconds=float(
                number("LINK_RECHECK_SECONDS", d.link_recheck_seconds, float)
            ),
            link_ping_seconds=float(number("LINK_PING_SECONDS", d.link_ping_seconds, float)),
            link_ping_timeout_seconds=float(
                number("LINK_PING_TIMEOUT_SECONDS", d.link_ping_timeout_seconds, float)
            ),
            link_transports=tuple(
                t.strip()
                for t in text("LINK_TRANSPORTS", ",".join(d.link_transports)).split(",")
                if t.strip()
            ),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.gateway not in GATEWAYS:
            raise SettingsError(f"POLICYD_HUB_GATEWAY must be one of {', '.join(GATEWAYS)}")
        if self.mode not in MODES:
            raise SettingsError(f"POLICYD_HUB_MODE must be one of {', '.join(MODES)}")
        if self.policyd_threads < 1:
            raise SettingsError("POLICYD_HUB_POLICYD_THREADS must be at least 1")
        if self.loop_probe_ms < 0:
            raise SettingsError("POLICYD_HUB_LOOP_PROBE_MS must be at least 0")
        if not 0 < self.port < 65536:
            raise SettingsError(f"POLICYD_HUB_PORT must be a TCP port, not {self.port}")
        if not self.timeout_seconds > 0:
            raise SettingsError("POLICYD_HUB_TIMEOUT_SECONDS must be above 0")
        if not 1 <= self.max_body_bytes <= MAX_LINK_BODY_BYTES:
            # A body forwarded over the link travels as base64 (4/3 of its bytes) inside a
            # message of at most 16 MiB; a larger one would close the link.
            raise SettingsError(
                f"POLICYD_HUB_MAX_BODY_BYTES must be from 1 to {MAX_LINK_BODY_BYTES}"
            )
        if self.metrics_address:
            try:
                net.parse("POLICYD_HUB_METRICS_ADDRESS", self.metrics_address)
            except ConfigError as exc:
                raise SettingsError(str(exc)) from None
        if self.link_address:
            self._validate_link()

    def _validate_link(self) -> None:
        try:
            net.parse("POLICYD_HUB_LINK_ADDRESS", self.link_address)
        except ConfigError as exc:
            raise SettingsError(str(exc)) from None
        if bool(self.link_cert_file) != bool(self.link_key_file):
            raise SettingsError(
                "POLICYD_HUB_LINK_CERT_FILE and POLICYD_HUB_LINK_KEY_FILE go together"
            )
        if not self.link_cert_file and not self.link_insecure:
            raise SettingsError(
                "the link is served over TLS: set POLICYD_HUB_LINK_CERT_FILE and"
                " POLICYD_HUB_LINK_KEY_FILE (POLICYD_HUB_LINK_INSECURE=1 serves plain"
                " HTTP, for development only)"
            )
        if self.link_client_ca_file and not self.link_cert_file:
            raise SettingsError("POLICYD_HUB_LINK_CLIENT_CA_FILE needs the link's TLS files")
        for name in ("link_cert_file", "link_key_file", "link_client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"POLICYD_HUB_{name.upper()}: no such file {path!r}")
        for name in ("timeout_seconds", "recheck_seconds", "ping_seconds", "ping_timeout_seconds"):
            if not getattr(self, f"link_{name}") > 0:
                raise SettingsError(f"POLICYD_HUB_LINK_{name.upper()} must be above 0")
        if not self.link_transports or not set(self.link_transports) <= {"polling", "websocket"}:
            raise SettingsError("POLICYD_HUB_LINK_TRANSPORTS must be polling, websocket or both")
