"""Vibration features of acceleration windows: pure, vectorised NumPy/SciPy.

Modules, in the order a window goes through them:
  plan      FeatureSpec (what to compute) and Plan (what depends only on spec, n, fs), cached
  timefeat  rms, peak, peak_to_peak, crest_factor, kurtosis, skewness
  spectrum  one rfft of the Hann-windowed window; band RMS, velocity RMS, spectrum peaks
  envelope  envelope spectrum from that rfft, bearing defect lines, the dominant defect
  features  the stages in order for a batch of windows -> `Features` (typed, `to_payload()`)

Cost model: the only O(n log n) step on the full window is one real FFT of the windowed
samples; spectrum peaks, band RMS, velocity RMS (integration as a division by (2*pi*f)^2 in
the power spectrum, Parseval for the RMS) and the analytic signal of the envelope all reuse it.

Conventions that are part of the outside contract:
* rms, peak, peak_to_peak, crest_factor, kurtosis, skewness use the raw samples, DC included.
* kurtosis is Pearson's (Gaussian = 3), biased (scipy.stats.kurtosis(fisher=False));
  skewness is scipy.stats.skew (biased).
* spectrum amplitude is that of a sinusoid: Hann window, amplitude-corrected; a peak is refined
  by Hann interpolation between the two largest bins, so an off-bin sine reads its amplitude too.
* band RMS and velocity RMS come from the windowed power spectrum divided by the window's
  energy (sum(w^2)), i.e. Parseval corrected for the equivalent noise bandwidth of Hann.
* the envelope spectrum is that of the squared envelope (unit: input unit squared), mean
  removed, Hann^2-windowed, amplitudes read at the bin (no interpolation: up to ~8 % low half
  a bin off). snr_db = 20*log10(line amplitude / median of the envelope spectrum around the
  line); `dominant_defect` documents the criterion.
* undefined values (crest factor or kurtosis of a constant window, a bearing line without a
  shaft speed, SNR against a zero background) are None, never NaN.
"""

from gateway.analytics.vibration.envelope import DEFECTS, BearingLines, bearing_lines, dominant_defect
from gateway.analytics.vibration.features import Features, analyse, compute, compute_batch
from gateway.analytics.vibration.plan import (
    ACCEL_UNITS, G, HARMONICS, FeatureSpec, Plan, PlanCache, accel_scale, make_plan,
)
from gateway.analytics.vibration.spectrum import Spectrum
from gateway.analytics.vibration.timefeat import TIME_FEATURES, time_features

__all__ = [
    "ACCEL_UNITS", "DEFECTS", "G", "HARMONICS", "TIME_FEATURES", "BearingLines", "FeatureSpec",
    "Features", "Plan", "PlanCache", "Spectrum", "accel_scale", "analyse", "bearing_lines",
    "compute", "compute_batch", "dominant_defect", "make_plan", "time_features",
]
