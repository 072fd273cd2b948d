"""The grpc.aio channel to policyd: plaintext, TLS, or mutual TLS.

Reconnect backoff is kept short (100 ms to 2 s instead of gRPC's 1 s to 120 s): while
policyd is down every request is answered 503 at once, and once it is back the channel
finds it within about two seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """Where policyd is and how to reach it.

    ca_file set = TLS (the server's certificate must chain to it); cert_file and key_file
    as well = mutual TLS. server_name overrides the name checked against the certificate.
    """

    target: str = "127.0.0.1:50051"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("policyd client TLS: set both cert_file and key_file, or neither")
        if self.cert_file and not self.ca_file:
            raise ValueError("policyd client TLS: cert_file and key_file need ca_file")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"policyd client TLS: {name}: no such file {path!r}")

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca_file:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )


def open_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    """A new channel; it connects lazily (or when asked to) in the running event loop."""
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    creds = settings.credentials()
    if creds is None:
        return grpc.aio.insecure_channel(settings.target, options=options)
    return grpc.aio.secure_channel(settings.target, creds, options=options)
