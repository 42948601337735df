"""All features of a batch of windows: the stages in order, one path for any number of rows.

The FFTs run on the whole (rows, n) array; the scalars of each window (moments, peaks, lines)
are finished one row at a time, which for these sizes costs no more than 2-D array code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from gateway.analytics.vibration.envelope import BearingLines, bearing_lines
from gateway.analytics.vibration.plan import Plan
from gateway.analytics.vibration.spectrum import Spectrum, power, spectra, weighted_rms, windowed_rfft
from gateway.analytics.vibration.timefeat import TIME_FEATURES, window_time_features

# Batching amortises the fixed per-call cost, but beyond ~64k samples per chunk the
# temporaries (spectrum, power, envelope) fall out of cache and each window gets slower again
# (measured: 16384-sample windows cost least in chunks of 4, 4096 in 8).
_CHUNK_SAMPLES = 65536
_MAX_ROWS = 8


@dataclass(slots=True)
class Features:
    """The features of one window. Only those in `features` (the spec's) were computed and go
    into the payload; None is an undefined value (e.g. kurtosis of a constant window)."""

    features: frozenset[str]
    rms: float | None = None
    peak: float | None = None
    peak_to_peak: float | None = None
    crest_factor: float | None = None
    kurtosis: float | None = None
    skewness: float | None = None
    velocity_rms: float | None = None  # mm/s
    spectrum: Spectrum | None = None
    bearing: BearingLines | None = None

    def scalars(self) -> list[tuple[str, float | None]]:
        """(name, value) of the computed scalar features, in payload order."""
        return [(name, getattr(self, name)) for name in (*TIME_FEATURES, "velocity_rms")
                if name in self.features]

    def to_payload(self) -> dict[str, Any]:
        """The JSON-ready feature part of a features record."""
        out: dict[str, Any] = dict(self.scalars())
        if self.spectrum is not None:
            out["spectrum"] = self.spectrum.to_payload()
        if self.bearing is not None:
            out["bearing"] = self.bearing.to_payload()
        return out


def analyse(X: np.ndarray, plan: Plan, shaft_hz: Iterable[float | None] | float | None = None,
            workers: int | None = None) -> list[Features]:
    """All features of `plan.spec` for each row of X (m, n) or for one window (n,).

    `shaft_hz`: one value for all rows or one per row (None/NaN: unknown speed, bearing lines
    are None). Rows must share the plan's length and sample rate. `workers`: scipy.fft workers.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    m, n = X.shape
    if n != plan.n:
        raise ValueError(f"window of {n} samples does not match the plan's {plan.n}")
    if shaft_hz is None or isinstance(shaft_hz, (int, float)):
        speeds = [shaft_hz] * m
    else:
        speeds = list(shaft_hz)
    rows = max(1, min(_MAX_ROWS, _CHUNK_SAMPLES // n))
    out: list[Features] = []
    # Divisions by zero and logs of zero (flat or silent windows) become inf/NaN on purpose and
    # end up as None: no warnings per window.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(0, m, rows):
            out += _analyse_chunk(X[i:i + rows], plan, speeds[i:i + rows], workers)
    return out


def _analyse_chunk(X: np.ndarray, plan: Plan, speeds: list[float | None],
                   workers: int | None) -> list[Features]:
    spec = plan.spec
    feats = spec.features
    m = X.shape[0]
    isfinite = math.isfinite
    if feats.isdisjoint(TIME_FEATURES):
        times: list[list[float | None]] = [[None] * 6] * m
    else:
        times = [[v if isfinite(v) else None for v in window_time_features(x)[:6]] for x in X]
    if not spec.needs_fft:
        return [Features(feats, *t) for t in times]

    S = windowed_rfft(X, plan, workers)
    P = power(S) if plan.weights is not None or "spectrum" in feats else None
    rms = weighted_rms(P, plan) if plan.weights is not None else None
    if rms is not None and spec.accel_scale is not None and "velocity_rms" in feats:
        velocity = [v if isfinite(v) else None for v in (row[plan.band_count] for row in rms)]
    else:
        velocity = [None] * m
    spectrum = spectra(P, plan, rms) if "spectrum" in feats else [None] * m
    bearing = bearing_lines(S, plan, speeds, workers) if "envelope" in feats else [None] * m
    return [Features(feats, *t, v, s, b) for t, v, s, b in zip(times, velocity, spectrum, bearing)]


def compute_batch(X: np.ndarray, plan: Plan, shaft_hz: Iterable[float | None] | float | None = None,
                  workers: int | None = None) -> list[dict[str, Any]]:
    """`analyse` as JSON-ready dicts, one per row (the feature part of the payload)."""
    return [f.to_payload() for f in analyse(X, plan, shaft_hz, workers)]


def compute(x: np.ndarray, plan: Plan, shaft_hz: float | None = None,
            workers: int | None = None) -> dict[str, Any]:
    """Features of one window (see `analyse`) as a JSON-ready dict."""
    return analyse(x, plan, [shaft_hz], workers)[0].to_payload()
