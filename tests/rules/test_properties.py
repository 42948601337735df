"""Property tests: for random input sequences (values, bad quality, time, ticks, restarts)
every `raised` is followed by at most one `cleared` before the next `raised`, per alarm topic."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.model import Quality
from tests.rules.helpers import Bench, original

SOURCE = "m.x"

# Values around every limit the rules below use, so that transitions actually happen.
levels = st.sampled_from([55.0, 19.0, 81.0, 21.0, 45.0, 49.5, 50.5, 0.0, 75.0, 79.5, 80.5, 100.0, 15.0])
values = st.one_of(
    levels, levels, levels,
    st.floats(min_value=-10, max_value=110, allow_nan=False),
    st.sampled_from([float("nan"), float("inf"), None, "ERR", True]),
)
qualities = st.sampled_from([Quality.GOOD] * 6 + [Quality.BAD, Quality.UNCERTAIN])
gaps = st.sampled_from([1.0, 0.5, 2.0, 0.2, 0.0])
sample_op = st.tuples(st.just("sample"), values, qualities, gaps)
ops = st.lists(
    st.one_of(
        sample_op, sample_op, sample_op, sample_op,
        st.tuples(st.just("advance"), st.sampled_from([3.0, 20.0, 40.0])),
        st.tuples(st.just("restart")),
    ),
    min_size=10, max_size=80,
)
durations = st.sampled_from([0, 0.5, 2, 5])

threshold_rules = st.builds(
    lambda above, gap, for_, clear_for, bad_after: {
        "name": "r", "type": "threshold", "input": SOURCE, "above": above, "clear": above - gap,
        "for": for_, "clear_for": clear_for, "bad_input_after": bad_after},
    st.sampled_from([20.0, 50.0, 80.0]), st.sampled_from([0.0, 1.0, 10.0]), durations, durations,
    st.sampled_from([None, 1, 10]),
)
iso_rules = st.builds(lambda for_, clear_for, h: {
        "name": "r", "type": "iso10816", "input": SOURCE, "zones": [20, 50, 80], "for": for_,
        "clear_for": clear_for, "hysteresis": h}, durations, durations, st.sampled_from([0, 0.05, 0.2]))
rate_rules = st.builds(lambda for_, limit: {
        "name": "r", "type": "rate", "input": SOURCE, "limit": limit, "per": "second",
        "window": "4s", "direction": "both", "for": for_}, durations, st.sampled_from([1.0, 10.0]))
stale_rules = st.builds(lambda after, clear_for: {
        "name": "r", "type": "stale", "input": SOURCE, "after": after, "clear_for": clear_for},
        st.sampled_from([1, 5, 30]), durations)


def play(rule: dict, steps: list[tuple]) -> Bench:
    b = Bench(rule)
    last_good = False  # nothing good seen yet

    def only_companion(out):
        # Bad data never moves the alarm itself (a tick may not complete a delay on it
        # either); at most the `.bad_input` companion speaks. `stale` is about bad data.
        if rule["type"] != "stale":
            assert all(r.topic.endswith(".bad_input") for r in out), out

    for op in steps:
        if op[0] == "sample":
            _, value, quality, gap = op
            out = b.sample(SOURCE, value, quality)
            last_good = quality is Quality.GOOD and isinstance(value, (int, float)) \
                and value == value and abs(value) != float("inf")
            if not last_good:
                only_companion(out)
            if gap:
                out = b.run(gap, step=min(gap, 0.5))
                if not last_good:
                    only_companion(out)
        elif op[0] == "advance":
            out = b.run(op[1], step=min(op[1], 0.5))
            if not last_good:
                only_companion(out)
        else:
            b.restart()
            # After a restart, the pending delays are gone: only a new good value can move it.
            last_good = False
    return b


def check_lifecycle(b: Bench) -> None:
    for topic in {r.topic for r in b.records}:
        records = b.on(topic)
        states = [r.payload["state"] for r in records]
        # The property as stated: after a raised, at most one cleared before the next raised.
        for i, state in enumerate(states):
            if state == "raised":
                following = states[i + 1:]
                upto = following.index("raised") if "raised" in following else len(following)
                assert following[:upto].count("cleared") <= 1, states
        # Stronger: transitions strictly alternate from raised, and a repeated `raised` is
        # only ever a severity change of the same alarm (same `since`, a different severity).
        assert states[0] == "raised", states
        for prev, cur in zip(records, records[1:]):
            if cur.payload["state"] == prev.payload["state"]:
                assert cur.payload["state"] == "raised", states
                assert cur.payload["since"] == prev.payload["since"]
                assert cur.payload["previous_severity"] == prev.payload["severity"]
                assert cur.payload["severity"] != prev.payload["severity"]
    # Across restarts the engine still offers the last published state for rebirth.
    retained = {r.topic: r.payload for r in b.engine.retained()}
    for topic, payload in retained.items():
        assert original(payload) == b.on(topic)[-1].payload


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(threshold_rules, ops)
def test_threshold_lifecycle_property(rule, steps):
    check_lifecycle(play(rule, steps))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(iso_rules, ops)
def test_iso10816_lifecycle_property(rule, steps):
    check_lifecycle(play(rule, steps))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate_rules, ops)
def test_rate_lifecycle_property(rule, steps):
    check_lifecycle(play(rule, steps))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stale_rules, ops)
def test_stale_lifecycle_property(rule, steps):
    check_lifecycle(play(rule, steps))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0.0, 1.0, 10.0]),
       st.lists(st.tuples(st.floats(min_value=0, max_value=100, allow_nan=False), st.booleans()),
                max_size=60))
def test_threshold_without_delays_follows_the_hysteresis_model(gap, steps):
    """With no delays the published state is exactly the textbook hysteresis, across restarts."""
    rule = {"name": "r", "type": "threshold", "input": SOURCE, "above": 50.0, "clear": 50.0 - gap}
    b = Bench(rule)
    active = False
    for value, restart in steps:
        if restart:
            b.restart()
        b.sample(SOURCE, value)
        active = value > 50.0 if not active else value > 50.0 - gap
        published = b.states("alarms/r")
        assert (published[-1] == "raised" if published else False) == active, (value, published)
    check_lifecycle(b)
