"""The alarm lifecycle: one retained alarm topic (`Alarm`), and the handler that runs an alarm
rule with it and its ``.bad_input`` companion (`AlarmHandler`).

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
  and comes back through `restore`. A restored raised alarm is held: the next value in alarm
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

Re-publication (reconnect, ``cmd/rebirth``): `Alarm.retained` gives the last record again with
``replay: true``, and a replayed ``raised`` carries ``raised_seq``, the seq of the record that
raised it, once the buffer has numbered that record (`Alarm.numbered`, through
`RuleEngine.numbered`). A consumer counting raises skips records with ``replay``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from gateway.model import Record, Sample, iso_ts
from rules.base import SEVERITY_RANK, AlarmRuleConfig, Handler, RuleConfig, Severity, Verdict, numeric


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


class AlarmHandler(Handler):
    """Runs an `AlarmRule`: the lifecycle of its alarm and of its `.bad_input` companion."""

    def __init__(self, rule: AlarmRule) -> None:
        super().__init__(rule.config)
        cfg = rule.config
        self.rule = rule
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
        return out

    def tick(self, now: float, wall: float) -> list[Record]:
        return self.alarm.tick(now, wall) if self.bad_since is None else self._check_bad(now, wall)

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
        return self.bad_input.offer(verdict, now, wall)

    def _with_unit(self, verdict: Verdict) -> Verdict:
        unit = self.rule.unit_of(self.unit)
        if unit is None or "unit" in verdict.extra:
            return verdict
        return Verdict(verdict.severity, verdict.value, verdict.limit, verdict.message,
                       {**verdict.extra, "unit": unit})

    def state(self) -> dict[str, Any]:
        return {**super().state(), "alarm": self.alarm.state(),
                "bad_input": self.bad_input.state() if self.bad_input else None}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("alarm"):
            self.alarm.restore(state["alarm"])
        if state.get("bad_input") and self.bad_input is not None:
            self.bad_input.restore(state["bad_input"])


def alarm_factory(rule_class: Callable[[Any], AlarmRule]) -> Callable[[RuleConfig], Handler]:
    """The registry factory of an alarm rule type: its judge wrapped in the lifecycle."""
    return lambda config: AlarmHandler(rule_class(config))


__all__ = ["Alarm", "AlarmHandler", "AlarmRule", "alarm_factory"]
