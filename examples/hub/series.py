"""A tag's time series: generated samples merged with written values, and the queries on it.

Generated samples exist at every multiple of the tag's interval up to now (never in the
future). A written value at the same time replaces the generated one; others are merged
in. Queries: snapshot, raw, plot, processed (interp, avg, min, max) and values at times.
Work per request is bounded: at most MAX_SAMPLES samples per tag and MAX_POINTS results.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass

from examples.hub.catalogue import Tag
from examples.hub.storage import HubStore

MAX_SAMPLES = 200_000
MAX_POINTS = 10_000
FUNCTIONS = ("interp", "avg", "min", "max")

Sample = tuple[float, float]
Point = tuple[float, float | None]


class QueryError(ValueError):
    """A query the hub will not run as asked (too large, bad parameters): HTTP 400."""


@dataclass(frozen=True, slots=True)
class Series:
    tag: Tag
    store: HubStore
    now: float

    def _k_range(self, start: float, end: float) -> range:
        iv = self.tag.interval
        return range(math.ceil(start / iv), math.floor(min(end, self.now) / iv) + 1)

    def samples(self, start: float, end: float, limit: int = MAX_SAMPLES) -> list[Sample]:
        """Merged samples with start <= time <= min(end, now), oldest first, at most limit."""
        end = min(end, self.now)
        if end < start:
            return []
        ks = self._k_range(start, end)
        if len(ks) > MAX_SAMPLES and limit >= MAX_SAMPLES:
            raise QueryError(
                f"{self.tag.name}: more than {MAX_SAMPLES} samples in the range; narrow it"
            )
        iv = self.tag.interval
        merged: dict[float, float] = {k * iv: self.tag.sample(k) for k in ks[:limit]}
        t = self.tag
        merged.update(self.store.values(t.data_source, t.name, start, end, limit))
        return sorted(merged.items())[:limit]

    def snapshot(self) -> Sample:
        k = math.floor(self.now / self.tag.interval)
        generated = (k * self.tag.interval, self.tag.sample(k))
        written = self.store.latest(self.tag.data_source, self.tag.name, self.now)
        return written if written is not None and written[0] >= generated[0] else generated

    def raw(self, start: float, end: float, points: int) -> list[Sample]:
        return self.samples(start, end, points)

    def plot(self, start: float, end: float, intervals: int) -> list[Sample]:
        """Per bucket the first, lowest, highest and last sample: a line that looks right."""
        samples = self.samples(start, end)
        width = (end - start) / intervals
        out: list[Sample] = []
        for bucket in _buckets(samples, start, width, intervals):
            if bucket:
                lowest = min(bucket, key=lambda p: p[1])
                highest = max(bucket, key=lambda p: p[1])
                out.extend(sorted({bucket[0], lowest, highest, bucket[-1]}))
        return out

    def processed(self, start: float, end: float, interval: float, function: str) -> list[Point]:
        if function not in FUNCTIONS:
            raise QueryError(f"function must be one of {', '.join(FUNCTIONS)}")
        count = math.floor((end - start) / interval) + 1
        if count > MAX_POINTS:
            raise QueryError(f"more than {MAX_POINTS} intervals; use a longer interval")
        times = [start + i * interval for i in range(count)]
        if function == "interp":
            iv = self.tag.interval
            samples = self.samples(start - iv, end + iv)
            return [(t, self._round(_interpolate(samples, t, self.now))) for t in times]
        samples = self.samples(start, end)
        out: list[Point] = []
        for t, bucket in zip(times, _buckets(samples, start, interval, count), strict=True):
            values = [v for _, v in bucket]
            if not values:
                out.append((t, None))
            elif function == "avg":
                out.append((t, self._round(sum(values) / len(values))))
            else:
                out.append((t, min(values) if function == "min" else max(values)))
        return out

    def at_times(self, times: Iterable[float]) -> list[Point]:
        iv = self.tag.interval
        return [
            (t, self._round(_interpolate(self.samples(t - iv, t + iv), t, self.now))) for t in times
        ]

    def _round(self, value: float | None) -> float | None:
        return None if value is None else round(value, self.tag.decimals + 2)


def _buckets(samples: list[Sample], start: float, width: float, count: int) -> list[list[Sample]]:
    """Samples split into count buckets [start + i*width, start + (i+1)*width)."""
    out: list[list[Sample]] = [[] for _ in range(count)]
    for point in samples:
        i = min(int((point[0] - start) // width), count - 1)
        if i >= 0:
            out[i].append(point)
    return out


def _interpolate(samples: list[Sample], t: float, now: float) -> float | None:
    """Linear between the samples around t; the last value after the last sample; none later
    than now."""
    if t > now or not samples:
        return None
    times = [p[0] for p in samples]
    i = bisect.bisect_right(times, t)
    if i == 0:
        return None
    t0, v0 = samples[i - 1]
    if t0 == t or i == len(samples):
        return v0
    t1, v1 = samples[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
