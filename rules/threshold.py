"""`threshold`: a value above (or below) a limit, with a clear level for hysteresis.

    {name: spindle_overtemp, type: threshold, input: press1.temperature,
     above: 80, clear: 75, for: 10s, clear_for: 5s, severity: warning}

Raised when the value is strictly beyond `above` / `below`; held until it is back at or inside
`clear` (default: the limit itself, i.e. no hysteresis).
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from rules.base import AlarmRuleConfig, FiniteFloat, RuleType, Severity, Verdict, fmt
from rules.alarm import alarm_factory


class ThresholdConfig(AlarmRuleConfig):
    type: Literal["threshold"]
    above: FiniteFloat | None = None
    below: FiniteFloat | None = None
    clear: FiniteFloat | None = None
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _one_side(self) -> "ThresholdConfig":
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' or 'below'")
        if self.clear is not None:
            if self.above is not None and self.clear > self.above:
                raise ValueError(f"'clear' ({self.clear}) must be at or below 'above' ({self.above})")
            if self.below is not None and self.clear < self.below:
                raise ValueError(f"'clear' ({self.clear}) must be at or above 'below' ({self.below})")
        return self


class ThresholdRule:
    def __init__(self, config: ThresholdConfig) -> None:
        self.config = config
        self.default_severity: Severity = config.severity
        self.rising = config.above is not None
        self.limit: float = config.above if self.rising else config.below  # type: ignore[assignment]
        self.clear: float = config.clear if config.clear is not None else self.limit

    def unit_of(self, sample_unit: str | None) -> str | None:
        return sample_unit

    def evaluate(self, value: float, ts: float, active: Severity | None) -> Verdict:
        cfg = self.config
        word = "above" if self.rising else "below"
        if active is None:
            beyond = value > self.limit if self.rising else value < self.limit
            if beyond:
                return Verdict(cfg.severity, value, self.limit,
                               f"{cfg.input} {fmt(value)} {word} {fmt(self.limit)}")
            return Verdict(None, value, self.limit, f"{cfg.input} {fmt(value)} within limit")
        held = value > self.clear if self.rising else value < self.clear
        if held:
            return Verdict(cfg.severity, value, self.limit,
                           f"{cfg.input} {fmt(value)} still {word} clear level {fmt(self.clear)}")
        back = "at or below" if self.rising else "at or above"
        return Verdict(None, value, self.clear,
                       f"{cfg.input} {fmt(value)} back {back} {fmt(self.clear)}")


RULE = RuleType("threshold", ThresholdConfig, alarm_factory(ThresholdRule))
