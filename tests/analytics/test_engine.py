"""AnalyticsEngine: the interface the core calls."""

from __future__ import annotations

import json

import numpy as np
import structlog
import pytest

from gateway.analytics import AnalyticsEngine
from gateway.analytics.config import AnalysisConfig, SummariesConfig
from gateway.model import NEW_CAPTURE, Quality, Sample, Waveform

FS = 12000.0


def analysis(name="m1_de", input="m1.accel", **kw) -> AnalysisConfig:
    base = dict(name=name, input=input, window=4096, spectrum={"peaks": 3, "bands": [[10, 1000]]},
                bearing={"shaft_hz": 29.93})
    base.update(kw)
    return AnalysisConfig(**base)


def blocks(x, size, t0=1000.0, source="m1.accel", fs=FS):
    return [Waveform(source, x[i:i + size], fs, t0 + i / fs, unit="g") for i in range(0, len(x), size)]


def signal(n, seed=0):
    t = np.arange(n) / FS
    rng = np.random.default_rng(seed)
    # an outer-race-like modulation at 107.3 Hz with harmonics, as periodic impacts give
    mod = 1 + sum(0.5 / h * np.cos(2 * np.pi * h * 107.3 * t) for h in (1, 2, 3))
    return (np.sin(2 * np.pi * 100 * t) + mod * np.sin(2 * np.pi * 3500 * t)
            + rng.normal(0, 0.1, n)).astype(np.float32)


def test_records_and_rule_samples():
    cfg = analysis()
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": "g"})
    recs, smps = [], []
    for w in blocks(signal(3 * 4096 + 100), 512):
        r, s = eng.on_waveform(w)
        recs += r
        smps += s
    assert len(recs) == 3
    rec = recs[1]
    assert rec.topic == "features/m1_de" and rec.kind == "features"
    assert rec.ts == pytest.approx(1000.0 + 4096 / FS)
    p = rec.payload
    json.dumps(p, allow_nan=False)
    assert p["analysis"] == "m1_de" and p["input"] == "m1.accel" and p["unit"] == "g"
    assert p["samples"] == 4096 and p["sample_rate"] == FS and p["quality"] == "good"
    assert p["window_start"].endswith("Z") and p["duration_s"] == pytest.approx(4096 / FS)
    for key in ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness", "velocity_rms"):
        assert isinstance(p[key], float)
    assert len(p["spectrum"]["peaks"]) == 3 and p["spectrum"]["bands"][0]["low"] == 10.0
    assert set(p["bearing"]) == {"shaft_hz", "bpfo", "bpfi", "bsf", "ftf", "dominant"}
    assert set(p["bearing"]["bpfo"]) >= {"hz", "amplitude", "snr_db"}
    by_source = {s.source: s for s in smps if s.ts == rec.ts}
    assert set(by_source) == set(eng.feature_names(cfg))
    assert by_source["m1_de.velocity_rms"].unit == "mm/s"
    assert by_source["m1_de.rms"].unit == "g" and by_source["m1_de.rms"].value == p["rms"]
    assert by_source["m1_de.bearing.bpfo"].value == p["bearing"]["bpfo"]["amplitude"]
    assert by_source["m1_de.bearing.bpfo.snr_db"].unit == "dB"


def test_feature_names_follow_the_config():
    cfg = analysis(features=["rms", "kurtosis"], bearing=None)
    eng = AnalyticsEngine([cfg], SummariesConfig(), {})
    assert eng.feature_names(cfg) == ["m1_de.rms", "m1_de.kurtosis"]


def test_only_configured_features_in_payload():
    cfg = analysis(features=["rms", "spectrum"], bearing=None)
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": "g"})
    (rec,), smps = eng.on_waveform(Waveform("m1.accel", signal(4096), FS, 0.0))
    assert "rms" in rec.payload and "spectrum" in rec.payload
    assert "kurtosis" not in rec.payload and "bearing" not in rec.payload
    assert [s.source for s in smps] == ["m1_de.rms"]


def test_batched_blocks_of_several_tags_equal_one_by_one():
    cfgs = [analysis(name=f"m{i}", input=f"m{i}.accel") for i in range(3)]
    units = {f"m{i}.accel": "g" for i in range(3)}
    ws = [Waveform(f"m{i}.accel", signal(4096, seed=i), FS, 50.0) for i in range(3)]
    one = AnalyticsEngine(cfgs, SummariesConfig(), units)
    separate = [one.on_waveform(w)[0][0].payload for w in ws]
    batched = [r.payload for r in AnalyticsEngine(cfgs, SummariesConfig(), units).on_waveforms(ws)[0]]
    assert [p["analysis"] for p in batched] == ["m0", "m1", "m2"]
    for a, b in zip(separate, batched):
        assert a["kurtosis"] == pytest.approx(b["kurtosis"], rel=1e-9)
        assert a["velocity_rms"] == pytest.approx(b["velocity_rms"], rel=1e-9)
        assert a["bearing"]["dominant"] == b["bearing"]["dominant"]


def test_two_analyses_on_one_input_with_overlap():
    a = analysis(name="fast", window=1024, overlap=0.5, features=["rms"], bearing=None)
    b = analysis(name="slow", window=4096, features=["rms"], bearing=None)
    eng = AnalyticsEngine([a, b], SummariesConfig(), {"m1.accel": "g"})
    recs = []
    for w in blocks(signal(8192), 1000):
        recs += eng.on_waveform(w)[0]
    fast = [r for r in recs if r.topic == "features/fast"]
    slow = [r for r in recs if r.topic == "features/slow"]
    assert len(fast) == (8192 - 1024) // 512 + 1 and len(slow) == 2
    assert fast[1].ts - fast[0].ts == pytest.approx(512 / FS)


def test_shaft_tag_speed_and_unknown_speed():
    cfg = analysis(bearing={"shaft_tag": "m1.speed", "shaft_tag_unit": "rpm"})
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": "g", "m1.speed": "rpm"})
    (rec,), smps = eng.on_waveform(Waveform("m1.accel", signal(4096), FS, 0.0))
    assert rec.payload["bearing"]["bpfo"]["amplitude"] is None
    assert rec.payload["bearing"]["dominant"] is None
    bpfo = next(s for s in smps if s.source == "m1_de.bearing.bpfo")
    assert bpfo.value is None and bpfo.quality is Quality.BAD
    eng.on_sample(Sample("m1.speed", 1795.8, 0.5))
    eng.on_sample(Sample("m1.speed", 0.0, 0.6, Quality.BAD))  # ignored: bad quality
    (rec,), _ = eng.on_waveform(Waveform("m1.accel", signal(4096), FS, 4096 / FS))
    assert rec.payload["bearing"]["shaft_hz"] == pytest.approx(29.93)
    assert rec.payload["bearing"]["bpfo"]["hz"] == pytest.approx(107.3, abs=FS / 4096)
    assert rec.payload["bearing"]["dominant"] == "bpfo"


def test_unit_not_acceleration():
    cfg = analysis(bearing=None, features=["rms", "velocity_rms"])
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": "V"})
    assert eng.problems() and "velocity_rms" in eng.problems()[0]
    (rec,), smps = eng.on_waveform(Waveform("m1.accel", signal(4096), FS, 0.0))
    assert rec.payload["velocity_rms"] is None
    vel = next(s for s in smps if s.source == "m1_de.velocity_rms")
    assert vel.value is None and vel.quality is Quality.BAD


@pytest.mark.parametrize("unit,factor", [("g", 1.0), ("m/s2", 1 / 9.80665), ("m/s²", 1 / 9.80665)])
def test_velocity_units(unit, factor):
    cfg = analysis(bearing=None, features=["velocity_rms"])
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": unit})
    t = np.arange(4096) / FS
    (rec,), _ = eng.on_waveform(Waveform("m1.accel", np.sin(2 * np.pi * 100 * t), FS, 0.0))
    assert rec.payload["velocity_rms"] == pytest.approx(9.80665 * factor / (2 * np.pi * 100) / 2**0.5 * 1000,
                                                        rel=0.01)


def test_gap_and_bad_block_restart_windows():
    cfg = analysis(features=["rms"], bearing=None)
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": "g"})
    x = signal(8192)
    ws = blocks(x, 512)
    del ws[3]  # a lost block
    recs = []
    for w in ws:
        recs += eng.on_waveform(w)[0]
    # the window restarts at the block after the gap: 4 blocks in, then 8 blocks = 1 window
    assert [r.ts for r in recs] == [pytest.approx(1000.0 + 4 * 512 / FS)]
    assert eng.stats() == {"m1_de": {"windows": 1, "dropped_windows": 0, "gaps": 1, "dropped_samples": 3 * 512,
                                     "pending_samples": 4 * 512, "restarts": {"late block": 1}}}


def test_restarts_declared_by_the_driver_are_counted_by_cause_and_logged_once():
    cfg = analysis(features=["rms"], bearing=None)
    eng = AnalyticsEngine([cfg], SummariesConfig(), {"m1.accel": "g"})
    ws = blocks(signal(8192), 512)
    for i in (2, 5):
        ws[i].restart = "seq gap"  # timestamps continue, but the sender says a block is missing
    ws[7].restart = NEW_CAPTURE
    with structlog.testing.capture_logs() as logs:
        recs = [r for w in ws for r in eng.on_waveform(w)[0]]
    # windows of 8 blocks: only the capture that starts at block 7 holds one
    assert [r.ts for r in recs] == [pytest.approx(1000.0 + 7 * 512 / FS)]
    st = eng.stats()["m1_de"]
    assert st["restarts"] == {"seq gap": 2, NEW_CAPTURE: 1}
    assert st["gaps"] == 2  # a new capture is not a loss
    assert st["dropped_samples"] == (2 + 3 + 2) * 512
    assert [(e["event"], e["cause"]) for e in logs if e["event"] == "analysis.stream_restart"] == [
        ("analysis.stream_restart", "seq gap")]


def test_other_sources_are_ignored():
    eng = AnalyticsEngine([analysis()], SummariesConfig(), {})
    assert eng.on_waveform(Waveform("other.accel", signal(8192), FS, 0.0)) == ([], [])


def test_sample_rate_that_cannot_hold_the_envelope_band_is_reported_not_raised():
    eng = AnalyticsEngine([analysis()], SummariesConfig(), {"m1.accel": "g"})
    (rec,), _ = eng.on_waveform(Waveform("m1.accel", signal(4096), 3000.0, 0.0))
    assert rec.payload["bearing"]["dominant"] is None and rec.payload["rms"] > 0
    assert any("envelope_band" in p for p in eng.problems())
