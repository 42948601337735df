"""Report by exception: which scalar tag values go to the upstreams that take values (Sparkplug).

A value is reported when it first arrives, when its quality changes, when it moves by more than
its tag's `deadband` from the value last reported (any change with deadband 0; a non-number on
any change), and when `max_silence` has passed since the last report. What is not reported is not
stored: the buffer only holds values some upstream will send.

Each report is one `values/{device}` record per device and batch of samples, whose payload lists
`[tag, value, ts, quality]` in measurement order, so one buffer row carries what one poll of a
device changed. With an `encode` function (Sparkplug's ValueEncoder), a record is stored as those
values encoded the way the upstream sends them, so that draining a backlog does not encode them
again; a record it cannot encode is stored as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from gateway.buffer import VALUES
from gateway.model import Quality, Record, Sample, TagReport, split_source

_DEFAULT = TagReport()


class _Last:
    __slots__ = ("value", "quality", "at")

    def __init__(self, value: Any, quality: Quality, at: float) -> None:
        self.value = value
        self.quality = quality
        self.at = at  # measurement time of the report


# (device, rows, quality_said) -> the record's `encoded`, or None; quality_said[i]: rows[i] must say
# its quality (it is not good, or the one reported before it was not, or none was)
Encoder = Callable[[str, list[list[Any]], list[bool]], "bytes | None"]


class ExceptionReporter:
    def __init__(self, policy: dict[str, TagReport], encode: Encoder | None = None) -> None:
        self.policy = policy  # source (device.tag) -> how it is reported; unknown: any change
        self._encode = encode
        self._last: dict[str, _Last] = {}
        self.offered = 0
        self.reported = 0

    def offer(self, samples: Iterable[Sample]) -> list[Record]:
        """The records for the samples that are to be reported (none for the others)."""
        by_device: dict[str, list[list[Any]]] = {}
        said: dict[str, list[bool]] = {}
        first_ts: dict[str, float] = {}
        good = Quality.GOOD
        offered = reported = 0
        last, policy = self._last, self.policy
        for s in samples:
            offered += 1
            prev = last.get(s.source)
            rule = policy.get(s.source, _DEFAULT)
            if prev is not None and not _due(prev, s, rule):
                continue
            if prev is None:
                say = True
                last[s.source] = _Last(s.value, s.quality, s.ts)
            else:
                say = s.quality is not good or prev.quality is not good
                prev.value, prev.quality, prev.at = s.value, s.quality, s.ts
            device, tag = split_source(s.source)
            rows = by_device.get(device)
            if rows is None:
                rows = by_device[device] = []
                said[device] = []
                first_ts[device] = s.ts
            rows.append([tag, s.value, s.ts, s.quality.value])
            said[device].append(say)
            reported += 1
        self.offered += offered
        self.reported += reported
        encode = self._encode
        return [Record(topic=f"{VALUES}/{device}", payload={"device": device, "values": rows},
                       ts=first_ts[device], kind=VALUES,
                       encoded=None if encode is None else encode(device, rows, said[device]))
                for device, rows in by_device.items()]

    def last(self, source: str) -> tuple[Any, float, str] | None:
        """The value last reported for a source: (value, measurement time, quality)."""
        got = self._last.get(source)
        return None if got is None else (got.value, got.at, got.quality.value)

    def stats(self) -> dict[str, int]:
        return {"offered": self.offered, "reported": self.reported}


def _due(prev: _Last, s: Sample, rule: TagReport) -> bool:
    if s.quality is not prev.quality:
        return True
    if rule.max_silence is not None and s.ts - prev.at >= rule.max_silence:
        return True
    old, new = prev.value, s.value
    if isinstance(new, bool) or isinstance(old, bool) or not isinstance(new, (int, float)) \
            or not isinstance(old, (int, float)):
        return new != old
    if math.isnan(new) or math.isnan(old):
        return not (math.isnan(new) and math.isnan(old))
    if rule.deadband == 0.0:
        return new != old
    return abs(new - old) > rule.deadband
