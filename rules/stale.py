"""`stale`: no good value of an input, or of any tag of a device, for `after`.

    {name: press1_silent, type: stale, input: press1.temperature, after: 30s, severity: critical}
    {name: press1_down, type: stale, device: press1, after: 30s}

Counted on the monotonic clock from when the last good value arrived (an NTP step of the wall
clock neither fires nor delays it), and from start-up, so a device that has not answered once
since the gateway started is stale too. A fresh good value clears it (after `clear_for`,
default at once). Bad-quality values do not count as fresh: a device that answers with errors
is as silent as one that does not answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.model import Record, Sample, iso_ts, source_of
from gateway.schema import Duration, Name
from rules.alarm import Alarm
from rules.base import Handler, RuleConfig, RuleType, Severity, Verdict


class StaleConfig(RuleConfig):
    type: Literal["stale"]
    input: str | None = None  # type: ignore[assignment]  # one of input / device
    device: Name | None = None
    after: Duration = Field(gt=0)
    clear_for: Duration = 0.0
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _input_or_device(self) -> "StaleConfig":
        if (self.input is None) == (self.device is None):
            raise ValueError("give exactly one of 'input' (device.tag) or 'device'")
        return self

    def inputs(self) -> list[str]:
        # A whole device is named bare (no dot): the core's input check accepts a device name.
        return [self.input or self.device]  # type: ignore[list-item]

    @property
    def watched(self) -> str:
        return self.input or self.device  # type: ignore[return-value]


class StaleHandler(Handler):
    config: StaleConfig

    def __init__(self, config: StaleConfig) -> None:
        super().__init__(config)
        self.alarm = Alarm(config.name, input=config.watched, clear_for=config.clear_for,
                           static={"type": "stale"})
        self.started = 0.0  # monotonic
        self.last_good: float | None = None  # monotonic time the last good value arrived
        self.last_good_ts: float | None = None  # the sample's own time, for the payload
        self.tags: list[str] = []

    def bind(self, now: float, device_tags: dict[str, list[str]]) -> None:
        self.started = now
        if self.config.device:
            self.tags = list(device_tags.get(self.config.device, []))

    def inputs(self) -> set[str]:
        if self.config.input:
            return {self.config.input}
        return {source_of(self.config.device, tag) for tag in self.tags}

    def devices(self) -> set[str]:
        return {self.config.device} if self.config.device else set()

    def alarms(self) -> list[Alarm]:
        return [self.alarm]

    def on_sample(self, s: Sample, now: float, wall: float) -> list[Record]:
        if not s.good or s.value is None or s.value != s.value:  # NaN is not a fresh value
            return []
        gap = now - (self.last_good if self.last_good is not None else self.started)
        self.last_good, self.last_good_ts = now, s.ts
        verdict = Verdict(None, round(gap, 3), self.config.after,
                          f"{s.source} delivers good values again after {gap:.1f} s",
                          self._extra())
        return self.alarm.offer(verdict, now, s.ts)

    def tick(self, now: float, wall: float) -> list[Record]:
        reference = self.last_good if self.last_good is not None else self.started
        age = now - reference
        if age < self.config.after:
            return self.alarm.tick(now, wall)
        what = f"device {self.config.device}" if self.config.device else self.config.input
        if self.last_good is None:
            message = f"no good value of {what} since start-up ({age:.1f} s)"
        else:
            message = f"no good value of {what} for {age:.1f} s"
        verdict = Verdict(self.config.severity, round(age, 3), self.config.after, message,
                          self._extra())
        return self.alarm.offer(verdict, now, wall)

    def _extra(self) -> dict[str, Any]:
        return {"unit": "s",
                "last_good": iso_ts(self.last_good_ts) if self.last_good_ts is not None else None}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "alarm": self.alarm.state()}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("alarm"):
            self.alarm.restore(state["alarm"])


RULE = RuleType("stale", StaleConfig, StaleHandler)
