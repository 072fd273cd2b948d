"""`make run` seeds the demo and serves policyd and the protected hub, as the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def _wait_for_hub(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url + "/api/info", timeout=2.0).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _middleware_counts(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The hub's middleware's counters (its own /metrics)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(f"http://{address}/metrics").text)
        for s in family.samples
        if s.name.startswith("policyd_middleware")
    }


def test_make_run_serves_the_demo_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    hub_port, client_port, link_port, plant_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    metrics, hub_metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(
        POLICYD_STORE_PATH=str(tmp_path / "policyd.db"),
        POLICYD_TOKENS_KEY_DIR=str(tmp_path / "keys"),
        POLICYD_AUDIT_PATH=str(tmp_path / "audit.db"),
        POLICYD_AUDIT_KEY_FILE=str(tmp_path / "audit.key"),
        POLICYD_OAUTH_ADDRESS=f"127.0.0.1:{free_port()}",
        POLICYD_OAUTH_SESSION_KEY_FILE=str(tmp_path / "oauth-session.key"),
        POLICYD_SERVER_ADDRESS=address,
        POLICYD_HUB_PORT=str(hub_port),
        POLICYD_CLIENT_PORT=str(client_port),
        POLICYD_METRICS_ADDRESS=metrics,
        POLICYD_HUB_METRICS_ADDRESS=hub_metrics,
        POLICYD_HUB_LINK_ADDRESS=f"127.0.0.1:{link_port}",
        PLANT_PORT=str(plant_port),
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

        hub = f"http://127.0.0.1:{hub_port}"
        _wait_for_hub(hub)
        bearer = {"Authorization": f"Bearer {(tmp_path / 'demo-alice.token').read_text().strip()}"}
        before = _middleware_counts(hub_metrics)
        read = httpx.get(f"{hub}/api/data/tags/edge-historian", headers=bearer)
        assert read.status_code == 200, read.text
        assert read.json()["data_source"] == "edge-historian"
        refused = httpx.get(f"{hub}/api/data/tags/plant-mes", headers=bearer)
        assert refused.status_code == 403
        assert refused.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"
        # Metrics are on in the demo: the hub's two answers, counted at its door.
        deadline = time.monotonic() + 10  # counted at the serving process's next flush
        while True:
            scraped = httpx.get(f"http://{metrics}/metrics").text
            at_hub = {
                s.labels["reason"]: s.value
                for family in text_string_to_metric_families(scraped)
                for s in family.samples
                if s.name == "policyd_decisions_total" and s.labels["door"] == "asgi"
            }
            if len(at_hub) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert at_hub == {"ALLOWED": 1.0, "DATA_SOURCE_NOT_GRANTED": 1.0}, scraped
        # The hub's own: its middleware asked policyd twice and answered the deny itself
        # (counted since before the two requests: waiting for the hub asked it too).
        after = _middleware_counts(hub_metrics)
        assert (
            after["policyd_middleware_checks_total", ()]
            - before.get(("policyd_middleware_checks_total", ()), 0)
            == 2
        ), after
        assert after["policyd_middleware_responses_total", (("status", "403"),)] == 1

        # plant-mes is served at "the plant", by a connector over the link (docs/link.md).
        assert (tmp_path / "tls" / "server.pem").is_file()
        granted = _policyd(env, "grants", "add", "alice", "demo-app", "plant-mes")
        assert granted.returncode == 0, granted.stderr
        plant = f"{hub}/api/data/tags/plant-mes"
        secret = tmp_path / "plant-connector.secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 20  # the connector may still be dialling in
        while (served := httpx.get(plant, headers=bearer)).status_code != 200:
            assert time.monotonic() < deadline, served.text
            time.sleep(0.1)
        assert served.json()["data_source"] == "plant-mes"
        disabled = _policyd(env, "connectors", "disable", "plant-connector")
        assert disabled.returncode == 0, disabled.stderr
        gone = httpx.get(plant, headers=bearer)
        assert gone.status_code == 503, gone.text
        assert gone.json()["error"] == "connector_unavailable"
        # Refused by the Check before this forward, or (the hub re-checks every 0.5 s, the
        # command takes about as long) no link left to take it: the 503 says why either way.
        assert gone.json()["reason"] == "CONNECTOR_DISABLED", gone.text
    finally:
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            out, _ = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)  # never leave the processes behind
            out, _ = run.communicate()
            raise AssertionError(f"make run did not stop on Ctrl-C:\n{out}") from None
    assert "stopped" in out, out  # policyd
    assert "Finished server process" in out, out  # the hub
    assert "Traceback" not in out, out
