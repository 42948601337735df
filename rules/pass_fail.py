"""`pass_fail`: judge each value of a test step against its limits.

    {name: voltage_test, type: pass_fail, input: tester.voltage, low: 80, high: 90}

Every good value gives one `events/{rule}` record: `result` PASS (low <= value <= high, limits
inclusive, either may be omitted) or FAIL, with the value and the limits (with `emit: change`,
only a value that differs from the previous good one). A bad-quality or
non-numeric value is not a test result: it gives no event (no made-up verdict) and is counted
as `invalid`. Running counts (pass, fail, invalid, yield) are in `health` and survive restarts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from gateway.model import Record, Sample
from rules.base import FiniteFloat, Handler, RuleConfig, RuleType, numeric


class PassFailConfig(RuleConfig):
    type: Literal["pass_fail"]
    low: FiniteFloat | None = None
    high: FiniteFloat | None = None
    # `change`: a polled tester register repeats the last result on every poll; judge a value
    # only when it differs from the previous good one (one result per part).
    emit: Literal["every", "change"] = "every"

    @model_validator(mode="after")
    def _limits(self) -> "PassFailConfig":
        if self.low is None and self.high is None:
            raise ValueError("give 'low', 'high' or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"'low' ({self.low}) must not be above 'high' ({self.high})")
        return self


class PassFailHandler(Handler):
    config: PassFailConfig

    def __init__(self, config: PassFailConfig) -> None:
        super().__init__(config)
        self.passed = 0
        self.failed = 0
        self.invalid = 0
        self.previous: float | None = None

    def on_sample(self, s: Sample, now: float, wall: float) -> list[Record]:
        cfg = self.config
        value = numeric(s.value) if s.good else None
        if value is None:
            self.invalid += 1
            self.dirty = True
            return []
        if cfg.emit == "change" and value == self.previous:
            return []
        self.previous = value
        self.dirty = True
        if cfg.low is not None and value < cfg.low:
            result, reason = "FAIL", "below low"
        elif cfg.high is not None and value > cfg.high:
            result, reason = "FAIL", "above high"
        else:
            result, reason = "PASS", None
        if result == "PASS":
            self.passed += 1
        else:
            self.failed += 1
        payload: dict[str, Any] = {
            "rule": cfg.name, "type": "pass_fail", "input": cfg.input, "result": result,
            "value": value, "low": cfg.low, "high": cfg.high, "unit": s.unit,
        }
        if reason:
            payload["reason"] = reason
        payload["count"] = self.passed + self.failed
        return [Record(topic=f"events/{cfg.name}", payload=payload, ts=s.ts, kind="event")]

    def counts(self) -> dict[str, Any]:
        total = self.passed + self.failed
        return {"pass": self.passed, "fail": self.failed, "invalid": self.invalid,
                "yield": round(self.passed / total, 6) if total else None}

    def state(self) -> dict[str, Any]:
        return {**super().state(),
                "counts": {"pass": self.passed, "fail": self.failed, "invalid": self.invalid}}

    def restore(self, state: dict[str, Any]) -> None:
        counts = state.get("counts")
        if counts:
            self.passed, self.failed = int(counts["pass"]), int(counts["fail"])
            self.invalid = int(counts.get("invalid", 0))

    def health(self) -> dict[str, Any]:
        return self.counts()


RULE = RuleType("pass_fail", PassFailConfig, PassFailHandler, health="pass_fail")
