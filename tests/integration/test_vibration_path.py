"""Waveforms through the real path: MQTT f32le blocks -> mqtt driver -> windows -> features -> rules."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import paho.mqtt.client as mqtt

from drivers.sim.vibration import serve as vibration_serve
from tests import cwru
from tests.integration.conftest import running_gateway, until

SHAFT_HZ_105 = 1797 / 60


def motor_device(broker, sample_rate: float, unit: str = "g") -> dict:
    return {"name": "motor1", "driver": "mqtt", "host": "127.0.0.1", "port": broker.port,
            "subscriptions": [{"topic": "sensors/motor1/accel", "tag": "accel", "format": "f32le",
                               "sample_rate": sample_rate, "unit": unit}]}


async def test_iso_zone_alarm_raises_as_the_simulated_bearing_fault_grows(tmp_path, mosquitto, collector_factory,
                                                                          gateway_config):
    collector = collector_factory(mosquitto, "edge/gw1/#")
    raw = gateway_config(
        devices=[motor_device(mosquitto, 12800)],
        analyses=[{"name": "motor1_de", "input": "motor1.accel", "window": 8192,
                   "bearing": {"shaft_hz": 29.93, "envelope_band": [2000, 5000]}}],
        rules=[{"name": "motor1_iso", "type": "iso10816", "input": "motor1_de.velocity_rms", "group": 2,
                "foundation": "rigid"}],
    )
    iso = lambda: [p for _, p in collector.json("edge/gw1/alarms/motor1_iso")]  # noqa: E731
    async with running_gateway(tmp_path, raw):
        sensor = asyncio.create_task(vibration_serve(
            host="127.0.0.1", port=mosquitto.port, sample_rate=12800, block=1024, fault="outer", severity=0.2,
            grow_s=10.0, max_severity=1.0, temp_topic=None, seed=3))
        try:
            assert await until(lambda: any(a["severity"] == "critical" for a in iso()), 40), iso()
        finally:
            sensor.cancel()
            await asyncio.gather(sensor, return_exceptions=True)
    alarms = iso()
    assert alarms[0]["state"] == "raised" and alarms[0]["severity"] == "warning" and alarms[0]["zone"] == "C"
    assert any(a["zone"] == "D" for a in alarms)
    features = [p for _, p in collector.json("edge/gw1/features/motor1_de")]
    velocities = [f["velocity_rms"] for f in features]
    assert velocities[0] < 2.8 < velocities[-1], velocities  # the zone moved because the signal did
    assert features[-1]["bearing"]["dominant"] == "bpfo"


async def test_cwru_inner_race_record_through_mqtt_names_bpfi(tmp_path, mosquitto, collector_factory, gateway_config):
    x = cwru.load(105)[0].astype(np.float32)
    fs, block, windows = 12000, 300, 3
    n = 16384 * windows + block
    collector = collector_factory(mosquitto, "edge/gw1/features/#")
    raw = gateway_config(
        devices=[motor_device(mosquitto, fs)],
        analyses=[{"name": "de", "input": "motor1.accel", "window": 16384,
                   "bearing": {"shaft_hz": SHAFT_HZ_105, "envelope_band": [2000, 5000]}}],
    )
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        async with running_gateway(tmp_path, raw):
            await asyncio.sleep(1.0)  # the driver has subscribed
            start = time.monotonic()
            for k, i in enumerate(range(0, n, block)):
                # a sensor publishes a block once it is complete: real-time pace
                await asyncio.sleep(max(0.0, start + (k + 1) * block / fs - time.monotonic()))
                pub.publish("sensors/motor1/accel", x[i:i + block].astype("<f4").tobytes(), qos=1)
            assert await until(lambda: len(collector.json("edge/gw1/features/de")) >= windows, 15)
    finally:
        pub.loop_stop()
        pub.disconnect()
    features = [p for _, p in collector.json("edge/gw1/features/de")]
    assert [f["bearing"]["dominant"] for f in features] == ["bpfi"] * len(features)
    first = features[0]
    ref = x[:16384].astype(np.float64)
    assert abs(first["rms"] - np.sqrt(np.mean(ref**2))) < 1e-5 * max(1.0, first["rms"])  # the very samples sent
    assert first["samples"] == 16384 and first["sample_rate"] == fs
    assert abs(first["bearing"]["bpfi"]["hz"] - 5.4152 * SHAFT_HZ_105) < 2.0
