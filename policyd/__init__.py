"""policyd: the authorization decision service for the data hub.

The core (`decision.engine`: decide) is plain Python over plain data; gRPC, Envoy, ASGI and the CLI
are doors into it. See docs/architecture.md.
"""

__version__ = "0.1.0"
