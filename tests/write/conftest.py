"""Helpers for the write-back tests: real simulators, drivers running their sessions, a router."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from drivers.base import DriverContext
from drivers.modbus import ModbusConfig, ModbusDriver
from drivers.opcua import OpcUaConfig, OpcUaDriver
from drivers.sim.modbus import ModbusSimulator
from drivers.sim.opcua import OpcUaSimulator
from gateway.commands import CommandRouter, CommandsConfig
from gateway.health import DeviceHealth
from tests.conftest import free_port
from tests.integration.conftest import until  # noqa: F401 - the write tests' polling helper


@contextlib.asynccontextmanager
async def running(driver):
    """The driver's session running (polls and all), until the block ends."""
    emitted: list = []

    async def emit(item) -> None:
        emitted.extend(item if isinstance(item, list) else [item])

    task = asyncio.create_task(driver.run(emit), name="test.driver")
    try:
        assert await until(lambda: driver._live is not None, 10), "the driver did not connect"
        driver.emitted = emitted
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


class Audit(list):
    """The router's `store`: the audit records it hands to the buffer road."""

    def __call__(self, records) -> None:
        self.extend(records)

    def payloads(self) -> list[dict]:
        return [r.payload for r in self if r.topic == "events/commands"]


def router_for(*drivers, **commands) -> tuple[CommandRouter, Audit]:
    audit = Audit()
    cfg = CommandsConfig(**{"write": True, **commands})
    return CommandRouter(cfg, {d.config.name: d for d in drivers}, audit), audit


@pytest.fixture
async def modbus_sim():
    sim = await ModbusSimulator(unit_ids=(1,)).start_tcp("127.0.0.1", free_port())
    try:
        yield sim
    finally:
        await sim.stop()


def modbus_driver(port: int, tags: list[dict], *, name: str = "press1", **kw) -> ModbusDriver:
    cfg = ModbusConfig(name=name, driver="modbus", host="127.0.0.1", port=port, poll_interval=0.2, timeout=1.0,
                       reconnect_min=0.05, reconnect_max=0.2, tags=tags, **kw)
    return ModbusDriver(cfg, DeviceHealth(cfg.name), DriverContext())


@pytest.fixture
async def opcua_sim():
    sim = await OpcUaSimulator("127.0.0.1", free_port(), period=0.1, batch_s=3600.0).start()
    try:
        yield sim
    finally:
        await sim.stop()


OVEN_TAGS = [
    {"name": "temperature", "node": "ns=2;s=Oven.Temperature"},
    {"name": "setpoint", "node": "ns=2;s=Oven.Setpoint", "writable": True, "min": 20, "max": 250},
    {"name": "batches", "node": "ns=2;s=Oven.Batches", "writable": True, "allowed": [0]},
    {"name": "mode", "node": "ns=2;s=Oven.Mode", "writable": True},
    {"name": "state", "node": "ns=2;s=Oven.State", "writable": True},
]
OVEN_METHODS = [{"name": "start_test", "object": "ns=2;s=Oven", "method": "ns=2;s=Oven.StartTest",
                 "args": ["Int16", "Double"]}]


def opcua_driver(endpoint: str, tags=None, methods=None, **kw) -> OpcUaDriver:
    cfg = OpcUaConfig(name="oven", driver="opcua", endpoint=endpoint, mode="poll", poll_interval=0.2, timeout=2.0,
                      reconnect_min=0.05, reconnect_max=0.2, tags=tags or OVEN_TAGS,
                      methods=OVEN_METHODS if methods is None else methods, **kw)
    return OpcUaDriver(cfg, DeviceHealth(cfg.name))
