"""Config models of `summaries:` and `analyses:` (contract section 2)."""

from __future__ import annotations

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
