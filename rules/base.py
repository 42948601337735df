"""Rule config base, handler base and `RuleType`, the description of one rule type.

A rule module defines a config model (a `RuleConfig` subclass whose `type` field is a Literal)
and a handler (a `Handler` subclass, or an alarm judge wrapped by `rules.alarm.alarm_factory`),
and ends with `RULE = RuleType(...)`. `rules/registry.py` lists every module's RULE in one
static table, from which `gateway.config` builds the discriminated union of rule configs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import ConfigDict, Field

from gateway.model import Record, Sample
from gateway.schema import Duration, Name, StrictModel

if TYPE_CHECKING:
    from rules.alarm import Alarm

Severity = Literal["info", "warning", "critical"]


class RuleConfig(StrictModel):
    name: Name
    type: str
    input: str  # device.tag or analysis.feature

    def inputs(self) -> list[str]:
        return [self.input]


STATE_VERSION = 1  # of the persisted state of every rule


class Handler(ABC):
    """One configured rule as the engine runs it, made by its rule type's factory.

    `now` is the engine's monotonic time (for every duration), `wall` epoch seconds (for the
    timestamps of records). The defaults are those of a rule that listens to its config's
    inputs, owns no alarm, has no timer, keeps only its type as state, shows nothing in health
    and adds nothing to data summaries: a rule type overrides what it does.
    """

    def __init__(self, config: RuleConfig) -> None:
        self.config = config
        self.name = config.name
        self.dirty = False  # its own persistent state changed since the last take_dirty

    def bind(self, now: float, device_tags: dict[str, list[str]]) -> None:
        """Once, when the engine starts: the start time and the tags of every device."""

    def inputs(self) -> set[str]:
        return set(self.config.inputs())

    def devices(self) -> set[str]:
        """Whole devices it listens to (a `stale` rule on `device`)."""
        return set()

    def alarms(self) -> list[Alarm]:
        return []

    @abstractmethod
    def on_sample(self, s: Sample, now: float, wall: float) -> list[Record]: ...

    def tick(self, now: float, wall: float) -> list[Record]:
        return []

    def state(self) -> dict[str, Any]:
        """Its persistent state: JSON-safe, written with the records (subclasses add to it)."""
        return {"v": STATE_VERSION, "type": self.config.type}

    def restore(self, state: dict[str, Any]) -> None:
        """Takes back what `state()` returned before a restart."""

    def take_dirty(self) -> bool:
        """True once after its persistent state changed: its own, or one of its alarms'."""
        changed = self.dirty
        for alarm in self.alarms():
            changed |= alarm.dirty
            alarm.dirty = False
        self.dirty = False
        return changed

    def health(self) -> dict[str, Any] | None:
        """Its fields in the rule type's health section (see `RuleType.health`), None for none."""
        return None

    def take_summary_fields(self, device: str, now: float) -> dict[str, Any]:
        """Fields for ``data/{device}`` over the interval since the last call; the interval's
        counters are reset."""
        return {}


@dataclass(frozen=True)
class RuleType:
    name: str
    config: type[RuleConfig]
    factory: Callable[[RuleConfig], Handler]
    health: str | None = None  # key of its section in the engine's health, listed even when empty




# --- Shared by the rule modules -------------------------------------------------------------

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}

# How long an alarm rule's input may be bad (or absent since start) before its companion
# `<rule>.bad_input` alarm is raised, unless the rule's `for` is longer or `bad_input_after` says
# otherwise. Long enough that a slow poll or an MQTT sensor's first message does not trip it.
DEFAULT_BAD_INPUT_AFTER = 30.0


class AlarmRuleConfig(RuleConfig):
    """Keys common to the rules whose outcome is an alarm evaluated on each input value."""

    # `for` is a Python keyword: the YAML key is the alias; extra="forbid" still applies.
    model_config = ConfigDict(populate_by_name=True)

    for_: Duration = Field(0.0, alias="for")  # condition must hold this long before raising
    clear_for: Duration = 0.0  # condition must be gone this long before clearing
    bad_input_after: Duration | None = None  # default: max(for, DEFAULT_BAD_INPUT_AFTER)
    bad_input_alarm: bool = True  # raise `<rule>.bad_input` when the input is bad that long

    @property
    def bad_input_delay(self) -> float:
        if self.bad_input_after is not None:
            return self.bad_input_after
        return max(self.for_, DEFAULT_BAD_INPUT_AFTER)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an alarm rule makes of one good value, given the alarm's current severity.

    `severity` None means "normal". `limit` is the level this value is judged against (the raise
    limit when raising, the clear level when clearing), `extra` goes into the payload as is.
    """

    severity: Severity | None
    value: float | None
    limit: float | None
    message: str
    extra: dict[str, Any] = field(default_factory=dict)


def numeric(value: Any) -> float | None:
    """A sample value usable by a numeric rule, or None (strings, None, NaN and inf are not)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        as_float = float(value)
        return as_float if math.isfinite(as_float) else None
    return None


def fmt(value: float | None) -> str:
    """Compact number for messages: 4 significant digits, no exponent for plant-sized values."""
    if value is None:
        return "?"
    return f"{value:.4g}"
