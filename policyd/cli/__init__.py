"""The `policyd` command: one module per command group, the root group in root.py.

`main` (the console script, `python -m policyd`) and `cli` (the click group) are its entry points.
"""

from policyd.cli.root import cli, main

__all__ = ["cli", "main"]
