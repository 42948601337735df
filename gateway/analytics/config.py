"""Config models of `summaries:`, `analyses:` (contract section 2) and `analytics:`."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from gateway.schema import Duration, Name, StrictModel

Feature = Literal[
    "rms", "peak", "peak_to_peak", "crest_factor", "kurtosis", "skewness",
    "velocity_rms", "spectrum", "envelope",
]
ALL_FEATURES: tuple[str, ...] = Feature.__args__  # type: ignore[attr-defined]

Band = tuple[float, float]


class SummariesConfig(StrictModel):
    interval: Duration = Field(10.0, gt=0)


def default_workers() -> int:
    """The cores this process may run on, minus one for the event loop; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


class AnalyticsConfig(StrictModel):
    """How the feature computation runs (gateway.analytics.workers)."""

    workers: int | None = Field(None, ge=1, le=64, description="worker processes computing features; null: the cores minus one, at least 1")
    queue: int = Field(256, ge=1, le=1_000_000, description="windows handed to the workers and not yet done; when full the newest are dropped and counted")

    @property
    def processes(self) -> int:
        return self.workers or default_workers()


class SpectrumConfig(StrictModel):
    peaks: int = Field(5, ge=0, le=100)
    bands: list[Band] = Field(default_factory=list)


class BearingConfig(StrictModel):
    shaft_hz: float | None = Field(None, gt=0)
    shaft_tag: str | None = None  # device.tag, in rpm (or Hz with shaft_tag_unit: hz)
    shaft_tag_unit: Literal["rpm", "hz"] = "rpm"
    orders: dict[Literal["bpfo", "bpfi", "bsf", "ftf"], float] = Field(
        default_factory=lambda: {"bpfo": 3.5848, "bpfi": 5.4152, "bsf": 2.357, "ftf": 0.39828}
    )
    envelope_band: Band = (2000.0, 5000.0)
    tolerance: float = Field(0.02, gt=0, lt=0.5)  # relative search tolerance around each defect line
    # Highest envelope frequency examined when the speed comes from shaft_tag (with shaft_hz the
    # range follows from the orders: 3 harmonics of the highest one).
    envelope_max_hz: float = Field(1000.0, gt=0)

    @model_validator(mode="after")
    def _speed_source(self) -> "BearingConfig":
        if (self.shaft_hz is None) == (self.shaft_tag is None):
            raise ValueError("give exactly one of shaft_hz or shaft_tag")
        return self


class AnalysisConfig(StrictModel):
    name: Name
    input: str  # a waveform tag: device.tag
    window: int = Field(16384, ge=64, le=4_194_304)
    overlap: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of a window shared with the next
    features: list[Feature] = Field(default_factory=lambda: list(ALL_FEATURES))
    velocity_band: Band = (10.0, 1000.0)
    spectrum: SpectrumConfig = Field(default_factory=SpectrumConfig)
    bearing: BearingConfig | None = None

    @model_validator(mode="after")
    def _envelope_needs_bearing(self) -> "AnalysisConfig":
        if "envelope" in self.features and self.bearing is None:
            raise ValueError("feature 'envelope' needs a 'bearing' section (shaft speed and defect orders)")
        return self
