"""Values rows stored as Sparkplug metrics (gateway.sparkplug.ValueEncoder): what goes on the wire
from them is what the JSON road sends, live and historical; they stay readable after the
configuration changed; a value that does not fit its tag's type takes the JSON road and its
birth; births carry the newest reported value.

Payloads are decoded by pysparkplug's own generated bindings, never by `gateway.sparkplug_pb`."""

from __future__ import annotations

import json
import time

import pysparkplug as ps
import yaml
from pysparkplug import _protobuf as tahu

from gateway import cli
from gateway import config as config_mod
from gateway.buffer import ENCODED, Buffer
from gateway.model import Quality, Sample
from gateway.report import ExceptionReporter
from gateway.sparkplug import CATALOG_KEY
from gateway.upstream_format import create
from tests.sparkplug.test_sparkplug_format import CONFIG, rows_of

G, B, U = Quality.GOOD, Quality.BAD, Quality.UNCERTAIN


def load(tmp_path, devices=None, name="g.yaml"):
    raw = {**CONFIG, "gateway": {"id": "gw1", "state_dir": str(tmp_path)},
           "devices": devices or CONFIG["devices"]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return config_mod.load(path)


def started(cfg):
    fmt = create(cfg.all_upstreams[0], cfg, started_at=time.time())
    fmt.will()
    fmt.device_state("press1", True)
    births = fmt.on_connect()
    return fmt, births


def polls():
    """Poll rounds of press1 as a driver sends them: every type, negatives, a value out of its
    type's range, qualities going bad, uncertain and good again, a null."""
    out = []
    for i in range(40):
        t = 1_765_000_000.0 + i * 0.25
        q = B if i in (5, 6) else U if i == 9 else G
        out.append([
            Sample("press1.temp", -300 + 17 * i, t, q),
            Sample("press1.speed", None if i == 5 else 1.5 * i - 20.125, t, q),
            Sample("press1.scaled", 0.1 * i, t + 0.001),
            Sample("press1.count", 4_000_000_000 + i, t),
            Sample("press1.running", i % 3 == 0, t),
        ])
    return out


def wire(messages):
    """(topic, metrics) of each DDATA, every field a host reads."""
    out = []
    for m in messages:
        if "/DDATA/" not in m.topic:
            continue
        p = tahu.Payload.FromString(m.payload)
        out.append((m.topic, [(x.alias, x.name, x.timestamp, x.WhichOneof("value"),
                               getattr(x, x.WhichOneof("value")) if x.WhichOneof("value") else None,
                               x.is_historical, x.is_null, list(x.properties.keys),
                               [v.int_value for v in x.properties.values]) for x in p.metrics]))
    return out


def test_encoded_rows_send_what_json_rows_send(tmp_path):
    cfg = load(tmp_path)
    for historical in (False, True):
        by_json, json_births = started(cfg)
        by_bytes, births = started(cfg)
        plain = ExceptionReporter(cfg.report_policy())
        encoding = ExceptionReporter(cfg.report_policy(), encode=by_bytes.value_encoder())
        sent_json, sent_bytes = [], []
        for i, poll in enumerate(polls()):
            stored = rows_of(encoding.offer(poll), first_seq=i + 1)
            assert all(r.payload[:1] == ENCODED for r in stored)  # stored as metrics, not JSON
            sent_bytes += [m for _, m in by_bytes.encode(stored, historical)]
            sent_json += [m for _, m in by_json.encode(rows_of(plain.offer(poll), first_seq=i + 1), historical)]
        assert wire(sent_bytes) == wire(sent_json)
        assert len(wire(sent_bytes)) == 40
        # every DDATA decodes against its birth, marked historical only when it waited
        dbirth = ps.DBirth.decode(births[1].payload)
        for m in sent_bytes:
            ddata = ps.DData.decode(m.payload, birth=dbirth)
            assert {x.is_historical for x in ddata.metrics} == {historical}
        first = ps.DData.decode(sent_bytes[0].payload, birth=dbirth)
        assert [(x.name, x.value) for x in first.metrics] == [
            ("temp", -300), ("speed", -20.125), ("scaled", 0.0), ("count", 4_000_000_000), ("running", True)]
        assert [m.topic for m in births] == [m.topic for m in json_births]


def test_a_backlog_is_joined_into_few_messages(tmp_path):
    cfg = load(tmp_path)
    fmt, _ = started(cfg)
    rep = ExceptionReporter(cfg.report_policy(), encode=fmt.value_encoder())
    rows = []
    for poll in polls():
        rows += rep.offer(poll)
    out = fmt.encode(rows_of(rows), historical=True)
    assert len(out) == 1  # 40 rows of one device: one DDATA, acknowledging all of them
    acks, message = out[0]
    assert [r.seq for r in acks] == list(range(1, 41))
    reported = sum(len(r.payload["values"]) for r in rows)  # `running` is not sent when it stays
    assert 150 < reported < 200 and len(tahu.Payload.FromString(message.payload).metrics) == reported


def test_a_backlog_message_ends_at_max_metrics_and_the_next_takes_the_rest(tmp_path):
    cfg = load(tmp_path)
    fmt, _ = started(cfg)
    fmt.max_metrics = 20
    rep = ExceptionReporter(cfg.report_policy(), encode=fmt.value_encoder())
    rows = []
    for poll in polls():
        rows += rep.offer(poll)
    out = fmt.encode(rows_of(rows), historical=True)
    counts = [len(tahu.Payload.FromString(m.payload).metrics) for _, m in out]
    assert len(out) > 5 and all(n >= 20 for n in counts[:-1]) and max(counts) < 20 + 5  # a row is never split
    # every row acknowledged by exactly one message, in order, and every metric sent once
    assert [r.seq for acks, _ in out for r in acks] == list(range(1, 41))
    assert sum(counts) == sum(len(r.payload["values"]) for r in rows)


def store(buffer, cfg, samples_by_poll, fmt):
    """As the Pipeline does: the catalog noted in the buffer, rows encoded against it."""
    enc = fmt.value_encoder()
    assert enc.keep_in(buffer)
    rep = ExceptionReporter(cfg.report_policy(), encode=enc)
    for poll in samples_by_poll:
        buffer.append(rep.offer(poll))
    return rep.reported


def test_stored_rows_are_read_back_after_the_configuration_changed(tmp_path):
    old = load(tmp_path)
    buffer = Buffer(tmp_path / "b.db", "gw1")
    buffer.set_links([("primary", frozenset({"values", "features", "alarms"}))])
    fmt_old, _ = started(old)
    reported = store(buffer, old, polls()[:3], fmt_old)
    # The new configuration puts a tag before the old ones: every alias moves.
    devices = json.loads(json.dumps(CONFIG["devices"]))
    devices[0]["tags"].insert(0, {"name": "pressure", "address": 10, "type": "float32"})
    devices[0]["tags"] = [t for t in devices[0]["tags"] if t["name"] != "count"]  # and one is gone
    new = load(tmp_path, devices, name="g2.yaml")
    fmt, births = started(new)
    fmt.stored_catalog = buffer.noted
    assert fmt.value_encoder().fingerprint != fmt_old.value_encoder().fingerprint
    out = fmt.encode(buffer.fetch({}, 100, link="primary"), historical=True)
    kinds = [m.topic.split("/")[2] for _, m in out]
    assert kinds == ["DBIRTH", "DDATA"]  # `count` is not in the new birth: born again first
    dbirth = ps.DBirth.decode(out[0][1].payload)
    assert {m.name: m.datatype for m in dbirth.metrics}["count"] == ps.DataType.INT64  # no longer configured
    ddata = ps.DData.decode(out[1][1].payload, birth=dbirth)
    got = [(m.name, m.value, m.timestamp) for m in ddata.metrics]
    assert got[:5] == [("temp", -300, 1_765_000_000_000), ("speed", -20.125, 1_765_000_000_000),
                       ("scaled", 0.0, 1_765_000_000_001), ("count", 4_000_000_000, 1_765_000_000_000),
                       ("running", True, 1_765_000_000_000)]
    assert len(got) == reported == 14 and all(m.is_historical for m in ddata.metrics)  # `running` stayed once
    assert [r.seq for r in out[1][0]] == [1, 2, 3]


def test_older_catalogs_stay_while_rows_may_need_them_and_go_once_none_is_buffered(tmp_path):
    old = load(tmp_path)
    buffer = Buffer(tmp_path / "b.db", "gw1")
    buffer.set_links([("primary", frozenset({"values", "features", "alarms"}))])
    fmt_old, _ = started(old)
    store(buffer, old, polls()[:2], fmt_old)
    devices = json.loads(json.dumps(CONFIG["devices"]))
    devices[0]["tags"].reverse()
    enc_old, enc_new = fmt_old.value_encoder(), started(load(tmp_path, devices, name="g2.yaml"))[0].value_encoder()
    keys = [enc_old.catalog_key, enc_new.catalog_key]
    assert enc_new.keep_in(buffer)  # a restart with the new configuration: the rows wait
    assert [buffer.noted(k) is not None for k in keys] == [True, True]
    rows = buffer.fetch({}, 100, link="primary")
    assert rows and rows[0].payload[:1] == ENCODED
    buffer.ack(rows, link="primary")
    assert buffer.depth == 0
    assert enc_new.keep_in(buffer)  # the next start: nothing buffered, nothing needs the old one
    assert [buffer.noted(k) is not None for k in keys] == [False, True]
    assert buffer.forget(CATALOG_KEY, keep=enc_new.catalog_key) == 0


def test_a_row_whose_catalog_is_gone_is_logged_not_sent(tmp_path, capsys):
    old = load(tmp_path)
    buffer = Buffer(tmp_path / "b.db", "gw1")
    buffer.set_links([("primary", frozenset({"values", "features", "alarms"}))])
    fmt_old, _ = started(old)
    rep = ExceptionReporter(old.report_policy(), encode=fmt_old.value_encoder())  # catalog not noted
    buffer.append(rep.offer(polls()[0]))
    devices = json.loads(json.dumps(CONFIG["devices"]))
    devices[0]["tags"].reverse()
    fmt, _ = started(load(tmp_path, devices, name="g2.yaml"))
    fmt.stored_catalog = buffer.noted
    assert fmt.encode(buffer.fetch({}, 100, link="primary"), historical=True) == []
    assert "sparkplug.stored_row_unreadable" in capsys.readouterr().out


def test_a_value_that_does_not_fit_goes_as_json_with_its_birth(tmp_path):
    cfg = load(tmp_path)
    fmt, births = started(cfg)
    rep = ExceptionReporter(cfg.report_policy(), encode=fmt.value_encoder())
    t = 1_765_000_000.0
    text = rep.offer([Sample("press1.speed", "n/a", t)])  # e.g. a device answering text
    assert text[0].encoded is None
    after = rep.offer([Sample("press1.speed", 3.25, t + 1), Sample("press1.temp", 7, t + 1)])
    assert after[0].encoded is not None  # fits the catalog's types: encoded
    out = fmt.encode(rows_of(text + after), historical=False)
    kinds = [m.topic.split("/")[2] for _, m in out]
    assert kinds == ["DBIRTH", "DDATA", "DBIRTH", "DDATA"]
    as_text = ps.DBirth.decode(out[0][1].payload)
    assert {m.name: m.datatype for m in as_text.metrics}["speed"] == ps.DataType.STRING
    assert [(m.name, m.value) for m in ps.DData.decode(out[1][1].payload, birth=as_text).metrics] == [("speed", "n/a")]
    # The stored row was encoded as FLOAT, but this birth says STRING: it is read back and the
    # value goes with a birth of its own type.
    as_number = ps.DBirth.decode(out[2][1].payload)
    assert {m.name: m.datatype for m in as_number.metrics}["speed"] == ps.DataType.DOUBLE
    assert [(m.name, m.value) for m in ps.DData.decode(out[3][1].payload, birth=as_number).metrics] == [
        ("speed", 3.25), ("temp", 7)]


def test_births_carry_the_newest_reported_value(tmp_path):
    cfg = load(tmp_path)
    fmt, _ = started(cfg)
    rep = ExceptionReporter(cfg.report_policy(), encode=fmt.value_encoder())
    fmt.reported = rep.last
    rows = []
    for poll in polls()[:8]:
        rows += rep.offer(poll)
    fmt.encode(rows_of(rows), historical=False)
    rep.offer([Sample("press1.temp", 55, 1_765_000_100.0)])  # reported, not sent yet
    births = fmt.births()
    dbirth = tahu.Payload.FromString(births[1].payload)
    got = {m.name: m for m in dbirth.metrics}
    assert got["temp"].int_value == 55 and got["temp"].timestamp == 1_765_000_100_000
    assert got["speed"].float_value == 1.5 * 7 - 20.125  # poll 7, good again after the bad ones
    assert got["speed"].properties.values[0].int_value == 192
    assert got["count"].int_value == 4_000_000_007


def test_buffer_dump_shows_encoded_rows_as_values(tmp_path, capsys):
    cfg = load(tmp_path)
    fmt, _ = started(cfg)
    buffer = Buffer(cfg.buffer_path, "gw1")
    buffer.set_links([("primary", frozenset({"values", "features", "alarms"}))])
    store(buffer, cfg, polls()[:2], fmt)
    buffer.close()
    assert cli.main(["buffer", "dump", "--config", str(tmp_path / "g.yaml")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["topic"] for r in rows] == ["values/press1", "values/press1"]
    assert rows[1]["payload"]["device"] == "press1"
    assert rows[1]["payload"]["values"][0] == ["temp", -283, 1_765_000_000.25, "good"]
