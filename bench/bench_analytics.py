"""Throughput of the full vibration feature set beside bare numpy.fft.rfft of the same windows.

    .venv/bin/python bench/bench_analytics.py [--seconds 0.6]

One core: BLAS and scipy.fft are kept to one thread, so "channels per core" means what it says.
For each window length (4,096 / 16,384 / 65,536 samples) it times, interleaved and best-of:
  bare rfft  numpy.fft.rfft of one window at a time (the issue's reference), and of the same
             windows as one 2-D call (what batching can reach);
  features   gateway.analytics.vibration.compute on one window at a time (all features:
             rms ... skewness, velocity_rms, spectrum with 5 peaks and 2 bands, envelope with
             4 defect orders x 3 harmonics), and compute_batch on all the windows at once
             (what AnalyticsEngine.on_waveforms does with windows that close together; it
             works in cache-sized chunks of up to 64k samples).
The windows: 256k samples per size (64 x 4096, 16 x 16384, 4 x 65536).
Ratios are features throughput / bare 1-D rfft throughput (target at 16,384: >= 0.25).
Real-time capacity: feature samples/s divided by 25,600 samples/s per channel.

Then the worker pool: windows per second through FeaturePool (assemble on the loop, compute in
worker processes, routed in order) with 1 worker and with N (the machine's cores, at least 2), 16,384
samples, 64 streams (target: on 2 cores at least 1.6 x the single-worker figure).

Then the ingest cost: blocks (and samples) per second that the MQTT driver decodes, payload to
placed block (drivers.mqtt.decode_payload and the sample-clock step), for f32le and for JSON
blocks of 1,024 samples ({"ts", "fs", "seq", "data": [...]}), beside numpy.frombuffer and
json.loads + numpy.asarray of the same payloads (target: JSON within 1.5 x the cost of bare
json.loads + numpy.asarray; orjson.loads + numpy.asarray is shown too).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _limit import TimeLimit  # noqa: E402  (bench/ is on sys.path as the script folder)
from drivers.mqtt import MqttConfig, MqttDriver, decode_payload  # noqa: E402
from gateway.analytics.vibration import FeatureSpec, compute, compute_batch, make_plan  # noqa: E402
from gateway.health import DeviceHealth  # noqa: E402

FS = 25600.0
SIZES = (4096, 16384, 65536)
SPEC = FeatureSpec(
    features=frozenset(["rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness",
                        "velocity_rms", "spectrum", "envelope"]),
    velocity_band=(10.0, 1000.0), peaks=5, bands=((10.0, 1000.0), (1000.0, 5000.0)),
    envelope_band=(2000.0, 5000.0),
    orders=(("bpfo", 3.5848), ("bpfi", 5.4152), ("bsf", 2.357), ("ftf", 0.39828)),
    shaft_hz=29.93,
)


def signals(m: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FS
    base = (1 + 0.5 * np.cos(2 * np.pi * 107.3 * t)) * np.sin(2 * np.pi * 3500 * t)
    return base + rng.normal(0, 0.3, (m, n))


def best_rate(fn, windows: int, seconds: float) -> float:
    """Windows per second, best of repeated timed runs within `seconds`."""
    fn()  # warm caches, plans and FFT twiddles
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = max(best, windows / dt)
        if time.perf_counter() > deadline:
            return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=0.6, help="time per measurement")
    ap.add_argument("--limit", type=float, default=180.0, help="overall time limit, s")
    args = ap.parse_args()
    limit = TimeLimit("bench_analytics", args.limit)
    print(f"numpy {np.__version__}, fs {FS:.0f} Hz, one core, best of repeated runs "
          f"({args.seconds}s per measurement)")
    hdr = (f"{'window':>7} | {'rfft 1-D':>12} {'rfft 2-D':>12} | {'features':>12} {'Msamp/s':>8} "
           f"{'ratio':>6} {'ch@25.6k':>8} | {'batched':>12} {'Msamp/s':>8} {'ratio':>6} {'ch@25.6k':>8}")
    print(hdr)
    print(f"{'':>7} | {'windows/s':>12} {'windows/s':>12} | {'windows/s':>12} {'':>8} {'':>6} {'':>8} |"
          f" {'windows/s':>12}")
    print(f"{'':>7} |  (reference)              |  one window per call                    |  compute_batch")
    t_start = time.perf_counter()
    summary = {}
    for n in SIZES:
        limit.phase(f"the {n}-sample measurements")
        m = max(4, 262144 // n)
        X = signals(m, n)
        plan = make_plan(SPEC, n, FS)
        rows = list(X)

        def bare_1d():
            for x in rows:
                np.fft.rfft(x)

        def bare_2d():
            np.fft.rfft(X, axis=-1)

        def feats_1d():
            for x in rows:
                compute(x, plan, 29.93)

        def feats_2d():
            compute_batch(X, plan, 29.93)

        r1 = best_rate(bare_1d, m, args.seconds)
        r2 = best_rate(bare_2d, m, args.seconds)
        f1 = best_rate(feats_1d, m, args.seconds)
        f2 = best_rate(feats_2d, m, args.seconds)
        summary[n] = (r1, f1, f2)
        print(f"{n:>7} | {r1:>12.0f} {r2:>12.0f} | {f1:>12.0f} {f1 * n / 1e6:>8.1f} {f1 / r1:>6.2f} "
              f"{f1 * n / FS:>8.0f} | {f2:>12.0f} {f2 * n / 1e6:>8.1f} {f2 / r1:>6.2f} {f2 * n / FS:>8.0f}")
    r1, f1, f2 = summary[16384]
    print()
    print(f"16,384-sample windows: features {f1 * 16384 / 1e6:.1f} M samples/s one window at a time "
          f"({f1 / r1:.2f} x bare rfft {r1 * 16384 / 1e6:.1f} M samples/s; target >= 0.25), "
          f"{f2 * 16384 / 1e6:.1f} M samples/s batched ({f2 / r1:.2f} x).")
    print(f"Real-time capacity on one core: {f1 * 16384 / FS:.0f} channels at 25.6 kHz "
          f"({f2 * 16384 / FS:.0f} batched).")
    print()
    limit.phase("the worker pool measurements")
    pool_scaling()
    print()
    limit.phase("the MQTT ingest measurements")
    ingest(args.seconds)
    print(f"(bench took {time.perf_counter() - t_start:.1f} s)")
    limit.done()


def pool_scaling(streams: int = 64, windows_each: int = 4, rounds: int = 3) -> None:
    """FeaturePool throughput, 1 worker vs N; each figure the best of `rounds` bursts."""
    import asyncio

    from gateway.analytics import AnalyticsEngine, FeaturePool
    from gateway.analytics.config import AnalysisConfig, SummariesConfig
    from gateway.model import Waveform

    n, total = 16384, streams * windows_each
    cfgs = [AnalysisConfig(name=f"a{i}", input=f"m.t{i}", window=n, spectrum={"peaks": 5, "bands": [[10, 1000], [1000, 5000]]},
                           bearing={"shaft_hz": 29.93}) for i in range(streams)]
    x = signals(1, n * windows_each)[0]

    async def rate(workers: int) -> float:
        eng = AnalyticsEngine(cfgs, SummariesConfig(), {f"m.t{i}": "g" for i in range(streams)})
        got = []
        pool = FeaturePool(eng, lambda r, s: got.extend(r), workers=workers, capacity=10 * total, stop_bound=3.0)
        task = asyncio.create_task(pool.run())
        best = 0.0
        for k in range(rounds + 1):  # the first round warms plans and caches
            got.clear()
            t0 = time.perf_counter()
            pool.submit(eng.assemble(Waveform(f"m.t{i}", x, FS, 1000.0 + k * len(x) / FS, unit="g")
                                     for i in range(streams)))
            while len(got) < total:
                await asyncio.sleep(0.001)
            if k:
                best = max(best, total / (time.perf_counter() - t0))
        pool.close()
        await task
        return best

    many = max(2, os.cpu_count() or 1)
    one, more = asyncio.run(rate(1)), asyncio.run(rate(many))
    print(f"worker pool, 16,384-sample windows, {streams} streams: {one:.0f} windows/s with 1 worker, "
          f"{more:.0f} with {many} ({more / one:.2f} x; target on 2 cores >= 1.6 x)")


INGEST_BLOCK = 1024
INGEST_BLOCKS = 256


def ingest(seconds: float) -> None:
    """MQTT payload -> placed waveform block, beside the bare library calls on the same payloads."""
    import orjson

    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 0.3, (INGEST_BLOCKS, INGEST_BLOCK)).astype(np.float32)
    raw = [row.astype("<f4").tobytes() for row in x]
    docs = [json.dumps({"ts": 1_796_205_600.0 + k * INGEST_BLOCK / FS, "fs": FS, "seq": k,
                        "data": row.tolist()}).encode() for k, row in enumerate(x)]
    cfg = MqttConfig(name="bench", driver="mqtt", subscriptions=[
        {"topic": "f32", "tag": "f32", "format": "f32le", "sample_rate": FS},
        {"topic": "json", "tag": "json", "format": "json", "values_path": "data", "sample_rate_path": "fs",
         "ts_path": "ts", "seq_path": "seq"}])
    subs = {s.tag: s for s in cfg.subscriptions}

    def driver_path(tag: str, payloads: list[bytes]):
        def run():
            driver = MqttDriver(cfg, DeviceHealth("bench"))  # a fresh stream: no restart inside a run
            sub, key = subs[tag], (tag, tag)
            for k, payload in enumerate(payloads):
                block = decode_payload(sub, payload)
                driver._place(key, block, 1_796_205_600.0 + (k + 1) * INGEST_BLOCK / FS, sub.jitter)
        return run

    def frombuffer():
        for payload in raw:
            np.frombuffer(payload, dtype="<f4")

    def json_loads():
        for payload in docs:
            np.asarray(json.loads(payload)["data"])

    def orjson_loads():
        for payload in docs:
            np.asarray(orjson.loads(payload)["data"])

    rates = {name: best_rate(fn, INGEST_BLOCKS, seconds) for name, fn in (
        ("frombuffer", frombuffer), ("f32le", driver_path("f32", raw)), ("json.loads", json_loads),
        ("orjson.loads", orjson_loads), ("json", driver_path("json", docs)))}
    print(f"MQTT ingest, blocks of {INGEST_BLOCK} samples ({len(raw[0])} bytes f32le, "
          f"{np.mean([len(d) for d in docs]):.0f} bytes JSON):")
    print(f"{'path':<44} {'blocks/s':>10} {'Msamp/s':>8} {'cost / raw':>10}")
    rows = [("numpy.frombuffer (raw f32le)", "frombuffer", "frombuffer"),
            ("driver f32le: decode + sample clock", "f32le", "frombuffer"),
            ("json.loads + numpy.asarray (raw JSON)", "json.loads", "json.loads"),
            ("orjson.loads + numpy.asarray", "orjson.loads", "json.loads"),
            ("driver JSON block: decode + sample clock", "json", "json.loads")]
    for label, name, ref in rows:
        r = rates[name]
        print(f"{label:<44} {r:>10.0f} {r * INGEST_BLOCK / 1e6:>8.1f} {rates[ref] / r:>10.2f}")
    print(f"JSON blocks: the driver costs {rates['json.loads'] / rates['json']:.2f} x bare json.loads + "
          f"numpy.asarray (target <= 1.5); f32le: {rates['frombuffer'] / rates['f32le']:.1f} x numpy.frombuffer.")


if __name__ == "__main__":
    main()
