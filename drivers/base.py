"""The driver protocol and the registry of driver types.

A driver module defines a config model (a `DeviceConfig` subclass whose `driver` field is a
Literal) and a driver class, and calls `register()` at import. `gateway.config` builds the
discriminated union of device configs from this registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.health import DeviceHealth
from gateway.model import Sample, Waveform
from gateway.schema import Duration, Name, StrictModel

# How a driver hands over what it read. Awaiting it applies back-pressure (bounded queue).
Emit = Callable[[Sample | Waveform], Awaitable[None]]


class DeviceConfig(StrictModel):
    name: Name
    driver: str
    enabled: bool = True
    timeout: Duration = 1.0
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0

    def tag_names(self) -> list[str]:
        """The tag names this device produces (for check-config and input validation)."""
        return [t.name for t in getattr(self, "tags", [])]

    def tag_units(self) -> dict[str, str | None]:
        return {t.name: getattr(t, "unit", None) for t in getattr(self, "tags", [])}

    def waveform_tags(self) -> set[str]:
        """Tags that produce Waveform blocks rather than scalar Samples."""
        return set()


class Driver(Protocol):
    config: DeviceConfig
    health: DeviceHealth

    async def run(self, emit: Emit) -> None:
        """Connect, read, emit; reconnect with back-off on failure; return only when cancelled."""


@dataclass(frozen=True)
class DriverType:
    name: str
    config: type[DeviceConfig]
    factory: Callable[[DeviceConfig, DeviceHealth], Driver]


REGISTRY: dict[str, DriverType] = {}


def register(name: str, config: type[DeviceConfig], factory: Callable[[DeviceConfig, DeviceHealth], Driver]) -> None:
    if name in REGISTRY:
        raise RuntimeError(f"driver {name!r} registered twice")
    REGISTRY[name] = DriverType(name, config, factory)


def create(config: DeviceConfig) -> Driver:
    return REGISTRY[config.driver].factory(config, DeviceHealth(config.name))
