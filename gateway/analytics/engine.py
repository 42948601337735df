"""The analytics stage: waveform blocks -> feature records and rule inputs; scalar samples ->
per-device summaries. No I/O and no clock of its own: the core feeds it and asks it to flush."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from gateway.analytics.config import AnalysisConfig, SummariesConfig
from gateway.analytics.summary import Summaries
from gateway import logs
from gateway.lazy import lazy
from gateway.model import NEW_CAPTURE, Quality, Record, Sample, Waveform, iso_ts, source_of

if TYPE_CHECKING:
    from gateway.analytics.vibration import FeatureSpec, Features
    from gateway.analytics.window import Window, WindowAssembler

# The engine also keeps the tag summaries, which every gateway runs; NumPy and SciPy come in
# with the first analysis only (see gateway.lazy).
np = lazy("numpy")
vibration = lazy("gateway.analytics.vibration")
windowing = lazy("gateway.analytics.window")

log = logs.get("analytics")

_TIME_FEATURES = ("rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness")


def feature_names(analysis: AnalysisConfig) -> list[str]:
    """Rule inputs (`analysis.feature`) emitted for `analysis`: its scalar features, and with
    `envelope` the amplitude and SNR of each bearing defect line. Needs no engine, so config
    validation can call it."""
    names = [f for f in (*_TIME_FEATURES, "velocity_rms") if f in analysis.features]
    if "envelope" in analysis.features and analysis.bearing is not None:
        for d in analysis.bearing.orders:
            names += [f"bearing.{d}", f"bearing.{d}.snr_db"]
    return [source_of(analysis.name, n) for n in names]


@dataclass(frozen=True, slots=True)
class Closed:
    """A window ready for `compute`, with what it needs from its stream at the time it closed:
    plain values only, so that it travels to a worker process cheaply (gateway.analytics.workers)."""

    analysis: str  # the analysis' name
    input: str  # its input tag
    window: Window
    unit: str | None
    spec: FeatureSpec
    shaft_hz: float | None

    @property
    def samples(self) -> int:
        return len(self.window.samples)


@dataclass(slots=True)
class _Stream:
    cfg: AnalysisConfig
    assembler: WindowAssembler
    unit: str | None
    spec: FeatureSpec | None = None
    spec_unit: str | None = None
    windows: int = 0

    def spec_for(self, unit: str | None) -> FeatureSpec:
        if self.spec is None or unit != self.spec_unit:
            self.spec = vibration.FeatureSpec.from_config(self.cfg, unit)
            self.spec_unit = unit
        return self.spec


class AnalyticsEngine:
    """See the module docstring. `jitter_s`: timestamp jitter of waveform blocks tolerated
    before a gap starts a new window (WindowAssembler); `workers`: scipy.fft workers of
    `compute` (the feature worker processes make their own FeatureComputer)."""

    def __init__(self, analyses: list[AnalysisConfig], summaries: SummariesConfig,
                 units: dict[str, str | None], *, jitter_s: float = 0.05,
                 workers: int | None = None) -> None:
        # Only the tags that have a unit: every lookup has a default (None here; in Summaries the
        # sample's own unit, which the drivers take from the same config), and a table of every
        # tag was about 80 bytes a tag for nothing.
        self._units = {source: unit for source, unit in units.items() if unit is not None}
        self._workers = workers
        self._computer: FeatureComputer | None = None  # made on first use: it needs NumPy
        self._streams: dict[str, list[_Stream]] = defaultdict(list)
        self._speed_tags: dict[str, str] = {}  # shaft_tag -> "rpm" | "hz"
        self._speeds: dict[str, float] = {}  # shaft_tag -> latest good speed in Hz
        self.analyses = list(analyses)
        for cfg in self.analyses:
            self._streams[cfg.input].append(_Stream(
                cfg=cfg, assembler=windowing.WindowAssembler(cfg.window, cfg.overlap, jitter_s),
                unit=self._units.get(cfg.input)))
            if cfg.bearing is not None and cfg.bearing.shaft_tag:
                self._speed_tags[cfg.bearing.shaft_tag] = cfg.bearing.shaft_tag_unit
        self._summaries = Summaries(summaries.interval, self._units)
        # analysis -> problem seen with real data (by `compute` here, or by a worker process)
        self._runtime_problems: dict[str, str] = {}
        self._dropped: Counter[str] = Counter()  # analysis -> windows never computed

    # ------------------------------------------------------------------ config help

    def feature_names(self, analysis: AnalysisConfig) -> list[str]:
        """Rule inputs (`analysis.feature`) that `on_waveform` emits as Samples for `analysis`."""
        return feature_names(analysis)

    def problems(self) -> list[str]:
        """Problems only visible with the tag units (for check-config) or, once data arrived,
        with the actual sample rate (e.g. an envelope band above Nyquist); for logs/health."""
        out = []
        for streams in self._streams.values():
            for st in streams:
                if "velocity_rms" in st.cfg.features and vibration.accel_scale(st.unit) is None:
                    out.append(f"analyses.{st.cfg.name}: velocity_rms needs the unit of "
                               f"{st.cfg.input} to be g or m/s2 (is {st.unit!r})")
        out += [f"analyses.{name}: {text}" for name, text in list(self._runtime_problems.items())]
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        """Per analysis: windows closed, of those dropped before computing (queue full, stop),
        restarts (gaps, rate changes, bad blocks) and samples thrown away by them -- for the
        health payload; nothing is dropped silently."""
        return {st.cfg.name: {"windows": st.windows, "dropped_windows": self._dropped[st.cfg.name],
                              "gaps": st.assembler.gaps,
                              "dropped_samples": st.assembler.dropped_samples,
                              "pending_samples": st.assembler.pending,
                              "restarts": dict(st.assembler.restarts)}
                for streams in self._streams.values() for st in streams}

    # ------------------------------------------------------------------ scalar samples

    def on_sample(self, s: Sample) -> None:
        self.on_samples((s,))

    def on_samples(self, samples: list[Sample] | tuple[Sample, ...],
                   on_error: Callable[[Sample], None] | None = None) -> None:
        """Scalar samples in arrival order: the summaries, and the shaft speeds analyses use. A
        sample that fails goes to `on_error` (when given) and the others go on."""
        if self._speed_tags:
            for s in samples:
                unit = self._speed_tags.get(s.source)
                if unit is not None and s.quality is Quality.GOOD and isinstance(s.value, (int, float)) \
                        and not isinstance(s.value, bool) and math.isfinite(s.value) and s.value > 0:
                    self._speeds[s.source] = float(s.value) / 60.0 if unit == "rpm" else float(s.value)
        self._summaries.add_many(samples, on_error)

    def flush_summaries(self, now: float) -> list[Record]:
        return self._summaries.flush(now)

    # ------------------------------------------------------------------ waveforms

    def on_waveform(self, w: Waveform) -> tuple[list[Record], list[Sample]]:
        return self.on_waveforms([w])

    def on_waveforms(self, blocks: Iterable[Waveform]) -> tuple[list[Record], list[Sample]]:
        """Several blocks at once, assembled and computed in the caller's thread (tests, bench,
        check-config). The pipeline calls `assemble` on the event loop and leaves the computing
        to its worker processes (gateway.analytics.workers)."""
        return self.compute(self.assemble(blocks))

    def assemble(self, blocks: Iterable[Waveform]) -> list[Closed]:
        """Cut blocks into windows; cheap, on the event loop. Everything that reads the stream's
        state (spec, unit, shaft speed) is taken here, so that `compute` reads nothing mutable."""
        done: list[Closed] = []
        for w in blocks:
            for st in self._streams.get(w.source, ()):
                unit = st.unit if st.unit is not None else w.unit
                seen = len(st.assembler.restarts)
                for win in st.assembler.push(w.samples, w.ts, w.sample_rate, w.quality, w.restart):
                    st.windows += 1
                    done.append(Closed(st.cfg.name, st.cfg.input, win, unit, st.spec_for(unit),
                                       self._shaft_hz(st.cfg)))
                if len(st.assembler.restarts) > seen:  # a cause not seen before on this stream
                    self._log_restart(st)
        return done

    def compute(self, windows: list[Closed]) -> tuple[list[Record], list[Sample]]:
        """Features of assembled windows, in their order, computed in the caller's thread."""
        if self._computer is None:
            self._computer = FeatureComputer(self._workers)
        records, samples, problems = self._computer.compute(windows)
        self.note_problems(problems)
        return records, samples

    def note_problems(self, problems: dict[str, str]) -> None:
        """Problems `FeatureComputer.compute` found with real data (in this process or a worker's)."""
        for name, text in problems.items():
            self._runtime_problems.setdefault(name, text)

    def count_dropped(self, analyses: Iterable[str]) -> None:
        """Windows (one analysis name each) assembled but never computed (a full worker queue, a
        stop, a worker that died): for health."""
        self._dropped.update(analyses)

    @staticmethod
    def _log_restart(st: _Stream) -> None:
        """Once per stream and cause; the counts keep going in health (`restarts`)."""
        cause = next(reversed(st.assembler.restarts))
        if cause == NEW_CAPTURE:
            return
        log.warning("analysis.stream_restart", analysis=st.cfg.name, input=st.cfg.input, cause=cause,
                    dropped_samples=st.assembler.dropped_samples,
                    hint="the partial window was dropped; health shows restarts by cause")

    def _shaft_hz(self, cfg: AnalysisConfig) -> float | None:
        b = cfg.bearing
        if b is None:
            return None
        if b.shaft_hz:
            return float(b.shaft_hz)
        return self._speeds.get(b.shaft_tag or "")


class FeatureComputer:
    """The features of closed windows: no stream state, no I/O, so it runs anywhere -- in the
    caller's thread (`AnalyticsEngine.compute`) or in a worker process (gateway.analytics.workers).
    `workers`: scipy.fft workers per FFT batch."""

    def __init__(self, workers: int | None = None) -> None:
        self._workers = workers
        self._plans = vibration.PlanCache()

    def compute(self, windows: list[Closed]) -> tuple[list[Record], list[Sample], dict[str, str]]:
        """Records and rule samples in window order, and the problems real data showed (analysis
        -> text, e.g. an envelope band above Nyquist). Windows that share window length, sample
        rate and feature spec are computed in one batch."""
        if not windows:
            return [], [], {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, c in enumerate(windows):
            groups[(c.spec, len(c.window.samples), c.window.sample_rate)].append(i)
        results: list[Features | None] = [None] * len(windows)
        problems: dict[str, str] = {}
        for (spec, n, fs), idx in groups.items():
            plan = self._plans.get(spec, n, fs)
            if plan.problem:
                for i in idx:
                    problems.setdefault(windows[i].analysis, plan.problem)
            X = np.stack([windows[i].window.samples for i in idx]) if len(idx) > 1 else windows[idx[0]].window.samples[None, :]
            for i, feats in zip(idx, vibration.analyse(X, plan, [windows[i].shaft_hz for i in idx], self._workers)):
                results[i] = feats
        records: list[Record] = []
        samples: list[Sample] = []
        for c, feats in zip(windows, results):
            rec, smp = self._outputs(c, feats)
            records.append(rec)
            samples.extend(smp)
        return records, samples, problems

    def _outputs(self, c: Closed, feats: Features) -> tuple[Record, list[Sample]]:
        win, unit = c.window, c.unit
        payload: dict[str, Any] = {
            "analysis": c.analysis,
            "input": c.input,
            "unit": unit,
            "quality": win.quality.value,
            "samples": len(win.samples),
            "sample_rate": float(win.sample_rate),
            "window_start": iso_ts(win.ts),
            "duration_s": len(win.samples) / float(win.sample_rate),
            **feats.to_payload(),
        }
        record = Record(topic=f"features/{c.analysis}", payload=payload, ts=win.ts, kind="features")
        units = {"rms": unit, "peak": unit, "peak_to_peak": unit, "velocity_rms": "mm/s"}
        samples = [self._sample(source_of(c.analysis, name), value, win, units.get(name))
                   for name, value in feats.scalars()]
        bearing = feats.bearing
        if bearing is not None:
            sq = f"{unit}^2" if unit else None
            for d in vibration.DEFECTS:
                if d in bearing.names:
                    i = bearing.names.index(d)
                    samples.append(self._sample(source_of(c.analysis, f"bearing.{d}"), bearing.amplitude[i], win, sq))
                    samples.append(self._sample(source_of(c.analysis, f"bearing.{d}.snr_db"), bearing.snr_db[i][0], win, "dB"))
        return record, samples

    @staticmethod
    def _sample(source: str, value: float | None, win: Window, unit: str | None) -> Sample:
        # An undefined feature (e.g. kurtosis of a flat window, no shaft speed yet) is a value
        # rules must not use: None with bad quality, never a made-up number.
        quality = Quality.BAD if value is None else win.quality
        return Sample(source=source, value=value, ts=win.ts, quality=quality, unit=unit)
