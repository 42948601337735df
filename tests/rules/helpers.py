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
    """A wall clock `t` and a monotonic clock that run together as time passes (`advance`, or
    setting `t` forward); `step_wall` moves the wall clock alone, like an NTP step."""

    def __init__(self, t: float = T0) -> None:
        self._t = t
        self.mono = 500.0  # unrelated to wall time, as on a real host

    @property
    def t(self) -> float:
        return self._t

    @t.setter
    def t(self, value: float) -> None:
        self.advance(value - self._t)

    def time(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> float:
        assert seconds >= 0, "time passing never goes back; use step_wall for a clock step"
        self._t += seconds
        self.mono += seconds
        return self._t

    def step_wall(self, seconds: float) -> None:
        self._t += seconds


_RULES = TypeAdapter(list[tagged_union([rt.config for rt in rules.REGISTRY.values()], "type")])


def configs(*dicts: dict[str, Any]) -> list[rules.RuleConfig]:
    """Rule configs as the core would build them from YAML `rules:`."""
    return _RULES.validate_python(list(dicts))


def original(replay: dict[str, Any]) -> dict[str, Any]:
    """A replayed payload without its replay markers: what was published the first time."""
    assert replay["replay"] is True, replay
    return {k: v for k, v in replay.items() if k not in ("replay", "raised_seq")}


class Bench:
    """One engine, its clock and everything it emitted; `restart()` simulates a daemon restart.

    Records are numbered like the buffer does (`seqs[i]` is the seq of `records[i]`), and the
    engine is told after the state was taken, as the core does."""

    def __init__(self, *rule_dicts: dict[str, Any], device_tags: dict[str, list[str]] | None = None,
                 clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.rule_dicts = rule_dicts
        self.device_tags = device_tags
        self.db: dict[str, dict] = {}  # what the core would keep in SQLite
        self.records: list[Record] = []
        self.seqs: list[int] = []
        self.engine = self._new_engine()

    def _new_engine(self) -> rules.RuleEngine:
        return rules.RuleEngine(configs(*self.rule_dicts), clock=self.clock,
                                restored=json.loads(json.dumps(self.db)),
                                device_tags=self.device_tags)

    def _keep(self, records: list[Record]) -> list[Record]:
        for record in records:
            json.dumps(record.payload, allow_nan=False)  # JSON-safe, no NaN
        seqs = list(range(len(self.records) + 1, len(self.records) + 1 + len(records)))
        self.records += records
        self.seqs += seqs
        for name, state in self.engine.take_state().items():
            if state is None:
                self.db.pop(name, None)
            else:
                self.db[name] = json.loads(json.dumps(state, allow_nan=False))
        self.engine.numbered(records, seqs)
        return records

    def seq_of(self, record: Record) -> int:
        return next(seq for r, seq in zip(self.records, self.seqs) if r is record)

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

    def restart(self, rule_dicts: tuple[dict[str, Any], ...] | None = None, *, clean: bool = True) -> None:
        """`clean`: the old engine's last state is saved first, as the core does on a stop."""
        if clean:
            self._keep([])
        if rule_dicts is not None:
            self.rule_dicts = rule_dicts
        self.engine = self._new_engine()

    def states(self, topic: str) -> list[str]:
        return [r.payload["state"] for r in self.records if r.topic == topic]

    def on(self, topic: str) -> list[Record]:
        return [r for r in self.records if r.topic == topic]


def states(records: list[Record]) -> list[str]:
    return [r.payload.get("state") or r.payload.get("result") for r in records]
