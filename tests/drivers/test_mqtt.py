"""MQTT-in driver against a real Mosquitto broker (tests/conftest.py fixture), loopback only."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from drivers import base, registry
from drivers.mqtt import (Block, MqttConfig, MqttDriver, MqttSubscription, PayloadError, decode_payload,
                          parse_timestamp)
from drivers.sim import vibration
from gateway.analytics.window import WindowAssembler
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
        block = decode_payload(sub(format=fmt, sample_rate=100), samples.astype(dtype).tobytes())
        assert block.ts is None and block.seq is None and block.sample_rate == 100
        assert block.samples.dtype == np.float32
        np.testing.assert_array_equal(block.samples, samples)


@given(st.lists(st.integers(-32768, 32767), min_size=1, max_size=100))
def test_i16le_scaled(ints):
    block = decode_payload(sub(format="i16le", sample_rate=10, scale=0.5, offset=1.0),
                           struct.pack(f"<{len(ints)}h", *ints))
    np.testing.assert_allclose(block.samples, np.array(ints) * 0.5 + 1.0)


def test_scalar_formats_and_timestamps():
    doc = json.dumps({"value": 21.5, "ts": 1_700_000_000_123, "data": [{"v": 3}]}).encode()
    assert decode_payload(sub(value_path="value", ts_path="ts"), doc) == (21.5, 1_700_000_000.123)
    assert decode_payload(sub(value_path="data.0.v"), doc) == (3, None)
    assert decode_payload(sub(), b"42") == (42, None)
    assert decode_payload(sub(value_path="on"), b'{"on": true}') == (True, None)
    assert decode_payload(sub(value_path="v"), b'{"v": "7.5"}') == (7.5, None)
    assert decode_payload(sub(format="text", scale=2.0), b" 1.25\n") == (2.5, None)
    np.testing.assert_array_equal(decode_payload(sub(format="csv", sample_rate=1), b"1,2.5, 3\n4").samples,
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
    assert registry.REGISTRY["mqtt"].config is MqttConfig
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


WAVE = {"topic": "sensors/m1/wave", "tag": "accel", "format": "json", "values_path": "data",
        "values_encoding": "array", "sample_rate_path": "fs", "ts_path": "ts", "seq_path": "seq", "unit": "g"}


@pytest.mark.parametrize(("label", "seqs"), [("skipped", [0, 1, 2, 3, 5, 6, 7, 8]),
                                             ("repeated", [0, 1, 2, 3, 3, 4, 5, 6])])
async def test_a_seq_gap_restarts_once_at_that_block(mosquitto, publisher, run_driver, label, seqs):
    driver = make_driver(mosquitto, [{**WAVE, "ts_path": None}])
    run = run_driver(driver)
    await started(run, driver)
    for seq in seqs:
        publisher.send("sensors/m1/wave", orjson.dumps({"fs": 1000, "seq": seq, "data": [seq] * 250}))
    assert await run.wait_for(lambda r: len(r.waveforms()) == len(seqs))
    waves = run.waveforms("motor1.accel")
    assert [w.restart for w in waves] == [None] * 4 + ["seq gap"] + [None] * 3
    assert [w.samples[0] for w in waves] == seqs
    assembler = WindowAssembler(500)
    windows = [win for w in waves for win in assembler.push(w.samples, w.ts, w.sample_rate, w.quality, w.restart)]
    assert dict(assembler.restarts) == {"seq gap": 1} and assembler.dropped_samples == 0
    assert len(windows) == 4 and assembler.pending == 0


async def test_a_deeply_nested_message_loses_nothing_behind_it(mosquitto, publisher, run_driver):
    """Issue 11: one hostile message is one bad value; the session and the queue behind it live on."""
    driver = make_driver(mosquitto, [SUBS[4], WAVE])
    run = run_driver(driver)
    await started(run, driver)
    publisher.send("sensors/m1/temp", "[" * 100_000 + "]" * 100_000)
    publisher.send("sensors/m1/wave", "[" * 100_000 + "]" * 100_000)
    for i in range(200):
        publisher.client.publish("sensors/m1/temp", json.dumps({"value": i, "ts": 1_700_000_000 + i}), qos=1)
    assert await run.wait_for(lambda r: len(r.samples()) == 200, timeout=15)
    assert [s.value for s in run.samples("motor1.temp")] == list(range(200))
    assert driver.health.bad_values == 2 and driver.health.errors == 0 and driver.health.connected
    assert driver.health.extra["dropped"] == 0


async def test_messages_queued_when_a_session_ends_are_counted(mosquitto, publisher):
    driver = make_driver(mosquitto, [SUBS[6]])
    driver.config.queue_size = 5
    held = asyncio.Event()

    async def stuck_emit(item):  # the gateway stops taking: the first message stays in hand
        held.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(driver.run(stuck_emit))
    try:
        for _ in range(200):
            if driver.health.connected:
                break
            await asyncio.sleep(0.05)
        for i in range(7):  # 1 in hand, 5 queued, 1 waiting for room in the paho thread
            publisher.send("sensors/motor1/speed", str(i))
        await asyncio.wait_for(held.wait(), 5)
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert driver.health.extra["dropped"] == 6


async def test_messages_received_before_a_connection_loss_are_handled(mosquitto, publisher):
    driver = make_driver(mosquitto, [SUBS[6]])
    got: list[float] = []

    async def slow_emit(item):  # the gateway takes 50 ms a message: the queue fills up
        await asyncio.sleep(0.05)
        got.append(item.value)

    task = asyncio.create_task(driver.run(slow_emit))
    try:
        for _ in range(200):
            if driver.health.connected:
                break
            await asyncio.sleep(0.05)
        for i in range(20):
            publisher.send("sensors/motor1/speed", str(i))
        await asyncio.sleep(0.2)
        publisher.close()
        mosquitto.stop()  # while most of the 20 wait in the queue
        for _ in range(100):
            if len(got) == 20 and driver.health.errors:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        publisher.close = lambda: None  # the fixture's close: already done
    assert got == list(range(20)) and driver.health.errors >= 1
    assert driver.health.extra["dropped"] == 0


@pytest.mark.parametrize("mode", ["burst", "json"])
async def test_vibration_simulator_modes(mosquitto, run_driver, mode):
    """burst: blocks held back and pushed every 0.4 s; json: self-describing blocks. Either way
    the stream continues, block after block, with the simulator's sample clock."""
    fs, block, blocks = 12000, 1200, 8  # 0.1 s blocks
    wave = {**WAVE, "topic": "sensors/motor1/accel"} if mode == "json" else SUBS[0]
    driver = make_driver(mosquitto, [wave])
    run = run_driver(driver)
    await started(run, driver)
    before = time.time()
    sent = await asyncio.wait_for(vibration.serve(host=mosquitto.host, port=mosquitto.port, block=block,
                                                  blocks=blocks, temp_topic=None, qos=1, seed=3, mode=mode,
                                                  burst_s=0.4, sample_rate=fs), timeout=10)
    assert sent == blocks
    assert await run.wait_for(lambda r: len(r.waveforms()) == blocks)
    waves = run.waveforms("motor1.accel")
    assert all(w.restart is None and w.samples.size == block and w.sample_rate == fs for w in waves)
    np.testing.assert_allclose(np.diff([w.ts for w in waves]), block / fs, atol=2e-6)  # (json: ISO, in µs)
    if mode == "json":  # the sensor's time: from the start of the run, one block after another
        assert before <= waves[0].ts <= before + 1.0
    else:  # pushed in two bursts of 4, 0.4 s apart
        assert waves[0].ts == pytest.approx(before + 0.3, abs=0.2)
    assert driver.health.bad_values == 0


def test_simulate_cli_options():
    from gateway.cli import build_parser

    args = build_parser().parse_args(["simulate", "vibration", "--mode", "burst", "--burst-every", "5",
                                      "--block", "2048"])
    assert (args.sim_mode, args.sim_burst_s, args.sim_block) == ("burst", 5.0, 2048)


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


def test_waveform_subscription_config():
    wave = {"topic": "sensors/m1/wave", "tag": "accel", "format": "json", "values_path": "data",
            "values_encoding": "array", "sample_rate_path": "fs", "ts_path": "ts", "seq_path": "seq", "unit": "g"}
    cfg = MqttConfig(name="m1", driver="mqtt", subscriptions=[wave, {"topic": "t", "tag": "temp", "value_path": "v"}])
    assert cfg.waveform_tags() == {"accel"}
    assert MqttSubscription(topic="t", tag="x", values_path="d", sample_rate=100).waveform
    bad = [
        {"values_path": "data"},  # no sample rate from anywhere
        {"format": "f32le", "sample_rate": 10, "values_path": "data"},
        {"format": "f32le", "sample_rate": 10, "seq_path": "seq"},
        {"value_path": "v", "values_path": "data", "sample_rate": 10},
        {"value_path": "v", "seq_path": "seq"},
        {"value_path": "v", "sample_rate_path": "fs"},
        {"value_path": "v", "values_encoding": "base64_f32le"},
        {"values_path": "data", "sample_rate": 10, "values_encoding": "base64_f64"},
    ]
    for options in bad:
        with pytest.raises(ValidationError):
            MqttSubscription(topic="t", tag="x", **options)


# ---------------------------------------------------------------------------------------------
# Self-describing JSON blocks

BLOCK = dict(format="json", values_path="data", sample_rate_path="fs", ts_path="ts", seq_path="seq")


def test_json_block_of_the_issue():
    payload = b'{"ts": "2026-12-02T10:00:00.000Z", "fs": 25600, "seq": 17, "data": [0.01, -0.02, 3, 0.5]}'
    block = decode_payload(sub(**BLOCK), payload)
    assert isinstance(block, Block) and block.sample_rate == 25600.0 and block.seq == 17
    assert block.ts == parse_timestamp("2026-12-02T10:00:00Z") == 1796205600.0
    assert block.samples.dtype == np.float64
    np.testing.assert_array_equal(block.samples, [0.01, -0.02, 3, 0.5])


def test_json_block_encodings_paths_and_timestamps():
    x = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    doc = {"m": {"v": base64.b64encode(x.astype("<f4").tobytes()).decode()}}
    block = decode_payload(sub(format="json", values_path="m.v", values_encoding="base64_f32le", sample_rate=1000),
                           orjson.dumps(doc))
    assert (block.sample_rate, block.ts, block.seq) == (1000, None, None)
    np.testing.assert_array_equal(block.samples, x)
    counts = base64.b64encode(np.array([100, -200, 32767], "<i2").tobytes()).decode()
    block = decode_payload(sub(format="json", values_path="v", values_encoding="base64_i16le", scale=0.01,
                               sample_rate=10), orjson.dumps({"v": counts}))
    np.testing.assert_allclose(block.samples, [1.0, -2.0, 327.67], rtol=1e-6)
    for ts in (1_764_669_600.25, 1_764_669_600_250, "2025-12-02T10:00:00.250+00:00"):
        block = decode_payload(sub(**BLOCK), orjson.dumps({"ts": ts, "fs": 5, "seq": 2.0, "data": [1]}))
        assert block.ts == 1_764_669_600.25 and block.seq == 2


GOOD_BLOCK = {"ts": 1_764_669_600.0, "fs": 100, "seq": 1, "data": [1, 2.5]}
MALFORMED_BLOCKS = [
    {"data": None}, {"data": "1,2"}, {"data": ["1", 2]}, {"data": [1, True]}, {"data": [1, None]},
    {"data": [[1], [2]]}, {"data": [1, {"v": 2}]}, {"data": []},
    {"fs": None}, {"fs": 0}, {"fs": -5}, {"fs": "fast"}, {"fs": True}, {"fs": 1e12},
    {"ts": "yesterday"}, {"ts": -5}, {"ts": 1e20}, {"ts": None}, {"ts": [1]},
    {"seq": "x"}, {"seq": 1.5}, {"seq": True}, {"seq": None},
]


@pytest.mark.parametrize("change", MALFORMED_BLOCKS)
def test_malformed_json_blocks_are_rejected(change):
    doc = {**GOOD_BLOCK, **change}
    doc = {k: v for k, v in doc.items() if v is not None} if None in change.values() else doc
    with pytest.raises(PayloadError):
        decode_payload(sub(**BLOCK), orjson.dumps(doc))
    decode_payload(sub(**BLOCK), orjson.dumps(GOOD_BLOCK))  # the unchanged block is fine


@pytest.mark.parametrize("payload", [
    b'{"v": 1}', b'{"v": [1, 2]}', b'{"v": "@@@@"}', b'{"v": "AAAA\xc3\xa9"}', b'{"v": "AAA"}',
    b'{"v": "AAAAAAA="}', b'{"v": "' + base64.b64encode(struct.pack("<2f", 1, float("nan"))) + b'"}',
    b'{"v": ""}',
])
def test_malformed_base64_blocks_are_rejected(payload):
    with pytest.raises(PayloadError):
        decode_payload(sub(format="json", values_path="v", values_encoding="base64_f32le", sample_rate=1), payload)


def test_block_length_and_json_literals():
    with pytest.raises(PayloadError, match="expected 3"):
        decode_payload(sub(**BLOCK, samples=3), orjson.dumps(GOOD_BLOCK))
    for literal in (b"NaN", b"Infinity", b"1e400"):
        with pytest.raises(PayloadError):
            decode_payload(sub(**BLOCK), b'{"fs": 1, "ts": 2, "seq": 3, "data": [1, ' + literal + b"]}")


ALL_SUBS = [MqttSubscription(**s) for s in SUBS] + [
    sub(**BLOCK), sub(format="json", values_path="v", values_encoding="base64_f32le", sample_rate=1),
    sub(format="json", values_path="0.v", values_encoding="base64_i16le", sample_rate=1, scale=1e300),
]
DEEP = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 100_000]


def assert_sound(decoded) -> None:
    """What a decoder returns is forwardable: finite numbers only, at least one sample."""
    if isinstance(decoded, Block):
        assert decoded.samples.ndim == 1 and decoded.samples.size > 0
        assert np.isfinite(decoded.samples).all() and 0 < decoded.sample_rate <= 1e9
    else:
        value, ts = decoded
        assert isinstance(value, (bool, int, float)) and math.isfinite(value)
        assert ts is None or math.isfinite(ts)


@pytest.mark.parametrize("payload", DEEP)
@pytest.mark.parametrize("subscription", [s for s in ALL_SUBS if s.format in ("json", "text", "csv")],
                         ids=lambda s: s.tag)
def test_deep_nesting_is_a_bad_payload(subscription, payload):  # (to f32le it is a valid block of numbers)
    with pytest.raises(PayloadError):
        decode_payload(subscription, payload)


def test_a_decoder_that_overflows_its_stack_gives_a_bad_payload(monkeypatch):
    """Any parser may hit the recursion limit on hostile nesting (the json module does): a bad
    payload, never an exception that ends the session."""
    monkeypatch.setattr("drivers.mqtt.orjson.loads", json.loads)
    with pytest.raises(PayloadError, match="RecursionError"):
        decode_payload(sub(value_path="v"), DEEP[0])


@given(payload=st.binary(max_size=200), index=st.integers(0, len(ALL_SUBS) - 1))
@settings(max_examples=400, deadline=None)
def test_every_decoder_takes_any_bytes(payload, index):
    try:
        decoded = decode_payload(ALL_SUBS[index], payload)
    except PayloadError:
        return
    assert_sound(decoded)


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=5))
JSON_DOCS = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["data", "fs", "ts", "seq", "v", "value", "0"]), inner, max_size=4), max_leaves=30)


@given(doc=JSON_DOCS, index=st.integers(0, len(ALL_SUBS) - 1))
@settings(max_examples=400, deadline=None)
def test_every_decoder_takes_any_json_structure(doc, index):
    try:
        decoded = decode_payload(ALL_SUBS[index], json.dumps(doc).encode())  # NaN and Infinity literals too
    except PayloadError:
        return
    assert_sound(decoded)


@given(values=st.lists(st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(), st.none(),
                                 st.text(max_size=3), st.lists(st.integers(), max_size=2)), max_size=40))
@settings(max_examples=300, deadline=None)
def test_array_decoder_never_makes_up_a_sample(values):
    payload = json.dumps({"fs": 100, "ts": 1.7e9, "seq": 0, "data": values}).encode()
    numbers = bool(values) and all(type(v) in (int, float) and math.isfinite(v) for v in values)
    if numbers:
        np.testing.assert_array_equal(decode_payload(sub(**BLOCK), payload).samples, np.array(values, dtype=float))
    else:
        with pytest.raises(PayloadError):
            decode_payload(sub(**BLOCK), payload)


@given(raw=st.binary(max_size=64), junk=st.sampled_from(["", "=", "==", "A", "*", "é", " ", "\n"]))
@settings(max_examples=300, deadline=None)
def test_base64_decoder_never_makes_up_a_sample(raw, junk):
    text = base64.b64encode(raw).decode() + junk
    subscription = sub(format="json", values_path="v", values_encoding="base64_f32le", sample_rate=1)
    reference = np.frombuffer(raw[: len(raw) // 4 * 4], "<f4")
    must_pass = junk == "" and raw and len(raw) % 4 == 0 and np.isfinite(reference).all()
    try:
        block = decode_payload(subscription, orjson.dumps({"v": text}))
    except PayloadError:
        assert not must_pass
        return
    np.testing.assert_array_equal(block.samples, reference)  # (surplus padding is harmless)


# ---------------------------------------------------------------------------------------------
# Continuity: the driver says which blocks continue their stream


def stream_placer(fs: float = 1000.0, jitter: float = 0.1):
    cfg = MqttConfig(name="m", driver="mqtt", subscriptions=[
        {"topic": "a", "tag": "x", "format": "f32le", "sample_rate": fs}])
    drv = MqttDriver(cfg, DeviceHealth("m"))

    def place(received: float = 0.0, n: int = 100, ts: float | None = None, seq: int | None = None,
              rate: float = fs) -> tuple[float, str | None]:
        start, cause = drv._place(("x", "a"), Block(np.zeros(n), rate, ts, seq), received, jitter)
        return round(start, 9), cause

    return place


def test_sample_clock_by_arrival():
    place = stream_placer()  # blocks of 0.1 s, jitter 0.1 s
    assert place(10.1) == (10.0, None)
    assert place(10.2 + 0.12) == (10.1, None)  # 120 ms late: jitter, continues
    assert place(10.3 + 0.02) == (10.2, None)  # early after a late one
    assert place(10.31) == (10.3, None)  # a burst: still contiguous
    assert place(10.8) == (10.7, "late block")  # 0.3 s late: a lost block, the clock restarts
    assert place(10.9) == (10.8, None)
    # A replay at full speed: 2,000 blocks (200 s of signal) within a second all continue.
    assert [place(11.0 + k / 2000) for k in range(2000)] == [(round(10.9 + k / 10, 9), None) for k in range(2000)]
    assert place(11.5, rate=2000.0, n=200) == (11.4, "rate change")


def test_block_counter_decides_alone():
    place = stream_placer()
    assert place(100.0, seq=7) == (99.9, None)
    assert place(0.0, seq=8) == (100.0, None)  # arrival time is ignored: the counter continues
    assert place(1000.0, seq=9) == (100.1, None)
    assert place(1000.0, seq=11) == (999.9, "seq gap")  # 10 is missing
    assert place(1000.0, seq=11) == (999.9, "seq gap")  # 11 repeated: the clock starts again
    assert place(1000.0, seq=12) == (1000.0, None)
    assert place(1000.0, seq=0) == (999.9, "seq gap")  # the sensor restarted its counter


def test_sensor_time_decides():
    place = stream_placer()  # one sample period: 1 ms
    assert place(5.0, ts=100.0) == (100.0, None)
    assert place(0.0, ts=100.1) == (100.1, None)
    assert place(0.0, ts=100.2009) == (100.2009, None)  # 0.9 ms off: the sensor's time is taken
    assert place(0.0, ts=100.3024) == (100.3024, "ts gap")  # 1.5 ms off
    assert place(0.0, ts=100.2) == (100.2, "ts gap")  # back in time
    assert place(0.0, ts=100.3, seq=1) == (100.3, None)
    assert place(0.0, ts=100.4, seq=3) == (100.4, "seq gap")
    assert place(0.0, ts=100.6, seq=4) == (100.6, "ts gap")  # counter continues, the time jumped


async def test_a_bad_block_restarts_the_stream():
    cfg = MqttConfig(name="m", driver="mqtt", subscriptions=[
        {"topic": "a/+", "tag": "x", "format": "f32le", "sample_rate": 1000}])
    drv = MqttDriver(cfg, DeviceHealth("m"))
    out: list[Waveform] = []

    async def emit(item):
        out.append(item)

    block = np.ones(100, "<f4").tobytes()
    for topic, payload, received in [("a/1", block, 1.0), ("a/2", block, 1.0), ("a/1", b"\x00\x00\xc0\x7f", 1.1),
                                     ("a/1", block, 1.1), ("a/1", block, 1.2), ("a/2", block, 1.1)]:
        await drv.handle(topic, payload, received, emit)
    assert [w.restart for w in out] == [None, None, "bad block", None, None]
    assert [w.ts for w in out] == pytest.approx([0.9, 0.9, 1.0, 1.1, 1.0])
    assert drv.health.bad_values == 1
