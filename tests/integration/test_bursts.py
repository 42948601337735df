"""Every CWRU record replayed at full speed through Mosquitto into the gateway, as raw f32le and as
self-describing JSON blocks, in blocks of 300 to 4,800 samples: every window comes out, each with
the features NumPy/SciPy give for the very slice it holds.

Ten seconds of signal arrive in well under a second: every block but the first is early by the
sample clock, by up to ten seconds, and must continue the stream (issue 10, bursts)."""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from scipy import stats

from tests import cwru
from tests.analytics.test_cwru import EXPECTED_DOMINANT
from tests.integration.conftest import running_gateway, until

WINDOW = 16384
T0 = 1_796_205_600.0  # 2026-12-02T10:00:00Z, the sensor's time of each record's first sample


def encoding(rec: int) -> str:
    """JSON blocks carry arrays for some records, base64 float32 for the others."""
    return "array" if cwru.RECORDS.index(rec) % 2 == 0 else "base64_f32le"


def devices(port: int) -> list[dict]:
    # Raw blocks carry neither time nor counter: only a block arriving more than half a block plus
    # `jitter` behind the sample clock tells a loss. A burst runs ahead of that clock, except at a
    # stream's first blocks, where a stall of the loaded test machine (seen: one in a full suite
    # run) would pass for a lost block; 1 s of jitter keeps this test about bursts.
    raw = [{"topic": f"cwru/raw/{rec}", "tag": f"de{rec}", "format": "f32le", "sample_rate": cwru.load(rec)[2],
            "unit": "g", "jitter": "1s"} for rec in cwru.RECORDS]
    blocks = [{"topic": f"cwru/json/{rec}", "tag": f"de{rec}", "format": "json", "values_path": "data",
               "values_encoding": encoding(rec), "sample_rate_path": "fs", "ts_path": "ts", "seq_path": "seq",
               "unit": "g"} for rec in cwru.RECORDS]
    return [{"name": name, "driver": "mqtt", "host": "127.0.0.1", "port": port, "subscriptions": subs}
            for name, subs in (("raw", raw), ("blocks", blocks))]


def analyses() -> list[dict]:
    return [{"name": f"{device}_{rec}", "input": f"{device}.de{rec}", "window": WINDOW,
             "features": ["rms", "crest_factor", "kurtosis", "envelope"],
             "bearing": {"shaft_hz": cwru.load(rec)[1] / 60}}
            for device in ("raw", "blocks") for rec in cwru.RECORDS]


def payloads(rec: int, rng: np.random.Generator):
    """(topic, payload) of both formats for one record, in blocks of 300..4,800 samples."""
    x, _, fs = cwru.load(rec)
    i = seq = 0
    while i < len(x):
        n = int(rng.integers(300, 4801))
        block = x[i:i + n]
        yield f"cwru/raw/{rec}", block.astype("<f4").tobytes()
        t = T0 + i / fs
        if encoding(rec) == "array":  # epoch seconds and the float64 samples themselves
            doc = {"ts": t, "fs": fs, "seq": seq, "data": block}
        else:  # ISO 8601 with microseconds and float32
            iso = _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="microseconds")
            doc = {"ts": iso, "fs": fs, "seq": seq, "data": base64.b64encode(block.astype("<f4").tobytes()).decode()}
        yield f"cwru/json/{rec}", orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        i += n
        seq += 1


def reference(rec: int, device: str) -> np.ndarray:
    """The samples as the gateway receives them: float32 unless sent as a JSON array."""
    x = cwru.load(rec)[0]
    return x if device == "blocks" and encoding(rec) == "array" else x.astype(np.float32).astype(np.float64)


async def test_every_record_at_full_speed_gives_every_window(tmp_path, mosquitto, collector_factory,
                                                             gateway_config):
    expected = {f"{d}_{rec}": len(cwru.load(rec)[0]) // WINDOW for d in ("raw", "blocks") for rec in cwru.RECORDS}
    collector = collector_factory(mosquitto, "edge/gw1/features/#")
    features = lambda name: collector.json(f"edge/gw1/features/{name}")  # noqa: E731
    raw = gateway_config(devices=devices(mosquitto.port), analyses=analyses())
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    rng = np.random.default_rng(10)
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: app.pipeline is not None and all(
                h.connected for h in app.pipeline.device_health.values()), 10)
            await asyncio.sleep(0.3)  # subscribed
            last = None
            for rec in cwru.RECORDS:
                for topic, payload in payloads(rec, rng):
                    last = pub.publish(topic, payload, qos=1)
            await asyncio.to_thread(last.wait_for_publish, 20)
            done = lambda: all(len(features(n)) >= k for n, k in expected.items())  # noqa: E731
            assert await until(done, 40), {n: (len(features(n)), k) for n, k in expected.items()}
            health = app.pipeline.health_payload()
    finally:
        pub.loop_stop()
        pub.disconnect()

    for name, windows in expected.items():
        device, rec = name.split("_")[0], int(name.split("_")[1])
        assert health["analyses"][name] == {"windows": windows, "dropped_windows": 0, "gaps": 0,
                                            "dropped_samples": 0,
                                            "pending_samples": len(cwru.load(rec)[0]) % WINDOW,
                                            "restarts": {}}, name
        got = sorted((p for _, p in features(name)), key=lambda p: p["seq"])
        assert len(got) == windows
        x = reference(rec, device)
        for k, f in enumerate(got):
            ref = x[k * WINDOW:(k + 1) * WINDOW]
            rms = np.sqrt(np.mean(ref**2))
            assert f["samples"] == WINDOW
            assert f["rms"] == pytest.approx(rms, rel=0.005), (name, k)
            assert f["crest_factor"] == pytest.approx(np.max(np.abs(ref)) / rms, rel=0.005), (name, k)
            assert f["kurtosis"] == pytest.approx(stats.kurtosis(ref, fisher=False), rel=0.005), (name, k)
        dominants = {f["bearing"]["dominant"] for f in got}
        if rec in EXPECTED_DOMINANT:
            assert dominants == {EXPECTED_DOMINANT[rec]}, name
        elif rec == 97:  # the normal baseline: neither race named
            assert not dominants & {"bpfi", "bpfo"}, name
        if device == "blocks":  # the sensor's time, one window after another
            starts = [_dt.datetime.fromisoformat(f["window_start"].replace("Z", "+00:00")).timestamp() for f in got]
            np.testing.assert_allclose(starts, T0 + np.arange(windows) * WINDOW / cwru.load(rec)[2], atol=1e-3)
    for device in ("raw", "blocks"):
        assert health["devices"][device]["bad_values"] == 0 and health["devices"][device]["dropped"] == 0
