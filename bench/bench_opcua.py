"""OPC UA throughput: values per second by the driver (poll and subscribe) vs raw asyncua.

    python bench/bench_opcua.py [--seconds 5] [--period 0.005]

The simulated oven runs in its own process and updates its nodes every `--period` seconds.
Poll: the driver reads the five value nodes flat out (poll_interval 0) vs a raw
`client.read_attributes` loop. Subscribe: data changes per second through the driver vs a raw
asyncua subscription handler that only counts; both are bounded by the server's update rate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncua import Client  # noqa: E402

from _limit import TimeLimit  # noqa: E402  (bench/ is on sys.path as the script folder)
from drivers.opcua import OpcUaConfig, OpcUaDriver  # noqa: E402
from gateway.health import DeviceHealth  # noqa: E402

NODES = ["ns=2;s=Oven.Temperature", "ns=2;s=Oven.Running", "ns=2;s=Oven.Parts", "ns=2;s=Oven.State",
         "ns=2;s=Oven.Counter"]
SERVER = """
import asyncio, logging
logging.disable(logging.WARNING)
from drivers.sim.opcua import serve
asyncio.run(serve(port={port}, period={period}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(endpoint: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with Client(endpoint) as client:
                await client.get_node(NODES[-1]).read_value()
                return
        except (OSError, asyncio.TimeoutError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def raw_poll(endpoint: str, seconds: float) -> float:
    async with Client(endpoint) as client:
        nodes = [client.get_node(n) for n in NODES]
        values, end, start = 0, time.perf_counter() + seconds, time.perf_counter()
        while time.perf_counter() < end:
            values += len(await client.read_attributes(nodes))
        return values / (time.perf_counter() - start)


async def raw_subscribe(endpoint: str, seconds: float, publishing_ms: float) -> float:
    count = 0

    class Handler:
        def datachange_notification(self, node, val, data) -> None:  # noqa: ANN001
            nonlocal count
            count += 1

    async with Client(endpoint) as client:
        sub = await client.create_subscription(publishing_ms, Handler())
        await sub.subscribe_data_change([client.get_node(n) for n in NODES], sampling_interval=0)
        await asyncio.sleep(1.0)  # initial values and warm-up
        first, start = count, time.perf_counter()
        await asyncio.sleep(seconds)
        rate = (count - first) / (time.perf_counter() - start)
        await sub.delete()
        return rate


async def with_driver(endpoint: str, mode: str, seconds: float, publishing_s: float) -> float:
    cfg = OpcUaConfig(name="bench", driver="opcua", endpoint=endpoint, mode=mode,
                      poll_interval=0 if mode == "poll" else publishing_s, sampling_interval=0,
                      tags=[{"name": f"n{i}", "node": n} for i, n in enumerate(NODES)])
    driver = OpcUaDriver(cfg, DeviceHealth("bench"))
    count = 0

    async def emit(sample) -> None:
        nonlocal count
        count += 1

    task = asyncio.create_task(driver.run(emit))
    while count < len(NODES):
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0 if mode == "subscribe" else 0.2)
    first, start = count, time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (count - first) / (time.perf_counter() - start)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (4 measurements)")
    parser.add_argument("--period", type=float, default=0.005, help="server update period, s")
    parser.add_argument("--limit", type=float, default=None, help="overall time limit, s (default 4 x seconds + 90)")
    args = parser.parse_args()
    limit = TimeLimit("bench_opcua", args.limit or 4 * args.seconds + 90)
    logging.disable(logging.WARNING)
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/"
    server = limit.child(subprocess.Popen([sys.executable, "-c", SERVER.format(port=port, period=args.period)],
                                          cwd=ROOT))
    try:
        limit.phase(f"the OPC UA simulator at {endpoint}")
        await wait_ready(endpoint)
        publishing = 0.05
        limit.phase("raw asyncua reads")
        raw_p = await raw_poll(endpoint, args.seconds)
        limit.phase("the gateway's OPC UA driver polling, then ending when cancelled")
        drv_p = await with_driver(endpoint, "poll", args.seconds, publishing)
        limit.phase("a raw asyncua subscription")
        raw_s = await raw_subscribe(endpoint, args.seconds, publishing * 1000)
        limit.phase("the gateway's OPC UA driver subscribed, then ending when cancelled")
        drv_s = await with_driver(endpoint, "subscribe", args.seconds, publishing)
        limit.phase("the simulator to stop")
    finally:
        server.terminate()
        server.wait(10)
    limit.done()
    print(f"opc ua, {len(NODES)} nodes, server updates every {args.period * 1000:g} ms "
          f"(at most {len(NODES) / args.period:,.0f} changes/s), publishing interval {publishing * 1000:g} ms")
    print(f"  poll       raw asyncua read_attributes: {raw_p:10,.0f} values/s")
    print(f"             edge-gateway driver:         {drv_p:10,.0f} values/s   ratio {drv_p / raw_p:6.1%}")
    print(f"  subscribe  raw asyncua subscription:    {raw_s:10,.0f} values/s")
    print(f"             edge-gateway driver:         {drv_s:10,.0f} values/s   ratio {drv_s / raw_s:6.1%}")


if __name__ == "__main__":
    asyncio.run(main())
