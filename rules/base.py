"""Rule config base and the registry of rule types.

A rule module defines a config model (a `RuleConfig` subclass whose `type` field is a Literal)
and a rule class, and calls `register()` at import. `gateway.config` builds the discriminated
union of rule configs from this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.schema import Name, StrictModel

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
