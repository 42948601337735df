"""`max_outstanding`: several Modbus TCP read requests in flight on one connection, against the
pymodbus simulator (drivers.sim.modbus answers requests that arrive together, in order)."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError
from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DeviceDisconnected
from drivers.modbus import ModbusConfig, ModbusDriver, TcpLink
from drivers.sim.modbus import SCRATCH, ModbusSimulator
from gateway.health import DeviceHealth
from gateway.model import Quality, Sample
from tests.conftest import free_port

# 12 requests of 10 registers (max_registers 10), each register holding its own address
SCRATCH_TAGS = [{"name": "r", "address": SCRATCH, "count": 120}]
LIVE_TAGS = [{"name": "temperature", "address": 0, "type": "float32"},
             {"name": "serial", "address": 12, "type": "string", "count": 4}]


def config(port: int, outstanding: int, **kw) -> ModbusConfig:
    return ModbusConfig(name="plc", driver="modbus", host="127.0.0.1", port=port, timeout=kw.pop("timeout", 1.0),
                        max_registers=10, max_gap=0, max_outstanding=outstanding,
                        tags=kw.pop("tags", SCRATCH_TAGS + LIVE_TAGS), **kw)


async def fill_scratch(port: int) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0)
    await client.connect()
    for start in range(SCRATCH, SCRATCH + 120, 60):
        assert not (await client.write_registers(start, list(range(start, start + 60)), device_id=1)).isError()
    client.close()


async def one_poll(cfg: ModbusConfig) -> tuple[list[Sample], float, ModbusDriver]:
    driver = ModbusDriver(cfg, DeviceHealth(cfg.name))
    link = TcpLink(cfg)
    await link.open()
    out: list[Sample] = []

    async def emit(item) -> None:
        out.extend(item if isinstance(item, list) else [item])

    try:
        started = time.perf_counter()
        await driver.poll(link, emit)
        return out, time.perf_counter() - started, driver
    finally:
        link.close()


def test_config():
    assert config(502, 1).max_outstanding == 1
    assert ModbusConfig(name="p", driver="modbus", tags=[{"name": "a", "address": 0}]).max_outstanding == 1
    with pytest.raises(ValidationError, match="less than or equal to 16"):
        config(502, 17)
    with pytest.raises(ValidationError, match="max_outstanding applies to transport tcp"):
        ModbusConfig(name="p", driver="modbus", transport="rtu", serial={"port": "/dev/ttyUSB0"}, max_outstanding=2,
                     tags=[{"name": "a", "address": 0}])


async def test_four_outstanding_reads_every_tag_as_one_does_and_faster_on_a_slow_link():
    port = free_port()
    async with ModbusSimulator(latency=0.02) as sim:  # every answer 20 ms on its way
        await sim.start_tcp("127.0.0.1", port)
        await fill_scratch(port)
        serial, t_serial, _ = await one_poll(config(port, 1))
        piped, t_piped, driver = await one_poll(config(port, 4))
    assert len(driver.plan) == 14  # temperature, serial, 12 x 10 scratch registers
    assert [s.source for s in piped] == [s.source for s in serial]  # emitted in request order
    assert [s.source for s in piped] == ["plc.temperature", "plc.serial"] + [f"plc.r_{i}" for i in range(120)]
    assert all(s.quality is Quality.GOOD for s in piped)
    assert [s.value for s in piped[2:]] == list(range(SCRATCH, SCRATCH + 120))
    assert [s.value for s in serial[2:]] == list(range(SCRATCH, SCRATCH + 120))
    by_source = {s.source: s.value for s in piped}
    assert by_source["plc.serial"] == "SIM-0001" and 30 < by_source["plc.temperature"] < 60
    # 14 round trips of 20 ms one after another, against about 14 / 4 of them
    assert t_serial > 14 * 0.02
    assert t_piped < 0.5 * t_serial, (t_piped, t_serial)


async def test_a_failing_request_marks_only_its_tags_and_the_rest_stay_in_order():
    port = free_port()
    async with ModbusSimulator() as sim:
        await sim.start_tcp("127.0.0.1", port)
        await fill_scratch(port)
        sim.fail.add(SCRATCH + 35)  # the fourth request of the scratch range: device failure
        samples, _, driver = await one_poll(config(port, 4))
    scratch = [s for s in samples if s.source.startswith("plc.r_")]
    assert [s.source for s in scratch] == [f"plc.r_{i}" for i in range(120)]
    values = [s.value for s in scratch]
    bad = [i for i, s in enumerate(scratch) if s.quality is Quality.BAD]
    assert bad == list(range(30, 40))
    assert values[:30] == list(range(SCRATCH, SCRATCH + 30))
    assert values[40:] == list(range(SCRATCH + 40, SCRATCH + 120))
    assert driver.health.bad_values >= 1


async def test_link_lost_mid_poll_ends_the_session_with_device_disconnected():
    port = free_port()
    sim = await ModbusSimulator(latency=0.05).start_tcp("127.0.0.1", port)
    cfg = config(port, 4)
    driver = ModbusDriver(cfg, DeviceHealth(cfg.name))
    link = TcpLink(cfg)
    await link.open()
    try:
        poll = asyncio.create_task(driver.poll(link, lambda item: asyncio.sleep(0)))
        await asyncio.sleep(0.02)  # requests on the wire
        await sim.stop()
        with pytest.raises(DeviceDisconnected):
            await asyncio.wait_for(poll, 5)
    finally:
        link.close()


async def test_the_driver_runs_and_reconnects_with_outstanding_reads(run_driver):
    port = free_port()
    sim = await ModbusSimulator().start_tcp("127.0.0.1", port)
    cfg = config(port, 4, poll_interval=0.05, reconnect_min=0.05, reconnect_max=0.2, tags=LIVE_TAGS)
    driver = ModbusDriver(cfg, DeviceHealth(cfg.name))
    run = run_driver(driver)
    try:
        assert await run.wait_for(lambda r: len(r.samples("plc.serial")) >= 3)
        assert driver.health.extra["max_outstanding"] == 4
        await sim.stop()
        assert await run.wait_for(lambda r: r.latest("plc.serial").quality is Quality.BAD)
        await sim.start_tcp("127.0.0.1", port)
        assert await run.wait_for(lambda r: r.latest("plc.serial").value == "SIM-0001", timeout=10)
    finally:
        await sim.stop()


def test_check_config_shows_it(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "state").mkdir()
    path = tmp_path / "g.yaml"
    path.write_text(f"""gateway: {{id: g, state_dir: {tmp_path / 'state'}}}
devices:
  - {{name: plc, driver: modbus, host: 127.0.0.1, port: 5020, max_outstanding: 4, max_registers: 10,
     tags: [{{name: r, address: 0, count: 30}}]}}
  - {{name: old, driver: modbus, host: 127.0.0.1, port: 5021, tags: [{{name: a, address: 0}}]}}
""")
    proc = run_cli("check-config", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "tcp 127.0.0.1:5020 unit 1, 3 requests per poll, max_outstanding 4" in proc.stdout
    assert "tcp 127.0.0.1:5021 unit 1, 1 requests per poll, max_outstanding 1" in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("max_outstanding: 4", "max_outstanding: 40"))
    proc = run_cli("check-config", "-c", str(bad))
    assert proc.returncode == 2 and f"{bad}:3: devices.0.max_outstanding:" in proc.stderr, proc.stderr
