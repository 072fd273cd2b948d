"""policyd inside a Python service: decisions in the service's own process, no gRPC hop.

    from adapters.asgi import PolicydMiddleware
    from adapters.embedded import EmbeddedPolicyd

    app = PolicydMiddleware(app, embedded=EmbeddedPolicyd("policyd.toml"))

Or, from any framework: `await policyd.check_http(...)` (or `check_http_sync` in a
thread). See docs/asgi.md, "Embedded mode".
"""

from adapters.embedded.engine import EmbeddedPolicyd, auth_of

__all__ = ["EmbeddedPolicyd", "auth_of"]
