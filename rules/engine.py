"""The alarm lifecycle and the engine that feeds samples and time to every configured rule.

Lifecycle of one alarm (topic ``alarms/{rule}``, retained, last state):

* **raised once**: a condition must hold for ``for`` (continuously, judged on good values)
  before the alarm is raised; the record carries ``state: raised`` and ``since``.
* **held**: further values in alarm publish nothing. Rules apply hysteresis themselves (a
  threshold clears at ``clear``, not at the raise limit; an ISO zone must drop below its
  boundary minus ``hysteresis``), so a value wobbling around a limit does not flap.
* **severity changes** while raised are re-published as ``state: raised`` with the new
  ``severity``, the same ``since`` and ``previous_severity``. Escalation is immediate;
  de-escalation waits ``clear_for`` like a clear.
* **cleared once**: the condition must be gone for ``clear_for`` before ``state: cleared``.
* **restart**: the state of every alarm (active or not, since, the last record) is handed to
  the core by `RuleEngine.take_state` and written in the same SQLite transaction as the records,
  and comes back as ``restored``. A restored raised alarm is held: the next value in alarm
  publishes nothing, the next normal value clears it (once).

Bad input (the documented choice): **a companion alarm, never a state change of the alarm.**

* A sample that is not GOOD quality, or whose value is not a finite number, is *bad*. Bad
  samples never raise, never clear and never change the severity of ``alarms/{rule}``: its
  retained message keeps saying what was last known, so ``raised`` / ``cleared`` stay strictly
  alternating (the property the tests check).
* When a rule's input has had no good value for ``bad_input_after`` (default: the longer of the
  rule's ``for`` and 30 s), counted from the first bad sample, or from start-up when the input
  has never delivered a good value, the engine raises ``alarms/{rule}.bad_input`` (a rule name
  cannot contain a dot, so it never clashes with a configured rule). Its payload names the
  input, its last quality, when it was last good and which state the main alarm is held in. The
  first good sample clears it. ``bad_input_alarm: false`` turns it off.
* Silence after a good value is *not* bad input: OPC UA subscriptions and MQTT sensors send
  nothing while a value is steady. Drivers mark a device that stops answering with BAD samples
  (contract section 4), and the ``stale`` rule is there for silence.
* ``for`` / ``clear_for`` timers survive a short run of bad samples (a timer is completed only by
  a good value, or by a tick while the last sample is good); once ``bad_input_after`` is reached
  they start over, because the condition was not seen to hold across such a gap.

Times: ``for``, ``clear_for``, ``after`` and ``bad_input_after`` are measured on the engine's
monotonic clock (when the gateway learned a value), so neither a device clock that is off nor an
NTP step of the gateway's wall clock can shorten or stretch them. Handlers get both: ``now``
(monotonic, for every duration) and ``wall`` (for timestamps). Records carry the sample's own
timestamp when a sample caused them, the wall clock's when a tick did. Nothing monotonic is
persisted: it means nothing after a restart.

Re-publication (reconnect, ``cmd/rebirth``): `RuleEngine.retained` gives the last record of
every alarm again with ``replay: true``, and a replayed ``raised`` carries ``raised_seq``, the
seq of the record that raised it, once the buffer has numbered that record (`numbered`). A
consumer counting raises skips records with ``replay``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway import logs
from gateway.model import Clock, Record, Sample, iso_ts
from rules.base import (
    REGISTRY,
    SEVERITY_RANK,
    AlarmRuleConfig,
    RuleConfig,
    Severity,
    Verdict,
    numeric,
)

log = logs.get("rules.engine")

STATE_VERSION = 1


class Handler(Protocol):
    """What the engine needs from one configured rule (made by the rule type's factory)."""

    name: str
    dirty: bool  # its persistent state changed since the last take_state

    # `now` is monotonic (durations), `wall` epoch seconds (timestamps of records)
    def bind(self, now: float, device_tags: dict[str, list[str]]) -> None: ...
    def inputs(self) -> set[str]: ...
    def devices(self) -> set[str]: ...  # whole devices it listens to (stale on `device`)
    def on_sample(self, s: Sample, now: float, wall: float) -> list[Record]: ...
    def tick(self, now: float, wall: float) -> list[Record]: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...
    def alarms(self) -> list[Alarm]: ...
    def health(self) -> tuple[str, dict[str, Any]] | None: ...  # (section, fields)
    def summary_fields(self, device: str, now: float) -> dict[str, Any]: ...


def _direction(current: Severity | None, target: Severity | None) -> str:
    if current is None:
        return "raise"
    if target is None:
        return "clear"
    return "up" if SEVERITY_RANK[target] > SEVERITY_RANK[current] else "down"


class Alarm:
    """One retained alarm topic: raised once, held, cleared once, with on/off delays."""

    def __init__(self, name: str, *, input: str, for_: float = 0.0, clear_for: float = 0.0,
                 static: dict[str, Any] | None = None) -> None:
        self.name = name
        self.input = input
        self.for_ = for_
        self.clear_for = clear_for
        self.static = static or {}  # fields every payload of this alarm carries
        self.severity: Severity | None = None  # None: not active
        self.since: float | None = None  # ts at which the published state began
        self.last: Record | None = None
        self.raised_seq: int | None = None  # buffer seq of the record that raised it (None: not known)
        self.dirty = False
        self._pending: tuple[str, float] | None = None  # (direction, monotonic time it began)
        self._verdict: Verdict | None = None

    @property
    def active(self) -> bool:
        return self.severity is not None

    @property
    def state_name(self) -> str | None:
        return self.last.payload["state"] if self.last else None

    def offer(self, verdict: Verdict, now: float, ts: float) -> list[Record]:
        """A fresh judgement of a good value (`now` monotonic, `ts` the record's timestamp);
        returns the record of a transition, if any."""
        self._verdict = verdict
        if verdict.severity == self.severity:
            self._pending = None
            return []
        direction = _direction(self.severity, verdict.severity)
        # The delay runs from when the condition first pointed this way; a changing target
        # within the same direction (warning -> critical while waiting to raise) keeps it.
        if self._pending is None or self._pending[0] != direction:
            self._pending = (direction, now)
        return self._complete(now, ts)

    def tick(self, now: float, wall: float) -> list[Record]:
        """Completes a delayed transition; call only while the input is good."""
        return self._complete(now, wall) if self._pending else []

    def forget_pending(self) -> None:
        self._pending = None

    def _complete(self, now: float, ts: float) -> list[Record]:
        assert self._pending is not None and self._verdict is not None
        direction, began = self._pending
        delay = {"raise": self.for_, "up": 0.0}.get(direction, self.clear_for)
        if now - began < delay:
            return []
        self._pending = None
        return [self._publish(self._verdict, ts)]

    def _publish(self, verdict: Verdict, ts: float) -> Record:
        previous = self.severity
        payload: dict[str, Any] = {"rule": self.name}
        if verdict.severity is None:
            payload.update(state="cleared", severity=previous)
            self.since = ts
        else:
            payload.update(state="raised", severity=verdict.severity)
            if previous is None:
                self.since = ts
                self.raised_seq = None  # a new raise: its seq comes from the buffer (`numbered`)
            else:
                payload["previous_severity"] = previous
        self.severity = verdict.severity
        payload.update(input=self.input, value=verdict.value, limit=verdict.limit,
                       since=iso_ts(self.since), message=verdict.message)
        payload.update(self.static)
        payload.update(verdict.extra)
        self.last = Record(topic=f"alarms/{self.name}", payload=payload, ts=ts, kind="alarm",
                           retain=True)
        self.dirty = True
        return self.last

    def numbered(self, record: Record, seq: int) -> bool:
        """The buffer gave `record` its seq; True when that is this alarm's raise to remember."""
        raise_record = (record is self.last and record.payload["state"] == "raised"
                        and "previous_severity" not in record.payload)
        if raise_record:
            self.raised_seq = seq
        return raise_record

    def retained(self) -> Record | None:
        """The last record again, marked as a replay (see the module docstring)."""
        if self.last is None:
            return None
        payload = {**self.last.payload, "replay": True}
        if payload["state"] == "raised" and self.raised_seq is not None:
            payload["raised_seq"] = self.raised_seq
        return Record(topic=self.last.topic, payload=payload, ts=self.last.ts, kind="alarm", retain=True)

    def state(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "since": self.since,
            "raised_seq": self.raised_seq,
            "last": {"payload": self.last.payload, "ts": self.last.ts} if self.last else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        severity = state.get("severity")
        if severity is not None and severity not in SEVERITY_RANK:
            raise ValueError(f"unknown severity {severity!r}")
        last = state.get("last")
        record = None
        if last is not None:
            record = Record(topic=f"alarms/{self.name}", payload=dict(last["payload"]),
                            ts=float(last["ts"]), kind="alarm", retain=True)
        since = state.get("since")
        raised_seq = state.get("raised_seq")  # absent in states written before it existed
        self.severity = severity
        self.since = float(since) if since is not None else None
        self.raised_seq = int(raised_seq) if raised_seq is not None else None
        self.last = record


class AlarmRule(Protocol):
    """A rule type that judges each good value (threshold, iso10816, rate)."""

    config: AlarmRuleConfig
    default_severity: Severity

    def unit_of(self, sample_unit: str | None) -> str | None:
        """The unit of the judged value, given the input's unit."""

    def evaluate(self, value: float, ts: float, active: Severity | None) -> Verdict | None:
        """None when the value alone cannot be judged yet (e.g. a rate needs a window)."""


class AlarmHandler:
    """Runs an `AlarmRule`: the lifecycle of its alarm and of its `.bad_input` companion."""

    def __init__(self, rule: AlarmRule) -> None:
        cfg = rule.config
        self.rule = rule
        self.name = cfg.name
        self.dirty = False
        self.alarm = Alarm(cfg.name, input=cfg.input, for_=cfg.for_, clear_for=cfg.clear_for,
                           static={"type": cfg.type})
        self.bad_input: Alarm | None = None
        if cfg.bad_input_alarm:
            self.bad_input = Alarm(f"{cfg.name}.bad_input", input=cfg.input,
                                   static={"type": "bad_input", "parent": cfg.name})
        self.bad_after = cfg.bad_input_delay
        self.bad_since: float | None = None  # monotonic time since which no good value
        self.bad_quality = "missing"
        self.last_good_ts: float | None = None
        self.unit: str | None = None

    def bind(self, now: float, device_tags: dict[str, list[str]]) -> None:
        # Never having had a good value counts as bad from start-up.
        self.bad_since = now

    def inputs(self) -> set[str]:
        return set(self.rule.config.inputs())

    def devices(self) -> set[str]:
        return set()

    def alarms(self) -> list[Alarm]:
        return [a for a in (self.alarm, self.bad_input) if a is not None]

    def on_sample(self, s: Sample, now: float, wall: float) -> list[Record]:
        value = numeric(s.value) if s.good else None
        if value is None:
            if self.bad_since is None:
                self.bad_since = now
            self.bad_quality = "invalid" if s.good else str(s.quality)
            return self._check_bad(now, wall)
        out: list[Record] = []
        self.bad_since = None
        self.last_good_ts = s.ts
        self.unit = s.unit or self.unit
        if self.bad_input is not None and self.bad_input.active:
            out += self.bad_input.offer(
                Verdict(None, None, self.bad_after, f"{self.alarm.input} delivers good values again"),
                now, s.ts)
        verdict = self.rule.evaluate(value, s.ts, self.alarm.severity)
        if verdict is not None:
            out += self.alarm.offer(self._with_unit(verdict), now, s.ts)
        self._sync_dirty()
        return out

    def tick(self, now: float, wall: float) -> list[Record]:
        out = self.alarm.tick(now, wall) if self.bad_since is None else self._check_bad(now, wall)
        self._sync_dirty()
        return out

    def _check_bad(self, now: float, wall: float) -> list[Record]:
        assert self.bad_since is not None
        if now - self.bad_since < self.bad_after:
            return []
        self.alarm.forget_pending()
        if self.bad_input is None or self.bad_input.active:
            return []
        held = self.alarm.state_name or "never published"
        last_good = iso_ts(self.last_good_ts) if self.last_good_ts is not None else None
        since_what = f"since {last_good}" if last_good else "since start-up"
        verdict = Verdict(
            self.rule.default_severity, None, self.bad_after,
            f"no good value of {self.alarm.input} {since_what} ({self.bad_quality}); "
            f"{self.name} is held {held}",
            {"quality": self.bad_quality, "last_good": last_good, "held_state": held},
        )
        out = self.bad_input.offer(verdict, now, wall)
        self._sync_dirty()
        return out

    def _with_unit(self, verdict: Verdict) -> Verdict:
        unit = self.rule.unit_of(self.unit)
        if unit is None or "unit" in verdict.extra:
            return verdict
        return Verdict(verdict.severity, verdict.value, verdict.limit, verdict.message,
                       {**verdict.extra, "unit": unit})

    def _sync_dirty(self) -> None:
        for alarm in self.alarms():
            if alarm.dirty:
                alarm.dirty = False
                self.dirty = True

    def state(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "type": self.rule.config.type,
            "alarm": self.alarm.state(),
            "bad_input": self.bad_input.state() if self.bad_input else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("alarm"):
            self.alarm.restore(state["alarm"])
        if state.get("bad_input") and self.bad_input is not None:
            self.bad_input.restore(state["bad_input"])

    def health(self) -> tuple[str, dict[str, Any]] | None:
        return None

    def summary_fields(self, device: str, now: float) -> dict[str, Any]:
        return {}


def alarm_factory(rule_class: Callable[[Any], AlarmRule]) -> Callable[[RuleConfig], Handler]:
    """The registry factory of an alarm rule type: its judge wrapped in the lifecycle."""
    return lambda config: AlarmHandler(rule_class(config))


class RuleEngine:
    """Every configured rule: routes samples to them, runs their timers, keeps their state.

    Single-threaded by design: the core calls it from one task. See the module docstring for
    the lifecycle and for what happens on bad input.
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

    def on_sample(self, s: Sample) -> list[Record]:
        """Evaluates the rules whose input is `s.source` (or whose device is `s`'s)."""
        handlers = self._by_input.get(s.source, [])
        by_device = self._by_device.get(s.source.split(".", 1)[0])
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
            if handler.dirty:
                handler.dirty = False
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

    def summary_fields(self, device: str) -> dict[str, Any]:
        """Extra fields for ``data/{device}`` over the interval since the last call."""
        now = self._clock.monotonic()
        fields: dict[str, Any] = {}
        for handler in self._handlers:
            for key, value in handler.summary_fields(device, now).items():
                fields.setdefault(key, {}).update(value)
        return fields

    def health(self) -> dict[str, Any]:
        active = [a for h in self._handlers for a in h.alarms() if a.active]
        by_severity = {s: sum(1 for a in active if a.severity == s) for s in SEVERITY_RANK}
        out: dict[str, Any] = {"alarms_active": len(active), "active": sorted(a.name for a in active),
                               "by_severity": by_severity, "pass_fail": {}}
        for handler in self._handlers:
            section = handler.health()
            if section is not None:
                key, fields = section
                out.setdefault(key, {})[handler.name] = fields
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


__all__ = ["Alarm", "AlarmHandler", "AlarmRule", "Handler", "RuleEngine", "alarm_factory"]
