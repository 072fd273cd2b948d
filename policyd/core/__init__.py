"""The domain: plain data, reason codes, errors, the compiled policy (routes, CEL conditions).

The bottom layer: imports nothing else of policyd and no transport library (docs/architecture.md).
"""
