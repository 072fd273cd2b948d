"""`make run` seeds the demo and serves it; `policyd check` answers as the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, wait_serving

pytestmark = pytest.mark.slow


def _policyd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyd", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
    )


def test_make_run_serves_the_demo_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(
        POLICYD_STORE_PATH=str(tmp_path / "policyd.db"),
        POLICYD_TOKENS_KEY_DIR=str(tmp_path / "keys"),
        POLICYD_SERVER_ADDRESS=address,
    )
    run = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"VAR={tmp_path}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_serving(address, timeout=60)
        token = f"@{tmp_path / 'demo-alice.token'}"
        granted = _policyd(
            env, "check", "--token", token, "--path", "/api/data/tags/edge-historian"
        )
        assert granted.returncode == 0, granted.stdout + granted.stderr
        assert granted.stdout.startswith("allow ALLOWED")
        other = _policyd(env, "check", "--token", token, "--path", "/api/data/tags/plant-mes")
        assert other.returncode == 3
        assert other.stdout.startswith("deny DATA_SOURCE_NOT_GRANTED")
    finally:
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, _ = run.communicate(timeout=30)
    assert "stopped" in out, out
    assert "Traceback" not in out, out
