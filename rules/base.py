"""Rule config base and the registry of rule types.

A rule module defines a config model (a `RuleConfig` subclass whose `type` field is a Literal)
and a rule class, and calls `register()` at import. `gateway.config` builds the discriminated
union of rule configs from this registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from gateway.schema import Duration, Name, StrictModel

Severity = Literal["info", "warning", "critical"]


class RuleConfig(StrictModel):
    name: Name
    type: str
    input: str  # device.tag or analysis.feature

    def inputs(self) -> list[str]:
        return [self.input]


@dataclass(frozen=True)
class RuleType:
    name: str
    config: type[RuleConfig]
    factory: Callable[[RuleConfig], Any]


REGISTRY: dict[str, RuleType] = {}


def register(name: str, config: type[RuleConfig], factory: Callable[[RuleConfig], Any]) -> None:
    if name in REGISTRY:
        raise RuntimeError(f"rule type {name!r} registered twice")
    REGISTRY[name] = RuleType(name, config, factory)


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
