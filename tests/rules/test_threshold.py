"""threshold: edges, hysteresis, for / clear_for, flapping, severity, restart mid-alarm."""

from __future__ import annotations

from gateway.model import Quality, iso_ts
from tests.rules.helpers import T0, Bench, original

TOPIC = "alarms/spindle_overtemp"


def overtemp(**keys):
    return {"name": "spindle_overtemp", "type": "threshold", "input": "press1.temperature",
            "above": 80, "clear": 75, **keys}


def feed(bench: Bench, values, step: float = 1.0, source: str = "press1.temperature"):
    out = []
    for v in values:
        out += bench.sample(source, v, unit="degC")
        bench.clock.advance(step)
        out += bench.tick()
    return out


def test_raise_exactly_past_the_limit_and_clear_at_the_clear_level():
    b = Bench(overtemp())
    assert feed(b, [79, 80]) == []  # 80 is not above 80
    (raised,) = b.sample("press1.temperature", 80.1, unit="degC")
    assert raised.topic == TOPIC and raised.kind == "alarm" and raised.retain
    p = raised.payload
    assert p["state"] == "raised" and p["severity"] == "warning"
    assert p["input"] == "press1.temperature" and p["value"] == 80.1 and p["limit"] == 80
    assert p["since"] == iso_ts(b.clock.t) and p["unit"] == "degC" and p["rule"] == "spindle_overtemp"
    assert raised.ts == b.clock.t
    assert "gateway" not in p and "seq" not in p and "ts" not in p  # the buffer adds those
    assert feed(b, [90, 80, 76, 75.01]) == []  # held above the clear level
    (cleared,) = b.sample("press1.temperature", 75)
    assert cleared.payload["state"] == "cleared" and cleared.payload["limit"] == 75
    assert cleared.payload["severity"] == "warning"  # which alarm cleared
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_hysteresis_stops_flapping_around_the_limit():
    b = Bench(overtemp())
    feed(b, [79.9, 80.1, 79.9, 80.1, 79.9, 80.2, 76, 80.5, 78])
    assert b.states(TOPIC) == ["raised"]
    feed(b, [74, 81, 74, 81])
    assert b.states(TOPIC) == ["raised", "cleared", "raised", "cleared", "raised"]


def test_without_clear_the_limit_itself_clears():
    b = Bench(overtemp(clear=None))
    feed(b, [81, 80.5, 80])
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_below_limit():
    b = Bench({"name": "low_pressure", "type": "threshold", "input": "p.bar", "below": 2.0,
               "clear": 2.5, "severity": "critical"})
    feed(b, [3, 2, 1.9, 2.4, 2.49], source="p.bar")
    assert b.states("alarms/low_pressure") == ["raised"]
    assert b.records[0].payload["severity"] == "critical"
    feed(b, [2.5], source="p.bar")
    assert b.states("alarms/low_pressure") == ["raised", "cleared"]


def test_for_delays_the_raise_and_a_dip_restarts_it():
    b = Bench(overtemp(**{"for": "10s"}))
    feed(b, [81] * 9)  # 9 s above
    assert b.records == []
    feed(b, [79])  # one value back inside: the 10 s start over
    feed(b, [81] * 9)
    assert b.records == []
    out = feed(b, [81, 81])
    assert b.states(TOPIC) == ["raised"] and len(out) == 1


def test_for_completes_on_a_tick_when_the_input_is_slow():
    b = Bench(overtemp(**{"for": "10s"}))
    start = b.clock.t
    b.sample("press1.temperature", 85)
    out = b.run(9.5)
    assert out == []
    (raised,) = b.run(0.5)
    assert raised.ts == start + 10 and raised.payload["since"] == iso_ts(start + 10)
    assert raised.payload["value"] == 85


def test_a_value_between_clear_and_limit_does_not_keep_a_pending_raise():
    b = Bench(overtemp(**{"for": "5s"}))
    feed(b, [81, 81, 78, 81, 81, 81, 81])
    assert b.records == []


def test_clear_for_delays_the_clear_and_a_new_excursion_cancels_it():
    b = Bench(overtemp(clear_for="5s"))
    feed(b, [85, 70, 70, 70, 70])  # 4 s below clear
    assert b.states(TOPIC) == ["raised"]
    feed(b, [77])  # above the clear level again: the clear timer restarts
    feed(b, [70] * 4)  # 4 s since the restart of the timer
    assert b.states(TOPIC) == ["raised"]
    feed(b, [70])
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_flapping_input_with_both_delays_gives_one_raise_and_one_clear():
    b = Bench(overtemp(**{"for": "3s", "clear_for": "3s"}))
    flapping = [81, 74] * 20 + [81] * 5 + [81, 74] * 20 + [70] * 5
    feed(b, flapping)
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_bad_quality_never_clears_and_never_raises():
    b = Bench(overtemp())
    feed(b, [85])
    for quality, value in [(Quality.BAD, None), (Quality.UNCERTAIN, 10.0), (Quality.GOOD, float("nan")),
                           (Quality.GOOD, "n/a"), (Quality.GOOD, None), (Quality.BAD, 10.0)]:
        b.sample("press1.temperature", value, quality)
        b.clock.advance(1)
        b.tick()
    assert b.states(TOPIC) == ["raised"]
    feed(b, [70])
    assert b.states(TOPIC) == ["raised", "cleared"]
    for quality in (Quality.BAD, Quality.UNCERTAIN):
        b.sample("press1.temperature", 99.0, quality)
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_a_short_bad_gap_does_not_break_the_for_timer_but_is_not_evidence_either():
    b = Bench(overtemp(**{"for": "10s"}))
    b.sample("press1.temperature", 85)
    b.run(3)
    b.sample("press1.temperature", None, Quality.BAD)
    assert b.run(10) == []  # the timer is due, but the last value is bad: nothing is raised
    (raised,) = b.sample("press1.temperature", 85)  # a good value still beyond: due, raised
    assert raised.payload["state"] == "raised"


def test_a_bool_input_is_judged_as_0_and_1():
    b = Bench({"name": "door", "type": "threshold", "input": "cell.door_open", "above": 0.5})
    feed(b, [False, True, True, False], source="cell.door_open")
    assert b.states("alarms/door") == ["raised", "cleared"]


def test_restart_mid_alarm_holds_it_without_a_second_raise_and_clears_once():
    b = Bench(overtemp(**{"for": "2s"}))
    feed(b, [85, 85, 85])
    assert b.states(TOPIC) == ["raised"]
    raised_since = b.records[0].payload["since"]
    b.restart()
    assert [original(r.payload) for r in b.engine.retained()] == [b.records[0].payload]
    feed(b, [90, 85, 86])
    assert b.states(TOPIC) == ["raised"]  # no duplicate raise
    (cleared,) = feed(b, [70])
    assert cleared.payload["state"] == "cleared"
    b.restart()
    feed(b, [70, 60])
    assert b.states(TOPIC) == ["raised", "cleared"]  # no second clear after the next restart
    assert raised_since == b.records[0].payload["since"]


def test_a_clear_that_happened_while_the_daemon_was_down_is_not_lost():
    b = Bench(overtemp())
    feed(b, [85])
    b.restart()
    b.clock.advance(3600)
    (cleared,) = b.sample("press1.temperature", 60)
    assert cleared.payload["state"] == "cleared"


def test_restart_before_the_state_was_saved_raises_again_once():
    """The core writes records and state in one transaction: neither survives a crash."""
    b = Bench(overtemp())
    b.engine.on_sample(__import__("gateway.model", fromlist=["Sample"]).Sample(
        "press1.temperature", 85.0, b.clock.t))  # records and state lost with the crash
    b.restart(clean=False)
    feed(b, [85, 86])
    assert b.states(TOPIC) == ["raised"]


def test_severity_change_in_config_while_raised_is_republished_after_restart():
    b = Bench(overtemp())
    feed(b, [85])
    b.restart((overtemp(severity="critical"),))
    (changed,) = b.sample("press1.temperature", 85)
    p = changed.payload
    assert p["state"] == "raised" and p["severity"] == "critical"
    assert p["previous_severity"] == "warning" and p["since"] == iso_ts(T0)
