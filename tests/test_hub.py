"""The reference hub over a real uvicorn socket, protected by the middleware and a real
`policyd serve`: every route of the data API, deterministic values, writes that persist,
the data-source list filtered by the decision, and the hub behind a gateway."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.hub.app import create_app
from examples.hub.catalogue import DEMO_DATA_SOURCES, Catalogue
from examples.hub.settings import HubSettings, SettingsError
from examples.hub.times import format_time, parse_time
from policyd.cli import demo
from tests.asgi_server import serve_asgi
from tests.helpers import Home, ServerProcess

DATA_SOURCES = ("ds-a", "ds-b", "ds-c")
START = "2025-06-01T00:00:00Z"
T0 = parse_time(START, 0)
CATALOGUE = Catalogue(DATA_SOURCES)
FLOW = next(iter(CATALOGUE.data_sources["ds-a"].tags.values()))  # 10 s samples
PH = next(t for t in CATALOGUE.data_sources["ds-a"].tags.values() if t.interval == 60)
PH_B = next(t for t in CATALOGUE.data_sources["ds-b"].tags.values() if t.interval == 60)


def settings_for(data_dir: Path, address: str = "", gateway: str = "asgi") -> HubSettings:
    return HubSettings(
        data_dir=data_dir,
        data_sources=DATA_SOURCES,
        gateway=gateway,
        policyd_address=address,
        timeout_seconds=5.0,
    )


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def hub(shared_server: ServerProcess, shared_home: Home, hub_dir: Path) -> Iterator[str]:
    shared_home.store.set_consent(
        "alice", "app1", ["UserInfo", "DataRead", "DataWrite", "AccountDebit"]
    )
    with serve_asgi(create_app(settings_for(hub_dir, shared_server.address))) as url:
        yield url


@pytest.fixture(scope="module")
def reader(shared_home: Home) -> dict[str, str]:
    return {"Authorization": f"Bearer {shared_home.token()}"}


@pytest.fixture(scope="module")
def writer(shared_home: Home) -> dict[str, str]:
    token = shared_home.token(scopes=("UserInfo", "DataRead", "DataWrite", "AccountDebit"))
    return {"Authorization": f"Bearer {token}"}


def values(response: httpx.Response, ds: str, tag: str) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()[ds][tag]["values"]
    return result


def query(url: str, headers: dict[str, str], kind: str, **body: Any) -> httpx.Response:
    body.setdefault("tags", {"ds-a": [FLOW.name]})
    return httpx.post(f"{url}/api/data/v2/{kind}", headers=headers, json=body)


# -- catalogue, profile, listing -------------------------------------------------------------


def test_info_is_public(hub: str) -> None:
    r = httpx.get(f"{hub}/api/info")
    assert r.status_code == 200
    assert r.json()["gateway"] == "asgi"


def test_the_profile_names_the_user_and_the_app(hub: str, reader: dict[str, str]) -> None:
    r = httpx.get(f"{hub}/api/user/me", headers=reader)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "sub": "alice",
        "name": "Alice Operator",
        "client_id": "app1",
        "scopes": ["UserInfo", "DataRead"],
    }


def test_the_data_source_list_shows_only_the_granted_ones(hub: str, reader: dict[str, str]) -> None:
    r = httpx.get(f"{hub}/api/data/datasources", headers=reader)
    assert r.status_code == 200, r.text
    assert [d["name"] for d in r.json()["data_sources"]] == ["ds-a", "ds-b"]
    assert r.json()["data_sources"][0]["tag_count"] == 8


def test_one_data_source_granted_or_not(hub: str, reader: dict[str, str]) -> None:
    ok = httpx.get(f"{hub}/api/data/datasources/ds-b", headers=reader)
    assert ok.status_code == 200 and ok.json()["name"] == "ds-b"
    refused = httpx.get(f"{hub}/api/data/datasources/ds-c", headers=reader)
    assert refused.status_code == 403
    assert refused.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"


def test_tag_search_by_pattern_with_pages(hub: str, reader: dict[str, str]) -> None:
    every = httpx.get(f"{hub}/api/data/tags/ds-a", headers=reader).json()
    assert every["total"] == 8
    names = [t["name"] for t in every["tags"]]
    assert names[0] == FLOW.name
    flows = httpx.get(f"{hub}/api/data/tags/ds-a", params={"name": "fic*"}, headers=reader)
    assert [t["name"] for t in flows.json()["tags"]] == [FLOW.name]
    page = httpx.get(
        f"{hub}/api/data/tags/ds-a", params={"page": 2, "page_size": 3}, headers=reader
    ).json()
    assert [t["name"] for t in page["tags"]] == names[3:6]
    bad = httpx.get(f"{hub}/api/data/tags/ds-a", params={"page_size": 0}, headers=reader)
    assert bad.status_code == 400


def test_a_tag_by_name(hub: str, reader: dict[str, str]) -> None:
    r = httpx.get(f"{hub}/api/data/tags/ds-a/{FLOW.name}", headers=reader)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "data_source": "ds-a",
        "name": FLOW.name,
        "description": FLOW.description,
        "units": "m3/h",
        "sample_interval_seconds": 10.0,
    }
    missing = httpx.get(f"{hub}/api/data/tags/ds-a/NOPE.PV", headers=reader)
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


# -- reading values ---------------------------------------------------------------------------


def test_raw_values_are_generated_deterministically(
    hub: str, reader: dict[str, str], tmp_path: Path
) -> None:
    body = {"start": START, "end": "2025-06-01T00:01:00Z"}
    first = values(query(hub, reader, "raw", **body), "ds-a", FLOW.name)
    assert [v["timestamp"] for v in first] == [format_time(T0 + 10 * i) for i in range(7)]
    assert [v["value"] for v in first] == [FLOW.sample(int(T0 / 10) + i) for i in range(7)]
    assert values(query(hub, reader, "raw", **body), "ds-a", FLOW.name) == first
    # Another hub process with its own data folder computes the same numbers.
    other = Catalogue(["ds-a"]).data_sources["ds-a"].tags[FLOW.name]
    assert [other.sample(int(T0 / 10) + i) for i in range(7)] == [v["value"] for v in first]
    limited = query(hub, reader, "raw", start=START, end="*", points=5)
    assert len(values(limited, "ds-a", FLOW.name)) == 5


def test_the_snapshot_is_the_latest_sample(hub: str, reader: dict[str, str]) -> None:
    r = query(hub, reader, "snapshot", tags={"ds-a": [FLOW.name], "ds-b": [PH_B.name]})
    (flow,) = values(r, "ds-a", FLOW.name)
    assert r.json()["ds-a"][FLOW.name]["units"] == "m3/h"
    ts = parse_time(flow["timestamp"], 0)
    assert ts % 10 == 0
    assert flow["value"] == FLOW.sample(int(ts / 10))
    (ph,) = values(r, "ds-b", PH_B.name)
    assert ph["value"] == PH_B.sample(int(parse_time(ph["timestamp"], 0) / 60))


def test_plot_keeps_the_extremes_of_each_interval(hub: str, reader: dict[str, str]) -> None:
    end = "2025-06-01T01:00:00Z"
    raw = values(query(hub, reader, "raw", start=START, end=end), "ds-a", FLOW.name)
    plot = values(query(hub, reader, "plot", start=START, end=end, intervals=6), "ds-a", FLOW.name)
    assert len(plot) <= 6 * 4
    assert {p["timestamp"] for p in plot} <= {p["timestamp"] for p in raw}
    assert max(p["value"] for p in plot) == max(p["value"] for p in raw)
    assert min(p["value"] for p in plot) == min(p["value"] for p in raw)


def test_processed_interpolates_averages_and_finds_extremes(
    hub: str, reader: dict[str, str]
) -> None:
    end = "2025-06-01T00:30:00Z"
    raw = values(query(hub, reader, "raw", start=START, end=end), "ds-a", FLOW.name)
    by_minute = [[p["value"] for p in raw[i * 6 : i * 6 + 6]] for i in range(30)]

    def processed(function: str, **extra: Any) -> list[Any]:
        r = query(
            hub,
            reader,
            "processed",
            start=START,
            end=end,
            interval="1m",
            function=function,
            **extra,
        )
        return [p["value"] for p in values(r, "ds-a", FLOW.name)]

    avg = processed("avg")
    assert len(avg) == 31  # 00:00 .. 00:30, each the start of a one-minute interval
    assert avg[:30] == pytest.approx([statistics.mean(b) for b in by_minute], abs=1e-3)
    assert processed("min")[:30] == [min(b) for b in by_minute]
    assert processed("max")[:30] == [max(b) for b in by_minute]
    interp = query(
        hub,
        reader,
        "processed",
        start="2025-06-01T00:00:05Z",
        end="2025-06-01T00:00:25Z",
        interval="10s",
    )
    halfway = [p["value"] for p in values(interp, "ds-a", FLOW.name)]
    expected = [(raw[i]["value"] + raw[i + 1]["value"]) / 2 for i in range(3)]
    assert halfway == pytest.approx(expected, abs=1e-3)
    bad = query(hub, reader, "processed", start=START, end=end, interval="1m", function="median")
    assert bad.status_code == 400


def test_values_at_times_interpolate_and_have_no_future(hub: str, reader: dict[str, str]) -> None:
    times = [START, "2025-06-01T00:00:02.5Z", "*+1h"]
    got = values(query(hub, reader, "values-at-times", times=times), "ds-a", FLOW.name)
    k = int(T0 / 10)
    assert got[0]["value"] == FLOW.sample(k)
    assert got[1]["value"] == pytest.approx(
        FLOW.sample(k) + (FLOW.sample(k + 1) - FLOW.sample(k)) / 4, abs=1e-3
    )
    assert got[2]["value"] is None


def test_a_body_naming_an_ungranted_data_source_is_refused(
    hub: str, reader: dict[str, str]
) -> None:
    r = query(hub, reader, "snapshot", tags={"ds-a": [FLOW.name], "ds-c": [FLOW.name]})
    assert r.status_code == 403
    assert r.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"


def test_bad_queries_are_400(hub: str, reader: dict[str, str]) -> None:
    for body in (
        {"start": "yesterday"},
        {"start": "*", "end": "*-1h"},
        {"start": START, "end": "*", "points": 0},
        {"start": START, "end": "*", "points": "many"},
    ):
        r = query(hub, reader, "raw", **body)
        assert r.status_code == 400, body
        assert r.json()["error"] == "invalid_request"
    huge = query(hub, reader, "plot", start="2000-01-01T00:00:00Z", end="*")
    assert huge.status_code == 400
    unknown = query(hub, reader, "raw", tags={"ds-a": ["NOPE.PV"]})
    assert unknown.status_code == 404


# -- writing ----------------------------------------------------------------------------------


def test_written_history_persists_across_a_restart(
    hub: str, writer: dict[str, str], shared_server: ServerProcess, hub_dir: Path
) -> None:
    at = [T0 + 3600, T0 + 3600 + 5, T0 + 3600 + 10]
    points = [{"timestamp": format_time(t), "value": 1000.0 + i} for i, t in enumerate(at)]
    put = httpx.put(
        f"{hub}/api/data/v2/history/ds-a", headers=writer, json={"values": {FLOW.name: points}}
    )
    assert put.status_code == 200, put.text
    assert put.json()["written"] == 3
    window = {"start": format_time(at[0]), "end": format_time(at[-1])}
    got = values(query(hub, writer, "raw", **window), "ds-a", FLOW.name)
    # Written values replace generated ones at the same time; the one between them is added.
    assert got == points
    # A new hub process over the same folder reads them back.
    settings = settings_for(hub_dir, shared_server.address)
    with serve_asgi(create_app(settings)) as again:
        assert values(query(again, writer, "raw", **window), "ds-a", FLOW.name) == points


def test_a_written_snapshot_is_read_back(hub: str, writer: dict[str, str]) -> None:
    put = httpx.put(
        f"{hub}/api/data/v2/snapshot/ds-a", headers=writer, json={"values": {PH.name: 4.25}}
    )
    assert put.status_code == 200, put.text
    written_at = parse_time(put.json()["timestamp"], 0)
    (snap,) = values(query(hub, writer, "snapshot", tags={"ds-a": [PH.name]}), "ds-a", PH.name)
    if parse_time(snap["timestamp"], 0) == written_at:
        assert snap["value"] == 4.25
    else:  # a generated sample came after the write (once a minute for this tag)
        assert parse_time(snap["timestamp"], 0) > written_at
    window = {"start": put.json()["timestamp"], "end": "*", "tags": {"ds-a": [PH.name]}}
    assert values(query(hub, writer, "raw", **window), "ds-a", PH.name)[0]["value"] == 4.25


def test_writing_needs_the_scope_and_a_write_grant(
    hub: str, reader: dict[str, str], writer: dict[str, str]
) -> None:
    body = {"values": {FLOW.name: 1.0}}
    no_scope = httpx.put(f"{hub}/api/data/v2/snapshot/ds-a", headers=reader, json=body)
    assert (no_scope.status_code, no_scope.json()["reason"]) == (403, "SCOPE_MISSING")
    read_only = httpx.put(f"{hub}/api/data/v2/snapshot/ds-b", headers=writer, json=body)
    assert read_only.status_code == 403
    assert read_only.json()["reason"] == "DATA_SOURCE_ACCESS_INSUFFICIENT"
    not_a_number = httpx.put(
        f"{hub}/api/data/v2/snapshot/ds-a", headers=writer, json={"values": {FLOW.name: "x"}}
    )
    assert not_a_number.status_code == 400


def test_debit_and_refund_an_account(hub: str, writer: dict[str, str]) -> None:
    debit = httpx.post(
        f"{hub}/api/account/debit", headers=writer, json={"amount": 2.5, "description": "query"}
    )
    assert debit.status_code == 200, debit.text
    balance = debit.json()["balance"]
    assert math.isclose(balance, 97.5)
    tx = debit.json()["transaction_id"]
    refund = httpx.post(f"{hub}/api/account/refund", headers=writer, json={"transaction_id": tx})
    assert refund.status_code == 200, refund.text
    assert math.isclose(refund.json()["balance"], 100.0)
    again = httpx.post(f"{hub}/api/account/refund", headers=writer, json={"transaction_id": tx})
    assert again.status_code == 409
    too_much = httpx.post(f"{hub}/api/account/debit", headers=writer, json={"amount": 1000})
    assert too_much.status_code == 402
    assert (
        httpx.post(f"{hub}/api/account/debit", headers=writer, json={"amount": 0.001}).status_code
        == 400
    )


def test_debit_needs_the_account_scope(hub: str, reader: dict[str, str]) -> None:
    r = httpx.post(f"{hub}/api/account/debit", headers=reader, json={"amount": 1})
    assert (r.status_code, r.json()["reason"]) == (403, "SCOPE_MISSING")


# -- behind a gateway, settings ----------------------------------------------------------------


def test_behind_a_gateway_the_hub_trusts_its_x_policyd_headers(tmp_path: Path) -> None:
    with serve_asgi(create_app(settings_for(tmp_path, gateway="envoy"))) as url:
        decided = {
            "x-policyd-sub": "bob",
            "x-policyd-client-id": "app1",
            "x-policyd-scopes": "UserInfo DataRead",
            "x-policyd-data-sources": '["ds-c"]',
            "x-policyd-decision-id": "d-1",
        }
        listed = httpx.get(f"{url}/api/data/datasources", headers=decided)
        assert [d["name"] for d in listed.json()["data_sources"]] == ["ds-c"]
        me = httpx.get(f"{url}/api/user/me", headers=decided).json()
        assert (me["sub"], me["scopes"]) == ("bob", ["UserInfo", "DataRead"])
        assert httpx.get(f"{url}/api/data/tags/ds-a", headers=decided).status_code == 403
        assert httpx.get(f"{url}/api/user/me").status_code == 401
        assert httpx.get(f"{url}/api/info").status_code == 200


def test_settings_come_from_policyd_hub_variables(tmp_path: Path) -> None:
    s = HubSettings.from_env(
        {
            "POLICYD_HUB_PORT": "9001",
            "POLICYD_HUB_DATA_DIR": str(tmp_path),
            "POLICYD_HUB_DATA_SOURCES": "a, b,,c",
            "POLICYD_SERVER_ADDRESS": "127.0.0.1:6000",
            "POLICYD_HUB_TIMEOUT_SECONDS": "0.5",
        }
    )
    assert (s.port, s.data_dir, s.data_sources) == (9001, tmp_path, ("a", "b", "c"))
    assert (s.policyd_address, s.timeout_seconds) == ("127.0.0.1:6000", 0.5)
    assert HubSettings.from_env({}).policyd_address == "127.0.0.1:50051"
    with pytest.raises(SettingsError, match="POLICYD_HUB_PORT"):
        HubSettings.from_env({"POLICYD_HUB_PORT": "http"})
    with pytest.raises(SettingsError, match="POLICYD_HUB_GATEWAY"):
        HubSettings.from_env({"POLICYD_HUB_GATEWAY": "none"})


def test_the_hub_serves_the_data_sources_the_policyd_demo_seeds() -> None:
    assert set(DEMO_DATA_SOURCES) == set(demo.DATA_SOURCES)
