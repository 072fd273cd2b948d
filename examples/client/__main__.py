"""`python -m examples.client`: serve the demo app on 127.0.0.1:8090 (POLICYD_CLIENT_PORT)."""

from __future__ import annotations

import os

import uvicorn

from examples.client.app import create_app


def main() -> int:
    port = int(os.environ.get("POLICYD_CLIENT_PORT", "8090"))
    uvicorn.run(create_app(), host="127.0.0.1", port=port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
