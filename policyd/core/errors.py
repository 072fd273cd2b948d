"""Errors the core raises. Doors turn them into one-line messages, exit codes or denies."""

from __future__ import annotations


class PolicydError(Exception):
    """A problem the user can act on; str(error) is a one-line message."""


class NotFound(PolicydError):
    pass


class Conflict(PolicydError):
    pass


class InvalidInput(PolicydError):
    pass


class ConfigError(PolicydError):
    pass


class StoreUnavailable(PolicydError):
    """The store could not be read or written (locked past the timeout, missing, corrupt)."""


class StoreMoved(StoreUnavailable):
    """A decision's read found the store at a newer generation than the caches it had used:
    it starts over once, on the newer one (PostgreSQL only; facts.py)."""
