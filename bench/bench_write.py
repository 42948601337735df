"""Write-back: writes per second and latency through the gateway's command path, beside raw
pymodbus `write_register` to the same server in the same run.

    python bench/bench_write.py [--seconds 4] [--limit 90]

The gateway side is `cmd/write` as the daemon runs it once the request is off MQTT: the command
router (token-free; request id memory, validation, the driver's encoder), the Modbus driver
writing through its own TCP link (behind its polls, here one poll every 10 s), the read-back
(`verify: true`, the default; also measured with `verify: false`), and the audit record appended
to a real SQLite buffer (durability normal). One request at a time, as the daemon's one command
task runs them. "10 tags" is one request with `writes: [...]` of 10 uint16 tags; the raw side of
it is 10 `write_register` calls. The simulator runs in its own process, as a device would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from _limit import TimeLimit  # noqa: E402  (bench/ is on sys.path as the script folder)
from bench_modbus import SERVER, free_port, wait_port  # noqa: E402
from drivers.base import DriverContext  # noqa: E402
from drivers.modbus import ModbusConfig, ModbusDriver  # noqa: E402
from drivers.sim.modbus import SCRATCH  # noqa: E402
from gateway import logs  # noqa: E402
from gateway.buffer import Buffer  # noqa: E402
from gateway.commands import CommandRouter, CommandsConfig  # noqa: E402
from gateway.health import DeviceHealth  # noqa: E402

TAGS = 10


def summary(latencies: list[float], elapsed: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms)"""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return len(ordered) / elapsed, statistics.median(ordered) * 1000, p99 * 1000


async def raw(port: int, tags: int, seconds: float) -> tuple[float, float, float]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0)
    await client.connect()
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for k in range(tags):
            response = await client.write_register(SCRATCH + k, i & 0xFFFF, device_id=1)
            assert not response.isError()
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - start
    client.close()
    return summary(latencies, elapsed)


async def gateway(port: int, tags: int, seconds: float, verify: bool, state: Path) -> tuple[float, float, float]:
    cfg = ModbusConfig(name="press1", driver="modbus", port=port, poll_interval=10.0, timeout=2.0,
                       tags=[{"name": f"sp{k}", "address": SCRATCH + k, "type": "uint16", "writable": True,
                              "verify": verify} for k in range(TAGS)])
    drv = ModbusDriver(cfg, DeviceHealth("press1"), DriverContext())
    buffer = Buffer(state / f"bench-{tags}-{verify}.db", "bench")
    router = CommandRouter(CommandsConfig(write=True), {"press1": drv}, lambda records: buffer.append(records))

    async def emit(item) -> None:
        pass

    task = asyncio.create_task(drv.run(emit), name="bench.driver")
    try:
        deadline = time.monotonic() + 15
        while drv._live is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the driver did not connect in 15 s: {drv.health.last_error}")
            await asyncio.sleep(0.01)
        latencies: list[float] = []
        start = time.perf_counter()
        end = start + seconds
        i = 0
        while time.perf_counter() < end:
            value = i & 0xFFFF
            request = ({"id": f"r{i}", "device": "press1", "tag": "sp0", "value": value} if tags == 1 else
                       {"id": f"r{i}", "device": "press1",
                        "writes": [{"tag": f"sp{k}", "value": value} for k in range(tags)]})
            t0 = time.perf_counter()
            reply = await router.handle("write", request)
            latencies.append(time.perf_counter() - t0)
            if not reply["ok"]:
                raise RuntimeError(f"write refused or failed: {reply}")
            i += 1
        elapsed = time.perf_counter() - start
        if buffer.depth != i:
            raise RuntimeError(f"{i} requests but {buffer.depth} audit records")
        return summary(latencies, elapsed)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        buffer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement (8 measurements)")
    parser.add_argument("--limit", type=float, default=None, help="overall time limit, s (default 8 x seconds + 45)")
    args = parser.parse_args()
    limit = TimeLimit("bench_write", args.limit or 8 * args.seconds + 45)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logs.configure("warning")  # the daemon's default is info: one commands.audit line per request, as JSON
    port = free_port()
    sim = limit.child(subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)],
                                       cwd=Path(__file__).resolve().parent.parent))
    rows: list[tuple[str, int, tuple[float, float, float], tuple[float, float, float]]] = []
    try:
        limit.phase(f"the simulator to listen on 127.0.0.1:{port}")
        await wait_port(port)
        with tempfile.TemporaryDirectory(prefix="bench-write-") as state:
            for tags in (1, TAGS):
                # raw, gateway, raw again: the mean of the two raw runs cancels slow drift
                limit.phase(f"raw pymodbus write_register x{tags} (first run)")
                raw1 = await raw(port, tags, args.seconds / 2)
                for verify in (True, False):
                    limit.phase(f"gateway cmd/write of {tags} tag(s), verify {verify}")
                    gw = await gateway(port, tags, args.seconds, verify, Path(state))
                    rows.append((f"verify {'on ' if verify else 'off'}", tags, gw, raw1))
                limit.phase(f"raw pymodbus write_register x{tags} (second run)")
                raw2 = await raw(port, tags, args.seconds / 2)
                mean = tuple((a + b) / 2 for a, b in zip(raw1, raw2))
                rows[-2:] = [(name, t, gw, mean) for name, t, gw, _ in rows[-2:]]
        limit.phase("the simulator to stop")
    finally:
        sim.terminate()
        sim.wait(5)
    limit.done()
    print("write-back, Modbus TCP over loopback, one request at a time (simulator in its own process)")
    print(f"  {'request':<22} {'gateway req/s':>13} {'p50 ms':>8} {'p99 ms':>8}   {'raw req/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8}   ratio")
    for name, tags, (rate, p50, p99), (raw_rate, raw50, raw99) in rows:
        what = f"{tags} tag{'s' if tags > 1 else ''}, {name}"
        print(f"  {what:<22} {rate:13,.0f} {p50:8.2f} {p99:8.2f}   {raw_rate:10,.0f} {raw50:8.2f} {raw99:8.2f}"
              f"   {rate / raw_rate:6.1%}")
    print("  raw: write_register per tag, no read-back, no audit; ratio: gateway req/s / raw req/s")


if __name__ == "__main__":
    asyncio.run(main())
