"""Soak: every device kind at once for minutes, with broker outages; nothing lost, memory flat.

Marked slow (run with `pytest -m slow`); SOAK_SECONDS sets the length (default 180).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

import pytest

from drivers.sim.modbus import ModbusSimulator
from drivers.sim.vibration import serve as vibration_serve
from tests.conftest import free_port
from tests.gateway.test_upstream import PersistentCollector
from tests.integration.conftest import base_config, running_gateway, until

pytestmark = pytest.mark.slow


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def test_soak_with_outages_loses_nothing_and_memory_stays_flat(tmp_path, mosquitto_factory):
    seconds = float(os.environ.get("SOAK_SECONDS", "180"))
    broker = mosquitto_factory(extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    collector = PersistentCollector(broker.port, "edge/gw1/#")
    modbus_port = free_port()
    sim = await ModbusSimulator(unit_ids=(1,)).start_tcp("127.0.0.1", modbus_port)
    raw = base_config(tmp_path, broker,
                      devices=[{"name": "press1", "driver": "modbus", "port": modbus_port, "poll_interval": "100ms",
                                "tags": [{"name": "temperature", "address": 0, "type": "float32"},
                                         {"name": "speed_rpm", "address": 6, "type": "uint16"},
                                         {"name": "running", "table": "coil", "address": 0, "type": "bool"}]},
                               {"name": "motor1", "driver": "mqtt", "port": broker.port,
                                "subscriptions": [{"topic": "sensors/motor1/accel", "tag": "accel", "format": "f32le",
                                                   "sample_rate": 12800, "unit": "g"}]}],
                      analyses=[{"name": "motor1_de", "input": "motor1.accel", "window": 8192,
                                 "bearing": {"shaft_hz": 29.93}}],
                      rules=[{"name": "stopped", "type": "threshold", "input": "press1.speed_rpm", "below": 100,
                              "clear": 500},
                             {"name": "iso", "type": "iso10816", "input": "motor1_de.velocity_rms", "group": 2,
                              "foundation": "rigid"},
                             {"name": "downtime", "type": "downtime", "input": "press1.running"}])
    sensor = asyncio.create_task(vibration_serve(host="127.0.0.1", port=broker.port, sample_rate=12800, block=1024,
                                                 fault="outer", severity=0.1, grow_s=seconds, temp_topic=None))
    samples: list[float] = []
    try:
        async with running_gateway(tmp_path, raw) as app:
            start = time.monotonic()
            await asyncio.sleep(min(30.0, seconds / 6))
            baseline = rss_mb()
            outages = 0
            while time.monotonic() - start < seconds:
                await asyncio.sleep(min(20.0, seconds / 6))
                broker.stop()  # 5 s outage: the buffer holds everything
                await asyncio.sleep(5.0)
                broker.start()
                outages += 1
                samples.append(rss_mb())
            assert await until(lambda: app.pipeline.buffer.depth == 0, 60), "the backlog did not drain"
            produced = app.pipeline.buffer.next_seq - 1
        await asyncio.sleep(2.0)
    finally:
        sensor.cancel()
        await asyncio.gather(sensor, return_exceptions=True)
        await sim.stop()
        collector.close()
    seqs = {p["seq"] for _, p in collector.messages if "seq" in p}
    assert outages >= 3
    assert set(range(1, produced + 1)) <= seqs, f"lost {len(set(range(1, produced + 1)) - seqs)} of {produced}"
    assert max(samples) - baseline < 60, f"RSS grew from {baseline:.0f} MB to {max(samples):.0f} MB"
