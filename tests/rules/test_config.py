"""Rule configs: keys as in CONTRACT.md section 2, unknown keys rejected, `for` as a YAML key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import rules
from tests.rules.helpers import configs

CONTRACT_RULES = [
    {"name": "spindle_overtemp", "type": "threshold", "input": "press1.temperature", "above": 80,
     "clear": 75, "for": "10s", "severity": "warning"},
    {"name": "motor1_iso", "type": "iso10816", "input": "motor1_de.velocity_rms", "group": 2,
     "foundation": "rigid"},
    {"name": "voltage_test", "type": "pass_fail", "input": "tester.voltage", "low": 80, "high": 90},
    {"name": "press1_silent", "type": "stale", "input": "press1.temperature", "after": "30s",
     "severity": "critical"},
    {"name": "press1_downtime", "type": "downtime", "input": "press1.running"},
]


def test_every_rule_type_is_registered_with_a_literal_type():
    assert set(rules.REGISTRY) == {"threshold", "iso10816", "pass_fail", "stale", "downtime", "rate"}
    for name, rule_type in rules.REGISTRY.items():
        assert rule_type.config.model_fields["type"].annotation.__args__ == (name,)


def test_contract_example_parses():
    parsed = configs(*CONTRACT_RULES)
    assert [c.type for c in parsed] == ["threshold", "iso10816", "pass_fail", "stale", "downtime"]
    assert parsed[0].for_ == 10.0
    assert parsed[3].after == 30.0
    # Each config reports the names it reads, for input validation in the core.
    assert parsed[0].inputs() == ["press1.temperature"]


def test_for_alias_and_python_name_both_work_and_dump_as_for():
    by_alias, by_name = configs(
        {"name": "a", "type": "threshold", "input": "d.t", "above": 1, "for": "500ms"},
        {"name": "b", "type": "threshold", "input": "d.t", "above": 1, "for_": 2},
    )
    assert by_alias.for_ == 0.5 and by_name.for_ == 2.0
    assert by_alias.model_dump(by_alias=True)["for"] == 0.5


@pytest.mark.parametrize("rule", CONTRACT_RULES, ids=lambda r: r["type"])
def test_unknown_key_is_an_error(rule):
    with pytest.raises(ValidationError) as err:
        configs({**rule, "fro": "10s"})
    assert "fro" in str(err.value) and "Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize("bad, message", [
    ({"above": 80, "below": 10}, "exactly one of 'above' or 'below'"),
    ({}, "exactly one of 'above' or 'below'"),
    ({"above": 80, "clear": 85}, "must be at or below 'above'"),
    ({"below": 10, "clear": 5}, "must be at or above 'below'"),
    ({"above": 80, "for": "soon"}, "invalid duration"),
    ({"above": float("nan")}, "finite"),
    ({"above": 80, "severity": "fatal"}, "severity"),
])
def test_threshold_validation(bad, message):
    with pytest.raises(ValidationError, match=message):
        configs({"name": "t", "type": "threshold", "input": "d.t", **bad})


@pytest.mark.parametrize("keys, boundaries", [
    ({"group": 1, "foundation": "rigid"}, (2.3, 4.5, 7.1)),
    ({"group": 1, "foundation": "flexible"}, (3.5, 7.1, 11.0)),
    ({"group": 2, "foundation": "rigid"}, (1.4, 2.8, 4.5)),
    ({"group": 2, "foundation": "flexible"}, (2.3, 4.5, 7.1)),
    ({"class": "I"}, (0.71, 1.8, 4.5)),
    ({"class": "II"}, (1.12, 2.8, 7.1)),
    ({"class": 3}, (1.8, 4.5, 11.2)),
    ({"class": "iv"}, (2.8, 7.1, 18.0)),
    ({"zones": [1, 2, 3]}, (1.0, 2.0, 3.0)),
])
def test_iso_tables(keys, boundaries):
    (config,) = configs({"name": "i", "type": "iso10816", "input": "a.velocity_rms", **keys})
    assert config.boundaries() == boundaries


@pytest.mark.parametrize("keys", [
    {}, {"group": 2}, {"foundation": "rigid"}, {"group": 3, "foundation": "rigid"},
    {"group": 2, "foundation": "rigid", "class": "I"}, {"class": "V"},
    {"zones": [3, 2, 1]}, {"zones": [0, 1, 2]}, {"zones": [1, 2]},
])
def test_iso_validation(keys):
    with pytest.raises(ValidationError):
        configs({"name": "i", "type": "iso10816", "input": "a.velocity_rms", **keys})


def test_other_validation():
    with pytest.raises(ValidationError, match="'low', 'high' or both"):
        configs({"name": "p", "type": "pass_fail", "input": "t.v"})
    with pytest.raises(ValidationError, match="must not be above"):
        configs({"name": "p", "type": "pass_fail", "input": "t.v", "low": 2, "high": 1})
    with pytest.raises(ValidationError, match="exactly one of 'input'"):
        configs({"name": "s", "type": "stale", "after": "1s"})
    with pytest.raises(ValidationError, match="exactly one of 'input'"):
        configs({"name": "s", "type": "stale", "after": "1s", "input": "a.b", "device": "a"})
    with pytest.raises(ValidationError):
        configs({"name": "s", "type": "stale", "input": "a.b"})  # `after` is required
    with pytest.raises(ValidationError, match="not both"):
        configs({"name": "d", "type": "downtime", "input": "a.b", "running": [1], "stopped": [0]})
    with pytest.raises(ValidationError, match="at or below 'limit'"):
        configs({"name": "r", "type": "rate", "input": "a.b", "limit": 1, "clear": 2})
    with pytest.raises(ValidationError):
        configs({"name": "r", "type": "rate", "input": "a.b", "limit": 0})
    with pytest.raises(ValidationError):
        configs({"name": "bad.name", "type": "downtime", "input": "a.b"})


def test_stale_on_a_device_names_the_device_as_its_input():
    (config,) = configs({"name": "s", "type": "stale", "device": "press1", "after": "30s"})
    assert config.inputs() == ["press1"] and config.device == "press1"


def test_bad_input_delay_defaults_to_the_longer_of_for_and_30s():
    short, long_, explicit = configs(
        {"name": "a", "type": "threshold", "input": "d.t", "above": 1, "for": "5s"},
        {"name": "b", "type": "threshold", "input": "d.t", "above": 1, "for": "2m"},
        {"name": "c", "type": "threshold", "input": "d.t", "above": 1, "bad_input_after": "3s"},
    )
    assert (short.bad_input_delay, long_.bad_input_delay, explicit.bad_input_delay) == (30, 120, 3)


def test_duplicate_rule_names_are_refused_by_the_engine():
    rule = {"name": "a", "type": "threshold", "input": "d.t", "above": 1}
    with pytest.raises(ValueError, match="used twice"):
        rules.RuleEngine(configs(rule, rule))
