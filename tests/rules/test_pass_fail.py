"""pass_fail: one event per good value, inclusive limits, counts in health, bad values."""

from __future__ import annotations

from gateway.model import Quality
from tests.rules.helpers import Bench, states

TOPIC = "events/voltage_test"


def voltage(**keys):
    return {"name": "voltage_test", "type": "pass_fail", "input": "tester.voltage", "low": 80,
            "high": 90, **keys}


def test_every_value_gives_a_result_with_its_limits():
    b = Bench(voltage())
    for v in (85, 80, 90, 79.99, 90.01, 85):
        b.sample("tester.voltage", v, unit="V")
        b.clock.advance(1)
    assert states(b.records) == ["PASS", "PASS", "PASS", "FAIL", "FAIL", "PASS"]
    first, fail_low, fail_high = b.records[0], b.records[3], b.records[4]
    assert first.topic == TOPIC and first.kind == "event" and not first.retain
    assert first.payload == {"rule": "voltage_test", "type": "pass_fail", "input": "tester.voltage",
                             "result": "PASS", "value": 85.0, "low": 80.0, "high": 90.0,
                             "unit": "V", "count": 1}
    assert fail_low.payload["reason"] == "below low" and fail_high.payload["reason"] == "above high"
    assert b.engine.health()["pass_fail"] == {
        "voltage_test": {"pass": 4, "fail": 2, "invalid": 0, "yield": round(4 / 6, 6)}}


def test_one_sided_limits():
    b = Bench(voltage(low=None), {"name": "leak", "type": "pass_fail", "input": "t.leak", "low": 0})
    b.sample("tester.voltage", -1000)
    b.sample("t.leak", -0.1)
    assert states(b.records) == ["PASS", "FAIL"]
    assert b.records[0].payload["low"] is None


def test_bad_values_give_no_result_and_are_counted_invalid():
    b = Bench(voltage())
    b.sample("tester.voltage", None, Quality.BAD)
    b.sample("tester.voltage", float("nan"))
    b.sample("tester.voltage", 85, Quality.UNCERTAIN)
    assert b.records == []
    assert b.engine.health()["pass_fail"]["voltage_test"] == {
        "pass": 0, "fail": 0, "invalid": 3, "yield": None}


def test_counts_survive_a_restart():
    b = Bench(voltage())
    for v in (85, 70, 85):
        b.sample("tester.voltage", v)
    b.restart()
    b.sample("tester.voltage", 85)
    assert b.engine.health()["pass_fail"]["voltage_test"]["pass"] == 3
    assert b.records[-1].payload["count"] == 4


def test_emit_change_judges_a_polled_register_once_per_new_value():
    b = Bench(voltage(emit="change"))
    for v in (85, 85, 85, 95, 95, None, 95, 86):
        b.sample("tester.voltage", v, Quality.GOOD if v is not None else Quality.BAD)
    assert states(b.records) == ["PASS", "FAIL", "PASS"]
