"""rate: slope over a window, per second or per minute, hysteresis, direction, bad values."""

from __future__ import annotations

import random
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import Quality
from rules.rate import RESUM_EVERY, SlopeWindow
from tests.rules.helpers import Bench

TOPIC = "alarms/oven_ramp"


def ramp_rule(**keys):
    return {"name": "oven_ramp", "type": "rate", "input": "oven.temp", "limit": 5, "per": "minute",
            "window": "20s", **keys}


def feed(b: Bench, values, step=1.0):
    out = []
    for v in values:
        out += b.sample("oven.temp", v, unit="degC")
        b.clock.advance(step)
        out += b.tick()
    return out


def linear(start, per_minute, seconds, step=1.0):
    return [start + per_minute / 60 * i * step for i in range(int(seconds / step))]


def test_a_temperature_climbing_too_fast_raises_and_clears_when_it_levels_off():
    b = Bench(ramp_rule())
    feed(b, linear(20, 3, 60))  # 3 degC/min: fine
    assert b.records == []
    feed(b, linear(23, 12, 30))
    (raised,) = b.on(TOPIC)
    p = raised.payload
    assert p["state"] == "raised" and p["value"] > 5 and p["limit"] == 5
    assert p["per"] == "minute" and p["unit"] == "degC/min" and "input_value" in p
    feed(b, [29.0] * 30)
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_the_rate_is_measured_correctly_per_second():
    b = Bench(ramp_rule(limit=0.5, per="second", window="10s"))
    feed(b, linear(0, 0.6 * 60, 20, step=0.5), step=0.5)
    (raised,) = b.on(TOPIC)
    assert raised.payload["value"] == pytest.approx(0.6)
    assert raised.payload["unit"] == "degC/s"


def test_no_verdict_until_half_the_window_is_covered():
    b = Bench(ramp_rule())
    feed(b, [20, 40, 60, 80, 100, 120, 140, 160, 180])  # 8 s span < 10 s
    assert b.records == []
    feed(b, [200, 220])
    assert b.states(TOPIC) == ["raised"]


def test_one_spike_does_not_raise_a_window_slope():
    b = Bench(ramp_rule(window="60s"))
    values = [50.0] * 60
    values[40] = 53.0  # a 3 degC spike on one reading
    feed(b, values)
    assert b.records == []


def test_falling_and_both_directions():
    falling = Bench(ramp_rule(direction="falling"))
    feed(falling, linear(100, 12, 30))
    assert falling.records == []
    feed(falling, linear(106, -12, 30))
    assert falling.states(TOPIC) == ["raised"]
    assert falling.records[0].payload["value"] < -5

    both = Bench(ramp_rule(direction="both"))
    feed(both, linear(100, -12, 30))
    assert both.states(TOPIC) == ["raised"]


def test_rate_hysteresis_with_clear():
    b = Bench(ramp_rule(clear=2))
    feed(b, linear(20, 10, 30))
    feed(b, linear(25, 4, 60))  # below the limit, above the clear rate: held
    assert b.states(TOPIC) == ["raised"]
    feed(b, linear(29, 1, 60))
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_bad_values_are_left_out_and_a_clock_going_back_restarts_the_window():
    b = Bench(ramp_rule())
    for i, v in enumerate(linear(20, 20, 40)):
        quality = Quality.BAD if i % 3 == 0 else Quality.GOOD
        b.sample("oven.temp", v if quality is Quality.GOOD else 999.0, quality)
        b.clock.advance(1)
        b.tick()
    assert b.states(TOPIC) == ["raised"]
    b.sample("oven.temp", 30.0, ts=b.clock.t - 1000)  # source clock jumped back
    b.sample("oven.temp", 30.0, ts=b.clock.t - 1000)  # duplicate timestamp: ignored
    assert b.states(TOPIC) == ["raised"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 5), st.floats(-1e6, 1e6)), min_size=2, max_size=300),
       st.floats(1, 100))
def test_the_running_slope_matches_a_direct_least_squares_fit(steps, window):
    slopes = SlopeWindow()
    t = 1.8e9  # epoch-sized timestamps must not cost precision
    for dt, v in steps:
        t += dt
        slopes.add(t, v)
        slopes.drop_older_than(t - window)
    ts = np.array([p[0] for p in slopes.points]) - slopes.points[0][0]
    vs = np.array([p[1] for p in slopes.points])
    if len(ts) < 2:
        assert slopes.slope() is None
        return
    expected = np.polyfit(ts, vs, 1)[0]
    scale = max(1.0, float(np.ptp(vs)) / max(float(np.ptp(ts)), 1e-9))
    assert slopes.slope() == pytest.approx(expected, rel=1e-6, abs=1e-6 * scale)


def test_a_spike_that_has_left_the_window_leaves_no_slope_behind():
    """A flat window after a spike reads as flat: the sums are not kept relative to a point
    that has left (every difference would then be the spike's size, and cancel inexactly)."""
    rnd = random.Random(7)
    slopes = SlopeWindow()
    t = 1.8e9
    for i in range(300):
        t += rnd.uniform(0.01, 5)
        slopes.add(t, 348165.0 if i < 10 else 0.0)
        slopes.drop_older_than(t - 20)
    assert all(v == 0.0 for _, v in slopes.points) and len(slopes) >= 2
    assert slopes.slope() == 0.0


def test_running_sums_are_recomputed_so_rounding_cannot_build_up():
    slopes = SlopeWindow()
    for i in range(RESUM_EVERY * 3 + 7):
        slopes.add(1.8e9 + i * 0.01, 1e6 + 0.5 * i * 0.01 + (0.3 if i % 2 else -0.3))
        slopes.drop_older_than(1.8e9 + i * 0.01 - 10)
    assert slopes.slope() == pytest.approx(0.5, rel=1e-3)
