"""A driver task ends promptly when cancelled, whatever it is doing: connecting, waiting for an
answer, backing off or polling flat out. SIGTERM and reloads depend on it.

Python 3.11's `asyncio.wait_for` (inside pymodbus) loses a cancellation that arrives in the same
loop pass as the response; `drivers.base.check_cancelled` catches the lost request. The
flat-out test cancels at many moments to hit that pass: before the fix about half the tries of
bench/bench_modbus.py never ended.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

import pytest

from drivers.modbus import ModbusConfig, ModbusDriver
from drivers.sim.modbus import SCRATCH, ModbusSimulator
from gateway.health import DeviceHealth
from tests.conftest import free_port

BOUND = 1.0  # seconds a cancelled driver may take to end


def driver(port: int, **kw) -> ModbusDriver:
    tags = [{"name": f"t{i}", "address": SCRATCH + 2 * i, "type": "float32"} for i in range(20)]
    cfg = ModbusConfig(name="dev", driver="modbus", host="127.0.0.1", port=port,
                       poll_interval=kw.pop("poll_interval", 0), timeout=kw.pop("timeout", 5.0),
                       reconnect_min=kw.pop("reconnect_min", 0.05), reconnect_max=5.0, tags=tags)
    return ModbusDriver(cfg, DeviceHealth(cfg.name))


async def cancel_and_time(task: asyncio.Task) -> float:
    start = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=BOUND)
    took = time.monotonic() - start
    if not done:  # leave nothing running behind the test, then fail
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        pytest.fail(f"driver still running {BOUND}s after cancel")
    assert task.cancelled()
    return took


@pytest.fixture
async def sim():
    port = free_port()
    simulator = await ModbusSimulator(unit_ids=(1,)).start_tcp("127.0.0.1", port)
    simulator.port = port
    yield simulator
    await simulator.stop()


async def test_cancel_while_polling_flat_out_always_ends(sim):
    rng = random.Random(7)
    deadline = time.monotonic() + 60
    tries = 0
    while tries < 80 and time.monotonic() < deadline:
        emitted = 0

        async def emit(item) -> None:
            nonlocal emitted
            emitted += 1

        drv = driver(sim.port)
        task = asyncio.create_task(drv.run(emit), name="test.driver")
        started = time.monotonic()
        while emitted < 3 and time.monotonic() - started < 5:
            await asyncio.sleep(0.001)
        assert emitted >= 3, drv.health.last_error
        await asyncio.sleep(rng.uniform(0, 0.004))  # land the cancel anywhere in a request cycle
        await cancel_and_time(task)
        tries += 1
    assert tries >= 20


async def test_cancel_while_waiting_for_an_answer_that_never_comes():
    # A peer that accepts the connection and never answers: the read would wait its 5 s timeout.
    async def silent(reader, writer):
        await reader.read(-1)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        drv = driver(port, timeout=5.0)
        task = asyncio.create_task(drv.run(lambda item: asyncio.sleep(0)), name="test.driver")
        await asyncio.sleep(0.3)
        assert not task.done()
        assert await cancel_and_time(task) < BOUND
    finally:
        server.close()
        await server.wait_closed()


async def test_cancel_while_backing_off():
    drv = driver(free_port(), reconnect_min=5.0)  # nothing listens: connect fails, then a 2.5-5 s wait
    task = asyncio.create_task(drv.run(lambda item: asyncio.sleep(0)), name="test.driver")
    await asyncio.sleep(0.3)
    assert drv.health.errors >= 1 and not task.done()
    assert await cancel_and_time(task) < BOUND


async def test_cancel_while_connecting():
    # A listener whose accept backlog is full and that never accepts: the kernel drops further
    # SYNs, so a new connect hangs in the TCP handshake, as to a device that is switched off.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        drv = driver(port, timeout=5.0)
        task = asyncio.create_task(drv.run(lambda item: asyncio.sleep(0)), name="test.driver")
        await asyncio.sleep(0.3)
        assert not task.done() and not drv.health.connected
        assert await cancel_and_time(task) < BOUND
    finally:
        for s in fillers:
            s.close()
        listener.close()
