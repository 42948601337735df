"""What to compute (`FeatureSpec`) and everything that depends only on (spec, n, fs) (`Plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft as sfft

G = 9.80665  # m/s^2 per g (standard gravity)

# Acceleration units understood for velocity_rms; value: metres per second^2 per unit.
ACCEL_UNITS: dict[str, float] = {
    "g": G, "m/s2": 1.0, "m/s^2": 1.0, "m/s²": 1.0, "ms-2": 1.0, "m s-2": 1.0,
    "mm/s2": 1e-3, "mm/s^2": 1e-3, "mm/s²": 1e-3,
}

HARMONICS = 3  # harmonics of each bearing defect line examined in the envelope spectrum


def accel_scale(unit: str | None) -> float | None:
    """m/s^2 per unit of the input, or None when the unit is not an acceleration we know."""
    if unit is None:
        return None
    u = unit.strip()
    return ACCEL_UNITS.get(u, ACCEL_UNITS.get(u.replace(" ", "").lower()))


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """What to compute, independent of window length and sample rate: hashable, so plans can be
    cached and windows of different analyses with the same spec can be batched together."""

    features: frozenset[str]
    velocity_band: tuple[float, float] = (10.0, 1000.0)
    peaks: int = 5
    bands: tuple[tuple[float, float], ...] = ()
    envelope_band: tuple[float, float] = (2000.0, 5000.0)
    orders: tuple[tuple[str, float], ...] = ()
    tolerance: float = 0.02
    accel_scale: float | None = G  # m/s^2 per input unit; None: velocity_rms cannot be computed
    envelope_max_hz: float = 1000.0  # highest envelope frequency examined when the speed varies
    shaft_hz: float | None = None  # fixed shaft speed, lets the plan size the envelope FFT tightly

    @classmethod
    def from_config(cls, cfg: Any, unit: str | None) -> "FeatureSpec":
        """Build from an `AnalysisConfig` and the unit of its input tag."""
        b = cfg.bearing
        return cls(
            features=frozenset(cfg.features),
            velocity_band=(float(cfg.velocity_band[0]), float(cfg.velocity_band[1])),
            peaks=int(cfg.spectrum.peaks),
            bands=tuple((float(lo), float(hi)) for lo, hi in cfg.spectrum.bands),
            envelope_band=tuple(map(float, b.envelope_band)) if b else (2000.0, 5000.0),
            orders=tuple((k, float(v)) for k, v in b.orders.items()) if b else (),
            tolerance=float(b.tolerance) if b else 0.02,
            accel_scale=accel_scale(unit),
            envelope_max_hz=float(getattr(b, "envelope_max_hz", 1000.0) or 1000.0) if b else 1000.0,
            shaft_hz=float(b.shaft_hz) if b and b.shaft_hz else None,
        )

    @property
    def needs_fft(self) -> bool:
        return bool(self.features & {"velocity_rms", "spectrum", "envelope"})


@dataclass(slots=True)
class Plan:
    """Everything that depends only on (spec, n, fs): windows, weights, bin ranges."""

    spec: FeatureSpec
    n: int
    fs: float
    df: float
    hann: np.ndarray
    amp_scale: float  # |X| -> sinusoid amplitude
    power_scale: float  # |X|^2 -> mean square, one-sided factor 2 kept in the weights
    # Per band [+ velocity]: (first bin, end bin, power weights of those bins). Slices rather
    # than one (K, columns) matrix: a band reads only its own bins of the power spectrum.
    weights: list[tuple[int, int, np.ndarray]] | None
    band_count: int
    # envelope
    k1: int = 0
    k2: int = 0
    env_len: int = 0
    env_bins: int = 0
    env_df: float = 1.0
    env_scale: float = 1.0  # sqrt of the envelope amplitude scale, applied to the band's bins
    w2hat: np.ndarray | None = None  # rfft(Hann^2)[:3] / sum(Hann^2)
    line_cache: dict[float, Any] = field(default_factory=dict)  # line geometry per shaft speed
    problem: str | None = None  # why a requested feature cannot be computed at this (n, fs)


def make_plan(spec: FeatureSpec, n: int, fs: float) -> Plan:
    n = int(n)
    fs = float(fs)
    df = fs / n
    # Periodic Hann: a sine on a bin reads exactly its amplitude (sum(w) = n/2).
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    K = n // 2 + 1
    freqs = np.arange(K) * df
    one_sided = np.full(K, 2.0)
    one_sided[0] = 0.0  # DC excluded by construction
    if n % 2 == 0:
        one_sided[-1] = 1.0
    columns = []
    for lo, hi in spec.bands:
        columns.append(np.where((freqs >= lo) & (freqs <= hi), one_sided, 0.0))
    band_count = len(columns)
    if "velocity_rms" in spec.features and spec.accel_scale is not None:
        lo, hi = spec.velocity_band
        sel = (freqs >= max(lo, df)) & (freqs <= hi)
        w = np.zeros(K)
        # v = a / (j 2 pi f): power divides by (2 pi f)^2; m/s -> mm/s.
        w[sel] = one_sided[sel] * (spec.accel_scale * 1000.0 / (2.0 * np.pi * freqs[sel])) ** 2
        columns.append(w)
    weights = []
    for w in columns:
        nz = np.flatnonzero(w)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        weights.append((lo, hi, np.ascontiguousarray(w[lo:hi])))
    plan = Plan(
        spec=spec, n=n, fs=fs, df=df, hann=hann,
        amp_scale=2.0 / float(hann.sum()),
        power_scale=1.0 / (n * float(np.dot(hann, hann))),
        weights=weights or None, band_count=band_count,
    )
    if "envelope" in spec.features:
        _plan_envelope(plan)
    return plan


def _plan_envelope(plan: Plan) -> None:
    spec, n, fs, df = plan.spec, plan.n, plan.fs, plan.df
    lo, hi = spec.envelope_band
    k1 = max(1, int(math.ceil(lo / df)))
    k2 = min(n // 2, int(math.floor(hi / df))) + 1
    if k2 - k1 < 4:
        # Not an exception: a sample rate is only known when data arrive, and one odd sensor
        # must not stop the others. The envelope is reported as unknown and the problem kept.
        plan.problem = (f"envelope_band {spec.envelope_band} Hz holds fewer than 4 bins at "
                        f"{fs:g} Hz / {n} samples: no envelope analysis")
        return
    if spec.shaft_hz:
        top_order = max((o for _, o in spec.orders), default=1.0)
        f_max = HARMONICS * top_order * spec.shaft_hz * (1 + spec.tolerance) * 1.3 + 10 * df
    else:
        f_max = spec.envelope_max_hz
    env_bins = int(min(math.ceil(f_max / df) + 1, n // 2))
    B = k2 - k1
    # |a|^2 of a baseband signal with bins 0..B-1 spans -(B-1)..(B-1); on L points that wraps,
    # and bins 0..env_bins stay clean as long as L >= B + env_bins.
    L = sfft.next_fast_len(B + env_bins + 1, real=False)
    w2 = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(L) / L)) ** 2  # Hann^2 at the envelope's times
    w2_sum = float(w2.sum())
    plan.k1, plan.k2, plan.env_len, plan.env_bins = k1, k2, L, env_bins
    plan.env_df = df
    # Scale applied to the band's bins so that the spectrum of |a|^2 comes out in amplitude:
    # (2 L / n)^2 (the ifft scaling of the baseband analytic signal, squared) * 2 / sum(Hann^2)
    # (one-sided, coherent gain), square-rooted.
    plan.env_scale = math.sqrt((2.0 * L / n) ** 2 * 2.0 / w2_sum)
    # rfft(Hann^2)[:3] / sum(Hann^2): the mean removal in the frequency domain (see envelope).
    plan.w2hat = sfft.rfft(w2)[:3] / w2_sum


class PlanCache:
    """Plans per (spec, n, fs). Owned by an engine: no module-level mutable state."""

    def __init__(self) -> None:
        self._plans: dict[tuple[FeatureSpec, int, float], Plan] = {}

    def get(self, spec: FeatureSpec, n: int, fs: float) -> Plan:
        key = (spec, int(n), float(fs))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make_plan(spec, n, fs)
        return plan
