"""Forwarding throughput: buffer -> broker, beside raw paho QoS 1 publishing to the same broker.

    python bench/bench_forward.py [--records 20000] [--inflight 100] [--only json|sparkplug]
                                  [--spb-rows 2000] [--spb-devices 10] [--spb-tags 100]
                                  [--spb-max-metrics 2000]

Starts its own Mosquitto on a free loopback port. Two sections, both by default:

json       buffer ingest (records/s, batches of 500), raw paho QoS 1 publish rate, gateway drain
           rate, and the ratio drain / raw.
sparkplug  `values/{device}` rows made by `ExceptionReporter.offer` (devices of `--spb-tags`
           scalar tags, a configuration with a `format: sparkplug` upstream and matching Modbus
           devices, loaded from YAML) drained by the real `Upstream` with a `SparkplugFormat`:
           DDATA messages/s and metrics/s (counted at the upstream: the buffer is empty only once
           every DDATA was acknowledged), beside raw paho QoS 1 publishing of the same encoded
           DDATA payloads (same broker, same max_inflight), the ratio drain / raw (target 0.7).
           Also, each alone: the protobuf encoding of the values as they are stored
           (`ValueEncoder`, µs per metric), `SparkplugFormat.encode` of the stored rows, and the
           buffer's own fetch and delete of the same rows (a copy of the file, no network).
           And the storage-free drain: the same Upstream and format over the same rows read into
           memory beforehand, acks only counted, so nothing touches SQLite while it runs: the
           ceiling of the drain/raw ratio if store and forward cost nothing.
           And the CPU (user + system) that raw paho and each drain took, in this process and
           in Mosquitto.
           `--spb-max-metrics` sets how many metrics a DDATA holds before the next one starts
           (the gateway's is `MAX_METRICS`): fewer make more, smaller messages, which is slower
           in metrics/s but closer to raw paho, whose cost then is per message, not per byte.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from _limit import TimeLimit  # bench/ is on sys.path as the script folder
from gateway import config as config_mod
from gateway import sparkplug_pb as pb
from gateway.buffer import Buffer
from gateway.config import UpstreamConfig
from gateway.model import Quality, Record, Sample
from gateway.report import ExceptionReporter
from gateway.sparkplug import MAX_METRICS, SparkplugFormat
from gateway.upstream import Upstream

PAYLOAD_BYTES = 200
SPB_TARGET = 0.7  # the target for the Sparkplug drain, as a fraction of raw paho
SPB_GROUP = "bench"
DRAIN_LIMIT = 120.0  # s, per drain or raw publish run (the overall --limit still applies)


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    # set_tcp_nodelay: by default Mosquitto holds a PUBACK back (Nagle) while one it sent is not
    # yet acknowledged, and the client's TCP acknowledges late (delayed ACK, 40 ms here): a burst
    # then ends with a 40 ms wait for its last PUBACKs, the same in the raw and the gateway runs.
    # That timer, not paho, set the raw figure of a short run (120 DDATA: 50 ms with it, 12 ms
    # without), so both are measured without it.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                    "set_tcp_nodelay true\n" + ("user root\n" if os.geteuid() == 0 else ""))
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
    return raw_publish(port, [("bench/raw", b"x" * PAYLOAD_BYTES)] * n, inflight, "raw")


def raw_publish(port: int, messages: list[tuple[str, bytes]], inflight: int, client_id: str) -> float:
    """Publish `messages` at QoS 1 with plain paho; messages/s until the last PUBACK."""
    n = len(messages)
    done = threading.Event()
    acked = 0

    def on_publish(client, userdata, mid, rc, props):
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(inflight)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    sent = 0
    while sent < n:  # keep at most 60k unacknowledged in paho: message ids are 16-bit
        if sent - acked < 60_000:
            topic, body = messages[sent]
            c.publish(topic, body, qos=1)
            sent += 1
        else:
            time.sleep(0.001)
    if not done.wait(DRAIN_LIMIT):
        raise RuntimeError(f"raw paho ({client_id}): only {acked}/{n} acknowledged")
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
    n = buffer.depth
    elapsed = await timed_drain(buffer, lambda on_connected: Upstream(
        cfg, buffer, gateway_id="bench", topic_prefix="edge/bench", client_id="bench-gw", started_at=time.time(),
        on_connected=on_connected), "drain")
    return n / elapsed


async def timed_drain(buffer: Buffer, make_upstream, what: str) -> float:
    """Seconds from the upstream's connect to an empty buffer. The clock starts in on_connected
    (after CONNACK, just before the pump's first fetch): polling `up.connected` from this task
    would only see it after the pump first yields, when a batch or two has already gone out."""
    started: list[float] = []
    emptied: list[float] = []
    ack = buffer.ack

    def timed_ack(*args, **kwargs):  # the clock stops at the ack that empties the buffer, not at
        ack(*args, **kwargs)         # the next look of the polling loop below (up to 5 ms later)
        if not buffer.depth and not emptied:
            emptied.append(time.perf_counter())

    buffer.ack = timed_ack
    up = make_upstream(lambda: started.append(time.perf_counter()))
    task = asyncio.create_task(up.run())
    deadline = time.monotonic() + DRAIN_LIMIT
    try:
        while not started and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not started:
            raise RuntimeError(f"{what}: not connected after {DRAIN_LIMIT:.0f} s ({up.last_error})")
        while buffer.depth and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if buffer.depth or not emptied:
            raise RuntimeError(f"{what}: {buffer.depth} rows left (connected: {up.connected})")
    finally:
        del buffer.ack  # the method again
    elapsed = emptied[0] - started[0]
    up.stop()
    await task
    return elapsed


# ----- Sparkplug -----------------------------------------------------------------------------

def _spb_tag(t: int) -> tuple[str, str, int]:
    """(type, table, registers) of the t-th tag: mostly float32, some uint16 and coils."""
    if t % 10 == 8:
        return "uint16", "holding", 1
    if t % 10 == 9:
        return "bool", "coil", 1
    return "float32", "holding", 2


def spb_config(workdir: Path, port: int, devices: int, tags: int, inflight: int):
    """A GatewayConfig with one `format: sparkplug` upstream and `devices` Modbus devices of
    `tags` scalar tags each, written as YAML and read with `gateway.config.load`."""
    lines = [
        "gateway:", "  id: bench", f"  state_dir: {workdir}",
        "upstreams:",
        f"  - {{name: spb, host: 127.0.0.1, port: {port}, format: sparkplug, group_id: {SPB_GROUP},"
        f" max_inflight: {inflight}}}",
        "devices:",
    ]
    for d in range(devices):
        lines += [f"  - name: dev{d}", "    driver: modbus", "    transport: tcp", "    host: 127.0.0.1",
                  "    port: 5020", "    unit_id: 1", "    tags:"]
        register = coil = 0
        for t in range(tags):
            type_, table, width = _spb_tag(t)
            if table == "coil":
                address, coil = coil, coil + 1
            else:
                address, register = register, register + width
            lines.append(f"      - {{name: t{t}, table: {table}, address: {address}, type: {type_}}}")
    path = workdir / "spb.yaml"
    path.write_text("\n".join(lines) + "\n")
    return config_mod.load(path)


def spb_fill(buffer: Buffer, cfg, rows: int) -> tuple[float, float]:
    """`rows` values/{device} rows: poll rounds of every device, each value changed, stored as
    the gateway stores them (encoded by the format's value encoder). Returns rows/s and the
    seconds spent in the encoder."""
    encoder = SparkplugFormat(cfg.upstreams[0], cfg, started_at=time.time()).value_encoder()
    encoding = [0.0]

    def timed(*args):
        t = time.perf_counter()
        try:
            return encoder(*args)
        finally:
            encoding[0] += time.perf_counter() - t

    reporter = ExceptionReporter(cfg.report_policy(), encode=timed)
    devices = [(d.name, [(f"{d.name}.{name}", r.type) for name, r in d.reporting().items()]) for d in cfg.devices]
    made = 0
    t0 = time.perf_counter()
    for poll in range(rows):
        if made >= rows:
            break
        ts = time.time()
        samples = []
        for _, tags in devices[:rows - made]:
            for i, (source, type_) in enumerate(tags):
                value = (poll + i) % 2 == 0 if type_ == "bool" else (poll + i) % 65536 if type_ == "uint16" \
                    else 20.0 + 0.01 * poll + i
                samples.append(Sample(source, value, ts, Quality.GOOD))
        records = reporter.offer(samples)
        if any(r.encoded is None for r in records):
            raise RuntimeError("sparkplug fill: a values row was not encoded when stored")
        buffer.append(records)
        made += len(records)
    elapsed = time.perf_counter() - t0
    if buffer.depth != rows:
        raise RuntimeError(f"sparkplug fill: {buffer.depth} rows in the buffer, {rows} wanted")
    return rows / elapsed, encoding[0]


def copy_of(buffer: Buffer, path: Path) -> Path:
    """A copy of the buffer's file (SQLite's online backup), to measure on without touching it."""
    dst = sqlite3.connect(path)
    buffer.conn.backup(dst)
    dst.close()
    return path


def batches(fetch, link: str, batch: int):
    """Every row `fetch` (a Buffer's) gives for `link`, in batches of `batch`, each after the
    last one's seqs, as the upstream's pump reads them (a batch may be acknowledged before the
    next is asked for)."""
    cursor: dict[int, int] = {}
    while rows := fetch(cursor, batch, link=link):
        for r in rows:
            cursor[r.priority] = max(cursor.get(r.priority, 0), r.seq)
        yield rows


def spb_buffer_alone(buffer: Buffer, work: Path, link: str, batch: int) -> float:
    """Seconds for the buffer alone to fetch and delete every row, as the upstream does (batches
    of `batch`, each acknowledged), on a copy of the file: what store and forward costs before
    any byte goes out."""
    alone = Buffer(copy_of(buffer, work / "alone.db"), "bench")
    alone.set_links([(link, SparkplugFormat.kinds)])
    t0 = time.perf_counter()
    for rows in batches(alone.fetch, link, batch):
        alone.ack(rows, link=link)
    elapsed = time.perf_counter() - t0
    left = alone.depth
    alone.close()
    if left:
        raise RuntimeError(f"sparkplug buffer alone: {left} rows left")
    return elapsed


def spb_encode(buffer: Buffer, cfg, batch: int, max_metrics: int,
               repeat: int = 3) -> tuple[float, list[tuple[str, bytes]], int]:
    """`SparkplugFormat.encode` alone over the buffered rows, fetched as the upstream does
    (batches of `batch`, historical: they waited in the buffer), by a fresh format each time
    (so each pass has its DBIRTHs too). Returns the best encode time of `repeat` passes, the
    DDATA messages (topic, payload) and the metrics they carry."""
    up = cfg.upstreams[0]
    fetched = list(batches(buffer.fetch, up.name, batch))
    best = float("inf")
    for _ in range(repeat):
        fmt = SparkplugFormat(up, cfg, started_at=time.time())
        fmt.max_metrics = max_metrics
        fmt.will()
        fmt.births()
        out = []
        t0 = time.perf_counter()
        for rows in fetched:
            out.extend(fmt.encode(rows, True))
        best = min(best, time.perf_counter() - t0)
    ddata = fmt.topic("DDATA")
    messages = [(m.topic, m.payload) for _, m in out if m.topic.startswith(ddata)]
    metrics = sum(len(pb.Payload.FromString(body).metrics) for _, body in messages)
    return best, messages, metrics


class StorageFree(Buffer):
    """The drain's ceiling: a copy of the buffer whose rows are read into memory before the clock
    starts, then fetched from lists and acknowledged by counting. Nothing is read from or deleted
    in SQLite during the drain: what the Sparkplug drain would reach if store and forward cost
    nothing (a measuring stand-in; the gateway never does this)."""

    def __init__(self, path: Path, gateway_id: str, link: str) -> None:
        super().__init__(path, gateway_id)
        self.set_links([(link, SparkplugFormat.kinds)])
        self.by_priority: dict[int, list] = {}
        for rows in batches(super().fetch, link, 10_000):
            for r in rows:
                self.by_priority.setdefault(r.priority, []).append(r)
        self.seqs = {p: [r.seq for r in rows] for p, rows in self.by_priority.items()}
        self.left = sum(len(rows) for rows in self.by_priority.values())

    depth = property(lambda self: self.left)

    def fetch(self, after, limit, now=None, link=None):
        out = []
        for p in sorted(self.by_priority, reverse=True):
            start = bisect.bisect_right(self.seqs[p], after.get(p, 0))
            out.extend(self.by_priority[p][start:start + limit - len(out)])
        return out

    def ack(self, rows, link=None) -> None:
        self.left -= len(rows)


class CountingFormat(SparkplugFormat):
    """The real format; counts the DDATA messages (and bytes) it hands the upstream."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ddata_prefix = self.topic("DDATA")
        self.ddata = 0
        self.ddata_bytes = 0

    def encode(self, rows, historical):
        out = super().encode(rows, historical)
        for _, m in out:
            if m.topic.startswith(self.ddata_prefix):
                self.ddata += 1
                self.ddata_bytes += len(m.payload)
        return out


async def spb_drain(buffer: Buffer, cfg, max_metrics: int) -> tuple[float, CountingFormat, Upstream]:
    up_cfg = cfg.upstreams[0]
    fmt = CountingFormat(up_cfg, cfg, started_at=time.time())
    fmt.max_metrics = max_metrics
    names = [d.name for d in cfg.devices]
    made: list[Upstream] = []

    def make(on_connected):
        made.append(Upstream(up_cfg, buffer, gateway_id=cfg.gateway.id, topic_prefix=cfg.topic_prefix_of(up_cfg),
                             client_id=cfg.client_id_of(up_cfg), started_at=time.time(), format=fmt,
                             on_connected=on_connected,
                             devices=lambda: dict.fromkeys(names, True)))  # every device up, as after its first poll
        return made[0]

    elapsed = await timed_drain(buffer, make, "sparkplug drain")
    return elapsed, fmt, made[0]


class CpuClock:
    """CPU seconds (user + system) of this process, its threads included, and of the broker."""

    def __init__(self, broker_pid: int) -> None:
        self.stat = Path(f"/proc/{broker_pid}/stat")
        self.tick = os.sysconf("SC_CLK_TCK")

    def now(self) -> tuple[float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        try:
            fields = self.stat.read_text().rsplit(")", 1)[1].split()
            broker = (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
        except (OSError, IndexError, ValueError):
            broker = float("nan")  # not Linux: the broker's share is not shown
        return own.ru_utime + own.ru_stime, broker

    def run(self, work):
        """work() -> (its result, (own, broker) CPU seconds it took)."""
        a = self.now()
        result = work()
        b = self.now()
        return result, (b[0] - a[0], b[1] - a[1])


def sparkplug(args, tmp: Path, port: int, limit: TimeLimit, broker_pid: int) -> list[str]:
    work = tmp / "spb"
    work.mkdir()
    limit.phase("the Sparkplug configuration to load")
    cfg = spb_config(work, port, args.spb_devices, args.spb_tags, args.inflight)
    up_cfg = cfg.upstreams[0]
    buffer = Buffer(work / "spb.db", cfg.gateway.id, durability=args.durability)
    buffer.set_links([(up_cfg.name, SparkplugFormat.kinds)])
    limit.phase("the buffer to take the Sparkplug values rows")
    ingest, encoding_s = spb_fill(buffer, cfg, args.spb_rows)
    limit.phase("SparkplugFormat.encode alone")
    enc_s, messages, metrics = spb_encode(buffer, cfg, up_cfg.batch, args.spb_max_metrics)
    if not messages:
        raise RuntimeError("sparkplug: encode made no DDATA")
    limit.phase("the buffer alone to fetch and delete the rows")
    alone_s = spb_buffer_alone(buffer, work, up_cfg.name, up_cfg.batch)
    ceiling_db = copy_of(buffer, work / "ceiling.db")  # for the storage-free drain, before this one empties
    limit.phase("raw paho QoS 1 publishes of the DDATA payloads to be acknowledged")
    clock = CpuClock(broker_pid)
    raw_first, raw_cpu = clock.run(lambda: raw_publish(port, messages, args.inflight, "raw-spb"))
    limit.phase("the gateway upstream (Sparkplug) to drain the buffer")
    (elapsed, fmt, up), drain_cpu = clock.run(lambda: asyncio.run(spb_drain(buffer, cfg, args.spb_max_metrics)))
    buffer.close()
    # Raw again, after the drain: the first run also warms the broker up, which the drain then
    # profits from. The faster of the two is the one compared with.
    limit.phase("raw paho QoS 1 publishes of the DDATA payloads (again) to be acknowledged")
    raw_again = raw_publish(port, messages, args.inflight, "raw-spb-2")
    raw = max(raw_first, raw_again)
    if up.published != args.spb_rows or not fmt.ddata:
        raise RuntimeError(f"sparkplug drain: {up.published}/{args.spb_rows} rows acknowledged, {fmt.ddata} DDATA")
    limit.phase("the storage-free drain (rows from memory, acks counted) to finish")
    free = StorageFree(ceiling_db, cfg.gateway.id, up_cfg.name)
    (free_s, free_fmt, free_up), free_cpu = clock.run(lambda: asyncio.run(spb_drain(free, cfg, args.spb_max_metrics)))
    free.close()
    if free_up.published != args.spb_rows:
        raise RuntimeError(f"storage-free drain: {free_up.published}/{args.spb_rows} rows acknowledged")
    # The drain's fetches need not cut the rows where encode-alone did (its window of messages in
    # flight decides), so it may send a few more, smaller DDATA: the ratio is of the time taken for
    # the same rows and metrics.
    msgs_s = fmt.ddata / elapsed
    raw_s = len(messages) / raw  # seconds raw paho took for all the payloads
    size = sum(len(b) for _, b in messages) / len(messages)
    return [
        f"sparkplug           {args.spb_rows} values rows ({args.spb_devices} devices x {args.spb_tags} tags),"
        f" {metrics:,} metrics in {len(messages)} DDATA of {size:,.0f} B avg (a DDATA ends at"
        f" {args.spb_max_metrics:,} metrics), QoS 1, max_inflight {args.inflight}",
        f"buffer ingest       {ingest:12,.0f} rows/s  (ExceptionReporter.offer and Buffer.append, one poll of"
        f" every device per append)",
        f"protobuf encode     {encoding_s / metrics * 1e6:12.2f} µs/metric  (ValueEncoder, once, as the rows are"
        f" stored)",
        f"encode alone        {enc_s / metrics * 1e6:12.2f} µs/metric  (SparkplugFormat.encode of the stored rows:"
        f" {len(messages) / enc_s:,.0f} DDATA/s; best of 3)",
        f"buffer alone        {alone_s * 1e3:12.1f} ms  (fetch and delete of the same rows, no network:"
        f" {alone_s / raw_s:.2f} x the raw publish time)",
        f"raw paho publish    {raw:12,.0f} msgs/s  (the same DDATA payloads; the faster of {raw_first:,.0f} before"
        f" and {raw_again:,.0f} after the drain)",
        f"gateway drain       {msgs_s:12,.0f} DDATA msgs/s  ({metrics / elapsed:,.0f} metrics/s,"
        f" {fmt.ddata} DDATA of {fmt.ddata_bytes / fmt.ddata:,.0f} B avg)",
        f"ratio drain/raw     {raw_s / elapsed:12.2f}  (raw time / drain time for the same metrics; target {SPB_TARGET})",
        f"storage-free drain  {free_fmt.ddata / free_s:12,.0f} DDATA msgs/s  (ratio {raw_s / free_s:.2f}: the same rows"
        f" fetched from memory, acks only counted: this drain's ceiling if the buffer cost nothing)",
        f"cpu, ms             raw {raw_cpu[0] * 1e3:,.0f} + broker {raw_cpu[1] * 1e3:,.0f}; drain {drain_cpu[0] * 1e3:,.0f}"
        f" + {drain_cpu[1] * 1e3:,.0f}; storage-free {free_cpu[0] * 1e3:,.0f} + {free_cpu[1] * 1e3:,.0f}  (user + system"
        f" of this process, its threads included, and of Mosquitto; the drains with their connect and stop)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--durability", choices=["normal", "full"], default="normal")
    ap.add_argument("--limit", type=float, default=240.0, help="overall time limit, s")
    ap.add_argument("--only", choices=["json", "sparkplug"], help="run one section (default: both)")
    ap.add_argument("--spb-rows", type=int, default=2_000, help="sparkplug: values rows (one device poll each)")
    ap.add_argument("--spb-devices", type=int, default=10)
    ap.add_argument("--spb-tags", type=int, default=100, help="sparkplug: scalar tags per device")
    ap.add_argument("--spb-max-metrics", type=int, default=MAX_METRICS,
                    help="sparkplug: metrics in a DDATA before the next one starts (the gateway's: %(default)s)")
    args = ap.parse_args()
    if not (1 <= args.spb_rows <= 100_000 and 1 <= args.spb_devices <= 1000 and 1 <= args.spb_tags <= 2000
            and 1 <= args.records <= 1_000_000 and 1 <= args.spb_max_metrics <= 100_000):
        ap.error("counts out of range: --records 1..1e6, --spb-rows 1..1e5, --spb-devices 1..1000, --spb-tags 1..2000,"
                 " --spb-max-metrics 1..1e5")
    limit = TimeLimit("bench_forward", args.limit)
    json_lines: list[str] = []
    spb_lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        limit.phase("Mosquitto to start")
        proc, port = start_broker(Path(tmp))
        limit.child(proc)
        try:
            if args.only in (None, "json"):
                buffer = Buffer(Path(tmp) / "bench.db", "bench", durability=args.durability)
                limit.phase("the buffer to take the records")
                ingest = fill(buffer, args.records)
                size = len(buffer.fetch({}, 1)[0].payload)
                limit.phase("raw paho QoS 1 publishes to be acknowledged")
                raw = raw_paho(port, args.records, args.inflight)
                limit.phase("the gateway upstream to drain the buffer")
                gw = asyncio.run(drain(buffer, port, args.inflight))
                json_lines = [
                    f"records             {args.records} x {size} B payload, QoS 1, max_inflight {args.inflight}",
                    f"buffer ingest       {ingest:12,.0f} records/s  (batches of 500, durability {args.durability})",
                    f"raw paho publish    {raw:12,.0f} records/s",
                    f"gateway drain       {gw:12,.0f} records/s",
                    f"ratio drain/raw     {gw / raw:12.2f}",
                ]
            if args.only in (None, "sparkplug"):
                spb_lines = sparkplug(args, Path(tmp), port, limit, proc.pid)
            limit.phase("Mosquitto to stop")
        finally:
            proc.terminate()
            proc.wait()
    limit.done()
    print("\n".join(json_lines + ([""] if json_lines and spb_lines else []) + spb_lines))


if __name__ == "__main__":
    main()
