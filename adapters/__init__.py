"""Doors into policyd for gateways: `adapters.asgi` (middleware inside a Python service)."""
