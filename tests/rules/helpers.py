"""Test helpers: a fake clock, config parsing through the registry union, record filters."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

import rules
from gateway.model import Quality, Record, Sample
from gateway.schema import tagged_union

T0 = 1_800_000_000.0  # a fixed epoch so that `since` strings are stable


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


_RULES = TypeAdapter(list[tagged_union([rt.config for rt in rules.REGISTRY.values()], "type")])


def configs(*dicts: dict[str, Any]) -> list[rules.RuleConfig]:
    """Rule configs as the core would build them from YAML `rules:`."""
    return _RULES.validate_python(list(dicts))


class Bench:
    """One engine, its clock and everything it emitted; `restart()` simulates a daemon restart."""

    def __init__(self, *rule_dicts: dict[str, Any], device_tags: dict[str, list[str]] | None = None,
                 clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.rule_dicts = rule_dicts
        self.device_tags = device_tags
        self.db: dict[str, dict] = {}  # what the core would keep in SQLite
        self.records: list[Record] = []
        self.engine = self._new_engine()

    def _new_engine(self) -> rules.RuleEngine:
        return rules.RuleEngine(configs(*self.rule_dicts), clock=self.clock,
                                restored=json.loads(json.dumps(self.db)),
                                device_tags=self.device_tags)

    def _keep(self, records: list[Record]) -> list[Record]:
        for record in records:
            json.dumps(record.payload, allow_nan=False)  # JSON-safe, no NaN
        self.records += records
        for name, state in self.engine.take_state().items():
            if state is None:
                self.db.pop(name, None)
            else:
                self.db[name] = json.loads(json.dumps(state, allow_nan=False))
        return records

    def sample(self, source: str, value: Any, quality: Quality = Quality.GOOD,
               unit: str | None = None, ts: float | None = None) -> list[Record]:
        s = Sample(source, value, self.clock.t if ts is None else ts, quality, unit)
        return self._keep(self.engine.on_sample(s))

    def tick(self) -> list[Record]:
        return self._keep(self.engine.tick())

    def run(self, seconds: float, step: float = 0.5) -> list[Record]:
        """Lets time pass with the core's 0.5 s ticks."""
        out: list[Record] = []
        end = self.clock.t + seconds
        while self.clock.t + step <= end + 1e-9:
            self.clock.advance(step)
            out += self.tick()
        return out

    def restart(self, rule_dicts: tuple[dict[str, Any], ...] | None = None) -> None:
        if rule_dicts is not None:
            self.rule_dicts = rule_dicts
        self.engine = self._new_engine()

    def states(self, topic: str) -> list[str]:
        return [r.payload["state"] for r in self.records if r.topic == topic]

    def on(self, topic: str) -> list[Record]:
        return [r for r in self.records if r.topic == topic]


def states(records: list[Record]) -> list[str]:
    return [r.payload.get("state") or r.payload.get("result") for r in records]
