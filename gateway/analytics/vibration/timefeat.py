"""Time-domain features of the raw samples (DC included): rms, peak, peak_to_peak, crest_factor,
Pearson kurtosis and skewness (biased, as scipy.stats.kurtosis(fisher=False) and skew)."""

from __future__ import annotations

import math

import numpy as np

TIME_FEATURES = ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness")
_NAMES = (*TIME_FEATURES, "mean")
_EPS16 = 16 * float(np.finfo(np.float64).eps)


def time_features(X: np.ndarray) -> dict[str, list[float]]:
    """TIME_FEATURES and the mean per row of X (m, n) or of a single window (n,); NaN marks
    undefined values (crest factor of a silent window, shape statistics of a constant one)."""
    rows = [window_time_features(x) for x in np.atleast_2d(X)]
    return {name: [r[i] for r in rows] for i, name in enumerate(_NAMES)}


def window_time_features(x: np.ndarray) -> tuple[float, ...]:
    """The values of `time_features` for one window, as a tuple in that order.

    One row at a time on purpose: the O(n) work is a centred copy, its square and three BLAS
    dots, and the scalars are finished in plain Python. Measured against the same arithmetic
    on a (rows, n) array (2-D reductions, batched matmul): as fast for one row and faster for
    eight, where the 2-D temporaries of 16k-sample windows fall out of cache.
    """
    n = x.shape[0]
    mx = float(x.max())
    mn = float(x.min())
    mean = float(np.add.reduce(x)) / n
    d = x - mean
    d2 = d * d
    m2 = float(np.dot(d, d)) / n
    m3 = float(np.dot(d2, d)) / n
    m4 = float(np.dot(d2, d2)) / n
    ms = m2 + mean * mean
    rms = math.sqrt(ms)
    peak = max(mx, -mn)
    nan = math.nan
    # A window with (numerically) no variance has no defined shape statistics.
    defined = m2 > _EPS16 * ms and m2 > 0
    return (rms, peak, mx - mn, peak / rms if rms > 0 else nan,
            m4 / (m2 * m2) if defined else nan, m3 / (m2 * math.sqrt(m2)) if defined else nan, mean)
