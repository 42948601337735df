"""The engine that routes samples and time to every configured rule and keeps their state.

Each rule is a `rules.base.Handler` made by its rule type's factory; the alarm lifecycle is in
`rules/alarm.py`. The engine reads the clock once per call and hands every handler both times:
``now`` (monotonic, for every duration) and ``wall`` (for timestamps of records).

* **routing**: a sample goes to the rules whose input is its source, and to those that listen
  to its whole device (``stale`` on ``device``).
* **state**: `take_state` returns the persistent state of every rule that changed (the core
  writes it in the same SQLite transaction as the records) and comes back as ``restored``. A
  rule gone from the config has its alarms cleared on the first tick, then its state deleted.
* **re-publication** (reconnect, ``cmd/rebirth``): `retained` gives the last record of every
  alarm, marked as a replay; `numbered` tells each alarm the buffer seq of its raise (the
  markers are described in `rules/alarm.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway import logs
from gateway.model import Clock, Record, Sample, iso_ts, split_source
from rules.alarm import Alarm
from rules.base import SEVERITY_RANK, Handler, RuleConfig
from rules.registry import REGISTRY

log = logs.get("rules.engine")


class RuleEngine:
    """Every configured rule: routes samples to them, runs their timers, keeps their state.

    Single-threaded by design: the core calls it from one task. See `rules/alarm.py` for the
    alarm lifecycle and for what happens on bad input.
    """

    def __init__(self, rules: list[RuleConfig], *, clock: Clock = time,
                 restored: dict[str, dict] | None = None,
                 device_tags: dict[str, list[str]] | None = None) -> None:
        self._clock = clock
        now = clock.monotonic()
        self._handlers: list[Handler] = []
        names: set[str] = set()
        for config in rules:
            if config.name in names:
                raise ValueError(f"rule name {config.name!r} is used twice")
            names.add(config.name)
            handler = REGISTRY[config.type].factory(config)
            handler.bind(now, device_tags or {})
            self._handlers.append(handler)
        self._by_name = {h.name: h for h in self._handlers}
        self._by_topic = {f"alarms/{a.name}": (a, h) for h in self._handlers for a in h.alarms()}
        self._by_input: dict[str, list[Handler]] = {}
        self._by_device: dict[str, list[Handler]] = {}
        for handler in self._handlers:
            for source in handler.inputs():
                self._by_input.setdefault(source, []).append(handler)
            for device in handler.devices():
                self._by_device.setdefault(device, []).append(handler)

        self._deleted: set[str] = set()
        # Alarms gone from the config, to settle on the first tick, with the handler (if any)
        # whose persisted state must then be rewritten without them.
        self._removed: list[tuple[Alarm, Handler | None]] = []
        for name, state in (restored or {}).items():
            handler = self._by_name.get(name)
            if handler is None:
                self._removed += [(a, None) for a in _orphans(name, state, keep=set())]
                self._deleted.add(name)
                continue
            try:
                handler.restore(state)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # A state we cannot read must not stop the gateway; the rule starts fresh.
                log.warning("rules.restore_failed", rule=name, error=str(exc))
            # A rule whose new config no longer has one of its old alarms (companion turned
            # off, type changed) must not leave that alarm raised on the broker.
            kept = {a.name for a in handler.alarms()}
            self._removed += [(a, handler) for a in _orphans(name, state, keep=kept)]

    # --- what the core calls ---------------------------------------------------------------

    def on_samples(self, samples: list[Sample], on_error: Callable[[Sample], None] | None = None) -> list[Record]:
        """`on_sample` for each, in order; a sample no rule reads costs one or two dict lookups.
        A sample that fails goes to `on_error` (when given; else it raises) and the rest go on."""
        by_input, by_device = self._by_input, self._by_device
        if not by_input and not by_device:
            return []
        out: list[Record] = []
        for s in samples:
            if s.source in by_input or (by_device and split_source(s.source)[0] in by_device):
                try:
                    out += self.on_sample(s)
                except Exception:
                    if on_error is None:
                        raise
                    on_error(s)
        return out

    def on_sample(self, s: Sample) -> list[Record]:
        """Evaluates the rules whose input is `s.source` (or whose device is `s`'s)."""
        handlers = self._by_input.get(s.source, [])
        by_device = self._by_device.get(split_source(s.source)[0])
        if by_device:
            handlers = [*handlers, *(h for h in by_device if h not in handlers)]
        if not handlers:
            return []
        now, wall = self._clock.monotonic(), self._clock.time()
        out: list[Record] = []
        for handler in handlers:
            out += handler.on_sample(s, now, wall)
        return out

    def tick(self) -> list[Record]:
        """Time-driven transitions: `for` / `clear_for` completion, stale, bad input."""
        now, wall = self._clock.monotonic(), self._clock.time()
        out: list[Record] = []
        for alarm, owner in self._removed:
            out.append(_settle_removed(alarm, wall))
            if owner is not None:
                owner.dirty = True
        self._removed = []
        for handler in self._handlers:
            out += handler.tick(now, wall)
        return out

    def take_state(self) -> dict[str, dict | None]:
        """Persistent states changed since the last call: rule name -> state (None: delete)."""
        changed: dict[str, dict | None] = {}
        for handler in self._handlers:
            if handler.take_dirty():
                changed[handler.name] = handler.state()
        # Deletions wait until removed rules' alarms have been settled by a tick, so that
        # a crash in between cannot lose the final `cleared`.
        if not self._removed:
            for name in self._deleted:
                changed[name] = None
            self._deleted = set()
        return changed

    def numbered(self, records: list[Record], seqs: list[int]) -> None:
        """The buffer stored `records` under `seqs`: remember the seq of each raise, for the
        `raised_seq` of its replays (persisted with the next `take_state`)."""
        for record, seq in zip(records, seqs):
            if record.kind != "alarm":
                continue
            owner = self._by_topic.get(record.topic)
            if owner is not None and owner[0].numbered(record, seq):
                owner[1].dirty = True

    def retained(self) -> list[Record]:
        """The last record of every alarm that has published, marked `replay`: for rebirth and
        reconnects."""
        out = []
        for handler in self._handlers:
            for alarm in handler.alarms():
                record = alarm.retained()
                if record is not None:
                    out.append(record)
        return out

    def take_summary_fields(self, device: str) -> dict[str, Any]:
        """Extra fields for ``data/{device}`` over the interval since the last call, which
        starts the next interval."""
        now = self._clock.monotonic()
        fields: dict[str, Any] = {}
        for handler in self._handlers:
            for key, value in handler.take_summary_fields(device, now).items():
                fields.setdefault(key, {}).update(value)
        return fields

    def health(self) -> dict[str, Any]:
        active = [a for h in self._handlers for a in h.alarms() if a.active]
        by_severity = {s: sum(1 for a in active if a.severity == s) for s in SEVERITY_RANK}
        out: dict[str, Any] = {"alarms_active": len(active), "active": sorted(a.name for a in active),
                               "by_severity": by_severity}
        # Every rule type with a health section has it, empty when no rule of that type is set.
        out.update({t.health: {} for t in REGISTRY.values() if t.health is not None})
        for handler in self._handlers:
            fields = handler.health()
            if fields is not None:
                out[REGISTRY[handler.config.type].health][handler.name] = fields
        return out

    def inputs(self) -> set[str]:
        out: set[str] = set()
        for handler in self._handlers:
            out |= handler.inputs()
        return out

    def rule_names(self) -> list[str]:
        return [h.name for h in self._handlers]


def _orphans(name: str, state: dict[str, Any], keep: set[str]) -> list[Alarm]:
    """The alarms in a restored state, not among `keep`, that are still active upstream."""
    out = []
    for key, alarm_name in (("alarm", name), ("bad_input", f"{name}.bad_input")):
        part = state.get(key) if isinstance(state, dict) else None
        if not part or alarm_name in keep:
            continue
        alarm = Alarm(alarm_name, input="")
        try:
            alarm.restore(part)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if alarm.active and alarm.last is not None:
            out.append(alarm)
    return out


def _settle_removed(alarm: Alarm, wall: float) -> Record:
    """A retained `raised` of a deleted rule would stay on the broker forever: clear it."""
    assert alarm.last is not None
    payload = dict(alarm.last.payload)
    payload.update(state="cleared", since=iso_ts(wall), value=None,
                   message=f"rule {payload.get('parent', alarm.name)} removed from the configuration")
    payload.pop("previous_severity", None)
    return Record(topic=f"alarms/{alarm.name}", payload=payload, ts=wall, kind="alarm", retain=True)


__all__ = ["RuleEngine"]
