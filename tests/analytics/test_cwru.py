"""Real bearing recordings (CWRU, tests/data/cwru, see SOURCE.md there)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gateway.analytics.config import AnalysisConfig, SummariesConfig
from gateway.analytics.engine import AnalyticsEngine
from gateway.analytics.vibration import FeatureSpec, compute_batch, make_plan, time_features
from gateway.model import Sample, Waveform
from tests import cwru

ORDERS_6205 = {"bpfo": 3.5848, "bpfi": 5.4152, "bsf": 2.357, "ftf": 0.39828}

# SOURCE.md reference table: fs, RMS, peak, crest, Pearson kurtosis (whole record, DE channel).
REFERENCE = {
    97: (48000, 0.0738, 0.3113, 4.22, 2.764),
    105: (12000, 0.2915, 1.7390, 5.97, 5.396),
    118: (12000, 0.1392, 0.6070, 4.36, 2.985),
    130: (12000, 0.6695, 3.6304, 5.42, 7.649),
    109: (48000, 0.5880, 3.5695, 6.07, 6.027),
    122: (48000, 0.1494, 0.7364, 4.93, 3.149),
    135: (48000, 1.2580, 6.5413, 5.20, 6.742),
}
EXPECTED_DOMINANT = {105: "bpfi", 109: "bpfi", 130: "bpfo", 135: "bpfo"}


def record(rec: int) -> tuple[np.ndarray, float]:
    """(DE acceleration vector, rpm from the file)."""
    x, rpm, fs = cwru.load(rec)
    assert fs == REFERENCE[rec][0]
    return x, rpm


@pytest.mark.parametrize("rec", sorted(REFERENCE))
def test_whole_record_statistics_match_reference_table(rec):
    _, rms, peak, crest, kurt = REFERENCE[rec]
    x, _ = record(rec)
    td = time_features(x[None, :])
    assert td["rms"][0] == pytest.approx(rms, rel=0.005)
    assert td["peak"][0] == pytest.approx(peak, rel=0.005)
    assert td["crest_factor"][0] == pytest.approx(crest, rel=0.005)
    assert td["kurtosis"][0] == pytest.approx(kurt, rel=0.005)


def envelope_dominants(rec: int, n: int) -> tuple[Counter, np.ndarray]:
    fs = REFERENCE[rec][0]
    x, rpm = record(rec)
    spec = FeatureSpec(features=frozenset(["envelope"]), orders=tuple(ORDERS_6205.items()),
                       shaft_hz=rpm / 60)
    m = len(x) // n
    res = compute_batch(x[: m * n].reshape(m, n), make_plan(spec, n, fs), rpm / 60)
    snr = np.array([[r["bearing"][d]["snr_db"] for d in ORDERS_6205] for r in res], dtype=float)
    return Counter(r["bearing"]["dominant"] for r in res), snr


@pytest.mark.parametrize("rec", [97, 105, 109, 130, 135])
@pytest.mark.parametrize("n", [4096, 16384, 65536])
def test_envelope_dominant_defect(rec, n):
    counts, snr = envelope_dominants(rec, n)
    windows = sum(counts.values())
    if rec in EXPECTED_DOMINANT:
        want = EXPECTED_DOMINANT[rec]
        # At 4096 samples (12 Hz resolution at 48 kHz) a window may miss; longer ones may not.
        assert counts[want] >= (0.9 * windows if n == 4096 else windows), counts
        j = list(ORDERS_6205).index(want)
        assert np.median(snr[:, j]) > 10.0
    else:  # normal baseline: neither race named
        assert counts["bpfi"] == counts["bpfo"] == 0, counts


def f32le_blocks(x: np.ndarray, block: int):
    """What an MQTT vibration sensor publishes: little-endian float32 samples."""
    for i in range(0, len(x), block):
        yield x[i:i + block].astype("<f4").tobytes()


def decode_f32le(payload: bytes) -> np.ndarray:
    if len(payload) % 4:
        raise ValueError("f32le payload length is not a multiple of 4")
    return np.frombuffer(payload, dtype="<f4")


@pytest.mark.parametrize("rec,speed_from_tag", [(105, False), (130, True), (109, False)])
def test_through_engine_in_f32le_blocks(rec, speed_from_tag):
    """The real path of a waveform: f32le blocks of a few hundred samples -> Waveform ->
    AnalyticsEngine windows -> features records and rule samples."""
    fs = REFERENCE[rec][0]
    x, rpm = record(rec)
    bearing = {"orders": ORDERS_6205, "envelope_band": [2000, 5000]}
    bearing |= {"shaft_tag": "motor1.speed_rpm"} if speed_from_tag else {"shaft_hz": rpm / 60}
    cfg = AnalysisConfig(name="motor1_de", input="motor1.accel", window=16384,
                         spectrum={"peaks": 5, "bands": [[10, 1000], [1000, 5000]]}, bearing=bearing)
    eng = AnalyticsEngine([cfg], SummariesConfig(interval="10s"),
                          {"motor1.accel": "g", "motor1.speed_rpm": "rpm"})
    t0 = 1_700_000_000.0
    if speed_from_tag:
        eng.on_sample(Sample("motor1.speed_rpm", rpm, t0))
    records, samples, pos = [], [], 0
    for payload in f32le_blocks(x, 300):
        block = decode_f32le(payload)
        r, s = eng.on_waveform(Waveform("motor1.accel", block, fs, t0 + pos / fs, unit="g"))
        records += r
        samples += s
        pos += len(block)
    n_windows = len(x) // 16384
    assert len(records) == n_windows
    assert [r.ts for r in records] == pytest.approx([t0 + i * 16384 / fs for i in range(n_windows)])
    assert all(r.topic == "features/motor1_de" and r.kind == "features" for r in records)
    assert [r.payload["bearing"]["dominant"] for r in records] == [EXPECTED_DOMINANT[rec]] * n_windows
    # float32 transport changes the features only at float32 precision
    x32 = x.astype(np.float32).astype(np.float64)
    direct = time_features(x32[: n_windows * 16384].reshape(n_windows, 16384))
    got = np.array([r.payload["kurtosis"] for r in records])
    np.testing.assert_allclose(got, direct["kurtosis"], rtol=1e-9)
    # rule inputs
    names = {s.source for s in samples}
    assert set(eng.feature_names(cfg)) == names
    vel = [s.value for s in samples if s.source == "motor1_de.velocity_rms"]
    assert len(vel) == n_windows and all(v > 0 for v in vel)
    assert eng.flush_summaries(t0 + 10)[0].payload["tags"]["speed_rpm"]["last"] == rpm if speed_from_tag else True
