"""The whole road: Modbus TCP load server -> `edge-gateway run` -> Mosquitto -> a counter.

    python bench/bench_pipeline.py [--seconds 20] [--loads 1k,20k,100k,100k/4]
    python bench/bench_pipeline.py --minutes 10          # RSS flatness at 100k points/s
    python bench/bench_pipeline.py --vibration [--seconds 20]

Each load starts the load server (bench/modbus_load.py, its own process: N holding registers,
all changing every 100 ms), the real gateway as a subprocess (one Modbus device, the N
registers as one range, summaries every second), and counts at a subscriber of the same
Mosquitto the samples the summaries say were taken (`count` of every tag of every record whose
interval lies in the measured window): delivered points/s. The gateway's CPU (utime + stime from
/proc/PID/stat, in % of one core) and RSS (VmRSS) are read over the same window. Loads are
`N` registers every 100 ms, or `N/k` for `max_outstanding` k; 100k is 5,000 registers every
50 ms. In the same run: the raw ceiling, pymodbus `read_holding_registers` of the same
registers (125 per request) in a tight loop against the same server, and the ratio.

`--vibration`: no Modbus; 1,000 channels at 25.6 kHz fed in process into the analytics
(AnalyticsEngine.assemble on the loop, FeaturePool worker processes computing 16,384-sample
windows), with 1 worker and then with 2 (or the default pool, if larger). Two measurements per
pool size:
- real time: 100 ms blocks of every channel, the channels started a block apart in groups (as
  independent sensors are), for `--seconds`; prints the event loop's lag p50/p99 (a 10 ms
  timer's overshoot), the windows (feature records) computed per second and those dropped;
- throughput: a backlog of windows (a capture upload) handed over at once, timed until every
  feature record is delivered; the ratio of the pool sizes is the scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _limit import TimeLimit  # noqa: E402  (bench/ is on sys.path as the script folder)

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOADS = {"1k": (100, 0.1), "20k": (2000, 0.1), "100k": (5000, 0.05)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_mosquitto(workdir: Path, limit: TimeLimit) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
                    "max_inflight_messages 0\npersistence false\nlog_type error\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = limit.child(subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    limit.phase(f"mosquitto to listen on 127.0.0.1:{port}")
    wait_port(port)
    return proc, port


class Counter:
    """Summaries at the broker: per interval start (record ts), the samples they count."""

    def __init__(self, port: int, gateway_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.by_interval: dict[float, int] = {}
        self.health: dict = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        prefix = f"edge/{gateway_id}"
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe([(f"{prefix}/data/#", 1),
                                                                           (f"{prefix}/health", 0)])
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("the counter did not subscribe")

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        payload = json.loads(msg.payload)
        if msg.topic.endswith("/health"):
            self.health = payload
            return
        points = sum(t.get("count", 0) for t in payload.get("tags", {}).values())
        ts = _epoch(payload["ts"])
        with self._lock:
            self.by_interval[ts] = self.by_interval.get(ts, 0) + points

    def points(self, start: float, end: float) -> int:
        """Samples of the summaries whose interval starts in [start, end)."""
        with self._lock:
            return sum(n for ts, n in self.by_interval.items() if start <= ts < end)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def raw_ceiling(port: int, registers: int, seconds: float) -> float:
    """pymodbus read_holding_registers of the same registers, 125 a request, flat out: registers/s."""
    from pymodbus.client import AsyncModbusTcpClient

    async def run() -> float:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0)
        await client.connect()
        starts = list(range(0, registers, 125))
        read = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            for a in starts:
                count = min(125, registers - a)
                response = await client.read_holding_registers(a, count=count, device_id=1)
                assert not response.isError(), response
                read += count
        elapsed = time.perf_counter() - began
        client.close()
        return read / elapsed

    return asyncio.run(run())


def gateway_config(workdir: Path, broker: int, device: int, n: int, period: float, outstanding: int) -> Path:
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    path = workdir / "gateway.yaml"
    path.write_text(f"""gateway: {{id: bench, state_dir: {state}, log_level: warning, log_format: json}}
upstream: {{host: 127.0.0.1, port: {broker}, health_interval: 2s}}
summaries: {{interval: 1s}}
devices:
  - name: load
    driver: modbus
    host: 127.0.0.1
    port: {device}
    poll_interval: {period}s
    timeout: 2s
    max_outstanding: {outstanding}
    tags: [{{name: r, address: 0, type: uint16, count: {n}}}]
""")
    return path


def measure_load(label: str, n: int, period: float, outstanding: int, broker: int, counter: Counter,
                 workdir: Path, seconds: float, limit: TimeLimit, rss_every: float | None = None) -> dict:
    device = free_port()
    load = limit.child(subprocess.Popen([sys.executable, str(REPO / "bench" / "modbus_load.py"), str(device), str(n)]))
    gw = None
    try:
        limit.phase(f"{label}: the load server to listen on 127.0.0.1:{device}")
        wait_port(device)
        config = gateway_config(workdir, broker, device, n, period, outstanding)
        errors = open(workdir / f"gateway-{label.replace('/', '-')}.log", "w")
        gw = limit.child(subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)], cwd=REPO,
                                          stdout=errors, stderr=errors))
        limit.phase(f"{label}: the gateway's first summary at the broker")
        while not counter.by_interval:
            if gw.poll() is not None:
                raise RuntimeError(f"the gateway ended with {gw.returncode}; see {errors.name}")
            time.sleep(0.05)
        limit.phase(f"{label}: warm-up (3 s)")
        time.sleep(3.0)
        # the window: whole seconds, so that it holds whole summary intervals
        start = float(int(time.time()) + 1)
        time.sleep(max(0.0, start - time.time()))
        cpu0, rss0 = cpu_seconds(gw.pid), rss_mb(gw.pid)
        missed0 = counter.health.get("devices", {}).get("load", {}).get("missed_polls", 0)
        end = start + seconds
        samples = []
        limit.phase(f"{label}: the measured window ({seconds:.0f} s)")
        while time.time() < end:
            time.sleep(min(rss_every or 1.0, max(0.0, end - time.time())))
            samples.append((time.time() - start, rss_mb(gw.pid)))
        cpu1, rss1 = cpu_seconds(gw.pid), rss_mb(gw.pid)
        limit.phase(f"{label}: the last summaries of the window to arrive")
        deadline = time.monotonic() + 5
        while max(counter.by_interval, default=0) < end and time.monotonic() < deadline:
            time.sleep(0.05)
        health = counter.health.get("devices", {}).get("load", {})
        return {"label": label, "offered": n / period, "delivered": counter.points(start, end) / seconds,
                "cpu": 100 * (cpu1 - cpu0) / seconds, "rss0": rss0, "rss1": rss1, "rss": samples,
                "requests": health.get("requests_per_poll"), "period": period,
                "missed": health.get("missed_polls", 0) - missed0, "loop_lag": counter.health.get("loop_lag")}
    finally:
        if gw is not None and gw.poll() is None:
            limit.phase(f"{label}: the gateway to stop")
            gw.send_signal(signal.SIGTERM)
            gw.wait(15)
        load.terminate()
        load.wait(5)
        counter.by_interval.clear()
        counter.health = {}


def pipeline(args: argparse.Namespace) -> int:
    loads = ["100k/4"] if args.minutes else args.loads.split(",")
    seconds = args.minutes * 60 if args.minutes else args.seconds
    limit = TimeLimit("bench_pipeline", args.limit or len(loads) * (seconds + 30) + 60)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    broker, port = start_mosquitto(workdir, limit)
    results = []
    try:
        counter = Counter(port, "bench")
        for spec in loads:
            name, _, k = spec.partition("/")
            n, period = LOADS[name]
            results.append(measure_load(spec, n, period, int(k or 1), port, counter, workdir, seconds, limit,
                                        rss_every=10.0 if args.minutes else None))
        counter.close()
        n = max(LOADS[s.partition("/")[0]][0] for s in loads)
        device = free_port()
        load = limit.child(subprocess.Popen([sys.executable, str(REPO / "bench" / "modbus_load.py"), str(device), str(n)]))
        try:
            limit.phase("the raw pymodbus ceiling")
            wait_port(device)
            raw = raw_ceiling(device, n, 5.0)
        finally:
            load.terminate()
            load.wait(5)
    finally:
        broker.terminate()
        broker.wait(5)
    limit.done()
    print(f"bench_pipeline: Modbus TCP load server -> edge-gateway run -> Mosquitto -> counter; "
          f"{seconds:.0f} s windows; {os.cpu_count()} cores")
    print(f"  raw ceiling: pymodbus read_holding_registers of {n} registers, 125 a request: {raw:,.0f} registers/s")
    print(f"  {'load':<8} {'offered/s':>10} {'delivered/s':>12} {'ratio':>6} {'of raw':>7} {'CPU %':>6} "
          f"{'RSS start':>10} {'RSS end':>8} {'req/poll':>8} {'missed polls/s':>14} {'loop lag max':>12}")
    for r in results:
        print(f"  {r['label']:<8} {r['offered']:>10,.0f} {r['delivered']:>12,.0f} {r['delivered'] / r['offered']:>6.1%} "
              f"{r['delivered'] / raw:>7.1%} {r['cpu']:>6.1f} {r['rss0']:>8.1f}MB {r['rss1']:>6.1f}MB "
              f"{r['requests'] or 0:>8} {r['missed'] / seconds:>14.1f} {(r['loop_lag'] or {}).get('max_ms', 0):>10.1f}ms")
    if args.minutes:
        r = results[0]
        values = [mb for _, mb in r["rss"]]
        settled = values[len(values) // 10:]  # after the first tenth: warm-up
        print(f"  RSS every 10 s (MB): {', '.join(f'{v:.1f}' for v in values)}")
        spread = max(settled) - min(settled)
        print(f"  RSS after warm-up: min {min(settled):.1f} max {max(settled):.1f} MB, spread {spread:.1f} MB "
              f"({'flat' if spread <= 5 else 'NOT flat'}: target within 5 MB)")
    return 0


# ---------------------------------------------------------------------------------------------
# --vibration


def vibration(args: argparse.Namespace) -> int:
    from gateway.analytics.config import AnalysisConfig, AnalyticsConfig, SummariesConfig, default_workers

    limit = TimeLimit("bench_pipeline --vibration", args.limit or 2 * args.seconds + 120)
    channels, fs, window, block = 1000, 25600.0, 16384, 2560  # 100 ms blocks
    analyses = [AnalysisConfig(name=f"ch{i}", input=f"vib.ch{i}", window=window,
                               features=["rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness",
                                         "velocity_rms", "spectrum"], velocity_band=(10, 1000),
                               spectrum={"peaks": 5, "bands": [[10, 1000], [1000, 5000]]})
                for i in range(channels)]
    results = []
    backlog = []
    from gateway import logs

    logs.configure("error", json=False)  # the pool logs each switch between full and flowing
    sizes = (1, max(2, default_workers()))
    for workers in sizes:
        limit.phase(f"vibration: {channels} channels in real time with {workers} worker(s)")
        results.append(asyncio.run(_vibration_run(analyses, channels, fs, block, workers, args.seconds,
                                                  AnalyticsConfig().queue, SummariesConfig())))
    for workers in sizes:
        limit.phase(f"vibration: a backlog of {BACKLOG} windows with {workers} worker(s)")
        backlog.append(asyncio.run(_backlog_run(analyses, channels, fs, block, workers)))
    limit.done()
    print(f"bench_pipeline --vibration: {channels} channels x {fs:,.0f} Hz, {window}-sample windows, blocks of "
          f"{block} fed in process; {args.seconds:.0f} s each; {os.cpu_count()} cores")
    print(f"  offered: {channels * fs / window:,.0f} windows/s ({channels * fs / 1e6:.1f} M samples/s)")
    for r in results:
        print(f"  real time, workers {r['workers']}: features {r['features']:,.0f} windows/s, dropped "
              f"{r['dropped']:,} windows, loop lag p50 {r['p50'] * 1000:.1f} ms p99 {r['p99'] * 1000:.1f} ms "
              f"(target p99 < 20 ms), feeding {r['fed'] / 1e6:.1f} M samples/s")
    for workers, rate in zip(sizes, backlog):
        print(f"  throughput, workers {workers}: {rate:,.0f} windows/s ({BACKLOG} windows handed over at once)")
    print(f"  throughput {sizes[1]} workers / 1 worker: {backlog[1] / backlog[0]:.2f}x (target >= 1.6x)")
    return 0


BACKLOG = 3000  # windows of the throughput measurement


async def _backlog_run(analyses, channels, fs, block, workers) -> float:
    import numpy as np

    from gateway.analytics import AnalyticsEngine, FeaturePool
    from gateway.analytics.config import SummariesConfig
    from gateway.model import Waveform

    rng = np.random.default_rng(2)
    engine = AnalyticsEngine(analyses, SummariesConfig(), {f"vib.ch{i}": "g" for i in range(channels)})
    window = analyses[0].window
    x = rng.standard_normal(window * 3).astype(np.float32)  # 3 windows per channel: 3,000 windows
    windows = engine.assemble(Waveform(f"vib.ch{i}", x, fs, 1000.0, "g") for i in range(channels))[:BACKLOG]
    delivered = 0

    def deliver(records, samples) -> None:
        nonlocal delivered
        delivered += len(records)

    pool = FeaturePool(engine, deliver, workers=workers, capacity=len(windows) + 100, stop_bound=3.0)
    runner = asyncio.create_task(pool.run())
    pool.submit(windows[:workers * 8])  # start the workers, warm their plans
    while delivered < workers * 8:
        await asyncio.sleep(0.005)
    delivered = 0
    began = time.perf_counter()
    pool.submit(windows)
    while delivered < len(windows):
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - began
    pool.close()
    await runner
    return len(windows) / elapsed


STAGGER = 7  # channel i starts i % 7 blocks late (a window is 6.4 blocks)


async def _vibration_run(analyses, channels, fs, block, workers, seconds, queue, summaries) -> dict:
    import numpy as np

    from gateway.analytics import AnalyticsEngine, FeaturePool
    from gateway.model import Waveform

    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal(block).astype(np.float32) for _ in range(8)]  # reused: the data do not matter
    engine = AnalyticsEngine(analyses, summaries, {f"vib.ch{i}": "g" for i in range(channels)})
    computed = 0

    def deliver(records, samples) -> None:
        nonlocal computed
        computed += len(records)

    pool = FeaturePool(engine, deliver, workers=workers, capacity=queue, stop_bound=3.0)
    lags: list[float] = []
    fed = 0

    async def lag_probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(max(0.0, loop.time() - before - 0.01))

    async def feed() -> None:
        nonlocal fed
        loop = asyncio.get_running_loop()
        t0 = time.time()
        start = loop.time()
        tick = 0
        while True:
            ts = t0 + tick * block / fs
            for i in range(channels):  # one hand-over per channel, as a driver makes them
                if tick < i % STAGGER:
                    continue  # independent sensors: not every channel closes its window in the same block
                pool.submit(engine.assemble([Waveform(f"vib.ch{i}", blocks[(i + tick) % 8], fs, ts, "g")]))
                if i % 100 == 99:
                    await asyncio.sleep(0)  # as the pipeline: other tasks between batches
            fed += channels * block
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * block / fs - loop.time()))

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(pool.run(), name="bench.pool")
        probe = tg.create_task(lag_probe(), name="bench.lag")
        feeder = tg.create_task(feed(), name="bench.feed")
        await asyncio.sleep(3.0)  # warm-up: plans, first windows
        c0, f0, lags_from, d0 = computed, fed, len(lags), pool.dropped
        began = time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - began
        c1, f1, d1 = computed, fed, pool.dropped
        window_lags = sorted(lags[lags_from:])
        feeder.cancel()
        probe.cancel()
        pool.close()
        await runner
    q = statistics.quantiles(window_lags, n=100)
    return {"workers": workers, "features": (c1 - c0) / elapsed, "fed": (f1 - f0) / elapsed, "dropped": d1 - d0,
            "p50": statistics.median(window_lags), "p99": q[98]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per load")
    parser.add_argument("--loads", default="1k,20k,100k,100k/4",
                        help="comma-separated: 1k, 20k, 100k, each optionally /K for max_outstanding K")
    parser.add_argument("--minutes", type=float, default=None, help="one 100k/4 run this long, RSS every 10 s")
    parser.add_argument("--vibration", action="store_true", help="the in-process vibration load instead")
    parser.add_argument("--limit", type=float, default=None, help="overall time limit, s")
    args = parser.parse_args()
    return vibration(args) if args.vibration else pipeline(args)


if __name__ == "__main__":
    raise SystemExit(main())
