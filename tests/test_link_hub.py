"""The reference hub with the link: settings, and a data source it does not hold answered
from the link (503 at once while no connector serves it)."""

from __future__ import annotations

import httpx
import pytest

from examples.hub.settings import HubSettings, SettingsError
from tests.helpers import Home, free_port, run_hub


def test_the_link_listener_needs_tls_unless_told_it_is_development(tmp_path: object) -> None:
    with pytest.raises(SettingsError, match="the link is served over TLS"):
        HubSettings.from_env({"POLICYD_HUB_LINK_ADDRESS": "127.0.0.1:8443"})
    dev = HubSettings.from_env(
        {"POLICYD_HUB_LINK_ADDRESS": "127.0.0.1:8443", "POLICYD_HUB_LINK_INSECURE": "1"}
    )
    assert dev.link_insecure and dev.link_recheck_seconds == 0.5
    assert dev.link_timeout_seconds == 10.0
    with pytest.raises(SettingsError, match="POLICYD_HUB_LINK_TRANSPORTS"):
        HubSettings.from_env(
            {
                "POLICYD_HUB_LINK_ADDRESS": "127.0.0.1:8443",
                "POLICYD_HUB_LINK_INSECURE": "1",
                "POLICYD_HUB_LINK_TRANSPORTS": "carrier-pigeon",
            }
        )
    with pytest.raises(SettingsError, match="no such file"):
        HubSettings.from_env(
            {
                "POLICYD_HUB_LINK_ADDRESS": "127.0.0.1:8443",
                "POLICYD_HUB_LINK_CERT_FILE": "/nonexistent.pem",
                "POLICYD_HUB_LINK_KEY_FILE": "/nonexistent.key",
            }
        )


@pytest.mark.slow
def test_a_data_source_the_hub_does_not_hold_goes_to_the_link(seeded: Home) -> None:
    token = seeded.token(scopes=("UserInfo", "DataRead"))
    bearer = {"Authorization": f"Bearer {token}"}
    link = f"127.0.0.1:{free_port()}"
    with run_hub(seeded, "ds-b", link_address=link, link_insecure="1") as hub:
        # ds-a is granted but at the plant: no connector online, 503 at once.
        away = httpx.get(f"{hub.url}/api/data/tags/ds-a", headers=bearer, timeout=5)
        assert away.status_code == 503, away.text
        assert away.json()["error"] == "connector_unavailable"
        assert away.headers["x-policyd-decision-id"]
        # ds-b is the hub's own.
        home = httpx.get(f"{hub.url}/api/data/tags/ds-b", headers=bearer, timeout=5)
        assert home.status_code == 200, home.text
        # The link listener answers Engine.IO's handshake.
        hello = httpx.get(f"http://{link}/socket.io/?EIO=4&transport=polling", timeout=5)
        assert hello.status_code == 200 and '"sid"' in hello.text
    assert "serving the link for connectors on http://" in hub.log()
