"""The pipeline with its feature pool: into a real SQLite buffer in measurement order per stream,
and a stop with windows still queued that ends within the bound, no worker process left."""

from __future__ import annotations

import time

import numpy as np

from gateway.app import STOP_BOUND
from gateway.buffer import Buffer
from gateway.model import Waveform
from tests.conftest import alive, free_port
from tests.integration.conftest import running_gateway, until

FS = 25600.0
STREAMS = 4


def config(tmp_path, broker, window: int, queue: int) -> dict:
    # The upstream points at a port nobody listens on: every record stays in the buffer to be read.
    return {
        "gateway": {"id": "gw1", "state_dir": str(tmp_path / "state")},
        "upstream": {"host": "127.0.0.1", "port": free_port(), "reconnect_max": "1s"},
        "devices": [{"name": "m", "driver": "mqtt", "host": "127.0.0.1", "port": broker.port, "subscriptions": [
            {"topic": f"s/{i}", "tag": f"t{i}", "format": "f32le", "sample_rate": FS, "unit": "g"}
            for i in range(STREAMS)]}],
        "analyses": [{"name": f"a{i}", "input": f"m.t{i}", "window": window, "bearing": {"shaft_hz": 29.93}}
                     for i in range(STREAMS)],
        "analytics": {"workers": 2, "queue": queue},
    }


def blocks(window: int, windows_each: int, bursts: int) -> list[Waveform]:
    """Interleaved bursts of all streams, each block continuing its stream."""
    x = np.random.default_rng(1).normal(0, 0.3, window * windows_each).astype(np.float32)
    step = window * windows_each / FS
    return [Waveform(f"m.t{i}", x, FS, 1000.0 + k * step, unit="g") for k in range(bursts) for i in range(STREAMS)]



async def test_feature_records_enter_the_buffer_in_measurement_order_per_stream(tmp_path, mosquitto):
    window, each, bursts = 4096, 6, 5
    async with running_gateway(tmp_path, config(tmp_path, mosquitto, window, queue=10_000)) as app:
        assert await until(lambda: app.pipeline is not None, 10)
        assert app.pipeline.features.pids() == []  # started with the first window
        for w in blocks(window, each, bursts):
            await app.pipeline.queue.put(w)
        total = STREAMS * each * bursts
        assert await until(lambda: sum(a["windows"] for a in app.pipeline.analytics.stats().values()) == total
                           and app.pipeline.features.in_flight == 0, 60)
        health = app.pipeline.health_payload()
        pids = app.pipeline.features.pids()
    assert len(pids) == 2 and await until(lambda: alive(pids) == [], 5)
    assert health["analytics"] == {"workers": 2, "capacity": 10_000, "in_flight": 0, "dropped_windows": 0,
                                   "restarts": 0}
    buffer = Buffer(tmp_path / "state" / "buffer.db", "gw1")
    try:
        rows = [r for r in buffer.dump() if r["kind"] == "features"]
    finally:
        buffer.close()
    assert len(rows) == total
    for i in range(STREAMS):
        starts = [r["payload"]["window_start"] for r in rows if r["payload"]["analysis"] == f"a{i}"]
        assert len(starts) == each * bursts and starts == sorted(starts) and len(set(starts)) == len(starts)


async def test_stop_with_windows_queued_ends_within_the_bound_and_ends_the_workers(tmp_path, mosquitto):
    window, each, bursts = 65536, 10, 3  # 120 large windows: seconds of work on a busy machine
    total = STREAMS * each * bursts
    async with running_gateway(tmp_path, config(tmp_path, mosquitto, window, queue=10_000)) as app:
        assert await until(lambda: app.pipeline is not None, 10)
        pipeline = app.pipeline
        for w in blocks(window, each, bursts):
            await pipeline.queue.put(w)
        assert await until(lambda: pipeline.features.in_flight > 0 and len(pipeline.features.pids()) == 2, 10)
        pids = pipeline.features.pids()
        t0 = time.monotonic()
        app.request_stop()
        assert await until(lambda: not alive(pids), 2 * STOP_BOUND + 2.0)
        took = time.monotonic() - t0
    # the bound for the queued windows, plus the jobs running at that moment and the rest of the stop
    assert took < STOP_BOUND + 2.0, took
    features = pipeline.features
    assert features.in_flight == 0
    assert sum(a["windows"] for a in pipeline.analytics.stats().values()) == total
    assert sum(a["dropped_windows"] for a in pipeline.analytics.stats().values()) == features.dropped
    buffer = Buffer(tmp_path / "state" / "buffer.db", "gw1")
    try:
        rows = [r for r in buffer.dump() if r["kind"] == "features"]
    finally:
        buffer.close()
    assert len(rows) == total - features.dropped  # every window computed or counted, none lost unseen
