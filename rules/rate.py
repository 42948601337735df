"""`rate`: the rate of change of an input beyond a limit (a temperature climbing too fast).

    {name: oven_ramp, type: rate, input: oven.temp, limit: 5, per: minute, window: 60s,
     direction: rising, clear: 3, for: 10s, severity: warning}

The rate is the least-squares slope of the good values of the last `window` (by their own
timestamps), so one noisy reading does not raise it; it is judged only once the values span at
least half the window. `direction`: rising (default), falling or both (absolute rate).
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from pydantic import Field, model_validator

from gateway.schema import Duration
from rules.base import AlarmRuleConfig, FiniteFloat, RuleType, Severity, Verdict, fmt
from rules.alarm import alarm_factory

# Bounds memory when an input is much faster than its window (e.g. a feature at 100 Hz).
MAX_POINTS = 5000
# Running sums drift as points are added and removed; recompute them from the points this often.
RESUM_EVERY = 2000


class RateConfig(AlarmRuleConfig):
    type: Literal["rate"]
    limit: FiniteFloat = Field(gt=0)
    clear: FiniteFloat | None = Field(None, ge=0)
    per: Literal["second", "minute"] = "minute"
    window: Duration = Field(30.0, gt=0)
    direction: Literal["rising", "falling", "both"] = "rising"
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _clear_below_limit(self) -> "RateConfig":
        if self.clear is not None and self.clear > self.limit:
            raise ValueError(f"'clear' ({self.clear}) must be at or below 'limit' ({self.limit})")
        return self


class SlopeWindow:
    """Least-squares slope of (t, v) points in a sliding window, O(1) per point.

    Sums are kept relative to a point of the window (the newest when they were last recomputed)
    so that epoch-sized timestamps and large values do not cancel. They are recomputed from the
    points when that point leaves the window (relative to a point gone, a spike that has left
    would keep every difference large: a flat window read as a slope), and every RESUM_EVERY
    points, so that rounding from adding and removing cannot build up. Between two such
    recomputes the whole window has passed, so a point is summed again about once while it is
    in the window: still O(1) per point on average.
    """

    def __init__(self) -> None:
        self.points: deque[tuple[float, float]] = deque()
        self._since_resum = 0
        self._resum()

    def __len__(self) -> int:
        return len(self.points)

    def clear(self) -> None:
        self.points.clear()
        self._resum()

    def _resum(self) -> None:
        self._t0, self._v0 = self.points[-1] if self.points else (0.0, 0.0)
        self._st = self._sv = self._stt = self._stv = 0.0
        for t, v in self.points:
            self._add_sums(t, v, 1.0)
        self._since_resum = 0

    def _add_sums(self, t: float, v: float, sign: float) -> None:
        dt, dv = t - self._t0, v - self._v0
        self._st += sign * dt
        self._sv += sign * dv
        self._stt += sign * dt * dt
        self._stv += sign * dt * dv

    def _pop_oldest(self) -> None:
        t, v = self.points.popleft()
        if t >= self._t0:  # the point the sums are relative to has left (points are in time order)
            self._resum()
        else:
            self._add_sums(t, v, -1.0)

    def add(self, t: float, v: float) -> None:
        if len(self.points) >= MAX_POINTS:
            self._pop_oldest()
        if not self.points:
            self.points.append((t, v))
            self._resum()
            return
        self.points.append((t, v))
        self._add_sums(t, v, 1.0)
        self._count()

    def drop_older_than(self, oldest: float) -> None:
        while self.points and self.points[0][0] < oldest:
            self._pop_oldest()
            self._count()

    def _count(self) -> None:
        self._since_resum += 1
        if self._since_resum >= RESUM_EVERY:
            self._resum()

    @property
    def span(self) -> float:
        return self.points[-1][0] - self.points[0][0] if len(self.points) > 1 else 0.0

    def slope(self) -> float | None:
        n = len(self.points)
        if n < 2:
            return None
        denominator = n * self._stt - self._st * self._st
        if denominator <= 0:
            return None
        return (n * self._stv - self._st * self._sv) / denominator


class RateRule:
    def __init__(self, config: RateConfig) -> None:
        self.config = config
        self.default_severity: Severity = config.severity
        self.scale = 60.0 if config.per == "minute" else 1.0
        self.clear = config.clear if config.clear is not None else config.limit
        self.window = SlopeWindow()
        self.last_ts: float | None = None

    def unit_of(self, sample_unit: str | None) -> str | None:
        per = "s" if self.config.per == "second" else "min"
        return f"{sample_unit}/{per}" if sample_unit else None

    def evaluate(self, value: float, ts: float, active: Severity | None) -> Verdict | None:
        cfg = self.config
        if self.last_ts is not None and ts <= self.last_ts:
            if ts == self.last_ts:
                return None  # the same reading twice says nothing about change
            self.window.clear()  # the source clock went back: earlier points are not comparable
        self.last_ts = ts
        self.window.add(ts, value)
        self.window.drop_older_than(ts - cfg.window)
        if self.window.span < cfg.window / 2:
            return None
        per_second = self.window.slope()
        if per_second is None:
            return None
        rate = per_second * self.scale
        judged = {"rising": rate, "falling": -rate, "both": abs(rate)}[cfg.direction]
        unit = f"/{'s' if cfg.per == 'second' else 'min'}"
        extra = {"per": cfg.per, "direction": cfg.direction, "window_s": cfg.window,
                 "input_value": value}
        if judged > (self.clear if active is not None else cfg.limit):
            return Verdict(cfg.severity, rate, cfg.limit,
                           f"{cfg.input} changing at {fmt(rate)}{unit}, limit {fmt(cfg.limit)}{unit}",
                           extra)
        limit = self.clear if active is not None else cfg.limit
        return Verdict(None, rate, limit, f"{cfg.input} changing at {fmt(rate)}{unit}", extra)


RULE = RuleType("rate", RateConfig, alarm_factory(RateRule))
