"""Runnable examples around policyd: `examples.hub`, the reference data hub."""
