"""The few types that cross stages: drivers -> analytics/rules -> buffer -> upstream."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # only for the annotation: a Modbus-only gateway never imports NumPy
    import numpy as np


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"

    @property
    def rank(self) -> int:
        """Higher is worse; used to report the worst quality of an interval."""
        return _QUALITY_RANK[self]


_QUALITY_RANK = {Quality.GOOD: 0, Quality.UNCERTAIN: 1, Quality.BAD: 2}

Scalar = float | int | bool | str | None


def source_of(device: str, tag: str) -> str:
    """The name of a value: `device.tag` (or `analysis.feature`). The one place it is built."""
    return f"{device}.{tag}"


def split_source(name: str) -> tuple[str, str]:
    """`device.tag` -> (device, tag), at the first dot; the one place a source is taken apart.
    A name without a dot (a whole device) gives (name, "")."""
    device, _, tag = name.partition(".")
    return device, tag


class _Sourced:
    """`source` is `device.tag` (or `analysis.feature`): its two halves."""

    __slots__ = ()
    source: str

    @property
    def device(self) -> str:
        return split_source(self.source)[0]

    @property
    def tag(self) -> str:
        return split_source(self.source)[1]


@dataclass(slots=True)
class Sample(_Sourced):
    """One scalar value of a tag (`device.tag`) or a feature (`analysis.feature`).

    A bad-quality sample carries value None (or the last raw value for diagnosis,
    never a made-up one); consumers must look at `quality` before using `value`.
    Not frozen: a frozen dataclass costs about twice as much to build, and drivers build one per
    tag per poll. Treat it as immutable all the same.
    """

    source: str
    value: Scalar
    ts: float  # epoch seconds of the measurement (source timestamp when known)
    quality: Quality = Quality.GOOD
    unit: str | None = None

    def __reduce__(self) -> tuple:
        # Pickled as a constructor call: a third faster to load than the slots' state (feature
        # worker processes send thousands a second).
        return Sample, (self.source, self.value, self.ts, self.quality, self.unit)

    @classmethod
    def bad(cls, source: str, ts: float, unit: str | None = None) -> "Sample":
        """A value that is no longer (or not) known: quality BAD, value None."""
        return cls(source, None, ts, Quality.BAD, unit)

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD


@dataclass(slots=True)
class Waveform(_Sourced):
    """A contiguous block of samples of a waveform tag (e.g. an accelerometer)."""

    source: str
    samples: np.ndarray  # 1-D, float32 or float64
    sample_rate: float  # Hz
    ts: float  # epoch seconds of the first sample
    unit: str | None = None
    quality: Quality = Quality.GOOD
    # Set by a driver that knows this block does not continue the previous one, with the cause:
    # "late block", "seq gap", "ts gap", "rate change", "bad block" or NEW_CAPTURE (a separate
    # capture, which is not a loss). None: the windows decide from the timestamps.
    restart: str | None = None

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


NEW_CAPTURE = "new capture"  # a restart that loses nothing: each capture is analysed on its own


# Forwarding priority: higher goes upstream first and is evicted last.
PRIORITY = {"alarm": 2, "event": 1, "features": 0, "data": 0}


@dataclass(slots=True)
class Record:
    """Something bound upstream. The buffer gives it `gateway`, `seq` and `ts`.

    `topic` is relative to the upstream topic prefix, e.g. ``data/press1``.
    """

    topic: str
    payload: dict[str, Any]
    ts: float  # epoch seconds of the measurement, not of the send
    kind: str = "data"  # data | features | alarm | event
    retain: bool = False
    priority: int = field(default=-1)
    # Bytes stored instead of the JSON payload, after a NUL (which no JSON text starts with): a
    # values row's Sparkplug metrics, encoded once when stored (gateway.sparkplug.ValueEncoder).
    encoded: bytes | None = None

    def __post_init__(self) -> None:
        if self.priority < 0:
            self.priority = PRIORITY.get(self.kind, 0)

    def __reduce__(self) -> tuple:
        return Record, (self.topic, self.payload, self.ts, self.kind, self.retain, self.priority, self.encoded)


@dataclass(frozen=True, slots=True)
class TagReport:
    """How a scalar tag is reported by exception (Sparkplug): its value type, one of the driver
    type names (bool, int16, uint16, int32, uint32, int64, uint64, float32, float64, string), its
    deadband (0: any change) and max_silence (None: only on change)."""

    type: str = "float64"
    deadband: float = 0.0
    max_silence: float | None = None


class Clock(Protocol):
    """Where time comes from: the `time` module itself, or a test's fake clock.

    `time()` is wall time, for timestamps only (payload `ts`, `since`); `monotonic()` measures
    durations (delays, timeouts, ages), so an NTP step of the wall clock cannot shorten or
    stretch them."""

    def time(self) -> float: ...
    def monotonic(self) -> float: ...


def iso_ts(ts: float) -> str:
    """ISO 8601 UTC with milliseconds and a Z, e.g. 2026-11-23T12:00:00.123Z."""
    return (
        _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class WriteRefused(Exception):
    """A write or call that was refused before anything was sent to the device. `reason` is a
    short code for the reply (`wrong_type`, `out_of_bounds`, `disconnected`, ...)."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class WriteFailed(Exception):
    """A write or call that went to the device and failed there (an exception answer, no answer,
    a bad status); the message says whether it may have taken effect."""

    def __init__(self, message: str, reason: str = "device_error") -> None:
        super().__init__(message)
        self.reason = reason
