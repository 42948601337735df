"""MQTT-in driver against a real Mosquitto broker (tests/conftest.py fixture), loopback only."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from drivers import base
from drivers.mqtt import MqttConfig, MqttDriver, MqttSubscription, PayloadError, decode_payload, parse_timestamp
from drivers.sim import vibration
from gateway.health import DeviceHealth
from gateway.model import Quality, Waveform

SUBS = [
    {"topic": "sensors/motor1/accel", "tag": "accel", "format": "f32le", "sample_rate": 12000, "unit": "g"},
    {"topic": "sensors/motor1/accel_be", "tag": "accel_be", "format": "f32be", "sample_rate": 6400},
    {"topic": "sensors/motor1/raw", "tag": "raw", "format": "i16le", "sample_rate": 1000, "scale": 0.001,
     "samples": 4},
    {"topic": "sensors/motor1/csv", "tag": "csvwave", "format": "csv", "sample_rate": 100},
    {"topic": "sensors/+/temp", "tag": "temp", "format": "json", "value_path": "value", "ts_path": "ts",
     "unit": "degC"},
    {"topic": "plant/line1/#", "tag": "line", "format": "json", "value_path": "data.0.v"},
    {"topic": "sensors/motor1/speed", "tag": "speed", "format": "text", "unit": "rpm"},
]


def sub(**kw) -> MqttSubscription:
    return MqttSubscription(**{"topic": "t", "tag": "x", **kw})


# ---------------------------------------------------------------------------------------------
# Pure decoding


@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e6, 1e6, width=32)))
@settings(max_examples=100, deadline=None)
def test_binary_waveforms_round_trip(samples):
    for fmt, dtype in (("f32le", "<f4"), ("f32be", ">f4")):
        value, ts = decode_payload(sub(format=fmt, sample_rate=100), samples.astype(dtype).tobytes())
        assert ts is None and value.dtype == np.float32
        np.testing.assert_array_equal(value, samples)


@given(st.lists(st.integers(-32768, 32767), min_size=1, max_size=100))
def test_i16le_scaled(ints):
    value, _ = decode_payload(sub(format="i16le", sample_rate=10, scale=0.5, offset=1.0),
                              struct.pack(f"<{len(ints)}h", *ints))
    np.testing.assert_allclose(value, np.array(ints) * 0.5 + 1.0)


def test_scalar_formats_and_timestamps():
    doc = json.dumps({"value": 21.5, "ts": 1_700_000_000_123, "data": [{"v": 3}]}).encode()
    assert decode_payload(sub(value_path="value", ts_path="ts"), doc) == (21.5, 1_700_000_000.123)
    assert decode_payload(sub(value_path="data.0.v"), doc) == (3, None)
    assert decode_payload(sub(), b"42") == (42, None)
    assert decode_payload(sub(value_path="on"), b'{"on": true}') == (True, None)
    assert decode_payload(sub(value_path="v"), b'{"v": "7.5"}') == (7.5, None)
    assert decode_payload(sub(format="text", scale=2.0), b" 1.25\n") == (2.5, None)
    np.testing.assert_array_equal(decode_payload(sub(format="csv", sample_rate=1), b"1,2.5, 3\n4")[0],
                                  [1, 2.5, 3, 4])
    assert parse_timestamp("2026-01-02T03:04:05.5Z") == pytest.approx(1767323045.5)
    assert parse_timestamp(1_700_000_000) == 1_700_000_000.0


MALFORMED = [
    (dict(value_path="value"), b"{not json"),
    (dict(value_path="value"), b'{"value": NaN}'),
    (dict(value_path="value"), b'{"value": "hot"}'),
    (dict(value_path="value"), b'{"other": 1}'),
    (dict(value_path="value"), b'{"value": [1, 2]}'),
    (dict(value_path="value", ts_path="ts"), b'{"value": 1, "ts": "yesterday"}'),
    (dict(), b""),
    (dict(), b"\xff\xfe\x00"),
    (dict(format="text"), b"nan"),
    (dict(format="text"), b"inf"),
    (dict(format="text"), b"twelve"),
    (dict(format="f32le", sample_rate=1), b"\x00\x00\x80"),
    (dict(format="f32le", sample_rate=1), struct.pack("<2f", 1.0, float("nan"))),
    (dict(format="f32be", sample_rate=1), struct.pack(">2f", 1.0, float("inf"))),
    (dict(format="i16le", sample_rate=1), b"\x01\x02\x03"),
    (dict(format="i16le", sample_rate=1, samples=4), struct.pack("<3h", 1, 2, 3)),
    (dict(format="csv", sample_rate=1), b"1,2,x"),
    (dict(format="csv", sample_rate=1), b" , "),
    (dict(format="csv", sample_rate=1), b"1,nan"),
]


@pytest.mark.parametrize(("options", "payload"), MALFORMED)
def test_malformed_payloads_are_rejected(options, payload):
    with pytest.raises(PayloadError):
        decode_payload(sub(**options), payload)


def test_config_model():
    cfg = MqttConfig(name="motor1", driver="mqtt", host="127.0.0.1", port=1883, subscriptions=SUBS)
    assert cfg.tag_names() == ["accel", "accel_be", "raw", "csvwave", "temp", "line", "speed"]
    assert cfg.waveform_tags() == {"accel", "accel_be", "raw", "csvwave"}
    assert cfg.tag_units()["accel"] == "g" and cfg.tag_units()["speed"] == "rpm"
    assert base.REGISTRY["mqtt"].config is MqttConfig
    with pytest.raises(ValidationError):
        MqttConfig(name="m", driver="mqtt", subscriptions=[{"topic": "a", "tag": "a", "format": "f32le"}])
    with pytest.raises(ValidationError):
        MqttConfig(name="m", driver="mqtt", subscriptions=[{"topic": "a/#/b", "tag": "a"}])
    with pytest.raises(ValidationError):
        MqttConfig(name="m", driver="mqtt", subscriptions=[{"topic": "a", "tag": "a", "bogus": 1}])
    with pytest.raises(ValidationError):
        MqttConfig(name="m", driver="mqtt", subscriptions=[{"topic": "a", "tag": "a"}, {"topic": "b", "tag": "a"}])


# ---------------------------------------------------------------------------------------------
# Against Mosquitto


class Publisher:
    def __init__(self, broker) -> None:
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto):
    pub = Publisher(mosquitto)
    yield pub
    pub.close()


def make_driver(broker, subscriptions=SUBS) -> MqttDriver:
    cfg = MqttConfig(name="motor1", driver="mqtt", host=broker.host, port=broker.port, reconnect_min=0.05,
                     reconnect_max=0.3, subscriptions=subscriptions)
    return MqttDriver(cfg, DeviceHealth(cfg.name))


async def started(run, driver) -> None:
    assert await run.wait_for(lambda r: driver.health.connected, timeout=10)


async def test_every_format_and_wildcards(mosquitto, publisher, run_driver):
    driver = make_driver(mosquitto)
    run = run_driver(driver)
    await started(run, driver)
    accel = np.sin(np.arange(512) / 5).astype(np.float32)
    publisher.send("sensors/motor1/accel", accel.astype("<f4").tobytes())
    publisher.send("sensors/motor1/accel_be", accel.astype(">f4").tobytes())
    publisher.send("sensors/motor1/raw", struct.pack("<4h", 1000, -1000, 0, 32767))
    publisher.send("sensors/motor1/csv", "0.5,1.5,2.5")
    publisher.send("sensors/motor7/temp", json.dumps({"value": 61.25, "ts": 1_700_000_000.5}))
    publisher.send("sensors/motor8/temp", json.dumps({"value": 62, "ts": "2026-01-02T03:04:05Z"}))
    publisher.send("plant/line1/cell/3", json.dumps({"data": [{"v": 9.5}]}))
    publisher.send("sensors/motor1/speed", "1790.5")
    publisher.send("sensors/other/accel", b"\x00\x00\x00\x00")  # matches no subscription
    assert await run.wait_for(lambda r: len(r.items) >= 8)
    await asyncio.sleep(0.1)

    w = run.waveforms("motor1.accel")[0]
    assert isinstance(w, Waveform) and w.sample_rate == 12000 and w.unit == "g"
    np.testing.assert_array_equal(w.samples, accel)
    np.testing.assert_array_equal(run.waveforms("motor1.accel_be")[0].samples, accel)
    np.testing.assert_allclose(run.waveforms("motor1.raw")[0].samples, [1.0, -1.0, 0.0, 32.767], rtol=1e-6)
    np.testing.assert_array_equal(run.waveforms("motor1.csvwave")[0].samples, [0.5, 1.5, 2.5])
    temps = run.samples("motor1.temp")
    assert [(s.value, s.ts) for s in temps] == [(61.25, 1_700_000_000.5), (62, 1767323045.0)]
    assert temps[0].unit == "degC" and temps[0].quality is Quality.GOOD
    assert run.latest("motor1.line").value == 9.5
    assert run.latest("motor1.speed").value == 1790.5
    assert len(run.items) == 8
    assert driver.health.bad_values == 0
    assert w.ts <= run.latest("motor1.speed").ts


async def test_malformed_batch_is_counted_and_never_forwarded(mosquitto, publisher, run_driver):
    driver = make_driver(mosquitto)
    run = run_driver(driver)
    await started(run, driver)
    batch = [
        ("sensors/motor1/temp", b"{not json"), ("sensors/motor1/temp", b'{"value": NaN}'),
        ("sensors/motor1/temp", b'{"value": "hot"}'), ("sensors/motor1/temp", b""),
        ("sensors/motor1/temp", b'{"value": 1, "ts": "never"}'), ("sensors/motor1/speed", b"nan"),
        ("sensors/motor1/speed", b"\xff\xfe"), ("sensors/motor1/accel", b"\x00\x00\x80"),
        ("sensors/motor1/accel", struct.pack("<3f", 1, float("nan"), 2)),
        ("sensors/motor1/raw", struct.pack("<3h", 1, 2, 3)), ("sensors/motor1/csv", b"1,,zz"),
        ("plant/line1/x", b'{"data": []}'),
    ] * 3
    for topic, payload in batch:
        publisher.send(topic, payload)
    publisher.send("sensors/motor1/speed", "100")  # the one good message, sent last
    assert await run.wait_for(lambda r: len(r.items) >= 1)
    assert await run.wait_for(lambda r: driver.health.bad_values == len(batch))
    assert [s.value for s in run.samples()] == [100.0]
    assert not run.task.done() and driver.health.connected


async def test_reconnects_and_resubscribes_after_broker_restart(mosquitto, run_driver):
    driver = make_driver(mosquitto)
    run = run_driver(driver)
    await started(run, driver)
    mosquitto.stop()
    assert await run.wait_for(lambda r: not driver.health.connected and driver.health.errors >= 1)
    await asyncio.sleep(0.3)
    mosquitto.start()
    assert await run.wait_for(lambda r: driver.health.connected, timeout=10)
    pub = Publisher(mosquitto)
    try:
        # the driver may still be subscribing: keep publishing until a value comes through
        for _ in range(50):
            pub.send("sensors/motor1/speed", "5")
            if await run.wait_for(lambda r: len(r.samples("motor1.speed")) > 0, timeout=0.2):
                break
    finally:
        pub.close()
    assert run.latest("motor1.speed").value == 5.0


async def test_vibration_simulator_end_to_end(mosquitto, run_driver):
    """The simulator's blocks arrive as waveforms whose envelope spectrum shows BPFO."""
    driver = make_driver(mosquitto, [SUBS[0]])
    run = run_driver(driver)
    await started(run, driver)
    block = 4096
    sent = await asyncio.wait_for(vibration.serve(host=mosquitto.host, port=mosquitto.port, block=block, blocks=4,
                                                  fault="outer", severity=0.5, temp_topic=None, qos=1, seed=3),
                                  timeout=20)
    assert sent == 4
    assert await run.wait_for(lambda r: len(r.waveforms()) == 4)
    waves = run.waveforms("motor1.accel")
    assert all(w.samples.size == block and w.sample_rate == 12000 and w.unit == "g" for w in waves)
    gaps = np.diff([w.ts for w in waves])
    assert np.all(np.abs(gaps - block / 12000) < 0.15)  # blocks are contiguous in time
    peak = envelope_peak(np.concatenate([w.samples for w in waves]), 12000)
    assert abs(peak - 29.93 * vibration.BearingOrders().bpfo) < 1.0


# ---------------------------------------------------------------------------------------------
# The vibration signal itself


def envelope_peak(x: np.ndarray, fs: float, band=(2000, 5000)) -> float:
    from scipy.signal import butter, hilbert, sosfiltfilt

    sos = butter(4, band, btype="band", fs=fs, output="sos")
    env = np.abs(hilbert(sosfiltfilt(sos, x.astype(np.float64))))
    spec = np.abs(np.fft.rfft((env - env.mean()) * np.hanning(env.size)))
    freqs = np.fft.rfftfreq(env.size, 1 / fs)
    band_mask = (freqs > 20) & (freqs < 400)
    return float(freqs[band_mask][np.argmax(spec[band_mask])])


def kurtosis(x: np.ndarray) -> float:
    x = x.astype(np.float64) - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


@pytest.mark.parametrize(("fault", "order"), [("outer", "bpfo"), ("inner", "bpfi")])
def test_envelope_analysis_finds_the_defect_frequency(fault, order):
    fs, shaft = 12000, 29.93
    x = vibration.make_signal(fs, 16384, 50.0, shaft, fault=fault, severity=0.1, rng=np.random.default_rng(7))
    assert x.dtype == np.float32
    expected = shaft * getattr(vibration.BearingOrders(), order)
    assert abs(envelope_peak(x, fs) - expected) < fs / 16384 * 2


def test_inner_race_shows_shaft_sidebands():
    fs, shaft = 12000, 29.93
    x = vibration.make_signal(fs, 65536, 0.0, shaft, fault="inner", severity=0.5, rng=np.random.default_rng(1))
    from scipy.signal import butter, hilbert, sosfiltfilt

    env = np.abs(hilbert(sosfiltfilt(butter(4, (2000, 5000), btype="band", fs=fs, output="sos"), x)))
    spec = np.abs(np.fft.rfft((env - env.mean()) * np.hanning(env.size)))
    freqs = np.fft.rfftfreq(env.size, 1 / fs)
    bpfi = shaft * vibration.BearingOrders().bpfi

    def at(f):
        return spec[np.abs(freqs - f) < 0.5].max()

    floor = np.median(spec[(freqs > 20) & (freqs < 400)])
    assert at(bpfi - shaft) > 5 * floor and at(bpfi + shaft) > 5 * floor


def test_healthy_bearing_is_gaussian_and_fault_grows():
    fs, shaft = 12000, 29.93
    healthy = vibration.make_signal(fs, 16384, 0.0, shaft, rng=np.random.default_rng(2))
    assert 2.0 < kurtosis(healthy) < 3.5 and 0.02 < healthy.std() < 0.05
    spec = np.abs(np.fft.rfft(healthy * np.hanning(healthy.size))) * 4 / healthy.size
    freqs = np.fft.rfftfreq(healthy.size, 1 / fs)
    assert spec[np.argmin(np.abs(freqs - shaft))] == pytest.approx(0.03, rel=0.2)  # 1x at 30 mg
    rms, kurt = [], []
    for severity in (0.05, 0.2, 0.8):
        x = vibration.make_signal(fs, 16384, 0.0, shaft, fault="outer", severity=severity,
                                  rng=np.random.default_rng(2))
        rms.append(float(x.std()))
        kurt.append(kurtosis(x))
    assert rms == sorted(rms) and kurt[0] > 3.5 and kurt[-1] > kurt[0]


def test_consecutive_blocks_join_without_a_seam():
    fs, n = 12000, 3000
    whole = vibration.make_signal(fs, 2 * n, 10.0, 29.93, noise_g=0.0, fault="outer", severity=0.5)
    first = vibration.make_signal(fs, n, 10.0, 29.93, noise_g=0.0, fault="outer", severity=0.5)
    second = vibration.make_signal(fs, n, 10.0 + n / fs, 29.93, noise_g=0.0, fault="outer", severity=0.5)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, atol=1e-4)


def test_waveform_blocks_follow_the_sensor_sample_clock():
    from drivers.mqtt import MqttConfig, MqttDriver
    from gateway.health import DeviceHealth

    cfg = MqttConfig(name="m", driver="mqtt", subscriptions=[
        {"topic": "a", "tag": "x", "format": "f32le", "sample_rate": 1000}])
    drv = MqttDriver(cfg, DeviceHealth("m"))
    n, fs, jitter = 100, 1000.0, 0.1  # blocks of 0.1 s
    start = lambda received: round(drv._block_start("a", n, fs, received, jitter), 9)  # noqa: E731
    assert start(10.1) == 10.0
    assert start(10.2 + 0.12) == 10.1   # 120 ms late: jitter, continues
    assert start(10.3 + 0.02) == 10.2   # early after a late one
    assert start(10.31) == 10.3         # a burst: still contiguous
    assert start(10.8) == 10.7          # 0.3 s late: a lost block, the clock restarts
    assert start(10.9) == 10.8
