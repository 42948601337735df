"""OPC UA config model: validation without a server."""

from __future__ import annotations

import pytest
from asyncua import ua
from pydantic import ValidationError

from drivers import base
from drivers.opcua import OpcUaConfig, to_sample
from gateway.model import Quality

TAGS = [{"name": "temp", "node": "ns=2;s=Oven.Temperature", "unit": "degC"}]


def test_config_validation():
    ok = dict(name="oven", driver="opcua", endpoint="opc.tcp://127.0.0.1:4840", tags=TAGS)
    assert OpcUaConfig(**ok).tag_names() == ["temp"]
    assert base.REGISTRY["opcua"].config is OpcUaConfig
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
