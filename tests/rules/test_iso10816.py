"""iso10816: zones by table, C warning / D critical, severity changes, hysteresis, restart."""

from __future__ import annotations

import pytest

from gateway.model import Quality
from rules.iso10816 import zone_of
from tests.rules.helpers import Bench

TOPIC = "alarms/motor1_iso"
SOURCE = "motor1_de.velocity_rms"


def iso(**keys):
    keys = keys or {"group": 2, "foundation": "rigid"}
    return {"name": "motor1_iso", "type": "iso10816", "input": SOURCE, **keys}


def feed(b: Bench, values):
    out = []
    for v in values:
        out += b.sample(SOURCE, v, unit="mm/s")
        b.clock.advance(1.4)
        out += b.tick()
    return out


@pytest.mark.parametrize("value, zone", [
    (0.0, "A"), (1.39, "A"), (1.4, "B"), (2.79, "B"), (2.8, "C"), (4.49, "C"), (4.5, "D"), (50, "D"),
])
def test_zone_boundaries_belong_to_the_upper_zone(value, zone):
    assert zone_of(value, (1.4, 2.8, 4.5)) == zone


def test_zone_c_warns_zone_d_is_critical_and_the_payload_names_the_zone():
    b = Bench(iso())
    assert feed(b, [0.8, 1.5, 2.5]) == []  # A and B are not alarms
    (warn,) = feed(b, [3.0])
    p = warn.payload
    assert (p["state"], p["severity"], p["zone"], p["limit"]) == ("raised", "warning", "C", 2.8)
    assert p["boundaries"] == {"ab": 1.4, "bc": 2.8, "cd": 4.5}
    assert p["standard"] == "ISO 10816-3 group 2 rigid" and p["unit"] == "mm/s"
    (crit,) = feed(b, [5.0])
    p = crit.payload
    assert (p["state"], p["severity"], p["zone"], p["limit"]) == ("raised", "critical", "D", 4.5)
    assert p["previous_severity"] == "warning" and p["since"] == warn.payload["since"]
    assert feed(b, [6.0, 4.4]) == []  # within the 5 % hysteresis below C/D: still critical
    (down,) = feed(b, [4.2])
    assert (down.payload["severity"], down.payload["zone"]) == ("warning", "C")
    assert down.payload["previous_severity"] == "critical"
    assert feed(b, [2.7]) == []  # within the hysteresis below B/C
    (cleared,) = feed(b, [2.6])
    assert (cleared.payload["state"], cleared.payload["zone"]) == ("cleared", "B")
    assert cleared.payload["limit"] == pytest.approx(2.8 * 0.95)
    assert b.states(TOPIC) == ["raised", "raised", "raised", "cleared"]


def test_straight_to_zone_d_raises_critical_once():
    b = Bench(iso(group=1, foundation="flexible"))
    feed(b, [1.0, 12.0, 13.0, 11.5])
    assert [(r.payload["state"], r.payload["severity"]) for r in b.records] == [("raised", "critical")]


def test_for_applies_to_the_raise_and_escalation_during_the_wait_raises_critical():
    b = Bench(iso(**{"class": "II", "for": "5s"}))
    feed(b, [3.0, 3.0, 8.0])
    assert b.records == []
    (raised,) = feed(b, [8.0])  # 5.6 s after the first zone C value
    assert raised.payload["severity"] == "critical"


def test_de_escalation_waits_clear_for_but_escalation_is_immediate():
    b = Bench(iso(zones=[1, 2, 3], clear_for="3s"))
    feed(b, [2.5])
    assert feed(b, [3.5]) != []  # escalation at once
    feed(b, [2.5, 2.5])  # 2.8 s in zone C
    assert [r.payload["severity"] for r in b.records] == ["warning", "critical"]
    feed(b, [2.5])
    assert [r.payload["severity"] for r in b.records] == ["warning", "critical", "warning"]


def test_a_growing_bearing_fault_walks_through_the_zones_once():
    b = Bench(iso())
    ramp = [0.5 + 0.05 * i for i in range(120)]  # 0.5 -> 6.45 mm/s
    noisy = [v + (0.1 if i % 2 else -0.1) for i, v in enumerate(ramp)]
    feed(b, noisy)
    assert [(r.payload["state"], r.payload["severity"]) for r in b.records] == [
        ("raised", "warning"), ("raised", "critical")]


def test_bad_feature_values_do_not_clear_and_restart_holds_critical():
    b = Bench(iso())
    feed(b, [5.0])
    b.sample(SOURCE, None, Quality.BAD)
    b.sample(SOURCE, float("nan"))
    b.restart()
    feed(b, [5.5, 4.4])
    assert b.states(TOPIC) == ["raised"]
    feed(b, [0.5])
    assert b.states(TOPIC) == ["raised", "cleared"]
