"""The engine: bad-input companion alarms, persisted state, retained records, health, routing."""

from __future__ import annotations

import json

import rules
from gateway.model import Quality, Sample, iso_ts
from tests.rules.helpers import T0, Bench, FakeClock, configs, original

MAIN = "alarms/spindle_overtemp"
BAD = "alarms/spindle_overtemp.bad_input"


def overtemp(**keys):
    return {"name": "spindle_overtemp", "type": "threshold", "input": "press1.temperature",
            "above": 80, "clear": 75, "severity": "critical", **keys}


def test_an_input_bad_for_too_long_raises_the_companion_and_holds_the_alarm():
    b = Bench(overtemp())
    b.sample("press1.temperature", 85.0)
    b.run(1)
    b.sample("press1.temperature", None, Quality.BAD)
    bad_from = b.clock.t
    assert b.run(29.5) == []
    (companion,) = b.run(0.5)
    p = companion.payload
    assert companion.topic == BAD and companion.retain and companion.ts == bad_from + 30
    assert (p["state"], p["severity"], p["type"], p["parent"]) == ("raised", "critical", "bad_input",
                                                                   "spindle_overtemp")
    assert (p["input"], p["value"], p["limit"], p["quality"]) == ("press1.temperature", None, 30, "bad")
    assert p["held_state"] == "raised" and p["last_good"] == iso_ts(T0)
    assert "held raised" in p["message"]
    b.run(120)
    b.sample("press1.temperature", 10.0, Quality.UNCERTAIN)
    assert b.states(MAIN) == ["raised"] and b.states(BAD) == ["raised"]
    recovered = b.sample("press1.temperature", 70.0)
    assert [(r.topic, r.payload["state"]) for r in recovered] == [(BAD, "cleared"), (MAIN, "cleared")]


def test_never_delivering_since_start_counts_as_bad_input():
    b = Bench(overtemp(**{"for": "1m"}))
    assert b.run(59.5) == []  # the longer of `for` and 30 s
    (companion,) = b.run(0.5)
    assert companion.payload["quality"] == "missing" and companion.payload["last_good"] is None
    assert companion.payload["held_state"] == "never published"
    assert "since start-up" in companion.payload["message"]


def test_silence_after_a_good_value_is_not_bad_input():
    """OPC UA subscriptions send nothing while a value is steady; `stale` is for silence."""
    b = Bench(overtemp())
    b.sample("press1.temperature", 20.0)
    assert b.run(600) == []


def test_a_good_non_number_is_bad_input_and_companion_can_be_turned_off():
    b = Bench(overtemp(bad_input_after="2s"), {**overtemp(), "name": "quiet", "bad_input_alarm": False})
    b.sample("press1.temperature", "ERR")
    b.run(5)
    (companion,) = b.records
    assert companion.topic == BAD and companion.payload["quality"] == "invalid"


def test_a_long_bad_gap_restarts_the_for_timer():
    b = Bench(overtemp(**{"for": "40s"}))
    b.sample("press1.temperature", 90.0)
    b.run(1)
    b.sample("press1.temperature", None, Quality.BAD)
    b.run(45)
    assert b.states(BAD) == ["raised"] and b.states(MAIN) == []
    b.sample("press1.temperature", 90.0)  # the 40 s start from here, not from the first 90
    assert b.run(39.5) == []
    b.run(0.5)
    assert b.states(MAIN) == ["raised"]


def test_the_companion_survives_a_restart_and_clears_once():
    b = Bench(overtemp())
    b.run(30)
    assert b.states(BAD) == ["raised"]
    b.restart()
    b.run(60)
    assert b.states(BAD) == ["raised"]
    b.sample("press1.temperature", 20.0)
    assert b.states(BAD) == ["raised", "cleared"]
    assert b.states(MAIN) == []


def test_take_state_returns_only_what_changed_and_is_json():
    clock = FakeClock()
    engine = rules.RuleEngine(configs(overtemp()), clock=clock)
    assert engine.take_state() == {}
    engine.on_sample(Sample("press1.temperature", 20.0, clock.t))
    assert engine.take_state() == {}  # nothing to persist for a normal value
    engine.on_sample(Sample("press1.temperature", 90.0, clock.t))
    state = engine.take_state()
    assert list(state) == ["spindle_overtemp"] and state["spindle_overtemp"]["alarm"]["severity"] == "critical"
    json.dumps(state, allow_nan=False)
    engine.on_sample(Sample("press1.temperature", 91.0, clock.t))
    assert engine.take_state() == {}


def test_retained_gives_the_last_state_of_every_alarm_that_published():
    b = Bench(overtemp(), {"name": "other", "type": "threshold", "input": "x.y", "above": 1},
              {"name": "test", "type": "pass_fail", "input": "t.v", "low": 1})
    assert b.engine.retained() == []
    b.sample("press1.temperature", 90.0)
    b.sample("press1.temperature", 10.0)
    b.sample("t.v", 5)
    (last,) = b.engine.retained()
    assert last.topic == MAIN and original(last.payload) == b.records[1].payload and last.retain
    last.payload["state"] = "tampered"  # callers get copies
    assert b.engine.retained()[0].payload["state"] == "cleared"
    b.restart()
    assert [original(r.payload) for r in b.engine.retained()] == [b.records[1].payload]


def test_a_removed_rule_clears_its_retained_alarm_then_its_state_is_deleted():
    b = Bench(overtemp(), {"name": "kept", "type": "threshold", "input": "x.y", "above": 1})
    b.sample("press1.temperature", 90.0)
    b.run(30)  # `kept` never had a value: its companion is raised and must stay
    assert b.states("alarms/kept.bad_input") == ["raised"]
    b.restart(({"name": "kept", "type": "threshold", "input": "x.y", "above": 1},))
    assert "spindle_overtemp" in b.db
    assert b.engine.take_state() == {}  # not deleted before the final clear is out
    (cleared,) = b.tick()
    assert cleared.topic == MAIN and cleared.payload["state"] == "cleared"
    assert "removed from the configuration" in cleared.payload["message"]
    assert "spindle_overtemp" not in b.db and "kept" in b.db


def test_unreadable_restored_state_starts_the_rule_fresh():
    clock = FakeClock()
    engine = rules.RuleEngine(configs(overtemp()), clock=clock,
                              restored={"spindle_overtemp": {"alarm": {"severity": "fatal"}}})
    (raised,) = engine.on_sample(Sample("press1.temperature", 90.0, clock.t))
    assert raised.payload["state"] == "raised"


def test_health_counts_active_alarms():
    b = Bench(overtemp(), {"name": "x", "type": "stale", "input": "x.y", "after": "5s"})
    b.sample("press1.temperature", 90.0)
    b.run(5)
    health = b.engine.health()
    assert health["alarms_active"] == 2 and health["active"] == ["spindle_overtemp", "x"]
    assert health["by_severity"] == {"info": 0, "warning": 1, "critical": 1}
    assert health["pass_fail"] == {}
    json.dumps(health, allow_nan=False)


def test_routing_and_inputs():
    b = Bench(overtemp(), {**overtemp(), "name": "second", "above": 100},
              {"name": "zone", "type": "iso10816", "input": "m.velocity_rms", "zones": [1, 2, 3]})
    assert b.engine.inputs() == {"press1.temperature", "m.velocity_rms"}
    out = b.sample("press1.temperature", 150.0)
    assert sorted(r.topic for r in out) == ["alarms/second", MAIN]
    assert b.sample("nobody.listens", 1.0) == []
    assert b.engine.rule_names() == ["spindle_overtemp", "second", "zone"]


def test_an_alarm_the_new_config_no_longer_has_is_cleared_once():
    b = Bench(overtemp())
    b.run(30)
    assert b.states(BAD) == ["raised"]
    b.restart((overtemp(bad_input_alarm=False),))
    b.run(1)
    b.restart((overtemp(bad_input_alarm=False),))
    b.run(1)
    assert b.states(BAD) == ["raised", "cleared"]
    assert b.db["spindle_overtemp"]["bad_input"] is None


def test_a_rule_that_changed_type_clears_its_old_alarm():
    b = Bench(overtemp())
    b.sample("press1.temperature", 90.0)
    b.restart(({"name": "spindle_overtemp", "type": "pass_fail", "input": "press1.temperature",
                "low": 0},))
    b.run(1)
    b.restart()
    b.run(1)
    assert b.states(MAIN) == ["raised", "cleared"]
    assert "alarm" not in b.db["spindle_overtemp"]


def test_replays_are_marked_and_point_at_the_raise_a_fresh_raise_is_not():
    other = {"name": "other", "type": "threshold", "input": "x.y", "above": 1}
    b = Bench(overtemp(), other)
    (raised,) = b.sample("press1.temperature", 85.0)
    assert "replay" not in raised.payload and "raised_seq" not in raised.payload
    b.restart((overtemp(severity="warning"), other))
    (changed,) = b.sample("press1.temperature", 86.0)
    assert changed.payload["previous_severity"] == "critical"  # a severity change is no raise
    b.sample("x.y", 5.0)
    b.sample("x.y", 0.0)
    replays = {r.topic: r.payload for r in b.engine.retained()}
    assert replays[MAIN]["replay"] is True and replays[MAIN]["severity"] == "warning"
    assert replays[MAIN]["raised_seq"] == b.seq_of(raised)  # across a restart, through the state
    assert replays["alarms/other"]["state"] == "cleared" and replays["alarms/other"]["replay"] is True
    assert "raised_seq" not in replays["alarms/other"]
    b.sample("press1.temperature", 10.0)
    (again,) = b.sample("press1.temperature", 90.0)
    assert "replay" not in again.payload
    assert b.engine.retained()[0].payload["raised_seq"] == b.seq_of(again)


def test_a_raise_whose_seq_was_not_saved_replays_without_raised_seq():
    b = Bench(overtemp())
    b.sample("press1.temperature", 85.0)  # state saved; the seq is saved with the next state
    b.restart(clean=False)  # crash before that
    (replay,) = b.engine.retained()
    assert replay.payload["replay"] is True and "raised_seq" not in replay.payload
