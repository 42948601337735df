"""Vibration features of acceleration windows: pure, vectorised NumPy/SciPy.

Everything works on a 2-D array of windows (rows) so that windows of several tags which close
together share one call (`compute_batch`); a single window is a batch of one. Only the handful
of scalars per window (moments -> kurtosis, five spectrum peaks, twelve defect lines) is finished
in plain Python: loops over windows and lines, never over samples.

Cost model (why the design looks like this): the only O(n log n) step on the full window is one
real FFT of the Hann-windowed samples. Spectrum peaks, band RMS, velocity RMS (integration as a
division by (2*pi*f)^2 in the power spectrum, Parseval for the RMS) and the analytic signal of
the envelope all reuse it. The analytic signal is built only from the bins inside
`envelope_band`, shifted to baseband, so its inverse FFT and the envelope spectrum's FFT have
length ~(band width + highest envelope frequency of interest)/df instead of n.

Conventions that are part of the outside contract:
* rms, peak, peak_to_peak, crest_factor, kurtosis, skewness use the raw samples, DC included.
* kurtosis is Pearson's (Gaussian = 3), biased (scipy.stats.kurtosis(fisher=False));
  skewness is scipy.stats.skew (biased).
* spectrum amplitude is that of a sinusoid: Hann window, amplitude-corrected; a peak is refined
  by Hann interpolation between the two largest bins, so an off-bin sine reads its amplitude too.
* band RMS and velocity RMS come from the windowed power spectrum divided by the window's
  energy (sum(w^2)), i.e. Parseval corrected for the equivalent noise bandwidth of Hann.
* the envelope spectrum is that of the squared envelope (unit: input unit squared), mean
  removed. The windowed signal's squared envelope carries Hann^2, which then serves as the
  window of the envelope spectrum; amplitudes are corrected by its coherent gain and read at
  the bin (no interpolation: up to ~8 % low half a bin off). snr_db = 20*log10(line amplitude /
  median of the envelope spectrum around the line); `dominant_defect` documents the criterion.
* undefined values (crest factor or kurtosis of a constant window, a bearing line without a
  shaft speed, SNR against a zero background) are None, never NaN.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import scipy.fft as sfft

try:
    # pocketfft's entry points as scipy.fft calls them, minus the backend dispatch (uarray),
    # which costs several microseconds a call: for one window that is a noticeable share of
    # the fixed cost (three transforms). Same arguments and results; a user-installed
    # scipy.fft backend is not consulted. Falls back to the public functions.
    from scipy.fft._pocketfft import ifft as _ifft, rfft as _rfft
except ImportError:  # pragma: no cover - other scipy layouts
    _ifft, _rfft = sfft.ifft, sfft.rfft

G = 9.80665  # m/s^2 per g (standard gravity)

# Acceleration units understood for velocity_rms; value: metres per second^2 per unit.
ACCEL_UNITS: dict[str, float] = {
    "g": G, "m/s2": 1.0, "m/s^2": 1.0, "m/s²": 1.0, "ms-2": 1.0, "m s-2": 1.0,
    "mm/s2": 1e-3, "mm/s^2": 1e-3, "mm/s²": 1e-3,
}

_TIME_SET = frozenset(["rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness"])
SCALAR_FEATURES = ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness", "velocity_rms")
DEFECTS = ("bpfo", "bpfi", "bsf", "ftf")

# Dominant-defect criterion (see `dominant_defect`).
DOMINANT_FUNDAMENTAL_SNR_DB = 10.0
DOMINANT_MIN_SNR_DB = 6.0
DOMINANT_MARGIN_DB = 3.0
HARMONICS = 3

_EPS16 = 16 * float(np.finfo(np.float64).eps)


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
    env_w2: np.ndarray | None = None
    env_w2_sum: float = 1.0
    env_gain: float = 1.0
    env_df: float = 1.0
    env_scale: float = 1.0  # sqrt of the envelope amplitude scale, applied to the band's bins
    w2hat: np.ndarray | None = None  # rfft(Hann^2)[:3] / sum(Hann^2)
    extra: dict = field(default_factory=dict)  # caches derived at run time (line geometry)
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
    weights = weights or None
    plan = Plan(
        spec=spec, n=n, fs=fs, df=df, hann=hann,
        amp_scale=2.0 / float(hann.sum()),
        power_scale=1.0 / (n * float(np.dot(hann, hann))),
        weights=weights, band_count=band_count,
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
    plan.k1, plan.k2, plan.env_len, plan.env_bins = k1, k2, L, env_bins
    plan.env_w2 = w2
    plan.env_w2_sum = float(w2.sum())
    plan.env_gain = (2.0 * L / n) ** 2  # ifft scaling of the baseband analytic signal, squared
    plan.env_df = df
    # Scale applied to the band's bins so that the spectrum of |a|^2 comes out in amplitude:
    # env_gain (squared ifft scale) * 2 / sum(Hann^2) (one-sided, coherent gain), square-rooted.
    plan.env_scale = math.sqrt(plan.env_gain * 2.0 / plan.env_w2_sum)
    # rfft(Hann^2)[:3] / sum(Hann^2): the mean removal in the frequency domain (see there).
    plan.w2hat = sfft.rfft(w2)[:3] / plan.env_w2_sum


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


# --------------------------------------------------------------------------- time domain

def time_features(X: np.ndarray) -> dict[str, list[float]]:
    """rms, peak, peak_to_peak, crest_factor, kurtosis, skewness per row of X (m, n).

    The O(n) work is vectorised (max, min, sum, one centred copy, three BLAS dot products);
    the handful of scalars per window is finished in plain Python, which costs less than
    a dozen NumPy calls on arrays of one element. NaN marks undefined values.
    """
    X = np.atleast_2d(X)
    m, n = X.shape
    if m == 1:
        return {k: [v] for k, v in zip(_TF_NAMES, _time_features_one(X[0]))}
    mx = X.max(axis=-1).tolist()
    mn = X.min(axis=-1).tolist()
    mean_a = np.add.reduce(X, axis=-1) / n
    d = X - mean_a[:, None]
    d2 = d * d
    if m == 1:  # plain BLAS dots straight to Python floats: no tiny-array round trips
        d0, d20 = d[0], d2[0]
        m2, m3, m4 = [float(d0 @ d0) / n], [float(d20 @ d0) / n], [float(d20 @ d20) / n]
    else:
        m2 = (_rowdot(d, d) / n).tolist()
        m3 = (_rowdot(d2, d) / n).tolist()
        m4 = (_rowdot(d2, d2) / n).tolist()
    out: dict[str, list[float]] = {k: [] for k in ("rms", "peak", "peak_to_peak", "crest_factor",
                                                   "kurtosis", "skewness", "mean")}
    nan = math.nan
    eps16 = _EPS16
    for r, mean in enumerate(mean_a.tolist()):
        ms = m2[r] + mean * mean
        rms = math.sqrt(ms)
        peak = max(mx[r], -mn[r])
        # A window with (numerically) no variance has no defined shape statistics.
        defined = m2[r] > eps16 * ms and m2[r] > 0
        out["rms"].append(rms)
        out["peak"].append(peak)
        out["peak_to_peak"].append(mx[r] - mn[r])
        out["crest_factor"].append(peak / rms if rms > 0 else nan)
        out["kurtosis"].append(m4[r] / (m2[r] * m2[r]) if defined else nan)
        out["skewness"].append(m3[r] / (m2[r] * math.sqrt(m2[r])) if defined else nan)
        out["mean"].append(mean)
    return out


_TF_NAMES = ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness", "mean")


def _time_features_one(x: np.ndarray) -> tuple[float, ...]:
    """time_features of a single 1-D window as a tuple in _TF_NAMES order: the same arithmetic
    (one centred copy, its square, three BLAS dots) without the 2-D reductions and per-row
    lists, whose fixed cost dominates for one window."""
    n = x.shape[0]
    mx = float(x.max())
    mn = float(x.min())
    mean = float(np.add.reduce(x)) / n
    # Three plain BLAS dots: measured faster here than one (2, n) @ (n, 2) product or a
    # (2, n) @ (n,) product over a stacked [d; d^2].
    d = x - mean
    d2 = d * d
    m2 = float(np.dot(d, d)) / n
    m3 = float(np.dot(d2, d)) / n
    m4 = float(np.dot(d2, d2)) / n
    ms = m2 + mean * mean
    rms = math.sqrt(ms)
    peak = max(mx, -mn)
    nan = math.nan
    defined = m2 > _EPS16 * ms and m2 > 0
    return (rms, peak, mx - mn, peak / rms if rms > 0 else nan,
            m4 / (m2 * m2) if defined else nan, m3 / (m2 * math.sqrt(m2)) if defined else nan, mean)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise sum(a*b): BLAS dot for one row, batched matmul for several (einsum is ~2x slower)."""
    if a.shape[0] == 1:
        return np.array([np.dot(a[0], b[0])])
    return (a[:, None, :] @ b[:, :, None])[:, 0, 0]


def _power(S: np.ndarray) -> np.ndarray:
    """|S|^2 of a complex array (abs() would take a square root first)."""
    P = np.square(S.real)
    P += np.square(S.imag)
    return P


def _hann_refine(a0: float, al: float, ar: float) -> tuple[float, float]:
    """Offset (bins) and amplitude factor of a Hann-windowed sine from a peak bin's magnitude
    a0 and its neighbours' al, ar. For Hann, |X[k+1]|/|X[k]| = (1+d)/(2-d) at tone offset d."""
    ratio = max(al, ar) / a0 if a0 > 0 else 0.0
    d = min(max((2.0 * ratio - 1.0) / (ratio + 1.0), 0.0), 0.5)
    # Hann response at offset d (1 at d=0): sinc(d) / (1 - d^2)
    gain = (math.sin(math.pi * d) / (math.pi * d) if d > 1e-12 else 1.0) / (1.0 - d * d)
    return (d if ar >= al else -d), 1.0 / gain


_BLOCK = 32
_CHUNK_SAMPLES = 65536


def _top_k(cand: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row of cand (>= 0, mostly zeros).

    argpartition over a row that is two-thirds zeros is slow (~20x on a real spectrum), so
    first bound the answer: the k-th largest of the per-block maxima B is a value that at least
    k entries reach, hence every one of the k largest entries is >= B; only those few are
    ranked.
    """
    m, K = cand.shape
    nb = K // _BLOCK
    if nb < 2 * k:
        return np.argpartition(cand, -k, axis=-1)[:, -k:]
    # Groups are strided (bins j, j+nb, j+2nb, ...): any partition works for the bound, and
    # a max across rows of a (BLOCK, nb) view is much faster than over short contiguous runs.
    bm = cand[:, : nb * _BLOCK].reshape(m, _BLOCK, nb).max(axis=1)
    bound = np.partition(bm, -k, axis=-1)[:, -k]
    if not (bound > 0).all():
        return np.argpartition(cand, -k, axis=-1)[:, -k:]
    flat = np.flatnonzero(cand >= bound[:, None])
    if m == 1:
        return flat[np.argsort(-cand[0, flat])[:k]][None, :]
    rr, cc = np.divmod(flat, K)
    vals = cand.reshape(-1)[flat]
    order = np.lexsort((-vals, rr))
    starts = np.searchsorted(rr[order], np.arange(m))
    return cc[order][starts[:, None] + np.arange(k)]


_NEIGHBOURS = np.arange(-1, 2)
_OFFSETS3 = np.arange(3)


def _peak_bins_1d(p: np.ndarray, k: int) -> tuple[list[int], list[list[float]]]:
    """Bins (1..K-2) of the k largest local maxima (p[b] > p[b-1], p[b] >= p[b+1]) of one power
    spectrum p, largest first, and the magnitudes sqrt(p) at b-1, b, b+1 of each: the same as
    ranking the masked spectrum of the multi-row path, in a handful of NumPy calls. For one
    window the cost is the number of calls, not the samples, so neither the mask over all K
    bins nor the ranking is done with arrays.

    If the set {p >= t} holds at least k local maxima, it holds the k largest: any local
    maximum outside is below t. t is the (4k)-th largest of the strided group maxima, so the
    set is small (a few dozen bins: peaks and their flanks) and is tested in Python. Spectra
    whose set holds fewer than k maxima (e.g. one broad hump) take the full mask.
    """
    c = p[1:-1]
    nb = c.shape[0] // _BLOCK
    kk = 4 * k
    if nb >= 2 * kk:
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
    bins = _top_k_1d(c * mask, k) + 1  # masked: 0 where not a local maximum
    return bins.tolist(), np.sqrt(p[bins[:, None] + _NEIGHBOURS]).tolist()


def _top_k_1d(cand: np.ndarray, k: int) -> np.ndarray:
    """_top_k for one row (1-D cand): same bound from strided block maxima, same ranking."""
    K = cand.shape[0]
    nb = K // _BLOCK
    if nb >= 2 * k:
        bm = cand[: nb * _BLOCK].reshape(_BLOCK, nb).max(axis=0)
        bound = np.partition(bm, -k)[-k]
        if bound > 0:
            flat = np.flatnonzero(cand >= bound)
            return flat[np.argsort(-cand[flat])[:k]]
    return np.argpartition(cand, -k)[-k:]


def spectrum_peaks(P: np.ndarray, plan: Plan, count: int) -> list[list[tuple[float, float]]]:
    """The `count` largest local maxima of each power spectrum row of P (m, K) as
    [(hz, amplitude), ...] per row, largest first (fewer when a row has fewer maxima)."""
    m, K = P.shape
    if count <= 0 or K < 3:
        return [[] for _ in range(m)]
    k = min(count, K - 2)
    if m == 1:
        b1, t1 = _peak_bins_1d(P[0], k)
        bins_l, trip = [b1], [t1]
    else:
        c = P[:, 1:-1]
        cand = c * ((c > P[:, :-2]) & (c >= P[:, 2:]))  # 0 where not a local maximum
        r = np.arange(m)[:, None]
        top = _top_k(cand, k)
        bins = top + 1
        # (m, k, 3) powers of each peak bin and its neighbours, to Python in one go
        trip = np.sqrt(P[r[..., None], bins[..., None] + _NEIGHBOURS]).tolist()
        bins_l = bins.tolist()
    df, scale = plan.df, plan.amp_scale
    out = []
    for row_bins, row in zip(bins_l, trip):
        peaks = []
        for b, (al, a0, ar) in zip(row_bins, row):
            if a0 <= 0:
                continue  # not a local maximum (row with fewer than k maxima)
            off, corr = _hann_refine(a0, al, ar)
            peaks.append(((b + off) * df, a0 * scale * corr))
        peaks.sort(key=lambda p: -p[1])
        out.append(peaks)
    return out


# --------------------------------------------------------------------------- envelope

def envelope_spectrum(S: np.ndarray, plan: Plan, workers: int | None = None) -> np.ndarray:
    """Amplitude spectrum of the squared envelope, bins 0..env_bins at resolution plan.df,
    from the rfft S (m, K) of the Hann-windowed signal."""
    return _envelope_padded(S, plan, workers)[:, : plan.env_bins + 1]


def _envelope_padded(S: np.ndarray, plan: Plan, workers: int | None = None) -> np.ndarray:
    """envelope_spectrum with one spare column at the end (m, env_bins + 2), which
    bearing_lines fills with +inf in place instead of copying the spectrum into a padded array."""
    m = S.shape[0]
    L, k1, k2 = plan.env_len, plan.k1, plan.k2
    Y = np.zeros((m, L), dtype=np.complex128)
    # Band-pass (bins outside the band dropped) + analytic signal (negative frequencies dropped)
    # + shift to baseband, all in one slice copy. The copy also applies the amplitude scale
    # (the x2 of the analytic signal, the ifft's 1/L, the coherent gain of Hann^2), as its
    # square root: |a|^2 and its spectrum then come out scaled without a pass of their own.
    np.multiply(S[:, k1:k2], plan.env_scale, out=Y[:, : k2 - k1])
    a = _ifft(Y, axis=-1, overwrite_x=True, workers=workers)
    e = _power(a)  # squared envelope
    B = plan.env_bins + 1
    E = _rfft(e, axis=-1, overwrite_x=True, workers=workers)
    # Remove the (window-weighted) mean: e carries Hann^2, so the DC to remove is c * Hann^2
    # with c = sum(e) / sum(Hann^2). The FFT is linear and the periodic Hann^2 has only bins
    # 0..2, and sum(e) is E's DC bin: subtracting c * rfft(Hann^2)[:3] from E[:, :3] is the
    # time-domain subtraction without two passes over e and without the sum.
    E[:, :3] -= E[:, :1].real * plan.w2hat
    # Amplitude with one spare column, set to +inf by bearing_lines (see there): usually just
    # one bin more of E, which bearing_lines overwrites.
    cols = E.shape[1]
    if cols > B:
        return np.abs(E[:, : B + 1])
    amp = np.empty((m, cols + 1))
    np.abs(E, out=amp[:, :cols])
    return amp
    return amp


@dataclass(slots=True)
class _LineGeometry:
    """Bin ranges of the D*H defect lines of one envelope spectrum row at one shaft speed,
    flattened to (D*H[, width]) and ready to index a row laid out with an +inf column at B."""

    width: int  # search bins per line
    bwidth: int  # background bins per line
    lo: np.ndarray  # first search bin
    sidx: np.ndarray  # (DH, width) search bins, padded by repeating the last (harmless for a max)
    target: np.ndarray  # Hz
    reach: np.ndarray  # Hz: tolerance * target + half a bin
    nearest: np.ndarray  # bin nearest the target
    bidx: np.ndarray  # (DH, bwidth) background bins, padded with the +inf column B
    pos_lo: np.ndarray  # flat positions of the median pair in the row's sorted background
    pos_hi: np.ndarray
    ok: np.ndarray  # the line and a background lie inside the spectrum
    all_ok: bool
    expected: np.ndarray  # target, NaN where unknown
    # Single-row geometry only (see _lines_one):
    nearest_hz: np.ndarray | None = None  # frequency of `nearest`
    gidx: np.ndarray | None = None  # sidx, bidx, nearest flattened into one gather
    near_ok: np.ndarray | None = None  # (DH*W,) search bin within tolerance + half a bin
    wrow: np.ndarray | None = None  # (DH,) offsets of the rows of near_ok
    pos2: np.ndarray | None = None  # (DH, 2) pos_lo, pos_hi


def _line_geometry(plan: Plan, speed: float) -> _LineGeometry:
    cache = plan.extra.setdefault("lines", {})
    g = cache.get(speed)
    if g is not None:
        return g
    spec = plan.spec
    B = plan.env_bins + 1
    df = plan.env_df
    orders = np.array([o for _, o in spec.orders], dtype=np.float64)
    harm = np.arange(1, HARMONICS + 1, dtype=np.float64)
    target = (speed * orders[:, None] * harm[None, :]).reshape(-1)  # (D*H,)
    known = np.isfinite(target) & (target > 0)
    t = np.where(known, target, 0.0) / df  # in bins
    half = np.maximum(t * spec.tolerance, 1.0)
    lo = np.floor(t - half).astype(np.int64)
    hi = np.ceil(t + half).astype(np.int64)  # inclusive
    inside = known & (lo >= 1) & (hi <= B - 1)
    lo = np.clip(lo, 1, B - 1)
    hi = np.clip(hi, lo, B - 1)
    width = int((hi - lo).max(initial=0)) + 1
    sidx = np.minimum(lo[:, None] + np.arange(width), hi[:, None])
    # Background: +-max(25 %, 10 bins) around the line, the search region excluded.
    bg_half = np.maximum(np.ceil(0.25 * t), 10.0).astype(np.int64)
    blo = np.clip(np.floor(t).astype(np.int64) - bg_half, 1, B - 1)
    bhi = np.clip(np.ceil(t).astype(np.int64) + bg_half, 1, B - 1)
    bwidth = int((bhi - blo).max(initial=0)) + 1
    bidx = blo[:, None] + np.arange(bwidth)
    bvalid = (bidx <= bhi[:, None]) & ((bidx < lo[:, None]) | (bidx > hi[:, None]))
    bidx = np.where(bvalid, bidx, B)
    count = bvalid.sum(axis=-1)
    rows = np.arange(len(target)) * bwidth
    ok = inside & (count > 0)
    g = _LineGeometry(
        width=width, bwidth=bwidth, lo=lo, sidx=sidx, target=target,
        reach=spec.tolerance * target + 0.5 * df,
        nearest=np.clip(np.rint(t).astype(np.int64), 1, B - 1), bidx=bidx,
        pos_lo=rows + np.maximum((count - 1) // 2, 0), pos_hi=rows + np.maximum(count // 2, 0),
        ok=ok, all_ok=bool(ok.all()), expected=np.where(known, target, np.nan),
    )
    g.nearest_hz = g.nearest * df
    g.gidx = np.concatenate([sidx.reshape(-1), bidx.reshape(-1), g.nearest])
    # The frequency test of _lines_rows, evaluated here for every bin a search can return
    # (the same float expression, hence the same outcome).
    g.near_ok = (np.abs(sidx * df - g.target[:, None]) <= g.reach[:, None]).reshape(-1)
    g.wrow = np.arange(len(target)) * width
    g.pos2 = np.stack([g.pos_lo, g.pos_hi], axis=1)
    if len(cache) > 256:  # speeds from a shaft_tag vary; keep the cache bounded
        cache.clear()
    cache[speed] = g
    return g


def _rows_geometry(geos: list[_LineGeometry], B: int) -> _LineGeometry:
    """One geometry for k rows laid out back to back (row r starts at r*(B+1))."""
    if len(geos) == 1:
        return geos[0]
    W = max(g.width for g in geos)
    Wb = max(g.bwidth for g in geos)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for r, g in enumerate(geos):
        off = r * (B + 1)
        sidx = g.sidx if g.width == W else np.concatenate(
            [g.sidx, np.repeat(g.sidx[:, -1:], W - g.width, axis=1)], axis=1)
        bidx = g.bidx if g.bwidth == Wb else np.concatenate(
            [g.bidx, np.full((len(g.bidx), Wb - g.bwidth), B)], axis=1)
        n_lines = len(g.lo)
        rows = (r * n_lines + np.arange(n_lines)) * Wb
        parts["lo"].append(g.lo + off)
        parts["sidx"].append(sidx + off)
        parts["bidx"].append(bidx + off)
        parts["nearest"].append(g.nearest + off)
        parts["pos_lo"].append(rows + (g.pos_lo - np.arange(n_lines) * g.bwidth))
        parts["pos_hi"].append(rows + (g.pos_hi - np.arange(n_lines) * g.bwidth))
        for name in ("target", "reach", "ok", "expected"):
            parts[name].append(getattr(g, name))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return _LineGeometry(width=W, bwidth=Wb, all_ok=bool(cat["ok"].all()), **cat)


def _blank_unusable(g, amp: np.ndarray, hz: np.ndarray, snr: np.ndarray, found: np.ndarray) -> None:
    """Lines whose search window falls outside the envelope spectrum are unknown, not zero."""
    if not g.all_ok:
        bad = ~g.ok
        snr[bad] = np.nan
        amp[bad] = np.nan
        hz[bad] = np.nan
        found &= g.ok


def bearing_lines(env: np.ndarray, plan: Plan, shaft_hz: np.ndarray,
                  padded: np.ndarray | None = None) -> dict[str, Any]:
    """Defect lines in envelope spectra env (m, B) for each row's shaft speed (m,), NaN = unknown.

    For every defect order and harmonic h = 1..HARMONICS: the largest bin within
    +-tolerance (at least +-1 bin) of h*order*shaft_hz; its SNR against the median of the
    envelope spectrum within +-max(25 %, 10 bins) of the line, the search region excluded.
    A line counts as found only if that bin is a local maximum whose frequency lies within
    the tolerance (+ half a bin) of the expected one: with coarse resolution the +-1 bin
    search would otherwise pick up the flank of a neighbouring line (e.g. 4x shaft speed next
    to BPFO at 4096 samples / 48 kHz). A line not found reports the level at the expected
    frequency's nearest bin, so its SNR stays meaningful (and low).
    Returns arrays hz, amplitude, snr_db, found of shape (m, defects, HARMONICS), and the names.
    """
    names = [d for d, _ in plan.spec.orders]
    m, B = env.shape
    D = len(names)
    if padded is not None and m == 1 and D:
        # One window with a known speed (the common single-window case): straight to the
        # cached geometry and _lines_one, no row bookkeeping.
        v = float(shaft_hz[0])
        if v == v and v > 0:
            g = _line_geometry(plan, v)
            row = padded[0]
            row[B] = np.inf
            amp, hz, snr, found = _lines_one(row, g, plan.env_df)
            _blank_unusable(g, amp, hz, snr, found)
            shape = (1, D, HARMONICS)
            return {"names": names, "expected_hz": g.expected.reshape(shape), "hz": hz.reshape(shape),
                    "amplitude": amp.reshape(shape), "snr_db": snr.reshape(shape),
                    "found": found.reshape(shape)}
    speeds = np.asarray(shaft_hz, dtype=np.float64).reshape(m).tolist()
    known_rows = [r for r, v in enumerate(speeds) if v == v and v > 0]
    shape = (m, D, HARMONICS)
    if D == 0 or not known_rows:
        nan = np.full(shape, np.nan)
        return {"names": names, "expected_hz": nan, "hz": nan.copy(), "amplitude": nan.copy(),
                "snr_db": nan.copy(), "found": np.zeros(shape, bool)}
    k = len(known_rows)
    g = _rows_geometry([_line_geometry(plan, speeds[r]) for r in known_rows], B)
    # Rows back to back, each with an +inf column at index B: the background's padding
    # (sorted past the median) and a harmless right neighbour of the last bin.
    # `padded`: env with the spare column already allocated (from _envelope_padded): no copy.
    if padded is not None and k == m:
        Einf = padded
    else:
        Einf = np.empty((k, B + 1))
        Einf[:, :B] = env if k == m else env[known_rows]
    Einf[:, B] = np.inf
    flat = Einf.reshape(-1)
    df = plan.env_df

    if k == 1:
        amp, hz, snr, found = _lines_one(flat, g, df)
    else:
        amp, hz, snr, found = _lines_rows(flat, g, df, B)
    expected = g.expected
    _blank_unusable(g, amp, hz, snr, found)
    out = {"names": names, "expected_hz": expected, "hz": hz, "amplitude": amp, "snr_db": snr,
           "found": found}
    if k == m:
        return {key: (v.reshape(shape) if key != "names" else v) for key, v in out.items()}
    nan = np.full(shape, np.nan)
    result = {"names": names, "expected_hz": nan, "hz": nan.copy(), "amplitude": nan.copy(),
              "snr_db": nan.copy(), "found": np.zeros(shape, bool)}
    for key in ("expected_hz", "hz", "amplitude", "snr_db", "found"):
        result[key][known_rows] = out[key].reshape(k, D, HARMONICS)
    return result


def _lines_one(row: np.ndarray, g: _LineGeometry, df: float) -> tuple[np.ndarray, ...]:
    """_lines_rows for a single row (B + 1 with the +inf column): the same tests in fewer
    NumPy calls, which is what a single window's cost is made of: one gather for the search,
    background and nearest bins, one for each maximum and its neighbours, the frequency test
    looked up from the geometry."""
    dh, w = g.sidx.shape
    G = row[g.gidx]
    ns = dh * w
    nbk = ns + g.bidx.size
    vals = G[:ns].reshape(dh, w)
    jj = vals.argmax(axis=-1)  # padding repeats the last bin: argmax is the first hit
    j = g.lo + jj
    t3 = row[j[:, None] + _NEIGHBOURS]  # (DH, 3): left, the maximum, right
    a0 = t3[:, 1]
    # Local maximum: a0 >= left and right <=> a0 is the max of the three (NaN: both false).
    found = t3.max(axis=-1) == a0
    found &= g.near_ok[g.wrow + jj]
    amp = np.where(found, a0, G[nbk:])
    hz = np.where(found, j * df, g.nearest_hz)
    bvals = G[ns:nbk].reshape(dh, -1)
    bvals.sort(axis=-1)
    med = bvals.reshape(-1)[g.pos2].sum(axis=-1)
    med *= 0.5
    snr = np.log10(amp / med)
    snr *= 20.0
    return amp, hz, snr, found


def _lines_rows(flat: np.ndarray, g: _LineGeometry, df: float, B: int) -> tuple[np.ndarray, ...]:
    vals = flat[g.sidx]  # (k*DH, W)
    a0 = vals.max(axis=-1)
    j = g.lo + vals.argmax(axis=-1)  # padding repeats the last bin: argmax is the first hit
    j_hz = (j % (B + 1)) * df
    # Found = a local maximum at most tolerance + half a bin from the expected frequency
    # (the bin centre is within half a bin of the true line).
    found = (a0 >= flat[j - 1]) & (a0 >= flat[j + 1]) & (np.abs(j_hz - g.target) <= g.reach)
    amp = np.where(found, a0, flat[g.nearest])
    hz = np.where(found, j_hz, (g.nearest % (B + 1)) * df)
    bvals = flat[g.bidx]
    bvals.sort(axis=-1)
    bflat = bvals.reshape(-1)
    med = 0.5 * (bflat[g.pos_lo] + bflat[g.pos_hi])
    snr = 20.0 * np.log10(amp / med)
    return amp, hz, snr, found


def dominant_defect(snr: np.ndarray, names: list[str]) -> list[str | None]:
    """The defect that clearly stands out, per row of snr (m, D, H) in dB (NaN = unknown).

    A defect qualifies when its fundamental is DOMINANT_FUNDAMENTAL_SNR_DB (10 dB) above
    background and each of its harmonics 2x..Hx that lie inside the envelope spectrum (at least
    one must) is DOMINANT_MIN_SNR_DB (6 dB) above: a real defect repeats at its harmonics, a
    coincidental line does not, and the maximum of noise over a search region of several bins
    reaches ~6 dB above the median quite often (10 dB rarely). Score = fundamental SNR + half
    of each positive harmonic SNR. The best-scoring defect is dominant when it qualifies and
    its score beats every other defect's by DOMINANT_MARGIN_DB (3 dB); otherwise None.

    Measured: white Gaussian noise, 16384 samples at 12 kHz, 256 windows: 5 false calls (2 %).
    CWRU (tests/analytics/test_cwru.py): bpfi for 105/109, bpfo for 130/135 in every window of
    16384 and 65536 samples and >= 91 % of 4096-sample windows; never for the 97 baseline.
    Requiring only the fundamental at 6 dB named bsf in 6 of 14 baseline windows, and at
    4096 samples / 48 kHz 4x shaft speed (119.8 Hz) sits within a bin of BPFO (107.3 Hz) --
    hence also the local-maximum-within-tolerance test in `bearing_lines`.
    """
    return [_dominant_row(row, names) for row in np.asarray(snr).tolist()]


def _dominant_row(row: list[list[float]], names: list[str]) -> str | None:
    scores = []
    for fund, *harm in row:
        if fund != fund:  # NaN: the line is unknown
            scores.append((-math.inf, False))
            continue
        avail = [h for h in harm if h == h]
        qualifies = (fund >= DOMINANT_FUNDAMENTAL_SNR_DB and bool(avail)
                     and all(h >= DOMINANT_MIN_SNR_DB for h in avail))
        scores.append((fund + 0.5 * sum(h for h in avail if h > 0), qualifies))
    if not scores:
        return None
    best = max(range(len(scores)), key=lambda i: scores[i][0])
    score, qualifies = scores[best]
    runner_up = max((s for i, (s, _) in enumerate(scores) if i != best), default=-math.inf)
    return names[best] if qualifies and score - runner_up >= DOMINANT_MARGIN_DB else None


# --------------------------------------------------------------------------- all features

def compute_batch(X: np.ndarray, plan: Plan, shaft_hz: Iterable[float | None] | float | None = None,
                  workers: int | None = None) -> list[dict[str, Any]]:
    """All features of `plan.spec` for each row of X (m, n); one JSON-ready dict per row.

    `shaft_hz`: one value for all rows or one per row (None/NaN: unknown speed, bearing lines
    are None). Rows must share the plan's length and sample rate.
    """
    # Divisions by zero and logs of zero (flat or silent windows) become inf/NaN on purpose and
    # end up as None in the payload: no warnings per window.
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    m, n = X.shape
    # Batching amortises the fixed per-call cost, but beyond ~64k samples per chunk the
    # temporaries (centred copy, spectrum, power) fall out of cache and each window gets
    # slower again (measured: 16384-sample windows cost least in chunks of 4, 4096 in 8).
    rows = max(1, min(8, _CHUNK_SAMPLES // n))
    if isinstance(shaft_hz, (int, float)) or shaft_hz is None:
        speeds = [shaft_hz] * m
    else:
        speeds = list(shaft_hz)
    out: list[dict[str, Any]] = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if m <= rows:
            return _compute_batch(X, plan, speeds, workers)
        for i in range(0, m, rows):
            out += _compute_batch(X[i:i + rows], plan, speeds[i:i + rows], workers)
    return out


def _compute_batch(X: np.ndarray, plan: Plan, shaft_hz: Any, workers: int | None) -> list[dict[str, Any]]:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    m, n = X.shape
    if n != plan.n:
        raise ValueError(f"window of {n} samples does not match the plan's {plan.n}")
    spec = plan.spec
    feats = spec.features
    out: list[dict[str, Any]] = [{} for _ in range(m)]

    if feats & _TIME_SET and m == 1:
        isfinite = math.isfinite
        out0 = out[0]
        for name, v in zip(_TF_NAMES[:6], _time_features_one(X[0])):
            if name in feats:
                out0[name] = v if isfinite(v) else None
    elif feats & _TIME_SET:
        td = time_features(X)
        for name in ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness"):
            if name in feats:
                vals = td[name]
                for r in range(m):
                    out[r][name] = _clean(vals[r])

    if not spec.needs_fft:
        return out

    S = _rfft(X * plan.hann, axis=-1, workers=workers)
    P = _power(S) if plan.weights is not None or "spectrum" in feats else None

    if plan.weights is not None:
        # (m, bands [+ velocity]) mean squares
        # A band with no bin at this resolution/sample rate (e.g. above Nyquist) is unknown, not 0.
        if m == 1:
            # One window: BLAS dots straight to Python floats, no (1, K) stack / sqrt arrays.
            p0, ps = P[0], plan.power_scale
            rms_cols = [[math.sqrt(max(float(np.dot(p0[lo:hi], w)) * ps, 0.0)) if hi > lo
                         else math.nan for lo, hi, w in plan.weights]]
        else:
            acc = np.stack([P[:, lo:hi] @ w if hi > lo else np.full(m, np.nan)
                            for lo, hi, w in plan.weights], axis=1) * plan.power_scale
            rms_cols = np.sqrt(np.maximum(acc, 0.0)).tolist()
        if "velocity_rms" in feats:
            vel = ([row[plan.band_count] for row in rms_cols] if spec.accel_scale is not None
                   else [None] * m)
            for r in range(m):
                out[r]["velocity_rms"] = _clean(vel[r])
    elif "velocity_rms" in feats:
        for r in range(m):
            out[r]["velocity_rms"] = None

    if "spectrum" in feats:
        peaks = spectrum_peaks(P, plan, spec.peaks)
        bands = ([row[: plan.band_count] for row in rms_cols] if plan.band_count
                 else [[] for _ in range(m)])
        isfinite = math.isfinite
        for r in range(m):
            out[r]["spectrum"] = {
                "peaks": [{"hz": round(h, 4), "amplitude": a} for h, a in peaks[r]],
                "bands": [{"low": lo, "high": hi, "rms": v if isfinite(v) else None}
                          for (lo, hi), v in zip(spec.bands, bands[r])],
                "resolution_hz": plan.df,
            }

    if "envelope" in feats:
        speeds = [math.nan if v is None or plan.env_len == 0 else float(v) for v in shaft_hz]
        if plan.env_len:
            padded = _envelope_padded(S, plan, workers=workers)
            env = padded[:, :-1]
        else:
            padded, env = None, np.zeros((m, 2))
        lines = bearing_lines(env, plan, speeds, padded)
        hz_l = lines["hz"].tolist()
        amp_l = lines["amplitude"].tolist()
        snr_l = lines["snr_db"].tolist()
        names = lines["names"]
        isfinite = math.isfinite
        for r in range(m):
            bearing: dict[str, Any] = {"shaft_hz": _clean(shaft_hz[r])}
            # Inline finite checks (values are Python floats already): _clean's call per
            # value was a noticeable share of a single window's cost.
            for name, hz_d, amp_d, snr_d in zip(names, hz_l[r], amp_l[r], snr_l[r]):
                h, a = hz_d[0], amp_d[0]
                snr_c = [v if isfinite(v) else None for v in snr_d]
                bearing[name] = {
                    "hz": h if isfinite(h) else None,
                    "amplitude": a if isfinite(a) else None,
                    "snr_db": snr_c[0],
                    "harmonics_snr_db": snr_c,
                }
            bearing["dominant"] = _dominant_row(snr_l[r], names)
            out[r]["bearing"] = bearing
    return out


def compute(x: np.ndarray, plan: Plan, shaft_hz: float | None = None,
            workers: int | None = None) -> dict[str, Any]:
    """Features of one window (see compute_batch)."""
    X = np.asarray(x, dtype=np.float64)[None, :]
    # Straight to the worker: one window needs no chunking and no per-row speed list building.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _compute_batch(X, plan, [shaft_hz], workers)[0]


def _clean(v: Any) -> float | None:
    """A plain float for JSON, None for NaN/inf."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
