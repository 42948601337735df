"""The Sparkplug format on its own (no broker): what `encode`, births and commands put on the wire.

Every payload is decoded by pysparkplug and its own generated protobuf bindings, never by the
gateway's `gateway.sparkplug_pb`."""

from __future__ import annotations

import time

import pysparkplug as ps
import pytest
import yaml
from pysparkplug import _protobuf as tahu

from gateway import config as config_mod
from gateway.buffer import Row, encode
from gateway.model import Record, Sample
from gateway.report import ExceptionReporter
from gateway.upstream_format import create

CONFIG = {
    "gateway": {"id": "gw1"},
    "upstream": {"format": "sparkplug", "group_id": "plant1"},
    "devices": [
        {"name": "press1", "driver": "modbus", "port": 5020, "tags": [
            {"name": "temp", "address": 0, "type": "int16"},
            {"name": "speed", "address": 1, "type": "float32"},
            {"name": "scaled", "address": 3, "type": "uint16", "scale": 0.1},
            {"name": "count", "address": 4, "type": "uint32"},
            {"name": "running", "table": "coil", "address": 0, "type": "bool"},
        ]},
        {"name": "motor1", "driver": "mqtt", "subscriptions": [
            {"topic": "s/accel", "tag": "accel", "format": "f32le", "sample_rate": 12800, "unit": "g"},
            {"topic": "s/temp", "tag": "bearing_temp", "format": "json", "value_path": "v"},
        ]},
    ],
    "analyses": [{"name": "motor1_de", "input": "motor1.accel", "window": 4096,
                  "features": ["rms", "velocity_rms", "envelope"],
                  "bearing": {"shaft_hz": 29.93, "orders": {"bpfo": 3.58}, "envelope_band": [2000, 5000]}}],
    "rules": [{"name": "hot", "type": "threshold", "input": "press1.temp", "above": 80}],
}


def make_format(tmp_path, **upstream):
    raw = {**CONFIG, "gateway": {"id": "gw1", "state_dir": str(tmp_path)},
           "upstream": {**CONFIG["upstream"], **upstream}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config_mod.load(path)
    return create(cfg.all_upstreams[0], cfg, started_at=time.time()), cfg


def rows_of(records: list[Record], first_seq: int = 1) -> list[Row]:
    return [Row(first_seq + i, r.topic, encode("gw1", first_seq + i, r), r.retain, r.priority, 0)
            for i, r in enumerate(records)]


def born(fmt):
    """Connect: the will, then births with press1 up."""
    will = fmt.will()
    fmt.device_state("press1", True)
    return will, fmt.on_connect()


def test_births_datatypes_aliases_and_seq(tmp_path):
    fmt, _ = make_format(tmp_path)
    will, births = born(fmt)
    assert will.topic == "spBv1.0/plant1/NDEATH/gw1" and will.qos == 1
    assert [m.topic for m in births] == ["spBv1.0/plant1/NBIRTH/gw1", "spBv1.0/plant1/DBIRTH/gw1/press1"]
    nbirth = ps.NBirth.decode(births[0].payload)
    assert nbirth.seq == 0
    names = {m.name: m for m in nbirth.metrics}
    assert names["bdSeq"].value == ps.NDeath.decode(will.payload).bd_seq_metric.value == 0
    assert names["Node Control/Rebirth"].value is False
    assert {n for n in names if n.startswith("Alarms/hot/")} == {"Alarms/hot/State", "Alarms/hot/Severity",
                                                                   "Alarms/hot/Value"}
    dbirth = ps.DBirth.decode(births[1].payload)
    assert dbirth.seq == 1
    types = {m.name: m.datatype for m in dbirth.metrics}
    assert types == {"temp": ps.DataType.INT16, "speed": ps.DataType.FLOAT, "scaled": ps.DataType.DOUBLE,
                     "count": ps.DataType.UINT32, "running": ps.DataType.BOOLEAN}
    aliases = [m.alias for m in (*nbirth.metrics, *dbirth.metrics)]
    assert len(set(aliases)) == len(aliases) and all(a for a in aliases)
    # every device metric says its quality in the birth
    raw = tahu.Payload.FromString(births[1].payload)
    assert all(list(m.properties.keys) == ["Quality"] and m.properties.values[0].int_value == 0 and m.is_null
               for m in raw.metrics)  # nothing read yet: null and bad

    rep = ExceptionReporter(fmt_cfg_policy(tmp_path))
    out = fmt.encode(rows_of(rep.offer([Sample("press1.temp", -12, 100.0), Sample("press1.running", True, 100.0),
                                        Sample("press1.count", 4_000_000_000, 100.5)])), historical=False)
    assert len(out) == 1
    acks, message = out[0]
    assert [r.seq for r in acks] == [1] and message.topic == "spBv1.0/plant1/DDATA/gw1/press1" and message.qos == 1
    raw = tahu.Payload.FromString(message.payload)
    assert all(not m.name and m.alias for m in raw.metrics)  # aliases only
    ddata = ps.DData.decode(message.payload, birth=dbirth)
    assert ddata.seq == 2
    assert [(m.name, m.value, m.timestamp, m.is_historical) for m in ddata.metrics] == [
        ("temp", -12, 100_000, False), ("running", True, 100_000, False), ("count", 4_000_000_000, 100_500, False)]


def fmt_cfg_policy(tmp_path):
    return config_mod.load(tmp_path / "g.yaml").report_policy()


def test_seq_wraps_and_nbirth_restarts_it(tmp_path):
    fmt, _ = make_format(tmp_path)
    born(fmt)
    seqs = []
    for i in range(300):
        rows = rows_of([Record("values/press1", {"device": "press1", "values": [["temp", i % 100, float(i), "good"]]},
                               float(i), kind="values")], first_seq=i + 1)
        seqs += [tahu.Payload.FromString(m.payload).seq for _, m in fmt.encode(rows, False)]
    expected = [(2 + i) % 256 for i in range(300)]
    assert seqs == expected and 0 in seqs and 255 in seqs
    births = fmt.births()
    assert [tahu.Payload.FromString(m.payload).seq for m in births] == [0, 1]


def test_quality_historical_and_null(tmp_path):
    fmt, _ = make_format(tmp_path)
    _, births = born(fmt)
    dbirth = ps.DBirth.decode(births[1].payload)
    values = [["temp", 20, 1.0, "good"], ["temp", None, 2.0, "bad"], ["temp", 21, 3.0, "uncertain"],
              ["temp", 22, 4.0, "good"], ["temp", 23, 5.0, "good"], ["temp", 99999, 6.0, "good"]]
    out = fmt.encode(rows_of([Record("values/press1", {"device": "press1", "values": values}, 1.0, kind="values")]),
                     historical=True)
    raw = tahu.Payload.FromString(out[0][1].payload)
    quality = [dict(zip(m.properties.keys, (v.int_value for v in m.properties.values))).get("Quality")
               for m in raw.metrics]
    # born without a value (quality bad): good is said at the first value and when it is good again
    assert quality == [192, 0, 64, 192, None, None]
    decoded = ps.DData.decode(out[0][1].payload, birth=dbirth).metrics
    assert all(m.is_historical for m in decoded)
    assert [m.value for m in decoded] == [20, None, 21, 22, 23, None]  # 99999 does not fit an Int16: null
    assert [m.is_null for m in decoded] == [False, True, False, False, False, True]


def test_a_metric_new_to_the_birth_makes_a_dbirth_first(tmp_path):
    fmt, _ = make_format(tmp_path)
    born(fmt)
    out = fmt.encode(rows_of([Record("values/press1", {"device": "press1", "values": [["extra", "on", 1.0, "good"]]},
                                     1.0, kind="values")]), False)
    assert [m.topic.split("/")[2] for _, m in out] == ["DBIRTH", "DDATA"]
    assert out[0][0] == [] and [r.seq for r in out[1][0]] == [1]  # the birth acks no row
    dbirth = ps.DBirth.decode(out[0][1].payload)
    assert {m.name: m.datatype for m in dbirth.metrics}["extra"] == ps.DataType.STRING
    assert [m.value for m in ps.DData.decode(out[1][1].payload, birth=dbirth).metrics] == ["on"]


def test_features_are_metrics_of_the_input_device_and_alarms_node_metrics(tmp_path):
    fmt, _ = make_format(tmp_path)
    born(fmt)
    fmt.device_state("motor1", True)
    dbirth_msgs = fmt.device_state("motor1", True)
    assert dbirth_msgs == []  # already born by the first call
    feature = Record("features/motor1_de", {
        "analysis": "motor1_de", "input": "motor1.accel", "unit": "g", "quality": "good", "samples": 4096,
        "window_start": "2026-12-03T10:00:00.000Z", "rms": 0.5, "velocity_rms": 2.25,
        "bearing": {"shaft_hz": 29.93, "bpfo": {"hz": 107.1, "amplitude": 0.01, "snr_db": 12.5,
                                                "harmonics_snr_db": [12.5, 3.0]}, "dominant": "bpfo"}},
        ts=0.0, kind="features")
    alarm = Record("alarms/hot", {"rule": "hot", "state": "raised", "severity": "warning", "value": 85.5},
                   ts=1_764_756_000.0, kind="alarm", retain=True)
    out = fmt.encode(rows_of([feature, alarm]), False)
    topics = [m.topic for _, m in out]
    assert topics == ["spBv1.0/plant1/DDATA/gw1/motor1", "spBv1.0/plant1/NDATA/gw1"]  # no rebirth needed
    births = fmt.births()
    motor_birth = ps.DBirth.decode(next(m for m in births if m.topic.endswith("/motor1")).payload)
    got = {m.name: m.value for m in ps.DData.decode(out[0][1].payload, birth=motor_birth).metrics}
    assert got == {"motor1_de/rms": 0.5, "motor1_de/velocity_rms": 2.25, "motor1_de/bearing/shaft_hz": 29.93,
                   "motor1_de/bearing/bpfo/hz": 107.1, "motor1_de/bearing/bpfo/amplitude": 0.01,
                   "motor1_de/bearing/bpfo/snr_db": 12.5, "motor1_de/bearing/dominant": "bpfo"}
    stamp = ps.DData.decode(out[0][1].payload, birth=motor_birth).metrics[0].timestamp
    assert stamp == 1_796_292_000_000  # the window's start, 2026-12-03T10:00:00Z
    nbirth = ps.NBirth.decode(births[0].payload)
    node = {m.name: m.value for m in ps.NData.decode(out[1][1].payload, birth=nbirth).metrics}
    assert node == {"Alarms/hot/State": "raised", "Alarms/hot/Severity": "warning", "Alarms/hot/Value": 85.5}
    # the next births carry the last values
    assert {m.name: m.value for m in nbirth.metrics}["Alarms/hot/State"] == "raised"


def test_device_death_and_late_data_of_a_dead_device(tmp_path):
    fmt, _ = make_format(tmp_path)
    born(fmt)
    assert [m.topic for m in fmt.device_state("press1", False)] == ["spBv1.0/plant1/DDEATH/gw1/press1"]
    assert fmt.device_state("press1", False) == []
    late = rows_of([Record("values/press1", {"device": "press1", "values": [["temp", None, 1.0, "bad"]]}, 1.0,
                           kind="values")])
    assert [m.topic.split("/")[2] for _, m in fmt.encode(late, False)] == ["DBIRTH", "DDATA", "DDEATH"]
    assert [m.topic.split("/")[2] for m in fmt.device_state("press1", True)] == ["DBIRTH"]


def test_bdseq_grows_per_connection_and_survives_a_restart(tmp_path):
    fmt, _ = make_format(tmp_path)
    seen = [ps.NDeath.decode(fmt.will().payload).bd_seq_metric.value for _ in range(3)]
    again, _ = make_format(tmp_path)  # a new process with the same state dir
    seen.append(ps.NDeath.decode(again.will().payload).bd_seq_metric.value)
    births = again.on_connect()
    assert seen == [0, 1, 2, 3]
    assert {m.name: m.value for m in ps.NBirth.decode(births[0].payload).metrics}["bdSeq"] == 3
    assert ps.NDeath.decode(again.on_clean_stop()[0].payload).bd_seq_metric.value == 3
    for _ in range(253):
        again.will()
    assert ps.NDeath.decode(again.will().payload).bd_seq_metric.value == 1  # 0..255, then round again


def test_primary_host_state(tmp_path):
    fmt, _ = make_format(tmp_path, primary_host_id="scada1")
    fmt.will()
    assert ("spBv1.0/STATE/scada1", 1) in fmt.subscriptions()
    assert fmt.on_connect() == [] and not fmt.ready()  # no birth before the host is online
    state = "spBv1.0/STATE/scada1"
    online = fmt.on_message(state, b'{"online": true, "timestamp": 200}', None, True)
    assert online.ready_changed and [m.topic.split("/")[2] for m in online.publish][0] == "NBIRTH" and fmt.ready()
    assert fmt.on_message(state, b'{"online": false, "timestamp": 100}', None, True) is None  # older: stale
    offline = fmt.on_message(state, b'{"online": false, "timestamp": 300}', None, False)
    assert offline.reconnect and [m.topic for m in offline.publish] == ["spBv1.0/plant1/NDEATH/gw1"]
    assert not fmt.ready()
    assert fmt.on_message(state, b"not json", None, False) is None


def test_ncmd_rebirth_and_dcmd_writes(tmp_path):
    fmt, _ = make_format(tmp_path)
    _, births = born(fmt)
    ncmd = ps.NCmd(timestamp=1, metrics=(ps.Metric(timestamp=1, name="Node Control/Rebirth",
                                                   datatype=ps.DataType.BOOLEAN, value=True),)).encode()
    inbound = fmt.on_message("spBv1.0/plant1/NCMD/gw1", ncmd, None, False)
    assert [m.topic.split("/")[2] for m in inbound.publish] == ["NBIRTH", "DBIRTH"]
    assert tahu.Payload.FromString(inbound.publish[0].payload).seq == 0
    assert inbound.command.name == "rebirth"
    other = ps.NCmd(timestamp=1, metrics=(ps.Metric(timestamp=1, name="Node Control/Reboot",
                                                    datatype=ps.DataType.BOOLEAN, value=True),)).encode()
    assert fmt.on_message("spBv1.0/plant1/NCMD/gw1", other, None, False) is None  # refused, logged

    temp_alias = {m.name: m.alias for m in ps.DBirth.decode(births[1].payload).metrics}["temp"]
    dcmd = tahu.Payload(timestamp=5, seq=7)
    dcmd.metrics.add(alias=temp_alias, datatype=ps.DataType.INT16, int_value=(1 << 16) - 3)  # -3, by alias
    dcmd.metrics.add(name="running", datatype=ps.DataType.BOOLEAN, boolean_value=True)
    dcmd.metrics.add(name="token", datatype=ps.DataType.STRING, string_value="s3cret")
    inbound = fmt.on_message("spBv1.0/plant1/DCMD/gw1/press1", dcmd.SerializeToString(), None, False)
    assert inbound.command.name == "write" and inbound.command.raw is None
    request = dict(inbound.command.request)
    assert request.pop("id").startswith("spb-press1-5-7-")  # and a digest of the payload
    assert request == {"device": "press1", "token": "s3cret",
                       "writes": [{"tag": "temp", "value": -3}, {"tag": "running", "value": True}]}
    assert fmt.on_message("spBv1.0/plant1/DCMD/gw1/nosuch", dcmd.SerializeToString(), None, False) is None
    assert fmt.on_message("spBv1.0/plant1/DCMD/gw1/press1", b"\xff\xfe garbage", None, False) is None


@pytest.mark.parametrize("kind", ["data", "events", "status"])
def test_rows_of_other_kinds_are_not_taken(tmp_path, kind):
    fmt, _ = make_format(tmp_path)
    assert kind not in fmt.kinds
