"""Test support for metrics: a home whose server serves /metrics, and a scrape of it."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Home, free_port

# One sample: (sample name, sorted label pairs) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def with_metrics(home: Home) -> str:
    """Turn metrics on in the home's config (a free port); returns metrics.address."""
    address = f"127.0.0.1:{free_port()}"
    with open(home.config_path, "a") as config:
        config.write(f'[metrics]\naddress = "{address}"\n')
    return address


def exposition(address: str) -> str:
    reply = httpx.get(f"http://{address}/metrics", timeout=10)
    reply.raise_for_status()
    return reply.text


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(address: str) -> Samples:
    return parse(exposition(address))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_scraped(
    address: str, condition: Callable[[Samples], bool], timeout: float = 15.0, what: str = ""
) -> Samples:
    """Scrape until `condition` holds; the last scrape (AssertionError when it never does)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(address)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {sorted(samples)}")
        time.sleep(0.05)
