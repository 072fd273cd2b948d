"""The reference hub: policyd's data API over demo data sources, protected by the adapters.

`python -m examples.hub` serves it (settings: POLICYD_HUB_* variables, docs/hub.md).
"""

from examples.hub.app import create_app

__all__ = ["create_app"]
