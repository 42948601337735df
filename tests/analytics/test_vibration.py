"""Synthetic signals with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from gateway.analytics.vibration import (
    G, FeatureSpec, compute, compute_batch, dominant_defect, make_plan, time_features,
)

ALL = frozenset(["rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness",
                 "velocity_rms", "spectrum", "envelope"])
ORDERS = (("bpfo", 3.5848), ("bpfi", 5.4152), ("bsf", 2.357), ("ftf", 0.39828))


def spec(**kw) -> FeatureSpec:
    base = dict(features=ALL, orders=ORDERS, shaft_hz=29.93, bands=((10.0, 1000.0), (1000.0, 5000.0)))
    base.update(kw)
    return FeatureSpec(**base)


def sine(amp, f, fs, n, phase=0.3):
    return amp * np.sin(2 * np.pi * f * np.arange(n) / fs + phase)


@pytest.mark.parametrize("amp,f", [(1.0, 100.0), (2.5, 437.3), (0.01, 1234.5)])
def test_sine_rms_crest_peak(amp, f):
    fs, n = 25600.0, 16384
    x = sine(amp, f, fs, n)
    out = compute(x, make_plan(spec(), n, fs))
    # Not an integer number of periods: allow the fraction of a period that is left over.
    assert out["rms"] == pytest.approx(amp / math.sqrt(2), rel=2e-3)
    assert out["crest_factor"] == pytest.approx(math.sqrt(2), rel=2e-3)
    assert out["peak"] == pytest.approx(amp, rel=1e-3)
    assert out["peak_to_peak"] == pytest.approx(2 * amp, rel=1e-3)
    assert out["kurtosis"] == pytest.approx(1.5, rel=5e-3)  # Pearson kurtosis of a sine


def test_time_features_match_scipy():
    rng = np.random.default_rng(1)
    X = np.stack([rng.normal(0.3, 2.0, 5000), rng.exponential(1.0, 5000), rng.standard_t(5, 5000)])
    td = time_features(X)
    for r in range(3):
        x = X[r]
        assert td["rms"][r] == pytest.approx(np.sqrt(np.mean(x * x)), rel=1e-12)
        assert td["peak"][r] == pytest.approx(np.max(np.abs(x)), rel=1e-12)
        assert td["peak_to_peak"][r] == pytest.approx(np.ptp(x), rel=1e-12)
        assert td["kurtosis"][r] == pytest.approx(scipy.stats.kurtosis(x, fisher=False), rel=1e-10)
        assert td["skewness"][r] == pytest.approx(scipy.stats.skew(x), rel=1e-10)


def test_gaussian_noise_kurtosis_near_3():
    x = np.random.default_rng(7).normal(0, 1, 65536)
    out = compute(x, make_plan(spec(features=frozenset(["kurtosis", "skewness"])), len(x), 25600))
    assert out["kurtosis"] == pytest.approx(3.0, abs=0.1)
    assert abs(out["skewness"]) < 0.05


@pytest.mark.parametrize("unit_scale,amp,f", [(G, 1.0, 100.0), (1.0, 9.80665, 159.155), (G, 0.5, 37.0)])
def test_velocity_rms_of_acceleration_sine(unit_scale, amp, f):
    fs, n = 12000.0, 16384
    x = sine(amp, f, fs, n)
    out = compute(x, make_plan(spec(accel_scale=unit_scale), n, fs))
    expected = amp * unit_scale / (2 * math.pi * f) / math.sqrt(2) * 1000.0  # mm/s
    assert out["velocity_rms"] == pytest.approx(expected, rel=0.01)


def test_velocity_band_excludes_dc_and_out_of_band():
    fs, n = 12000.0, 16384
    x = 5.0 + sine(1.0, 2000.0, fs, n)  # DC and a line above the 10-1000 Hz band
    out = compute(x, make_plan(spec(), n, fs))
    assert out["velocity_rms"] < 0.01
    assert out["rms"] == pytest.approx(math.sqrt(25 + 0.5), rel=1e-3)  # DC included here


def test_velocity_needs_acceleration_unit():
    x = sine(1.0, 100.0, 12000, 4096)
    out = compute(x, make_plan(spec(accel_scale=None), 4096, 12000))
    assert out["velocity_rms"] is None


@pytest.mark.parametrize("f", [100.0, 1000.0 + 0.5 * 12000 / 16384, 2222.2])
def test_spectrum_peak_amplitude_and_frequency(f):
    fs, n = 12000.0, 16384
    x = sine(1.7, f, fs, n) + sine(0.2, 3500.0, fs, n)
    out = compute(x, make_plan(spec(), n, fs))
    peaks = out["spectrum"]["peaks"]
    df = fs / n
    assert abs(peaks[0]["hz"] - f) <= df
    assert peaks[0]["amplitude"] == pytest.approx(1.7, rel=0.01)
    assert abs(peaks[1]["hz"] - 3500.0) <= df
    assert peaks[1]["amplitude"] == pytest.approx(0.2, rel=0.01)


def test_spectrum_on_bin_sine_reads_exactly_one():
    fs, n = 16384.0, 16384  # 1 Hz bins
    x = sine(1.0, 120.0, fs, n)
    p = compute(x, make_plan(spec(), n, fs))["spectrum"]["peaks"][0]
    assert p["hz"] == pytest.approx(120.0, abs=1e-6)
    assert p["amplitude"] == pytest.approx(1.0, rel=1e-9)


def test_band_rms():
    fs, n = 12000.0, 16384
    x = sine(1.0, 300.0, fs, n) + sine(2.0, 3000.0, fs, n)
    bands = compute(x, make_plan(spec(), n, fs))["spectrum"]["bands"]
    assert bands[0]["low"] == 10.0 and bands[0]["high"] == 1000.0
    assert bands[0]["rms"] == pytest.approx(1 / math.sqrt(2), rel=0.01)
    assert bands[1]["rms"] == pytest.approx(2 / math.sqrt(2), rel=0.01)


def bearing_signal(fs, n, defect_hz, seed=3, carrier=3500.0, noise=0.05):
    """Amplitude-modulated resonance: impacts at defect_hz exciting a 3.5 kHz mode."""
    t = np.arange(n) / fs
    rng = np.random.default_rng(seed)
    mod = 1.0 + 0.8 * np.cos(2 * np.pi * defect_hz * t)
    return mod * np.sin(2 * np.pi * carrier * t) + rng.normal(0, noise, n) + sine(0.5, 29.93, fs, n)


@pytest.mark.parametrize("defect,order", [("bpfo", 3.5848), ("bpfi", 5.4152), ("bsf", 2.357)])
def test_envelope_names_modulated_defect(defect, order):
    fs, n, fr = 12000.0, 16384, 29.93
    # Harmonics in the envelope too, as a periodic impact train gives.
    t = np.arange(n) / fs
    f = order * fr
    mod = 1.0 + sum(0.5 / h * np.cos(2 * np.pi * h * f * t) for h in (1, 2, 3))
    x = mod * np.sin(2 * np.pi * 3500.0 * t) + np.random.default_rng(5).normal(0, 0.2, n)
    b = compute(x, make_plan(spec(), n, fs), fr)["bearing"]
    assert b["dominant"] == defect
    assert abs(b[defect]["hz"] - f) < 0.02 * f
    assert b[defect]["snr_db"] > 20


@pytest.mark.parametrize("f_mod,rel", [(137 * 12000.0 / 16384, 0.01), (100.0, 0.1)])
def test_envelope_amplitude_of_known_modulation(f_mod, rel):
    """On a bin the line reads exactly; half a bin off (100 Hz here) the Hann^2 window of the
    envelope spectrum loses up to ~8 % (no interpolation of envelope lines)."""
    fs, n = 12000.0, 16384
    m, A = 0.4, 1.0
    t = np.arange(n) / fs
    x = A * (1 + m * np.cos(2 * np.pi * f_mod * t)) * np.sin(2 * np.pi * 3500 * t)
    sp = spec(orders=(("bpfo", f_mod / 29.93),))
    b = compute(x, make_plan(sp, n, fs), 29.93)["bearing"]
    # squared envelope A^2 (1 + m cos)^2 has a line of 2 m A^2 at f_mod
    assert b["bpfo"]["amplitude"] == pytest.approx(2 * m * A * A, rel=rel)
    assert b["bpfo"]["hz"] == pytest.approx(f_mod, abs=fs / n)


def test_noise_has_no_dominant_defect():
    fs, n = 12000.0, 16384
    X = np.random.default_rng(11).normal(0, 1, (64, n))
    res = compute_batch(X, make_plan(spec(), n, fs), 29.93)
    # The criterion trades sensitivity for a false-call rate of ~2 % on pure noise.
    assert sum(r["bearing"]["dominant"] is not None for r in res) <= 3


def test_unknown_speed_gives_none_lines():
    x = bearing_signal(12000.0, 4096, 107.3)
    b = compute(x, make_plan(spec(shaft_hz=None), 4096, 12000.0), None)["bearing"]
    assert b["dominant"] is None and b["shaft_hz"] is None
    assert b["bpfo"] == {"hz": None, "amplitude": None, "snr_db": None, "harmonics_snr_db": [None] * 3}


def test_dominant_criterion_needs_harmonics_and_margin():
    names = ["bpfo", "bpfi"]
    snr = np.array([
        [[20, 12, 9], [5, 1, 0]],     # clear bpfo
        [[20, 1, 2], [5, 1, 0]],      # fundamental alone: not enough
        [[20, 12, 9], [19, 12, 9]],   # two alike: no clear winner
        [[20, 12, np.nan], [0, 0, 0]],  # 3x outside the envelope range: 2x suffices
    ], dtype=float)
    assert dominant_defect(snr, names) == ["bpfo", None, None, "bpfo"]


def approx_tree(v):
    if isinstance(v, dict):
        return {k: approx_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [approx_tree(x) for x in v]
    if isinstance(v, float):
        return pytest.approx(v, rel=1e-9, abs=1e-12)
    return v


def test_batch_equals_single_and_is_json_plain():
    fs, n = 12000.0, 4096
    X = np.stack([bearing_signal(fs, n, 107.3, seed=s) for s in range(3)])
    plan = make_plan(spec(), n, fs)
    batch = compute_batch(X, plan, [29.93, None, 29.0])
    singles = [compute(X[0], plan, 29.93), compute(X[1], plan, None), compute(X[2], plan, 29.0)]
    json.dumps(batch, allow_nan=False)
    # 2-D and 1-D FFTs may round differently in the last bits.
    assert batch == approx_tree(singles)

    def plain(v):
        if isinstance(v, dict):
            return all(plain(x) for x in v.values())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or type(v) in (float, int, str, bool)
    assert plain(batch)


def test_constant_window_has_undefined_shape_features():
    out = compute(np.full(1024, 2.0), make_plan(spec(), 1024, 12000.0), 29.93)
    assert out["rms"] == 2.0 and out["crest_factor"] == 1.0
    assert out["kurtosis"] is None and out["skewness"] is None
    zero = compute(np.zeros(1024), make_plan(spec(), 1024, 12000.0), 29.93)
    assert zero["crest_factor"] is None
    json.dumps(zero, allow_nan=False)


def test_envelope_band_outside_the_spectrum_gives_unknown_lines():
    plan = make_plan(spec(envelope_band=(2000.0, 5000.0)), 1024, 3000.0)  # Nyquist 1500 Hz
    assert plan.problem and "envelope_band" in plan.problem
    out = compute(sine(1.0, 100.0, 3000.0, 1024), plan, 29.93)
    assert out["bearing"]["dominant"] is None and out["bearing"]["bpfo"]["amplitude"] is None
    assert out["rms"] == pytest.approx(2**-0.5, rel=0.01)


def test_band_above_nyquist_is_unknown():
    out = compute(sine(1.0, 100.0, 4000.0, 1024), make_plan(spec(bands=((10.0, 1000.0), (3000.0, 5000.0)),
                                                                   features=frozenset(["spectrum"])), 1024, 4000.0))
    assert out["spectrum"]["bands"][0]["rms"] == pytest.approx(2**-0.5, rel=0.01)
    assert out["spectrum"]["bands"][1]["rms"] is None
