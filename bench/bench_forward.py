"""Forwarding throughput: buffer -> broker, beside raw paho QoS 1 publishing to the same broker.

    python bench/bench_forward.py [--records 20000] [--inflight 100]

Starts its own Mosquitto on a free loopback port. Prints buffer ingest (records/s, batches of
500), raw paho QoS 1 publish rate, gateway drain rate, and the ratio drain / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from _limit import TimeLimit  # bench/ is on sys.path as the script folder
from gateway.buffer import Buffer
from gateway.config import UpstreamConfig
from gateway.model import Record
from gateway.upstream import Upstream

PAYLOAD_BYTES = 200


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def raw_paho(port: int, n: int, inflight: int) -> float:
    done = threading.Event()
    acked = 0

    def on_publish(client, userdata, mid, rc, props):
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="raw", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(inflight)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    body = b"x" * PAYLOAD_BYTES
    t0 = time.perf_counter()
    sent = 0
    while sent < n:  # keep at most 60k unacknowledged in paho: message ids are 16-bit
        if sent - acked < 60_000:
            c.publish("bench/raw", body, qos=1)
            sent += 1
        else:
            time.sleep(0.001)
    if not done.wait(120):
        raise RuntimeError(f"raw paho: only {acked}/{n} acknowledged")
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return n / elapsed


def fill(buffer: Buffer, n: int) -> float:
    pad = "x" * (PAYLOAD_BYTES - 70)  # gateway/seq/ts fields bring the JSON to about 200 bytes
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        buffer.append([Record("data/bench", {"v": i, "p": pad}, time.time()) for i in range(start, min(n, start + 500))])
    return n / (time.perf_counter() - t0)


async def drain(buffer: Buffer, port: int, inflight: int) -> float:
    cfg = UpstreamConfig(host="127.0.0.1", port=port, max_inflight=inflight)
    up = Upstream(cfg, buffer, gateway_id="bench", topic_prefix="edge/bench", client_id="bench-gw",
                  started_at=time.time())
    n = buffer.depth
    task = asyncio.create_task(up.run())
    while not up.connected:
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    deadline = time.monotonic() + 120
    while buffer.depth and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    if buffer.depth:
        raise RuntimeError(f"drain: {buffer.depth} rows left")
    up.stop()
    await task
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--durability", choices=["normal", "full"], default="normal")
    ap.add_argument("--limit", type=float, default=240.0, help="overall time limit, s")
    args = ap.parse_args()
    limit = TimeLimit("bench_forward", args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        limit.phase("Mosquitto to start")
        proc, port = start_broker(Path(tmp))
        limit.child(proc)
        try:
            buffer = Buffer(Path(tmp) / "bench.db", "bench", durability=args.durability)
            limit.phase("the buffer to take the records")
            ingest = fill(buffer, args.records)
            size = len(buffer.fetch({}, 1)[0].payload)
            limit.phase("raw paho QoS 1 publishes to be acknowledged")
            raw = raw_paho(port, args.records, args.inflight)
            limit.phase("the gateway upstream to drain the buffer")
            gw = asyncio.run(drain(buffer, port, args.inflight))
            limit.phase("Mosquitto to stop")
        finally:
            proc.terminate()
            proc.wait()
    limit.done()
    print(f"records             {args.records} x {size} B payload, QoS 1, max_inflight {args.inflight}")
    print(f"buffer ingest       {ingest:12,.0f} records/s  (batches of 500, durability {args.durability})")
    print(f"raw paho publish    {raw:12,.0f} records/s")
    print(f"gateway drain       {gw:12,.0f} records/s")
    print(f"ratio drain/raw     {gw / raw:12.2f}")


if __name__ == "__main__":
    main()
