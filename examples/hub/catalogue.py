"""The hub's demo data sources and their tags, with deterministic generated values.

Every data source has the same eight kinds of tag (flow, temperature, pressure, level, pH,
speed, power, vibration), named after a plant area derived from the data source's name
(`FIC-101.PV`, ...). A tag's value at sample k (time k * interval) is a slow sine wave plus
noise drawn from a hash of (data source, tag, k): any process computes the same numbers, so
tests and demos can compare them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

# The names the policyd demo (`make run`) seeds, with what they are.
DEMO_DATA_SOURCES = {
    "edge-historian": "Process historian at the edge gateway",
    "plant-mes": "Manufacturing execution system",
    "lab-lims": "Laboratory information system",
}

# prefix, description, units, base, amplitude, period (s), sample interval (s), decimals
_KINDS: tuple[tuple[str, str, str, float, float, float, float, int], ...] = (
    ("FIC", "Feed flow", "m3/h", 120.0, 15.0, 3600.0, 10.0, 2),
    ("TIC", "Reactor temperature", "degC", 85.0, 4.0, 1800.0, 10.0, 2),
    ("PIC", "Header pressure", "bar", 6.5, 0.4, 900.0, 5.0, 3),
    ("LIC", "Tank level", "%", 55.0, 20.0, 7200.0, 30.0, 1),
    ("AIC", "Effluent pH", "pH", 7.1, 0.3, 5400.0, 60.0, 2),
    ("SIC", "Pump speed", "rpm", 1480.0, 30.0, 600.0, 10.0, 0),
    ("JI", "Motor power", "kW", 75.0, 10.0, 2400.0, 15.0, 1),
    ("VI", "Bearing vibration", "mm/s", 2.2, 0.8, 300.0, 5.0, 3),
)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Tag:
    data_source: str
    name: str
    description: str
    units: str
    interval: float  # seconds between generated samples
    base: float
    amplitude: float
    period: float
    phase: float
    decimals: int

    def sample(self, k: int) -> float:
        """The generated value at time k * interval."""
        t = k * self.interval
        wave = self.amplitude * math.sin(2 * math.pi * t / self.period + self.phase)
        noise = _hash(f"{self.data_source}/{self.name}/{k}") / 2**64 * 2 - 1  # [-1, 1)
        return round(self.base + wave + 0.05 * self.amplitude * noise, self.decimals)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "units": self.units,
            "sample_interval_seconds": self.interval,
        }


@dataclass(frozen=True, slots=True)
class DataSource:
    name: str
    description: str
    tags: dict[str, Tag]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description, "tag_count": len(self.tags)}


def make_data_source(name: str, description: str = "") -> DataSource:
    seed = _hash(name)
    area = 100 + (seed % 8) * 100
    tags: dict[str, Tag] = {}
    for i, (prefix, what, units, base, amplitude, period, interval, decimals) in enumerate(
        _KINDS, start=1
    ):
        tag_name = f"{prefix}-{area + i}.PV"
        scale = 0.9 + ((seed >> (8 * (i % 8))) % 21) / 100  # 0.90 .. 1.10
        tags[tag_name] = Tag(
            data_source=name,
            name=tag_name,
            description=f"{what}, area {area}",
            units=units,
            interval=interval,
            base=round(base * scale, decimals),
            amplitude=amplitude,
            period=period,
            phase=(_hash(f"{name}/{tag_name}") % 6283) / 1000,
            decimals=decimals,
        )
    return DataSource(name, description or f"Demo data source {name}", tags)


class Catalogue:
    """The data sources this hub serves, by name."""

    def __init__(self, names: Iterable[str]) -> None:
        self.data_sources = {
            name: make_data_source(name, DEMO_DATA_SOURCES.get(name, "")) for name in names
        }

    def get(self, name: str) -> DataSource | None:
        return self.data_sources.get(name)
