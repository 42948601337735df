"""A simulated accelerometer on a motor bearing, publishing waveform blocks over MQTT.

The signal is built the way a real rolling-element bearing vibrates:

* shaft harmonics: 1x, 2x, 3x running speed (unbalance, misalignment), tens of mg;
* broadband noise from the machine and the sensor;
* with a defect, every rolling element that strikes the damaged spot gives a short impact that
  rings the housing at its structural resonance (a damped sinusoid, a few kHz). The impacts come
  at the defect frequency (BPFO or BPFI x shaft speed) with a little slip jitter, as real
  bearings do. An inner-race defect turns with the shaft, so its impacts are strongest when it
  passes the load zone: their amplitude is modulated at shaft speed (sidebands at BPFI +- 1x).

Band-passing around the resonance and taking the envelope (the analytics' `envelope` feature)
recovers the defect frequency, as on a real machine. Units: g.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson
from scipy.signal import fftconvolve

Fault = Literal["outer", "inner"] | None


@dataclass(frozen=True)
class BearingOrders:
    """Defect frequencies as multiples of shaft speed (defaults: SKF 6205-2RS, as in the CWRU data)."""

    bpfo: float = 3.5848
    bpfi: float = 5.4152
    bsf: float = 2.357
    ftf: float = 0.39828


def _unit_hash(k: np.ndarray, salt: int) -> np.ndarray:
    """A repeatable pseudo-random number in [0, 1) for each integer in `k` (splitmix64 finaliser)."""
    x = (k.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(salt * 0xBF58476D1CE4E5B9 & (2**64 - 1))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def ring_response(fs: float, resonance_hz: float, damping: float) -> np.ndarray:
    """Impulse response of the housing: a damped sinusoid, cut after it decays to ~0.03 %."""
    wn = 2 * np.pi * resonance_hz
    decay = damping * wn
    length = max(8, int(np.ceil(8.0 / decay * fs)))
    t = np.arange(length) / fs
    return np.exp(-decay * t) * np.sin(wn * np.sqrt(1 - damping**2) * t)


def make_signal(fs: float, n: int, t0: float, shaft_hz: float, *, fault: Fault = None, severity: float = 0.0,
                orders: BearingOrders = BearingOrders(), resonance_hz: float = 3000.0, damping: float = 0.05,
                impact_g: float = 3.0, noise_g: float = 0.02, harmonics_g: tuple[float, ...] = (0.03, 0.012, 0.006),
                slip: float = 0.02, wear_g: float = 0.5, rng: np.random.Generator | None = None) -> np.ndarray:
    """`n` samples of acceleration (g, float32) starting at time `t0` (s) at `fs` Hz.

    `severity` (0..1 and beyond) scales the defect impacts; 0 is a healthy bearing. Consecutive
    calls with consecutive `t0` join without a seam (the harmonics are phase-continuous and the
    ringing of impacts before `t0` carries into the block).
    """
    rng = rng if rng is not None else np.random.default_rng()
    t = t0 + np.arange(n) / fs
    signal = np.zeros(n)
    for k, amplitude in enumerate(harmonics_g, start=1):
        signal += amplitude * np.sin(2 * np.pi * k * shaft_hz * t + 0.7 * k)
    signal += rng.normal(0.0, noise_g, n)

    if fault is not None and severity > 0:
        defect_hz = shaft_hz * (orders.bpfo if fault == "outer" else orders.bpfi)
        ring = ring_response(fs, resonance_hz, damping)
        lead = ring.size  # impacts up to one ring length before t0 still ring into the block
        start = t0 - lead / fs
        first, last = int(np.ceil(start * defect_hz)), int(np.floor((t0 + n / fs) * defect_hz))
        k = np.arange(first, last + 1)
        # Jitter and gain spread are drawn per impact number, not per call, so that an impact
        # ringing across a block boundary is the same impact in both blocks.
        impact_t = k / defect_hz + slip / defect_hz * (2 * _unit_hash(k, 1) - 1)
        gains = impact_g * severity * (0.85 + 0.3 * _unit_hash(k, 2))
        if fault == "inner":
            gains *= 0.55 + 0.45 * np.cos(2 * np.pi * shaft_hz * impact_t)
        index = np.rint((impact_t - start) * fs).astype(np.int64)
        keep = (index >= 0) & (index < lead + n)
        train = np.zeros(lead + n)
        np.add.at(train, index[keep], gains[keep])
        signal += fftconvolve(train, ring)[lead:lead + n]
        # A spall that has grown also shakes the machine at the defect frequency itself (and at
        # 1x through the looseness it brings): low-frequency energy that raises velocity RMS,
        # so an advanced fault moves the ISO 10816 zone, not only the envelope. It grows with the
        # square of severity: early faults show in the envelope long before they show here.
        wear = wear_g * severity**2
        if wear > 0:
            signal += wear * np.sin(2 * np.pi * defect_hz * t + 0.3)
            signal += 0.5 * wear * np.sin(2 * np.pi * 2 * defect_hz * t + 1.1)
            signal += 0.3 * wear * np.sin(2 * np.pi * shaft_hz * t + 2.0)
    return signal.astype(np.float32)


Mode = Literal["stream", "burst", "json"]


def json_block(data: np.ndarray, t0: float, sample_rate: float, seq: int) -> bytes:
    """A self-describing block: `{"ts": ISO 8601 of the first sample, "fs": Hz, "seq": n, "data":
    [samples]}`. The time has microseconds: a sensor's time must be finer than a sample period."""
    ts = _dt.datetime.fromtimestamp(t0, _dt.timezone.utc).isoformat(timespec="microseconds")
    return orjson.dumps({"ts": ts.replace("+00:00", "Z"), "fs": sample_rate, "seq": seq, "data": data},
                        option=orjson.OPT_SERIALIZE_NUMPY)


async def serve(host: str = "127.0.0.1", port: int = 1883, topic: str = "sensors/motor1/accel",
                sample_rate: float = 12000.0, block: int = 4096, shaft_hz: float = 29.93, fault: Fault = "outer",
                severity: float = 0.05, grow_s: float = 300.0, max_severity: float = 1.0,
                noise_g: float = 0.02, temp_topic: str | None = "sensors/motor1/temp", qos: int = 0,
                username: str | None = None, password: str | None = None, blocks: int | None = None,
                seed: int | None = None, mode: Mode = "stream", burst_s: float = 10.0,
                ready: asyncio.Event | None = None) -> int:
    """Publish blocks of `block` samples until cancelled (or `blocks` sent). Returns the number sent.

    `mode`: "stream", f32le blocks in real time, each once it is complete; "burst", the same
    blocks held back and pushed as fast as the broker takes them every `burst_s` seconds,
    rounded to whole blocks (a sensor that buffers: the stream is continuous, and all but the
    first block of a burst arrive early by the sample clock);
    "json", real-time self-describing JSON blocks (see `json_block`), for a subscription with
    `values_path: data, sample_rate_path: fs, ts_path: ts, seq_path: seq`.
    The defect starts at `severity` and grows linearly to `max_severity` over `grow_s` seconds,
    so a demo shows the bearing getting worse. With `temp_topic`, the bearing temperature goes
    out as JSON `{"value": degC, "ts": epoch}` once per block.
    """
    import paho.mqtt.client as mqtt

    if mode not in ("stream", "burst", "json"):
        raise ValueError(f"unknown mode {mode!r}: stream, burst or json")
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"vibration-sim-{int(time.time() * 1000) % 100000}", protocol=mqtt.MQTTv311)
    if username:
        client.username_pw_set(username, password)
    await asyncio.to_thread(client.connect, host, port, 30)
    client.loop_start()
    rng = np.random.default_rng(seed)
    started = time.time()
    duration = block / sample_rate
    per_burst = max(1, round(burst_s / duration))  # blocks per burst
    sent = 0
    last = None
    try:
        if ready is not None:
            ready.set()
        while blocks is None or sent < blocks:
            t0 = started + sent * duration
            # A sensor publishes a block once it is complete, or holds it back until the next burst.
            due = (sent + 1 if mode != "burst" else math.ceil((sent + 1) / per_burst) * per_burst) * duration
            await asyncio.sleep(max(0.0, started + due - time.time()))
            grown = min(max_severity, severity + (max_severity - severity) * (t0 - started) / max(grow_s, 1e-9))
            data = make_signal(sample_rate, block, t0, shaft_hz, fault=fault, severity=grown if fault else 0.0,
                               noise_g=noise_g, rng=rng)
            payload = json_block(data, t0, sample_rate, sent) if mode == "json" else data.astype("<f4").tobytes()
            last = client.publish(topic, payload, qos=qos)
            if temp_topic:
                temp = 55.0 + 15.0 * (grown if fault else 0.0) + rng.normal(0.0, 0.1)
                last = client.publish(temp_topic, f'{{"value": {temp:.2f}, "ts": {t0:.3f}}}', qos=qos)
            sent += 1
        if last is not None:  # out of paho's queue before the connection goes
            await asyncio.to_thread(last.wait_for_publish, 10)
    finally:
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
    return sent
