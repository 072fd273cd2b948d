"""A small client of the Decision API, used by `policyd check` and the tests."""

from __future__ import annotations

from pathlib import Path

import grpc

from policyd.config import ClientConfig
from policyd.gen.v1 import decision_pb2_grpc


def open_channel(address: str, client: ClientConfig) -> grpc.Channel:
    """A channel to the server: TLS when client.ca_file is set, mTLS with a client cert."""
    if not client.ca_file:
        return grpc.insecure_channel(address)
    cert = Path(client.cert_file).read_bytes() if client.cert_file else None
    key = Path(client.key_file).read_bytes() if client.key_file else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(client.ca_file).read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )
    return grpc.secure_channel(address, creds)


def decision_stub(channel: grpc.Channel) -> decision_pb2_grpc.DecisionStub:
    return decision_pb2_grpc.DecisionStub(channel)  # type: ignore[no-untyped-call]
