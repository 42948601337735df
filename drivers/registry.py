"""Every driver type in one static table: a new driver is one more entry here.

The driver modules import their protocol libraries only when a device connects, so listing them
all here costs a Modbus-only gateway nothing of OPC UA."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from drivers import modbus, mqtt, opcua
from drivers.base import DeviceConfig, Driver, DriverContext, DriverType
from gateway.health import DeviceHealth

REGISTRY: Mapping[str, DriverType] = MappingProxyType({m.DRIVER.name: m.DRIVER for m in (modbus, opcua, mqtt)})


def create(config: DeviceConfig, context: DriverContext) -> Driver:
    return REGISTRY[config.driver].factory(config, DeviceHealth(config.name), context)
