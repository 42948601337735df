"""Modbus TCP throughput: tags read per second by the driver vs raw pymodbus, same server, same run.

    python bench/bench_modbus.py [--seconds 8] [--tags 60]

The raw side calls `read_holding_registers` for the same register span in a tight loop and counts
the tags that span holds; the driver side polls the same tags (poll_interval 0, so it runs flat
out), decodes them and emits Samples into a counter. Both talk over loopback to the simulator,
which runs in its own process as a real device would (in-process, it would share the CPU with
the code being measured).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from _limit import TimeLimit  # noqa: E402  (bench/ is on sys.path as the script folder)
from drivers.modbus import ModbusConfig, ModbusDriver  # noqa: E402
from drivers.sim.modbus import SCRATCH  # noqa: E402
from gateway.health import DeviceHealth  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = """
import asyncio, logging
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
from drivers.sim.modbus import serve
asyncio.run(serve(port={port}))
"""


async def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def raw(port: int, count: int, tags: int, seconds: float) -> float:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0)
    await client.connect()
    reads = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        response = await client.read_holding_registers(SCRATCH, count=count, device_id=1)
        assert not response.isError()
        reads += 1
    elapsed = time.perf_counter() - start
    client.close()
    return reads * tags / elapsed


async def driver(port: int, ntags: int, seconds: float) -> tuple[float, int]:
    tags = [{"name": f"t{i}", "address": SCRATCH + 2 * i, "type": "float32"} for i in range(ntags)]
    cfg = ModbusConfig(name="bench", driver="modbus", port=port, poll_interval=0, timeout=2.0, tags=tags)
    drv = ModbusDriver(cfg, DeviceHealth("bench"))
    emitted = 0

    async def emit(item) -> None:
        nonlocal emitted
        emitted += len(item) if isinstance(item, list) else 1

    task = asyncio.create_task(drv.run(emit))
    deadline = time.monotonic() + 15
    while emitted == 0:  # connected and first poll done
        if time.monotonic() > deadline:
            raise RuntimeError(f"the driver read nothing in 15 s: {drv.health.last_error}")
        await asyncio.sleep(0.01)
    first = emitted
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - start
    counted = emitted - first
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return counted / elapsed, len(drv.plan)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement (3 measurements)")
    parser.add_argument("--tags", type=int, default=60, help="float32 tags (2 registers each, <= 62 per request)")
    parser.add_argument("--limit", type=float, default=None, help="overall time limit, s (default 2 x seconds + 45)")
    args = parser.parse_args()
    limit = TimeLimit("bench_modbus", args.limit or 2 * args.seconds + 45)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    port = free_port()
    sim = limit.child(subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)],
                                       cwd=Path(__file__).resolve().parent.parent))
    try:
        limit.phase(f"the simulator to listen on 127.0.0.1:{port}")
        await wait_port(port)
        registers = 2 * args.tags
        # raw, driver, raw again: the mean of the two raw runs cancels slow drift of the machine
        limit.phase("raw pymodbus reads (first run)")
        raw1 = await raw(port, registers, args.tags, args.seconds / 2)
        limit.phase("the gateway's modbus driver: polling, then ending when cancelled")
        drv, requests = await driver(port, args.tags, args.seconds)
        limit.phase("raw pymodbus reads (second run)")
        raw2 = await raw(port, registers, args.tags, args.seconds / 2)
        limit.phase("the simulator to stop")
    finally:
        sim.terminate()
        sim.wait(5)
    limit.done()
    raw_rate = (raw1 + raw2) / 2
    print(f"modbus tcp, {args.tags} float32 tags in {registers} holding registers, {requests} request(s) per poll")
    print(f"  raw pymodbus read_holding_registers: {raw_rate:12,.0f} tags/s  ({raw_rate / args.tags:,.0f} reads/s)")
    print(f"  edge-gateway modbus driver:          {drv:12,.0f} tags/s  ({drv / args.tags:,.0f} polls/s)")
    print(f"  ratio driver/raw:                    {drv / raw_rate:12.1%}  (target >= 70%)")


if __name__ == "__main__":
    asyncio.run(main())
