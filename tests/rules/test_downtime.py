"""downtime: stop / run events with durations, state tags, bad values, availability, restart."""

from __future__ import annotations

import pytest

from gateway.model import Quality, iso_ts
from tests.rules.helpers import T0, Bench

TOPIC = "events/press1_downtime"


def downtime(**keys):
    return {"name": "press1_downtime", "type": "downtime", "input": "press1.running", **keys}


def at(b: Bench, seconds_from_start: float, value, quality=Quality.GOOD):
    b.clock.t = T0 + seconds_from_start
    return b.sample("press1.running", value, quality)


def test_stop_and_run_events_carry_the_duration_of_the_state_that_ended():
    b = Bench(downtime())
    assert at(b, 0, True) == []  # first value: nothing is known to have changed
    at(b, 5, True)
    (stop,) = at(b, 100, False)
    assert stop.topic == TOPIC and stop.kind == "event"
    assert stop.payload == {
        "rule": "press1_downtime", "type": "downtime", "input": "press1.running",
        "state": "stopped", "value": False, "previous": "running",
        "previous_since": iso_ts(T0), "duration_s": 100.0, "exact": False}
    at(b, 110, False)
    (run,) = at(b, 160.5, True)
    p = run.payload
    assert (p["state"], p["previous"], p["duration_s"], p["exact"]) == ("running", "stopped", 60.5, True)
    assert run.ts == T0 + 160.5


def test_state_codes_with_running_or_stopped_lists():
    b = Bench(downtime(input="plc.state", running=[2, 3]),
              {"name": "oven_mode", "type": "downtime", "input": "oven.mode", "stopped": ["IDLE", "FAULT"]})
    for value in (2, 3, 1, 0, 2.0):
        b.sample("plc.state", value)
    for value in ("RUN", "IDLE", "FAULT", "HEAT"):
        b.sample("oven.mode", value)
    assert [(r.topic, r.payload["state"]) for r in b.records] == [
        ("events/press1_downtime", "stopped"), ("events/press1_downtime", "running"),
        ("events/oven_mode", "stopped"), ("events/oven_mode", "running")]


def test_numbers_default_to_non_zero_running_and_text_without_a_list_is_unknown():
    b = Bench(downtime())
    for value in (1, 0, 0.0, 7, "RUN", "STOP", 0):
        b.sample("press1.running", value)
    assert [r.payload["state"] for r in b.records] == ["stopped", "running", "stopped"]


def test_bad_values_do_not_stop_the_machine_and_make_the_duration_inexact():
    b = Bench(downtime())
    at(b, 0, True)
    at(b, 10, False)
    at(b, 20, None, Quality.BAD)
    at(b, 30, False)
    (run,) = at(b, 40, True)
    assert run.payload["duration_s"] == 30 and run.payload["exact"] is False
    (stop,) = at(b, 50, False)
    assert stop.payload["exact"] is True
    assert [r.payload["state"] for r in b.records] == ["stopped", "running", "stopped"]


def test_availability_over_each_summary_interval_leaves_out_unknown_time():
    b = Bench(downtime(), {"name": "p2", "type": "downtime", "input": "press2.running"})
    at(b, 10, True)  # 0..10 unknown (not seen yet)
    at(b, 40, False)  # 10..40 running
    at(b, 50, True)  # 40..50 stopped
    b.clock.t = T0 + 60
    assert b.engine.take_summary_fields("press1") == {"availability": {"running": pytest.approx(40 / 50)}}
    at(b, 65, None, Quality.BAD)  # 60..65 running, then unknown
    at(b, 70, False)
    b.clock.t = T0 + 80
    assert b.engine.take_summary_fields("press1") == {"availability": {"running": pytest.approx(5 / 15)}}
    assert b.engine.take_summary_fields("press2") == {"availability": {"running": None}}
    assert b.engine.take_summary_fields("press3") == {}
    b.clock.t = T0 + 90
    assert b.engine.take_summary_fields("press1") == {"availability": {"running": 0.0}}


def test_restart_while_stopped_reports_the_whole_downtime_once():
    b = Bench(downtime())
    at(b, 0, True)
    at(b, 100, False)
    b.restart()
    assert b.engine.health()["downtime"]["press1_downtime"] == {
        "state": "unknown", "since": iso_ts(T0 + 100)}
    assert at(b, 400, False) == []  # still stopped: no second stop event
    (run,) = at(b, 700, True)
    assert run.payload["duration_s"] == 600 and run.payload["exact"] is False
    assert b.engine.health()["downtime"]["press1_downtime"]["state"] == "running"
