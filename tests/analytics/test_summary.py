"""Per-interval tag summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.analytics.config import SummariesConfig
from gateway.analytics.engine import AnalyticsEngine
from gateway.analytics.summary import Summaries
from gateway.model import Quality, Sample

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
qualities = st.sampled_from([Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN, Quality.BAD])


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(st.one_of(finite, st.integers(-10**6, 10**6)), qualities),
                       min_size=1, max_size=80))
def test_interval_statistics_equal_numpys(values):
    s = Summaries(10.0, {"dev.x": "bar"})
    for i, (v, q) in enumerate(values):
        s.add(Sample("dev.x", v, 1000.0 + i * 0.01, q))
    (rec,) = s.flush(1010.0)
    stats = rec.payload["tags"]["x"]
    used = np.array([float(v) for v, q in values if q is not Quality.BAD])
    assert stats["count"] == len(values)
    assert stats["bad_count"] == sum(q is Quality.BAD for _, q in values)
    assert stats["quality"] == max((q for _, q in values), key=lambda q: q.rank).value
    assert stats["unit"] == "bar"
    if used.size:
        scale = float(np.max(np.abs(used))) or 1.0
        assert stats["min"] == np.min(used) and stats["max"] == np.max(used)
        assert stats["mean"] == pytest.approx(float(np.mean(used)), rel=1e-12, abs=1e-12 * scale)
        assert stats["last"] == [v for v, q in values if q is not Quality.BAD][-1]
    else:
        assert stats["min"] is stats["max"] is stats["mean"] is stats["last"] is None
    json.dumps(rec.payload, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=50))
def test_bool_mean_is_fraction_true(values):
    s = Summaries(5.0)
    for i, v in enumerate(values):
        s.add(Sample("m.running", v, 10.0 + i))
    stats = s.flush(20.0)[0].payload["tags"]["running"]
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["min"] is min(values) and stats["max"] is max(values)
    assert stats["last"] is values[-1]


def test_strings_last_and_count_only_and_nan_counts_as_bad():
    s = Summaries(10.0)
    for i, v in enumerate(["idle", "run", "stop"]):
        s.add(Sample("plc.state", v, 1.0 + i))
    s.add(Sample("plc.temp", 20.0, 1.0))
    s.add(Sample("plc.temp", float("nan"), 2.0))
    s.add(Sample("plc.temp", np.float32(22.0), 3.0, Quality.UNCERTAIN))
    tags = s.flush(10.0)[0].payload["tags"]
    assert tags["state"] == {"min": None, "max": None, "mean": None, "last": "stop", "count": 3,
                             "unit": None, "quality": "good", "bad_count": 0}
    assert tags["temp"]["mean"] == 21.0 and tags["temp"]["count"] == 3
    assert tags["temp"]["bad_count"] == 1 and tags["temp"]["quality"] == "bad"
    assert type(tags["temp"]["last"]) is float
    json.dumps(tags, allow_nan=False)


def test_flush_per_device_interval_start_and_reset():
    eng = AnalyticsEngine([], SummariesConfig(interval="10s"), {"press1.temperature": "degC"})
    eng.on_sample(Sample("press1.temperature", 70.0, 1003.2))
    eng.on_sample(Sample("press1.temperature", 72.0, 1004.2))
    eng.on_sample(Sample("oven.temp", 180.0, 1005.0, unit="degC"))
    recs = {r.topic: r for r in eng.flush_summaries(1010.0)}
    assert set(recs) == {"data/press1", "data/oven"}
    r = recs["data/press1"]
    assert r.kind == "data" and r.ts == 1000.0  # start of the interval, on the 10 s grid
    assert r.payload["device"] == "press1" and r.payload["interval_s"] == 10.0
    assert r.payload["tags"]["temperature"]["unit"] == "degC"
    assert recs["data/oven"].payload["tags"]["temp"]["unit"] == "degC"
    assert eng.flush_summaries(1020.0) == []  # nothing new: no record
    eng.on_sample(Sample("oven.temp", 181.0, 1021.0))
    (r2,) = eng.flush_summaries(1030.0)
    assert r2.ts == 1020.0 and r2.payload["tags"]["temp"]["count"] == 1
    assert math.isclose(r2.payload["tags"]["temp"]["mean"], 181.0)


# Few distinct values, so that runs of repeats (the cheap path) and type changes (1 then 1.0,
# True then 1) both happen, mixed with everything the slow path takes.
_POOL = st.sampled_from([0, 1, 1.0, 2.5, -3, True, False, "on", None, math.nan, math.inf, np.float32(2.5), 10**15])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_POOL, qualities), min_size=1, max_size=60))
def test_runs_of_repeated_values_summarise_as_each_value_alone(values):
    """Reference: every sample on its own, written without runs."""
    s = Summaries(10.0)
    for i, (v, q) in enumerate(values):
        s.add(Sample("dev.x", v, 1000.0 + i * 0.01, q))
    stats = s.flush(1010.0)[0].payload["tags"]["x"]
    plain = [v.item() if isinstance(v, np.generic) else v for v, _ in values]
    good = [(v, q) for v, (_, q) in zip(plain, values)
            if q is not Quality.BAD and v is not None and not (isinstance(v, float) and not math.isfinite(v))]
    numbers = [float(v) for v, _ in good if isinstance(v, (int, float))]
    assert stats["count"] == len(values)
    assert stats["bad_count"] == len(values) - len(good)
    assert stats["last"] == (good[-1][0] if good else None)
    assert type(stats["last"]) is type(good[-1][0] if good else None)
    if numbers:
        assert stats["mean"] == pytest.approx(math.fsum(numbers) / len(numbers), rel=1e-12)
        all_bool = all(isinstance(v, bool) for v, _ in good if isinstance(v, (int, float)))
        assert stats["min"] == (bool(min(numbers)) if all_bool else min(numbers))
        assert stats["max"] == (bool(max(numbers)) if all_bool else max(numbers))
    else:
        assert stats["mean"] is stats["min"] is stats["max"] is None
