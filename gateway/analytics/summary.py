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
from typing import Any, Callable, Iterable

from gateway.model import Quality, Record, Sample, split_source

_WORST = {0: Quality.GOOD, 1: Quality.UNCERTAIN, 2: Quality.BAD}
_GOOD = Quality.GOOD


class TagStats:
    """Running accumulators of one tag over one interval.

    A value equal to the previous one (same type) costs one comparison and two increments: it
    extends the current run, and a run enters the sums (value x length, one compensated step)
    only when a different value comes or the payload is asked for. A poll loop that reads the
    same register value again and again, the usual case, then pays next to nothing for it."""

    __slots__ = ("count", "bad_count", "n", "total", "comp", "min", "max", "last", "all_bool",
                 "rank", "unit", "_run", "_run_value", "_run_type")

    def __init__(self, unit: str | None) -> None:
        self.count = 0
        self.bad_count = 0
        self.n = 0  # numeric (incl. bool) good samples folded into total/comp
        self.total = 0.0
        self.comp = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.last: Any = None
        self.all_bool = True
        self.rank = 0
        self.unit = unit
        self._run = 0  # good int/float samples equal to _run_value, not yet in n/total
        self._run_value: Any = None
        self._run_type: type | None = None

    def add(self, value: Any, quality: Quality) -> None:
        kind = value.__class__
        if quality is _GOOD and (kind is float or kind is int):
            if self._run and kind is self._run_type and value == self._run_value:
                self._run += 1  # unchanged (a run holds finite values only: NaN never equals)
                self.count += 1
                return
            if kind is int or math.isfinite(value):
                k = self._run
                if k:  # the run ends: `_fold`, written out here, the path of every changed value
                    self.n += k
                    x = float(self._run_value) * k
                    total = self.total
                    t = total + x
                    if abs(total) >= abs(x):
                        self.comp += (total - t) + x
                    else:
                        self.comp += (x - t) + total
                    self.total = t
                self._run, self._run_value, self._run_type = 1, value, kind
                self.count += 1
                self.last = value
                self.all_bool = False
                v = float(value)
                if self.min is None or v < self.min:
                    self.min = v
                if self.max is None or v > self.max:
                    self.max = v
                return
        self._add_slow(value, quality)

    def _fold(self) -> None:
        """The current run into n and the compensated sum, as one term value x length."""
        k, self._run = self._run, 0
        self.n += k
        self._sum(float(self._run_value) * k)

    def _sum(self, v: float) -> None:
        # Neumaier's compensated summation.
        t = self.total + v
        if abs(self.total) >= abs(v):
            self.comp += (self.total - t) + v
        else:
            self.comp += (v - t) + self.total
        self.total = t

    def _add_slow(self, value: Any, quality: Quality) -> None:
        """Everything but a good finite int or float: bools, strings, None, NumPy scalars, bad
        or uncertain quality, NaN and infinity."""
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
        if self._run:
            self._fold()  # `last` changes here: the next number starts a run of its own
        self.last = value
        if isinstance(value, (int, float)):  # bool is an int: mean = fraction true
            if not isinstance(value, bool):
                self.all_bool = False
            v = float(value)
            self.n += 1
            self._sum(v)
            if self.min is None or v < self.min:
                self.min = v
            if self.max is None or v > self.max:
                self.max = v

    def payload(self) -> dict[str, Any]:
        if self._run:
            self._fold()
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
        self._stats: dict[str, TagStats] = {}  # source -> this interval's stats, in arrival order
        self._start: float | None = None

    def add(self, s: Sample) -> None:
        self.add_many((s,))

    def add_many(self, samples: Iterable[Sample], on_error: Callable[[Sample], None] | None = None) -> None:
        """Samples in arrival order; per sample a dict lookup and `TagStats.add`. A sample that
        fails goes to `on_error` (if given; else the exception propagates) and the rest go on."""
        stats = self._stats
        for s in samples:
            try:
                st = stats.get(s.source)
                if st is None:
                    st = self._new(s)
                elif st.unit is None and s.unit is not None:
                    st.unit = s.unit
                st.add(s.value, s.quality)
            except Exception:
                if on_error is None:
                    raise
                on_error(s)

    def _new(self, s: Sample) -> TagStats:
        if self._start is None:
            self._start = math.floor(s.ts / self.interval) * self.interval
        st = self._stats[s.source] = TagStats(self._units.get(s.source, s.unit))
        return st

    def flush(self, now: float) -> list[Record]:
        start = self._start if self._start is not None else now - self.interval
        devices: dict[str, dict[str, Any]] = {}
        for source, st in self._stats.items():
            device, tag = split_source(source)  # once per tag and interval: no table of the halves kept
            devices.setdefault(device, {})[tag] = st.payload()
        records = [
            Record(topic=f"data/{device}", kind="data", ts=start,
                   payload={"device": device, "interval_s": self.interval, "tags": tags})
            for device, tags in devices.items()
        ]
        self._stats = {}
        self._start = now
        return records
