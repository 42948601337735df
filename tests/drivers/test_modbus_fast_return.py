"""Fast return of the Modbus TCP driver: polling again within 1 s of a nearby device's restart,
however long it was away. pymodbus reports a failed connect only as False, so the driver tells a
refusal (the device restarting) from a timeout with one plain TCP connect of its own."""

from __future__ import annotations

import asyncio
import time

import pytest

from drivers.modbus import ModbusConfig, ModbusDriver, TcpLink
from drivers.sim.modbus import ModbusSimulator
from gateway.health import DeviceHealth
from gateway.model import Quality
from tests.conftest import free_port

OUTAGE = 6.5  # reconnect_min 2 s: the plain back-off has no try between 6 s and 8 s after the loss


def config(port: int, host: str = "127.0.0.1", **kw) -> ModbusConfig:
    return ModbusConfig(name="press1", driver="modbus", host=host, port=port, unit_id=1, poll_interval=0.05,
                        timeout=0.5, tags=[{"name": "temperature", "address": 0, "type": "float32"}], **kw)


@pytest.mark.parametrize("outstanding", [1, 4])
async def test_a_refused_connect_says_retry_soon(outstanding):
    link = TcpLink(config(free_port(), max_outstanding=outstanding))
    with pytest.raises(Exception) as refused:
        await link.open()
    assert getattr(refused.value, "retry_soon", None) is True, refused.value
    link.close()


async def test_polls_again_within_1s_of_the_device_restart(run_driver):
    port = free_port()
    sim = await ModbusSimulator(unit_ids=(1,)).start_tcp("127.0.0.1", port)
    driver = ModbusDriver(config(port, reconnect_min=2.0, reconnect_max=30.0), DeviceHealth("press1"))
    run = run_driver(driver)
    try:
        assert await run.wait_for(lambda r: len(r.samples()) >= 3)
        await sim.stop()
        assert await run.wait_for(lambda r: r.latest("press1.temperature").quality is Quality.BAD)
        await asyncio.sleep(OUTAGE)
        before = len(run.samples())
        await sim.start_tcp("127.0.0.1", port)
        back = time.monotonic()
        assert await run.wait_for(lambda r: len(r.samples()) > before
                                  and r.latest("press1.temperature").quality is Quality.GOOD, timeout=5)
        assert time.monotonic() - back < 1.0, f"first good sample {time.monotonic() - back:.2f} s after the device was back"
    finally:
        await sim.stop()
