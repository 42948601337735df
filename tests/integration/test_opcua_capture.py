"""OPC UA array captures through the whole gateway: simulator -> opcua driver -> windows -> features upstream."""

from __future__ import annotations

from drivers.sim.opcua import OpcUaSimulator
from gateway.model import NEW_CAPTURE, iso_ts
from tests.conftest import free_port
from tests.integration.conftest import running_gateway, until


async def test_each_polled_capture_is_one_feature_record_at_its_source_timestamp(tmp_path, mosquitto,
                                                                                 collector_factory, gateway_config):
    sim = await OpcUaSimulator("127.0.0.1", free_port(), capture_samples=4096, capture_rate=12800.0,
                               capture_every=0.5).start()
    collector = collector_factory(mosquitto, ["edge/gw1/features/#", "edge/gw1/health"])
    raw = gateway_config(
        devices=[{"name": "motor2", "driver": "opcua", "endpoint": sim.endpoint, "mode": "poll",
                  "poll_interval": "100ms",
                  "tags": [{"name": "accel", "node": "ns=2;s=Motor.Capture", "sample_rate": 12800, "unit": "g",
                            "capture": "separate"}]}],
        analyses=[{"name": "motor2_de", "input": "motor2.accel", "window": 4096,
                   "features": ["rms", "velocity_rms", "envelope"], "bearing": {"shaft_hz": 29.93}}],
    )
    features = lambda: [p for _, p in collector.json("edge/gw1/features/motor2_de")]  # noqa: E731
    # health reports every second: the analysis counts of one that came after the fourth window
    health = lambda: [p["analyses"]["motor2_de"] for _, p in collector.json("edge/gw1/health")]  # noqa: E731
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: any(h["windows"] >= 4 for h in health()), 20), (features(), health())
    finally:
        await sim.stop()
    stats = [h for h in health() if h["windows"] >= 4][0]
    got = features()
    stamps = {iso_ts(ts) for ts in sim.captures}
    starts = [f["window_start"] for f in got]
    assert len(set(starts)) == len(starts) and set(starts) <= stamps  # one record per capture, its own time
    assert all(f["samples"] == 4096 and f["sample_rate"] == 12800 and f["unit"] == "g" for f in got)
    assert stats["dropped_samples"] == 0 and stats["gaps"] == 0
    assert stats["restarts"] == {NEW_CAPTURE: stats["windows"] - 1}
