"""OPC UA config model: validation without a server."""

from __future__ import annotations

import numpy as np
import pytest
from asyncua import ua
from pydantic import ValidationError

from drivers import base, registry
from drivers.opcua import ArrayError, OpcUaConfig, to_block, to_sample
from gateway import config
from gateway.model import Quality

TAGS = [{"name": "temp", "node": "ns=2;s=Oven.Temperature", "unit": "degC"}]


def test_config_validation():
    ok = dict(name="oven", driver="opcua", endpoint="opc.tcp://127.0.0.1:4840", tags=TAGS)
    assert OpcUaConfig(**ok).tag_names() == ["temp"]
    assert registry.REGISTRY["opcua"].config is OpcUaConfig
    with pytest.raises(ValidationError):
        OpcUaConfig(**{**ok, "security": {"policy": "Basic256Sha256", "mode": "SignAndEncrypt"}})
    with pytest.raises(ValidationError):
        OpcUaConfig(**{**ok, "security": {"policy": "None", "mode": "Sign"}})
    with pytest.raises(ValidationError):
        OpcUaConfig(**{**ok, "tags": [{"name": "t", "node": "not a node id;;"}]})
    with pytest.raises(ValidationError):
        OpcUaConfig(**{**ok, "endpoint": "http://x"})
    with pytest.raises(ValidationError):
        OpcUaConfig(**{**ok, "mode": "push"})


def test_status_codes_become_quality_and_source_timestamps_are_kept():
    import datetime as dt

    stamp = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    good = ua.DataValue(ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=stamp)
    assert to_sample("o.t", "degC", good, 0.0) == to_sample("o.t", "degC", good, 99.0)
    sample = to_sample("o.t", "degC", good, 0.0)
    assert (sample.value, sample.ts, sample.quality, sample.unit) == (1.5, stamp.timestamp(), Quality.GOOD, "degC")
    bad = ua.DataValue(ua.Variant(7.0, ua.VariantType.Double), ua.StatusCode(ua.StatusCodes.BadSensorFailure))
    sample = to_sample("o.t", None, bad, 42.0)
    assert (sample.value, sample.ts, sample.quality) == (None, 42.0, Quality.BAD)
    uncertain = ua.DataValue(ua.Variant(3, ua.VariantType.Int32),
                             ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue), SourceTimestamp=stamp)
    assert to_sample("o.t", None, uncertain, 0.0).quality is Quality.UNCERTAIN


ACCEL = {"name": "accel", "node": "ns=2;s=Motor.Capture", "sample_rate": 12800, "unit": "g", "capture": "separate"}


def test_waveform_tags_are_the_ones_with_a_sample_rate():
    ok = dict(name="motor", driver="opcua", endpoint="opc.tcp://127.0.0.1:4840")
    accel2 = {"name": "accel2", "node": "ns=2;s=Motor.Capture", "sample_rate_node": "ns=2;s=Motor.SampleRate",
              "capture": "continuous"}
    cfg = OpcUaConfig(**ok, tags=[*TAGS, ACCEL, accel2])
    assert cfg.waveform_tags() == {"accel", "accel2"} and cfg.tag_names() == ["temp", "accel", "accel2"]
    assert cfg.tags[1].capture == "separate" and cfg.tags[2].capture == "continuous"
    for broken, fragment in [({**ACCEL, "sample_rate_node": "ns=2;s=Motor.SampleRate"}, "give one"),
                             ({**TAGS[0], "capture": "separate"}, "capture applies to waveform tags only"),
                             ({**ACCEL, "sample_rate": 0}, "greater than 0"),
                             ({**ACCEL, "capture": "glued"}, "'separate' or 'continuous'"),
                             ({"name": "a", "node": "ns=2;s=M.C", "sample_rate_node": "nope;;"},
                              "not an OPC UA node id")]:
        with pytest.raises(ValidationError, match=fragment):
            OpcUaConfig(**ok, tags=[broken])


def test_analysis_input_must_be_an_opcua_waveform_tag(tmp_path):
    def load(input_tag: str):
        path = tmp_path / "gw.yaml"
        path.write_text(f"""\
gateway: {{id: gw1, state_dir: {tmp_path}}}
upstream: {{host: 127.0.0.1, port: 1883}}
devices:
  - name: motor
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    tags:
      - {{name: accel, node: "ns=2;s=Motor.Capture", sample_rate: 12800, unit: g, capture: separate}}
      - {{name: temp, node: "ns=2;s=Motor.Temperature", unit: degC}}
analyses:
  - {{name: a1, input: {input_tag}, window: 4096, features: [rms]}}
""")
        return config.load(path)

    assert load("motor.accel").analyses[0].input == "motor.accel"
    with pytest.raises(config.ConfigError) as err:
        load("motor.temp")
    assert any("'motor.temp' is not a waveform tag of a configured device (it is a scalar tag)" in p
               for p in err.value.problems)


def test_array_values_become_blocks_or_clear_errors():
    floats = to_block(ua.Variant([0.5, -1.0, 2.0], ua.VariantType.Float))
    assert floats.dtype == np.float32 and floats.tolist() == [0.5, -1.0, 2.0]
    assert to_block(ua.Variant([1, -2], ua.VariantType.Int32)).dtype == np.float64
    assert to_block(ua.Variant([1, -2], ua.VariantType.Int16)).tolist() == [1.0, -2.0]
    for variant, fragment in [(ua.Variant([[1.0, 2.0], [3.0, 4.0]], ua.VariantType.Double), "2-D"),
                              (ua.Variant(["a", "b"], ua.VariantType.String), "String array"),
                              (ua.Variant(1.5, ua.VariantType.Double), "scalar Double"),
                              (ua.Variant([1, 2], ua.VariantType.UInt64), "not Float, Double, Int16 or Int32"),
                              (ua.Variant([], ua.VariantType.Float), "empty"),
                              (ua.Variant([1.0, float("nan")], ua.VariantType.Double), "NaN"),
                              (None, "no value")]:
        with pytest.raises(ArrayError, match=fragment):
            to_block(variant)
