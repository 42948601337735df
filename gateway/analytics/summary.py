"""Per-interval summaries of scalar tags: min, max, mean, last, count, unit, worst quality.

Running accumulators (not stored values), so memory stays constant however fast a tag is
sampled and however long the interval. The sum is compensated (Neumaier) so that the mean
agrees with NumPy's on the same values even when they differ by many orders of magnitude.

Rules of the payload:
* count is every sample received; bad_count those with bad quality or a non-finite value.
  Bad samples are never part of min/max/mean/last.
* quality is the worst seen (a non-finite value counts as bad).
* numbers: min, max, mean. bools: mean is the fraction true, min/max are bools (any false /
  any true). strings (and other values): last and count only; min/max/mean are None.
* every value is a plain Python int/float/bool/str or None (JSON-ready).
"""

from __future__ import annotations

import math
from typing import Any

from gateway.model import Quality, Record, Sample, split_source

_WORST = {0: Quality.GOOD, 1: Quality.UNCERTAIN, 2: Quality.BAD}


class TagStats:
    __slots__ = ("count", "bad_count", "n", "total", "comp", "min", "max", "last", "all_bool",
                 "rank", "unit")

    def __init__(self, unit: str | None) -> None:
        self.count = 0
        self.bad_count = 0
        self.n = 0  # numeric (incl. bool) good samples
        self.total = 0.0
        self.comp = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.last: Any = None
        self.all_bool = True
        self.rank = 0
        self.unit = unit

    def add(self, value: Any, quality: Quality) -> None:
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # NumPy scalars from decoders: keep payloads plain Python
        self.count += 1
        rank = quality.rank
        bad = quality is Quality.BAD or value is None
        if isinstance(value, float) and not math.isfinite(value):
            bad, rank = True, Quality.BAD.rank
        if rank > self.rank:
            self.rank = rank
        if bad:
            self.bad_count += 1
            return
        self.last = value
        if isinstance(value, (int, float)):  # bool is an int: mean = fraction true
            if not isinstance(value, bool):
                self.all_bool = False
            v = float(value)
            self.n += 1
            # Neumaier's compensated summation.
            t = self.total + v
            if abs(self.total) >= abs(v):
                self.comp += (self.total - t) + v
            else:
                self.comp += (v - t) + self.total
            self.total = t
            if self.min is None or v < self.min:
                self.min = v
            if self.max is None or v > self.max:
                self.max = v

    def payload(self) -> dict[str, Any]:
        mean = mn = mx = None
        if self.n:
            mean = (self.total + self.comp) / self.n
            if self.all_bool:
                mn, mx = bool(self.min), bool(self.max)
            else:
                mn, mx = self.min, self.max
        return {
            "min": mn, "max": mx, "mean": mean, "last": self.last, "count": self.count,
            "unit": self.unit, "quality": _WORST[self.rank].value, "bad_count": self.bad_count,
        }


class Summaries:
    """Accumulates scalar samples per device and interval; `flush(now)` closes the interval.

    The interval's start (the records' ts) is the previous flush's `now`; before the first
    flush it is the first sample's timestamp rounded down to the interval grid.
    """

    def __init__(self, interval: float, units: dict[str, str | None] | None = None) -> None:
        self.interval = float(interval)
        self._units = units or {}
        self._devices: dict[str, dict[str, TagStats]] = {}
        self._start: float | None = None

    def add(self, s: Sample) -> None:
        if self._start is None:
            self._start = math.floor(s.ts / self.interval) * self.interval
        device, tag = split_source(s.source)
        tags = self._devices.setdefault(device, {})
        st = tags.get(tag)
        if st is None:
            st = tags[tag] = TagStats(self._units.get(s.source, s.unit))
        if st.unit is None and s.unit is not None:
            st.unit = s.unit
        st.add(s.value, s.quality)

    def flush(self, now: float) -> list[Record]:
        start = self._start if self._start is not None else now - self.interval
        records = [
            Record(topic=f"data/{device}", kind="data", ts=start,
                   payload={"device": device, "interval_s": self.interval,
                            "tags": {tag: st.payload() for tag, st in tags.items()}})
            for device, tags in self._devices.items() if tags
        ]
        self._devices = {}
        self._start = now
        return records
