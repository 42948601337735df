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
from rules.base import AlarmRuleConfig, FiniteFloat, Severity, Verdict, fmt, register
from rules.engine import alarm_factory

# Bounds memory when an input is much faster than its window (e.g. a feature at 100 Hz).
MAX_POINTS = 5000


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


class RateRule:
    def __init__(self, config: RateConfig) -> None:
        self.config = config
        self.default_severity: Severity = config.severity
        self.scale = 60.0 if config.per == "minute" else 1.0
        self.clear = config.clear if config.clear is not None else config.limit
        self.points: deque[tuple[float, float]] = deque(maxlen=MAX_POINTS)

    def slope(self) -> float | None:
        """Least-squares slope per second over the window, or None if it spans too little."""
        if len(self.points) < 2:
            return None
        t0 = self.points[0][0]
        if self.points[-1][0] - t0 < self.config.window / 2:
            return None
        n = len(self.points)
        mean_t = sum(t - t0 for t, _ in self.points) / n
        mean_v = sum(v for _, v in self.points) / n
        sxx = sum((t - t0 - mean_t) ** 2 for t, _ in self.points)
        sxy = sum((t - t0 - mean_t) * (v - mean_v) for t, v in self.points)
        return sxy / sxx if sxx > 0 else None

    def unit_of(self, sample_unit: str | None) -> str | None:
        per = "s" if self.config.per == "second" else "min"
        return f"{sample_unit}/{per}" if sample_unit else None

    def evaluate(self, value: float, ts: float, active: Severity | None) -> Verdict | None:
        cfg = self.config
        if self.points and ts <= self.points[-1][0]:
            if ts == self.points[-1][0]:
                return None  # the same reading twice says nothing about change
            self.points.clear()  # the source clock went back: earlier points are not comparable
        self.points.append((ts, value))
        while ts - self.points[0][0] > cfg.window:
            self.points.popleft()
        per_second = self.slope()
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


register("rate", RateConfig, alarm_factory(RateRule))
