"""stale: silence of a tag or of a whole device, never-answered devices, bad values, restart."""

from __future__ import annotations

from gateway.model import Quality, iso_ts
from tests.rules.helpers import T0, Bench

TOPIC = "alarms/press1_silent"


def silent(**keys):
    keys = keys or {"input": "press1.temperature"}
    return {"name": "press1_silent", "type": "stale", "after": "30s", "severity": "critical", **keys}


def test_a_device_that_never_answered_is_stale_after_the_delay_from_start():
    b = Bench(silent())
    assert b.run(29.5) == []
    (raised,) = b.run(0.5)
    p = raised.payload
    assert (p["state"], p["severity"], p["limit"], p["value"]) == ("raised", "critical", 30, 30)
    assert p["last_good"] is None and "since start-up" in p["message"]
    assert raised.ts == T0 + 30 and p["since"] == iso_ts(T0 + 30)
    assert b.run(60) == []  # held, not repeated


def test_a_fresh_good_value_clears_and_silence_raises_again():
    b = Bench(silent())
    b.run(10)
    b.sample("press1.temperature", 20.0)
    assert b.run(29.5) == []
    b.run(0.5)
    assert b.states(TOPIC) == ["raised"]
    assert b.on(TOPIC)[0].payload["last_good"] == iso_ts(T0 + 10)
    b.run(15)
    (cleared,) = b.sample("press1.temperature", 21.0)
    assert cleared.payload["state"] == "cleared" and cleared.payload["value"] == 45.0  # seconds without a good value
    b.run(30)
    assert b.states(TOPIC) == ["raised", "cleared", "raised"]


def test_bad_quality_values_are_not_fresh():
    b = Bench(silent())
    b.sample("press1.temperature", 20.0)
    for _ in range(70):
        b.clock.advance(0.5)
        b.sample("press1.temperature", None, Quality.BAD)
        b.sample("press1.temperature", float("nan"))
        b.tick()
    assert b.states(TOPIC) == ["raised"]


def test_clear_for_needs_good_values_to_keep_coming():
    b = Bench(silent(input="press1.temperature", clear_for="5s"))
    b.run(30)
    b.sample("press1.temperature", 1.0)
    assert b.run(4.5) == []
    b.sample("press1.temperature", 1.0)
    (cleared,) = b.run(0.5)
    assert cleared.payload["state"] == "cleared"


def test_a_whole_device_is_fresh_when_any_of_its_tags_is():
    b = Bench(silent(device="press1"), device_tags={"press1": ["temperature", "running"]})
    assert b.engine.inputs() == {"press1.temperature", "press1.running"}
    b.run(20)
    b.sample("press1.running", True)
    b.sample("other.temperature", 1.0)
    b.run(25)
    b.sample("press1.temperature", None, Quality.BAD)
    assert b.records == []
    b.run(5)
    (raised,) = b.records
    assert raised.payload["input"] == "press1" and "device press1" in raised.payload["message"]
    b.sample("press1.some_tag_not_listed", 3)  # matched by device, not by the tag list
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_device_rule_works_without_device_tags():
    b = Bench(silent(device="press1"))
    b.run(30)
    b.sample("press1.temperature", 1)
    assert b.states(TOPIC) == ["raised", "cleared"]


def test_restart_while_stale_does_not_raise_twice():
    b = Bench(silent())
    b.run(31)
    b.restart()
    b.run(60)
    assert b.states(TOPIC) == ["raised"]
    b.sample("press1.temperature", 1)
    b.restart()
    b.run(10)
    b.sample("press1.temperature", 1)
    assert b.states(TOPIC) == ["raised", "cleared"]
