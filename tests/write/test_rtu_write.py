"""A write on a serial line takes its turn behind the polls of that line (one owner, one lock)
and never waits longer than the device's timeout: then it fails and nothing is sent later."""

from __future__ import annotations

import asyncio
import time

from drivers.base import DriverContext
from drivers.modbus import ModbusConfig, ModbusDriver
from drivers.sim.modbus import SCRATCH, ModbusSimulator
from gateway.health import DeviceHealth
from gateway.model import Quality
from tests.drivers.test_modbus_rtu import BAUD, pty_pair  # noqa: F401 - the socat pty pair fixture
from tests.write.conftest import router_for, running, until


def rtu_driver(port: str, unit: int, name: str, context: DriverContext, timeout: float = 0.5) -> ModbusDriver:
    cfg = ModbusConfig(name=name, driver="modbus", transport="rtu", unit_id=unit, poll_interval=0.0, timeout=timeout,
                       reconnect_min=0.05, reconnect_max=0.2, serial={"port": port, "baudrate": BAUD},
                       tags=[{"name": "temperature", "address": 0, "type": "float32"},
                             {"name": "serial", "address": 12, "type": "string", "count": 4},
                             {"name": "setpoint", "address": SCRATCH, "type": "uint16", "writable": True}])
    return ModbusDriver(cfg, DeviceHealth(cfg.name), context)


async def test_a_write_waits_for_the_line_and_never_longer_than_the_timeout(pty_pair):
    server_end, client_end = pty_pair
    sim = await ModbusSimulator(unit_ids=(1, 2)).start_rtu(server_end, baudrate=BAUD)
    try:
        context = DriverContext()
        # two devices on the line, polling flat out: the bus is busy all the time
        async with running(rtu_driver(client_end, 1, "rtu1", context)) as first, \
                running(rtu_driver(client_end, 2, "rtu2", context)) as second:
            bus = first._live
            assert bus is second._live, "one owner per line"
            router, audit = router_for(first, second)
            for i in range(20):
                target = ("rtu1", "rtu2")[i % 2]
                reply = await router.handle("write", {"id": f"w{i}", "device": target, "tag": "setpoint", "value": i})
                assert reply["ok"] and reply["results"][0]["read_back"] == i, reply
            polls_before = bus.requests
            await asyncio.sleep(0.3)
            assert bus.requests > polls_before, "the polls went on between the writes"

            # a poll that holds the line: the write queues behind it, and is sent once it is over
            await bus.lock.acquire()
            writes = sim.writes.copy()
            pending = asyncio.create_task(router.handle("write", {"id": "late", "device": "rtu1", "tag": "setpoint",
                                                                  "value": 777}))
            await asyncio.sleep(0.2)  # within the 0.5 s timeout
            assert not pending.done() and sim.writes == writes
            bus.lock.release()
            reply = await asyncio.wait_for(pending, 5)
            assert reply["ok"] and reply["results"][0]["read_back"] == 777

            # held longer than the timeout: the write gives up, and nothing is sent afterwards
            await bus.lock.acquire()
            writes = sim.writes.copy()
            started = time.monotonic()
            pending = asyncio.create_task(router.handle("write", {"id": "too-late", "device": "rtu1",
                                                                  "tag": "setpoint", "value": 888}))
            reply = await asyncio.wait_for(pending, 5)
            waited = time.monotonic() - started
            bus.lock.release()
            assert reply["ok"] is False and reply["reason"] == "busy" and "nothing was sent" in reply["error"]
            assert 0.45 <= waited < 1.0, waited
            await asyncio.sleep(0.5)
            assert sim.writes == writes
            assert await until(lambda: len([s for s in first.emitted if s.source == "rtu1.setpoint"]) > 0, 5)
            # every poll around the writes was answered: no frames collided on the line
            for driver in (first, second):
                temps = [s for s in driver.emitted if s.source.endswith(".temperature")]
                assert len(temps) > 20 and all(s.quality is Quality.GOOD for s in temps)
                assert driver.health.errors == 0
        assert sim.writes[(1, "holding")] + sim.writes[(2, "holding")] == 21
    finally:
        await sim.stop()
