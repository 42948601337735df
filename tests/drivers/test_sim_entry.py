"""The simulator entry point that the CLI (`edge-gateway simulate`) and the demo call."""

from __future__ import annotations

import asyncio

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.sim import run_simulator
from tests.conftest import free_port


async def test_run_simulator_modbus_serves_until_cancelled():
    port, ready = free_port(), asyncio.Event()
    task = asyncio.create_task(run_simulator("modbus", port=port, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0)
    await client.connect()
    response = await client.read_holding_registers(12, count=4, device_id=1)
    client.close()
    assert not response.isError()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_simulator_vibration_publishes(mosquitto, collector_factory):
    collector = collector_factory(mosquitto, "sensors/#")
    sent = await asyncio.wait_for(run_simulator("vibration", host=mosquitto.host, port=mosquitto.port, block=1200,
                                                blocks=2, qos=1), 10)
    assert sent == 2
    assert collector.wait_for(lambda c: len(c.messages) >= 4, timeout=5)
    sizes = {len(p) for t, p, _ in collector.messages if t == "sensors/motor1/accel"}
    assert sizes == {1200 * 4}


async def test_unknown_kind():
    with pytest.raises(ValueError):
        await run_simulator("profibus")
