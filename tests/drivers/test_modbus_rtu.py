"""Modbus RTU: a pymodbus serial server on one end of a socat pty pair, two unit ids on one line."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time

import pytest

from drivers.base import DriverContext
from drivers.modbus import ModbusConfig, ModbusDriver, SerialConfig
from drivers.sim.modbus import ModbusSimulator
from gateway.health import DeviceHealth
from gateway.model import Quality

BAUD = 115200


@pytest.fixture
def pty_pair():
    socat = shutil.which("socat") or "/usr/bin/socat"
    if not os.path.exists(socat):
        pytest.fail("socat is not installed (.ci/run installs it with apt-get)")
    proc = subprocess.Popen([socat, "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"], stderr=subprocess.PIPE,
                            text=True)
    ports: list[str] = []
    deadline = time.monotonic() + 10
    while len(ports) < 2 and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"PTY is (\S+)", line):
            ports.append(match.group(1))
    assert len(ports) == 2, "socat did not report two ptys"
    yield ports
    proc.terminate()
    proc.wait(5)


def make_driver(port: str, unit: int, name: str, context: DriverContext | None = None) -> ModbusDriver:
    cfg = ModbusConfig(name=name, driver="modbus", transport="rtu", unit_id=unit, poll_interval=0.05, timeout=0.5,
                       reconnect_min=0.05, reconnect_max=0.2,
                       serial={"port": port, "baudrate": BAUD},
                       tags=[{"name": "temperature", "address": 0, "type": "float32"},
                             {"name": "serial", "address": 12, "type": "string", "count": 4},
                             {"name": "running", "table": "coil", "address": 0, "type": "bool"}])
    return ModbusDriver(cfg, DeviceHealth(cfg.name), context)


async def test_two_unit_ids_share_one_line(pty_pair, run_driver):
    server_end, client_end = pty_pair
    sim = await ModbusSimulator(unit_ids=(1, 2)).start_rtu(server_end, baudrate=BAUD)
    try:
        context = DriverContext()  # as one pipeline gives its drivers
        first, second = make_driver(client_end, 1, "rtu1", context), make_driver(client_end, 2, "rtu2", context)
        run1, run2 = run_driver(first), run_driver(second)
        for run, name in ((run1, "rtu1"), (run2, "rtu2")):
            assert await run.wait_for(lambda r, n=name: len(r.samples(f"{n}.temperature")) >= 10, timeout=15)
        for run, name in ((run1, "rtu1"), (run2, "rtu2")):
            samples = run.samples(f"{name}.temperature")
            assert all(s.quality is Quality.GOOD for s in samples), "frames collided on the line"
            assert 30 < samples[-1].value < 60
            assert run.latest(f"{name}.serial").value == "SIM-0001"
            assert run.latest(f"{name}.running").value is True
        # both devices went through one bus: one client, one lock
        assert first.health.errors == 0 and second.health.errors == 0
        assert sim.requests[(1, "holding")] >= 10 and sim.requests[(2, "holding")] >= 10
        buses = [b for (_, port), b in context.shared.items() if port == client_end]
        assert len(buses) == 1 and buses[0].requests >= 40
    finally:
        await sim.stop()


def test_inter_frame_gap_follows_the_baud_rate():
    assert SerialConfig(port="x", baudrate=9600).inter_frame_gap() == pytest.approx(3.5 * 10 / 9600)
    assert SerialConfig(port="x", baudrate=9600, parity="E").inter_frame_gap() == pytest.approx(3.5 * 11 / 9600)
    assert SerialConfig(port="x", baudrate=115200).inter_frame_gap() == pytest.approx(0.00175)


async def test_missing_serial_port_backs_off(run_driver):
    driver = make_driver("/dev/does-not-exist-edge", 1, "rtu9")
    run = run_driver(driver)
    await asyncio.sleep(0.5)
    assert driver.health.errors >= 2 and not driver.health.connected and not run.task.done()
