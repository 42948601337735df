"""`downtime`: when a machine stops and when it runs again, and its availability.

    {name: press1_downtime, type: downtime, input: press1.running}
    {name: line_state, type: downtime, input: plc.state, running: [2, 3]}       # state codes
    {name: oven_mode, type: downtime, input: oven.mode, stopped: ["IDLE", "FAULT"]}

What counts as running: by default a true / non-zero value; `running:` lists the values that
mean running, or `stopped:` the values that mean stopped (anything else runs).

Events on `events/{rule}`: `state` stopped or running (the state just entered), `value`, and
`duration_s`, the length of the state that just ended (`previous`): on `running` it is the
downtime. `exact` is false when that state began before the gateway saw it (first value after
start-up without a restored state, or a restart in between) or when the input was bad during
it. The first value ever seen gives no event (nothing is known to have changed).

Availability (`data/{device}.availability.{tag}`) is running time / (running + stopped time)
over the summary interval; time with a bad or missing input is left out, and an interval
without any known state gives null rather than a made-up number.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from gateway.model import Record, Sample, Scalar, iso_ts, split_source
from rules.base import Handler, RuleConfig, RuleType


class DowntimeConfig(RuleConfig):
    type: Literal["downtime"]
    running: list[Scalar] | None = None
    stopped: list[Scalar] | None = None

    @model_validator(mode="after")
    def _one_list(self) -> "DowntimeConfig":
        if self.running is not None and self.stopped is not None:
            raise ValueError("give 'running' or 'stopped' values, not both")
        return self


class DowntimeHandler(Handler):
    config: DowntimeConfig

    def __init__(self, config: DowntimeConfig) -> None:
        super().__init__(config)
        self.device, self.tag = split_source(config.input)
        self.known: bool | None = None  # last good state: True running, False stopped
        self.since: float | None = None  # sample ts at which `known` began
        self.exact = False  # `since` is the real start of the state, no bad gap since
        self.current: bool | None = None  # None while the input is bad or not yet seen
        self.segment_start = 0.0  # monotonic time of the last availability bookkeeping
        self.running_s = 0.0
        self.stopped_s = 0.0

    def bind(self, now: float, device_tags: dict[str, list[str]]) -> None:
        self.segment_start = now

    def classify(self, value: Scalar) -> bool | None:
        if value is None or (isinstance(value, float) and value != value):
            return None
        if self.config.running is not None:
            return value in self.config.running  # 1 matches 1.0 and True, not "1"
        if self.config.stopped is not None:
            return value not in self.config.stopped
        if isinstance(value, str):
            return None  # a state text needs `running:` or `stopped:` to mean anything
        return bool(value)

    def _account(self, now: float) -> None:
        elapsed = max(0.0, now - self.segment_start)
        if self.current is True:
            self.running_s += elapsed
        elif self.current is False:
            self.stopped_s += elapsed
        self.segment_start = now

    def on_sample(self, s: Sample, now: float, wall: float) -> list[Record]:
        state = self.classify(s.value) if s.good else None
        self._account(now)
        self.current = state
        if state is None:
            self.exact = False
            return []
        if self.known is None:
            self.known, self.since, self.exact = state, s.ts, False
            self.dirty = True
            return []
        if state == self.known:
            return []
        assert self.since is not None
        payload: dict[str, Any] = {
            "rule": self.name, "type": "downtime", "input": self.config.input,
            "state": "running" if state else "stopped", "value": s.value,
            "previous": "running" if self.known else "stopped",
            "previous_since": iso_ts(self.since),
            "duration_s": round(max(0.0, s.ts - self.since), 3),
            "exact": self.exact,
        }
        self.known, self.since, self.exact = state, s.ts, True
        self.dirty = True
        return [Record(topic=f"events/{self.name}", payload=payload, ts=s.ts, kind="event")]

    def state(self) -> dict[str, Any]:
        return {**super().state(), "downtime": {"running": self.known, "since": self.since}}

    def restore(self, state: dict[str, Any]) -> None:
        part = state.get("downtime")
        if part and part.get("running") is not None:
            self.known = bool(part["running"])
            self.since = float(part["since"])
            self.exact = False  # the gateway was not watching while it was down

    def health(self) -> dict[str, Any]:
        state = "unknown" if self.current is None else "running" if self.current else "stopped"
        return {"state": state, "since": iso_ts(self.since) if self.since is not None else None}

    def take_summary_fields(self, device: str, now: float) -> dict[str, Any]:
        if device != self.device:
            return {}
        self._account(now)
        known = self.running_s + self.stopped_s
        availability = round(self.running_s / known, 6) if known > 0 else None
        self.running_s = self.stopped_s = 0.0
        return {"availability": {self.tag: availability}}


RULE = RuleType("downtime", DowntimeConfig, DowntimeHandler, health="downtime")
