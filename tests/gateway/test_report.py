"""Report by exception (gateway.report): what reaches the upstreams that take per-tag values."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from gateway.model import Quality, Sample, TagReport
from gateway.report import ExceptionReporter


def reported(reporter: ExceptionReporter, samples: list[Sample]) -> list[list]:
    return [v for r in reporter.offer(samples) for v in r.payload["values"]]


def test_first_value_change_and_quality_are_reported():
    rep = ExceptionReporter({"d.t": TagReport("float64", 0.0)})
    assert reported(rep, [Sample("d.t", 1.0, 1.0)]) == [["t", 1.0, 1.0, "good"]]
    assert reported(rep, [Sample("d.t", 1.0, 2.0)]) == []  # unchanged
    assert reported(rep, [Sample("d.t", 1.5, 3.0)]) == [["t", 1.5, 3.0, "good"]]
    assert reported(rep, [Sample.bad("d.t", 4.0)]) == [["t", None, 4.0, "bad"]]
    assert reported(rep, [Sample.bad("d.t", 5.0)]) == []
    assert reported(rep, [Sample("d.t", 1.5, 6.0)]) == [["t", 1.5, 6.0, "good"]]  # good again
    assert rep.stats() == {"offered": 6, "reported": 4}


def test_deadband_is_measured_from_the_last_reported_value():
    rep = ExceptionReporter({"d.t": TagReport("float64", 5.0)})
    values = [0, 2, 4, 5, 5.5, 7, 10.4, 11, 0.1]
    sent = [v[1] for i, x in enumerate(values) for v in reported(rep, [Sample("d.t", x, float(i))])]
    # 2, 4, 5 stay within 5 of 0; 5.5 is 5.5 away; then 10.4 is 4.9 from 5.5 (kept back), 11 is 5.5
    assert sent == [0, 5.5, 11, 0.1]


def test_max_silence_sends_an_unchanged_value_again():
    rep = ExceptionReporter({"d.t": TagReport("int16", 0.0, max_silence=10.0)})
    times = [0.0, 4.0, 9.9, 10.0, 15.0, 20.1]
    sent = [v[2] for t in times for v in reported(rep, [Sample("d.t", 7, t)])]
    assert sent == [0.0, 10.0, 20.1]


def test_non_numbers_on_any_change_and_nan_once():
    rep = ExceptionReporter({})
    seq = [("a", "x"), ("a", "x"), ("a", "y"), ("b", True), ("b", True), ("b", False), ("c", math.nan),
           ("c", math.nan), ("c", 1.0)]
    sent = [(v[0], v[1]) for i, (tag, x) in enumerate(seq) for v in reported(rep, [Sample(f"d.{tag}", x, float(i))])]
    assert [(t, x if not (isinstance(x, float) and math.isnan(x)) else "nan") for t, x in sent] == \
        [("a", "x"), ("a", "y"), ("b", True), ("b", False), ("c", "nan"), ("c", 1.0)]


def test_one_record_per_device_in_measurement_order():
    rep = ExceptionReporter({})
    records = rep.offer([Sample("p1.a", 1, 1.0), Sample("p2.a", 1, 1.5), Sample("p1.b", 2, 2.0)])
    assert [(r.topic, r.kind, r.ts, r.payload) for r in records] == [
        ("values/p1", "values", 1.0, {"device": "p1", "values": [["a", 1, 1.0, "good"], ["b", 2, 2.0, "good"]]}),
        ("values/p2", "values", 1.5, {"device": "p2", "values": [["a", 1, 1.5, "good"]]}),
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100))
def test_every_value_held_back_is_within_the_deadband_of_the_last_one_sent(values, deadband):
    rep = ExceptionReporter({"d.t": TagReport("float64", deadband)})
    last = None
    for i, x in enumerate(values):
        sent = reported(rep, [Sample("d.t", x, float(i))])
        if last is None or (abs(x - last) > deadband if deadband else x != last):
            assert sent == [["t", x, float(i), Quality.GOOD.value]]
            last = x
        else:
            assert sent == []
