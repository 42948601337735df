"""Durations run on the monotonic clock: NTP steps of the wall clock (+1 h, -1 h) while time
passes normally neither fire, complete nor hold back anything; records keep wall timestamps."""

from __future__ import annotations

import pytest

from gateway.model import Quality, iso_ts
from tests.rules.helpers import Bench

HOUR = 3600.0


def overtemp(**keys):
    return {"name": "hot", "type": "threshold", "input": "press1.temperature", "above": 80,
            "clear": 75, **keys}


@pytest.mark.parametrize("step", [HOUR, -HOUR])
def test_a_wall_clock_step_does_not_make_a_device_stale(step):
    b = Bench({"name": "silent", "type": "stale", "input": "press1.temperature", "after": "30s"})
    b.sample("press1.temperature", 20.0)
    b.run(10)
    b.clock.step_wall(step)
    assert b.run(19.5) == []  # 29.5 s since the last good value, whatever the wall clock says
    (raised,) = b.run(0.5)  # and a step back does not hold it back either
    assert raised.payload["state"] == "raised" and raised.payload["value"] == 30
    assert raised.ts == b.clock.t and raised.payload["since"] == iso_ts(b.clock.t)  # wall time


def test_a_step_forward_does_not_complete_for_and_a_step_back_does_not_stretch_it():
    b = Bench(overtemp(**{"for": "10s", "clear_for": "10s"}))
    b.sample("press1.temperature", 90.0)
    b.clock.step_wall(HOUR)
    assert b.run(9.5) == [] and b.sample("press1.temperature", 90.0) == []
    (raised,) = b.run(0.5)
    assert raised.payload["state"] == "raised"
    b.sample("press1.temperature", 70.0)
    b.clock.step_wall(-HOUR)
    assert b.run(9.5) == []
    (cleared,) = b.run(0.5)
    assert cleared.payload["state"] == "cleared"
    assert b.states("alarms/hot") == ["raised", "cleared"]


@pytest.mark.parametrize("step", [HOUR, -HOUR])
def test_bad_input_after_counts_monotonic_seconds(step):
    b = Bench(overtemp())
    b.sample("press1.temperature", 20.0)
    b.sample("press1.temperature", None, Quality.BAD)
    b.clock.step_wall(step)
    b.sample("press1.temperature", None, Quality.BAD)
    assert b.run(29.5) == []
    (companion,) = b.run(0.5)
    assert companion.topic == "alarms/hot.bad_input" and companion.payload["state"] == "raised"


def test_availability_is_not_skewed_by_a_step():
    b = Bench({"name": "dt", "type": "downtime", "input": "press1.running"})
    b.sample("press1.running", True)
    b.clock.advance(10)
    b.clock.step_wall(HOUR)
    b.sample("press1.running", False)
    b.clock.advance(10)
    b.clock.step_wall(-HOUR)
    assert b.engine.take_summary_fields("press1") == {"availability": {"running": pytest.approx(0.5)}}
