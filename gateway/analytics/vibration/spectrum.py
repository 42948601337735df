"""The spectrum of the Hann-windowed window and what is read from it: band RMS, velocity RMS
(Parseval, corrected for the window's energy) and the largest peaks (Hann-interpolated)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from gateway.analytics.vibration.plan import Plan

_BLOCK = 32
_OFFSETS3 = np.arange(3)
_NEIGHBOURS = np.arange(-1, 2)


@dataclass(slots=True)
class Spectrum:
    """The `spectrum` feature of one window."""

    peaks: list[tuple[float, float]]  # (hz, sinusoid amplitude), largest first
    bands: list[tuple[float, float, float | None]]  # (low, high, rms); None: no bin in the band
    resolution_hz: float

    def to_payload(self) -> dict[str, Any]:
        return {
            "peaks": [{"hz": round(h, 4), "amplitude": a} for h, a in self.peaks],
            "bands": [{"low": lo, "high": hi, "rms": v} for lo, hi, v in self.bands],
            "resolution_hz": self.resolution_hz,
        }


def windowed_rfft(X: np.ndarray, plan: Plan, workers: int | None = None) -> np.ndarray:
    """rfft of each Hann-windowed row of X (m, n): the one transform of the full windows."""
    return sfft.rfft(X * plan.hann, axis=-1, workers=workers)


def power(S: np.ndarray) -> np.ndarray:
    """|S|^2 of a complex array (abs() would take a square root first)."""
    P = np.square(S.real)
    P += np.square(S.imag)
    return P


def weighted_rms(P: np.ndarray, plan: Plan) -> list[list[float]]:
    """Per row of P (m, K): the RMS of each of plan.weights (bands, then velocity in mm/s);
    NaN for a band with no bin at this resolution and sample rate (e.g. above Nyquist)."""
    ps = plan.power_scale
    sqrt = math.sqrt
    return [[sqrt(max(float(np.dot(p[lo:hi], w)) * ps, 0.0)) if hi > lo else math.nan
             for lo, hi, w in plan.weights or ()] for p in P]


def spectra(P: np.ndarray, plan: Plan, rms: list[list[float]] | None) -> list[Spectrum]:
    """The `spectrum` feature per row of P, with the band RMS from `weighted_rms`."""
    spec = plan.spec
    isfinite = math.isfinite
    out = []
    for r, p in enumerate(P):
        bands = rms[r][: plan.band_count] if plan.band_count else []
        out.append(Spectrum(
            peaks=spectrum_peaks(p, plan, spec.peaks),
            bands=[(lo, hi, v if isfinite(v) else None) for (lo, hi), v in zip(spec.bands, bands)],
            resolution_hz=plan.df,
        ))
    return out


def spectrum_peaks(p: np.ndarray, plan: Plan, count: int) -> list[tuple[float, float]]:
    """The `count` largest local maxima of one power spectrum p (K,) as [(hz, amplitude), ...],
    largest first (fewer when p has fewer maxima)."""
    K = p.shape[0]
    if count <= 0 or K < 3:
        return []
    bins, trip = _peak_bins(p, min(count, K - 2))
    df, scale = plan.df, plan.amp_scale
    peaks = []
    for b, (al, a0, ar) in zip(bins, trip):
        if a0 <= 0:
            continue  # not a local maximum (a spectrum with fewer than k maxima)
        off, corr = _hann_refine(a0, al, ar)
        peaks.append(((b + off) * df, a0 * scale * corr))
    peaks.sort(key=lambda q: -q[1])
    return peaks


def _peak_bins(p: np.ndarray, k: int) -> tuple[list[int], list[list[float]]]:
    """Bins (1..K-2) of the k largest local maxima (p[b] > p[b-1], p[b] >= p[b+1]) of p,
    largest first, and the magnitudes sqrt(p) at b-1, b, b+1 of each.

    The cost of one spectrum is the number of NumPy calls, not the bins, so neither the mask
    over all K bins nor the ranking is done with arrays when it can be avoided: if the set
    {p >= t} holds at least k local maxima, it holds the k largest (any local maximum outside
    is below t). t is the (4k)-th largest of strided group maxima, so the set is small (a few
    dozen bins: peaks and their flanks) and is tested in Python. Spectra whose set holds
    fewer than k maxima (e.g. one broad hump) take the full mask.
    """
    c = p[1:-1]
    nb = c.shape[0] // _BLOCK
    kk = 4 * k
    if nb >= 2 * kk:
        # Groups are strided (bins j, j+nb, j+2nb, ...): any partition works for the bound, and
        # a max across rows of a (BLOCK, nb) view is much faster than over short contiguous runs.
        bm = c[: nb * _BLOCK].reshape(_BLOCK, nb).max(axis=0)
        t = float(np.partition(bm, -kk)[-kk])
        if t > 0:
            sel = np.flatnonzero(c >= t)
            # rows (p[b-1], p[b], p[b+1]) for b = sel + 1; b + 1 <= K - 1 since c excludes it
            trip = p[sel[:, None] + _OFFSETS3].tolist()
            cand = [(v, i, l, r) for i, (l, v, r) in zip(sel.tolist(), trip) if v > l and v >= r]
            if len(cand) >= k:
                cand.sort(key=lambda q: -q[0])
                sq = math.sqrt
                return ([i + 1 for _, i, _, _ in cand[:k]],
                        [[sq(l), sq(v), sq(r)] for v, _, l, r in cand[:k]])
    mask = np.greater(c, p[:-2])
    mask &= np.greater_equal(c, p[2:])
    bins = _top_k(c * mask, k) + 1  # masked: 0 where not a local maximum
    return bins.tolist(), np.sqrt(p[bins[:, None] + _NEIGHBOURS]).tolist()


def _top_k(cand: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of cand (>= 0, mostly zeros), largest first when the
    bound below applies.

    argpartition over an array that is two-thirds zeros is slow (~20x on a real spectrum), so
    first bound the answer: the k-th largest of the strided block maxima is a value that at
    least k entries reach, hence every one of the k largest entries reaches it; only those
    few are ranked.
    """
    nb = cand.shape[0] // _BLOCK
    if nb >= 2 * k:
        bm = cand[: nb * _BLOCK].reshape(_BLOCK, nb).max(axis=0)
        bound = np.partition(bm, -k)[-k]
        if bound > 0:
            flat = np.flatnonzero(cand >= bound)
            return flat[np.argsort(-cand[flat])[:k]]
    return np.argpartition(cand, -k)[-k:]


def _hann_refine(a0: float, al: float, ar: float) -> tuple[float, float]:
    """Offset (bins) and amplitude factor of a Hann-windowed sine from a peak bin's magnitude
    a0 and its neighbours' al, ar. For Hann, |X[k+1]|/|X[k]| = (1+d)/(2-d) at tone offset d."""
    ratio = max(al, ar) / a0 if a0 > 0 else 0.0
    d = min(max((2.0 * ratio - 1.0) / (ratio + 1.0), 0.0), 0.5)
    # Hann response at offset d (1 at d=0): sinc(d) / (1 - d^2)
    gain = (math.sin(math.pi * d) / (math.pi * d) if d > 1e-12 else 1.0) / (1.0 - d * d)
    return (d if ar >= al else -d), 1.0 / gain
