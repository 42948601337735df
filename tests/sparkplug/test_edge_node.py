"""The gateway as a Sparkplug B 3.0 edge node, end to end: real Mosquitto brokers, the real
pymodbus simulator, the whole App in-process (and `edge-gateway run` as a subprocess for the
kill -9). Everything the gateway sends is decoded with pysparkplug, a decoder that is not the
gateway's; NCMD/DCMD are encoded with it too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pysparkplug as ps
import yaml
from pysparkplug import _protobuf as sp_pb

from drivers.sim.modbus import SCRATCH, SETPOINT, MachineModel
from tests.conftest import Collector, free_port
from tests.integration.conftest import running_gateway, until
from tests.integration.test_upstreams import Subscriber, parse_ts
from tests.sparkplug.conftest import (
    NODE,
    Msg,
    bdseq_of,
    by_name,
    dbirth,
    ddata_points,
    gateway_config,
    link,
    modbus_device,
    nbirth,
    sim_port,
    sparkplug_upstream,
    start_daemon,
    start_sim,
    topic,
    values_of,
)

DT = ps.DataType
REBIRTH = "Node Control/Rebirth"
OUTAGE_S = float(os.environ.get("EDGE_GATEWAY_TEST_OUTAGE_S", "30"))  # the Sparkplug broker's outage
NEG = SCRATCH  # a scratch register the tests set to a negative int16
COUNTER = SCRATCH + 30  # a scratch register that goes up by one at every read (CountingSimulator.ramps)
GOOD = 192  # the Quality property of a good value (OPC DA)


def always_running() -> MachineModel:
    return MachineModel(run_s=1e9, stop_s=1.0)


def ncmd(value: bool, ts: int | None = None) -> bytes:
    ts = ts or ps.get_current_timestamp()
    metric = ps.Metric(timestamp=ts, name=REBIRTH, datatype=DT.BOOLEAN, value=value)
    return ps.NCmd(timestamp=ts, metrics=(metric,)).encode(include_dtypes=True)


def dcmd(*metrics: tuple[str | None, int | None, DT, object], ts: int | None = None, dtypes: bool = True) -> bytes:
    """A DCMD of (name, alias, datatype, value) metrics; a metric without a name goes by alias.
    `dtypes=False`: the datatypes left out, as the specification allows outside births."""
    ts = ts or ps.get_current_timestamp()
    made = tuple(ps.Metric(timestamp=ts, name=name, alias=alias, datatype=datatype, value=value)
                 for name, alias, datatype, value in metrics)
    return ps.DCmd(timestamp=ts, metrics=made).encode(include_dtypes=dtypes)


def node_stream(messages: list[Msg]) -> list[Msg]:
    return [m for m in messages if m.kind in ("NBIRTH", "NDATA", "DBIRTH", "DDATA", "DDEATH")]


def assert_seq_runs(messages: list[Msg]) -> int:
    """seq is 0 at every NBIRTH and one more (mod 256) at every other node message; returns the
    number of wraps 255 -> 0 seen."""
    stream = node_stream(messages)
    assert stream and stream[0].kind == "NBIRTH", [m.topic for m in stream[:3]]
    wraps = 0
    prev = None
    for i, m in enumerate(stream):
        if m.kind == "NBIRTH":
            assert m.seq == 0, (i, m.topic, m.seq)
        else:
            assert m.seq == (prev + 1) % 256, (i, m.topic, prev, m.seq)
            wraps += prev == 255
        prev = m.seq
    return wraps


def quality_of(pb_metric) -> int | None:
    props = pb_metric.properties
    for key, value in zip(props.keys, props.values):
        if key == "Quality":
            return value.int_value
    return None


def audit_events(col: Collector) -> list[dict]:
    return [p for _, p in col.json(f"edge/{NODE}/events/commands")]


# ---------------------------------------------------------------------------------------------
# 1. births and aliases
# ---------------------------------------------------------------------------------------------

PRESS_TAGS = [
    {"name": "temperature", "address": 0, "type": "float32", "unit": "degC"},
    {"name": "parts", "address": 4, "type": "uint32"},
    {"name": "speed", "address": 6, "type": "uint16"},
    {"name": "status", "address": 7, "type": "int16"},
    {"name": "energy", "address": 8, "type": "float64"},
    {"name": "setpoint", "address": SETPOINT, "type": "float32"},
    {"name": "speed_pct", "address": 6, "type": "uint16", "scale": 0.05},
    {"name": "level", "address": NEG, "type": "int16"},
    {"name": "running", "table": "coil", "address": 0, "type": "bool"},
]
PRESS_TYPES = {"temperature": DT.FLOAT, "parts": DT.UINT32, "speed": DT.UINT16, "status": DT.INT16,
               "energy": DT.DOUBLE, "setpoint": DT.FLOAT, "speed_pct": DT.DOUBLE, "level": DT.INT16,
               "running": DT.BOOLEAN}


async def test_births_types_and_aliases(tmp_path, mosquitto, sp_collector_factory):
    sim = await start_sim(model=always_running())
    sim.holding()[NEG] = -1234 & 0xFFFF
    col = sp_collector_factory(mosquitto)
    port = sim_port(sim)
    devices = [modbus_device(port, PRESS_TAGS, "press1"),
               modbus_device(port, [{"name": "temperature", "address": 0, "type": "float32"},
                                    {"name": "running", "table": "coil", "address": 0, "type": "bool"}], "press2")]
    rules = [{"name": "hot", "type": "threshold", "input": "press1.temperature", "above": 80, "clear": 75}]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto), devices, rules=rules)
    try:
        async with running_gateway(tmp_path, raw):
            def seen(name: str, device: str = "press1") -> list:
                return values_of(ddata_points(col.all(), device), name)

            assert await until(lambda: all(seen(t) for t in PRESS_TYPES) and seen("temperature", "press2"), 20), \
                [m.topic for m in col.all()]
            sim.holding()[NEG] = -32768 & 0xFFFF  # the most negative int16
            assert await until(lambda: -32768 in seen("level"), 10), seen("level")
        messages = col.all()
    finally:
        await sim.stop()

    # NBIRTH: bdSeq (the first connection of a new state dir), the rebirth control, the alarms
    (nb_msg,) = [m for m in messages if m.kind == "NBIRTH"]
    assert nb_msg.topic == topic("NBIRTH") and nb_msg.seq == 0
    node = by_name(nbirth(nb_msg))
    assert node["bdSeq"].datatype == DT.INT64 and node["bdSeq"].value == 0
    assert node[REBIRTH].datatype == DT.BOOLEAN and node[REBIRTH].value is False
    for rule in ("hot", "hot.bad_input"):
        assert node[f"Alarms/{rule}/State"].datatype == DT.STRING
        assert node[f"Alarms/{rule}/Severity"].datatype == DT.STRING
        assert node[f"Alarms/{rule}/Value"].datatype == DT.DOUBLE

    # DBIRTH per device: every tag, its datatype, an alias, a Quality property
    births = {m.device: m for m in messages if m.kind == "DBIRTH"}
    assert set(births) == {"press1", "press2"}
    assert len([m for m in messages if m.kind == "DBIRTH"]) == 2  # one each: nothing new came up later
    press1, press2 = by_name(dbirth(births["press1"])), by_name(dbirth(births["press2"]))
    assert {n: m.datatype for n, m in press1.items()} == PRESS_TYPES
    assert {n: m.datatype for n, m in press2.items()} == {"temperature": DT.FLOAT, "running": DT.BOOLEAN}
    aliases = [m.alias for birth in (node, press1, press2) for m in birth.values()]
    assert None not in aliases and len(set(aliases)) == len(aliases), aliases  # unique over the edge node
    for metric in births["press1"].pb().metrics:  # null before the first poll: bad, never a good null
        assert quality_of(metric) == (0 if metric.is_null else GOOD), metric.name

    # DDATA: aliases only, each one of its device's birth; the values as the simulator holds them
    for device, birth in (("press1", press1), ("press2", press2)):
        points = ddata_points(messages, device)
        assert points and not any(p.had_name for p in points)
        assert {p.alias for p in points} <= {m.alias for m in birth.values()}
    points = ddata_points(messages, "press1")
    assert values_of(points, "level")[:1] == [-1234] and values_of(points, "level")[-1] == -32768
    assert set(values_of(points, "status")) == {1}
    assert set(values_of(points, "speed")) == {1500}
    assert set(values_of(points, "speed_pct")) == {75.0}  # 1500 x 0.05: a scaled tag is a Double
    assert set(values_of(points, "running")) == {True}
    assert set(values_of(points, "setpoint")) == {45.0}
    assert all(35.0 < v < 56.0 for v in values_of(points, "temperature"))
    assert all(isinstance(v, int) and v >= 0 for v in values_of(points, "parts"))
    assert all(v > 0.0 for v in values_of(points, "energy"))
    assert_seq_runs(messages)


# ---------------------------------------------------------------------------------------------
# 2. seq: 0 at NBIRTH, +1 per message, 255 -> 0
# ---------------------------------------------------------------------------------------------


async def test_seq_counts_every_message_and_wraps(tmp_path, mosquitto, sp_collector_factory):
    sim = await start_sim(model=always_running(), ramps={COUNTER: 1})
    col = sp_collector_factory(mosquitto)
    port = sim_port(sim)
    tag = [{"name": "counter", "address": COUNTER, "type": "uint16"}]
    devices = [modbus_device(port, tag, f"line{i}", poll="20ms") for i in range(4)]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto), devices)
    try:
        async with running_gateway(tmp_path, raw):
            # 4 devices, a new value at every 20 ms poll: a DDATA each, well over 256 messages
            assert await until(lambda: len(node_stream(col.all())) >= 600, 25), len(node_stream(col.all()))
        messages = col.all()
    finally:
        await sim.stop()
    stream = node_stream(messages)
    assert [m.kind for m in stream].count("NBIRTH") == 1
    assert {m.device for m in stream if m.kind == "DBIRTH"} == {f"line{i}" for i in range(4)}
    assert assert_seq_runs(messages) >= 2  # wrapped 255 -> 0 (twice), and never skipped or repeated
    assert [m.seq for m in stream[:2]] == [0, 1]


# ---------------------------------------------------------------------------------------------
# 3. bdSeq across a kill -9 of the real daemon
# ---------------------------------------------------------------------------------------------


async def test_bdseq_across_kill_9(tmp_path, mosquitto, sp_collector_factory):
    sim = await start_sim(model=always_running())
    col = sp_collector_factory(mosquitto)
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto),
                         [modbus_device(sim_port(sim), [{"name": "temperature", "address": 0, "type": "float32"}])])
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = start_daemon(cfg, tmp_path, "first")
    try:
        assert await until(lambda: col.of("NBIRTH") and col.of("DDATA", "press1"), 40), \
            (tmp_path / "first.log").read_text()[-3000:]
        first = bdseq_of(col.of("NBIRTH")[0])
        assert first == 0  # a new state dir: the first connection ever
        assert not col.of("NDEATH")
        proc.send_signal(signal.SIGKILL)  # no chance to say goodbye: only the broker can
        proc.wait(5)
        killed_at = time.time()
        assert await until(lambda: col.of("NDEATH"), 10), "the broker did not publish the will"
        (will,) = col.of("NDEATH")
        assert will.topic == topic("NDEATH") and bdseq_of(will) == first
        assert will.qos == 1  # the will, at QoS 1 (a clean stop's NDEATH goes at QoS 0)
        assert will.at >= killed_at - 0.5

        proc = start_daemon(cfg, tmp_path, "second")
        assert await until(lambda: len(col.of("NBIRTH")) == 2 and col.of("DBIRTH", "press1")[1:], 40), \
            (tmp_path / "second.log").read_text()[-3000:]
        reborn = col.of("NBIRTH")[1]
        assert bdseq_of(reborn) == first + 1 and reborn.seq == 0
        assert reborn.at > will.at
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert await until(lambda: len(col.of("NDEATH")) == 2, 5)
        clean = col.of("NDEATH")[1]  # a clean stop says it itself, with the bdSeq of its NBIRTH
        assert bdseq_of(clean) == first + 1 and clean.qos == 0
        await asyncio.sleep(0.5)
        assert len(col.of("NDEATH")) == 2  # and after a clean DISCONNECT the broker sends no will
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        await sim.stop()
    assert (tmp_path / "state" / "sparkplug-upstream.bdseq").read_text().strip() == str(first + 1)


# ---------------------------------------------------------------------------------------------
# 4. NCMD Node Control/Rebirth
# ---------------------------------------------------------------------------------------------


async def test_ncmd_rebirth(tmp_path, mosquitto, sp_collector_factory):
    sim = await start_sim(model=always_running(), ramps={COUNTER: 1})
    col = sp_collector_factory(mosquitto)
    tags = [{"name": "counter", "address": COUNTER, "type": "uint16"},
            {"name": "speed", "address": 6, "type": "uint16"}]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto), [modbus_device(sim_port(sim), tags)],
                         rules=[{"name": "fast", "type": "threshold", "input": "press1.counter", "above": 1e9}])
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: len(col.of("DDATA", "press1")) >= 5, 20)
            col.publish(topic("NCMD"), ncmd(False))  # only `true` asks for a rebirth
            await asyncio.sleep(1.0)
            assert len(col.of("NBIRTH")) == 1 and len(col.of("DBIRTH")) == 1
            asked = time.time()
            col.publish(topic("NCMD"), ncmd(True))
            assert await until(lambda: len(col.of("NBIRTH")) == 2 and len(col.of("DBIRTH")) == 2, 10)
            n = len(col.of("DDATA", "press1"))
            assert await until(lambda: len(col.of("DDATA", "press1")) >= n + 5, 10)
        messages = col.all()
    finally:
        await sim.stop()
    stream = node_stream(messages)
    i = [k for k, m in enumerate(stream) if m.kind == "NBIRTH"][1]
    again, device_again = stream[i], stream[i + 1]
    assert again.at >= asked and again.seq == 0
    assert device_again.kind == "DBIRTH" and device_again.device == "press1" and device_again.seq == 1
    first_node, node = by_name(nbirth(stream[0])), by_name(nbirth(again))
    assert node["bdSeq"].value == first_node["bdSeq"].value  # the same connection: the same bdSeq
    assert {"Alarms/fast/State", "Alarms/fast/Severity", "Alarms/fast/Value", REBIRTH} <= set(node)
    first_device = by_name(dbirth([m for m in stream if m.kind == "DBIRTH"][0]))
    device = by_name(dbirth(device_again))
    assert {n: (m.alias, m.datatype) for n, m in device.items()} == \
        {n: (m.alias, m.datatype) for n, m in first_device.items()}
    # the rebirth carries the last values sent, not nulls
    before = values_of(ddata_points(stream[:i], "press1"), "counter")
    assert device["counter"].value == before[-1] and device["speed"].value == 1500
    # the data goes on after the rebirth, decoded with the new birth, seq unbroken
    after = values_of(ddata_points(stream[i:], "press1"), "counter")
    assert after and after[0] > before[-1]
    assert_seq_runs(messages)


# ---------------------------------------------------------------------------------------------
# 5. DDEATH when the device goes, DBIRTH when it is back
# ---------------------------------------------------------------------------------------------


async def test_ddeath_and_dbirth_when_the_device_goes_and_comes_back(tmp_path, mosquitto, sp_collector_factory):
    port = free_port()
    sim = await start_sim(port, model=always_running(), ramps={COUNTER: 1})
    col = sp_collector_factory(mosquitto)
    tags = [{"name": "counter", "address": COUNTER, "type": "uint16"}]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto),
                         [modbus_device(port, tags, "press1"),
                          modbus_device(free_port(), tags, "ghost")])  # never reachable: never born
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: len(col.of("DDATA", "press1")) >= 5, 20)
            await sim.stop()
            stopped = time.time()
            assert await until(lambda: col.of("DDEATH", "press1"), 10), [m.topic for m in col.all()[-5:]]
            await asyncio.sleep(1.0)  # down for a while: nothing but the death
            sim = await start_sim(port, model=always_running(), ramps={COUNTER: 1})
            restarted = time.time()
            assert await until(lambda: len(col.of("DBIRTH", "press1")) == 2, 15)
            assert await until(lambda: col.of("DDATA", "press1")[-1].at > col.of("DBIRTH", "press1")[1].at, 10)
        messages = col.all()
    finally:
        await sim.stop()
    stream = [m for m in node_stream(messages) if m.device in (None, "press1")]
    (death,) = [m for m in stream if m.kind == "DDEATH"]
    assert death.at >= stopped and death.topic == topic("DDEATH", "press1")
    k = stream.index(death)
    reborn = stream[k + 1]
    assert reborn.kind == "DBIRTH" and reborn.at >= restarted  # no DDATA between death and birth
    assert by_name(dbirth(reborn))["counter"].datatype == DT.UINT16
    counts_after = values_of(ddata_points(stream[k + 1:], "press1"), "counter")
    assert counts_after and counts_after[0] <= 5  # the new simulator counts from 0 again
    assert not [m for m in messages if m.device == "ghost"]  # a device never connected: no birth, no death
    assert [m.kind for m in stream].count("NBIRTH") == 1
    assert_seq_runs(messages)


# ---------------------------------------------------------------------------------------------
# 6. deadband and max_silence
# ---------------------------------------------------------------------------------------------


async def test_deadband_and_max_silence(tmp_path, mosquitto, sp_collector_factory):
    fine, coarse = COUNTER, COUNTER + 1  # read together: the same value at every poll
    sim = await start_sim(model=always_running(), ramps={fine: 1, coarse: 1})
    col = sp_collector_factory(mosquitto)
    tags = [{"name": "fine", "address": fine, "type": "uint16"},
            {"name": "coarse", "address": coarse, "type": "uint16", "deadband": 5},
            {"name": "steady", "address": 6, "type": "uint16", "max_silence": "500ms"}]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto), [modbus_device(sim_port(sim), tags, poll="50ms")])
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: len(values_of(ddata_points(col.all(), "press1"), "coarse")) >= 6, 20)
            await asyncio.sleep(1.0)
        points = ddata_points(col.all(), "press1")
    finally:
        await sim.stop()
    every = values_of(points, "fine")  # deadband 0: every value the gateway read
    reported = values_of(points, "coarse")
    assert every == sorted(set(every)) and len(every) >= 30
    expected, last = [], None
    for v in every:  # what `deadband: 5` lets through of the same values
        if last is None or abs(v - last) > 5:
            expected.append(v)
            last = v
    assert reported == expected, (reported, every)
    assert all(b - a > 5 for a, b in zip(reported, reported[1:]))
    assert len(reported) <= len(every) // 6 + 1
    # a value that never changes is sent again once `max_silence` has passed
    steady = [p for p in points if p.name == "steady"]
    assert {p.value for p in steady} == {1500} and len(steady) >= 3
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(steady, steady[1:])]
    assert all(0.45 <= g <= 2.0 for g in gaps), gaps


# ---------------------------------------------------------------------------------------------
# 7. primary host application
# ---------------------------------------------------------------------------------------------

HOLD_S = 4.0  # the primary host is offline this long


async def test_primary_host_state_holds_data_then_history_in_order(tmp_path, mosquitto, sp_collector_factory):
    sim = await start_sim(model=always_running(), ramps={COUNTER: 1})
    col = sp_collector_factory(mosquitto)
    state_topic = "spBv1.0/STATE/scada1"
    t0 = ps.get_current_timestamp()
    col.publish(state_topic, json.dumps({"online": False, "timestamp": t0}), retain=True)
    tags = [{"name": "counter", "address": COUNTER, "type": "uint16"}]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto, primary_host_id="scada1"),
                         [modbus_device(sim_port(sim), tags)])
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: app.pipeline is not None, 10)
            up = app.pipeline.upstreams[0]
            buffer = app.pipeline.buffer
            assert await until(lambda: up.connected and app.pipeline.drivers[0].health.connected, 15)
            await asyncio.sleep(HOLD_S / 2)
            depth = buffer.link_depth(up.name)
            await asyncio.sleep(HOLD_S / 2)
            assert buffer.link_depth(up.name) > depth > 0  # the rows wait, and more keep coming
            assert [m.kind for m in col.all()] == ["STATE"]  # no birth, no data while the host is away
            held = buffer.link_depth(up.name)
            assert held >= 0.5 * HOLD_S / 0.1
            waiting = [r for r in buffer.dump(20) if r["topic"] == "values/press1"]
            assert waiting and all("encoded" in r for r in waiting)  # stored as DDATA metrics, not JSON

            col.publish(state_topic, json.dumps({"online": True, "timestamp": ps.get_current_timestamp()}),
                        retain=True)
            online_at = time.time()
            live = lambda: [p for p in ddata_points(col.all(), "press1") if not p.is_historical]  # noqa: E731
            assert await until(lambda: len(live()) >= 10, 15)
            assert await until(lambda: buffer.link_depth(up.name) <= 3, 10), buffer.link_depth(up.name)

            # a STATE older than the one in force is stale: ignored, data keeps flowing
            col.publish(state_topic, json.dumps({"online": False, "timestamp": t0}))
            n = len(col.of("DDATA"))
            await asyncio.sleep(1.0)
            assert await until(lambda: len(col.of("DDATA")) >= n + 5, 5)
        messages = col.all()
    finally:
        await sim.stop()
    stream = node_stream(messages)
    assert [m.kind for m in stream[:2]] == ["NBIRTH", "DBIRTH"] and stream[0].at >= online_at  # births first
    assert bdseq_of(stream[0]) == 0 and [m.kind for m in stream].count("NBIRTH") == 1
    points = [p for p in ddata_points(messages, "press1") if p.name == "counter"]
    flags = [p.is_historical for p in points]
    history = flags.index(False)
    assert history >= held and not any(flags[history:]) and all(flags[:history])  # history first, then live
    values = [p.value for p in points]
    assert values == list(range(values[0], values[0] + len(values)))  # each value once, in order: no gap
    stamps = [p.timestamp for p in points]
    assert stamps == sorted(stamps)  # measurement order
    born_ms = stream[0].pb().timestamp  # when the gateway took the STATE online (and sent the births)
    assert len([t for t in stamps[:history] if t < online_at * 1000]) >= held  # what waited is history
    assert stamps[history - 1] < born_ms + 500 < stamps[-1]
    assert_seq_runs(messages)


async def test_primary_host_going_offline_ends_the_session_and_nothing_is_lost(tmp_path, mosquitto,
                                                                             sp_collector_factory):
    """Online, then offline: the node sends NDEATH and connects anew; no birth while the host is
    away; online again: NBIRTH with the next bdSeq, then what waited as history, without a gap."""
    sim = await start_sim(model=always_running(), ramps={COUNTER: 1})
    col = sp_collector_factory(mosquitto)
    state_topic = "spBv1.0/STATE/scada1"
    col.publish(state_topic, json.dumps({"online": True, "timestamp": ps.get_current_timestamp()}), retain=True)
    tags = [{"name": "counter", "address": COUNTER, "type": "uint16"}]
    raw = gateway_config(tmp_path, sparkplug_upstream(mosquitto, primary_host_id="scada1"),
                         [modbus_device(sim_port(sim), tags)])
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: len(col.of("DDATA")) >= 5, 15)
            up = app.pipeline.upstreams[0]
            connects = up.connects
            col.publish(state_topic, json.dumps({"online": False, "timestamp": ps.get_current_timestamp()}),
                        retain=True)
            offline_at = time.time()
            assert await until(lambda: len(col.of("NDEATH")) == 1, 5)  # sent by the node itself
            assert await until(lambda: up.connects == connects + 1 and up.connected, 10)  # a new session
            await asyncio.sleep(HOLD_S)
            quiet = [m for m in col.all() if m.at > offline_at + 1.0 and m.kind not in ("STATE", "NDEATH")]
            assert quiet == []  # nothing while the host is away: no birth, no data
            assert app.pipeline.buffer.link_depth(up.name) >= 0.5 * HOLD_S / 0.1
            col.publish(state_topic, json.dumps({"online": True, "timestamp": ps.get_current_timestamp()}),
                        retain=True)
            back_at = time.time()
            assert await until(lambda: app.pipeline.buffer.link_depth(up.name) <= 3, 15)
            assert await until(lambda: any(not p.is_historical and p.msg.at > back_at + 0.5
                                           for p in ddata_points(col.all(), "press1")), 10)
        messages = col.all()
    finally:
        await sim.stop()
    births = [m for m in messages if m.kind == "NBIRTH"]
    deaths = [m for m in messages if m.kind == "NDEATH"]
    assert len(births) == 2 and bdseq_of(deaths[0]) == bdseq_of(births[0])
    assert bdseq_of(births[1]) == bdseq_of(births[0]) + 1 and births[1].at >= back_at
    values = values_of(ddata_points(messages, "press1"), "counter")
    # every reading once at least, in order (a DDATA in flight when the session ended may come twice)
    distinct = sorted(set(values))
    assert distinct == list(range(distinct[0], distinct[-1] + 1))
    assert len(values) - len(distinct) <= 5
    later = [p for p in ddata_points(messages, "press1") if p.msg.at >= back_at]
    flags = [p.is_historical for p in later]
    assert flags[0] and False in flags and not any(flags[flags.index(False):])  # history first, then live
    assert_seq_runs(messages)


# ---------------------------------------------------------------------------------------------
# 8. a Sparkplug upstream and a JSON upstream; the Sparkplug broker is down for OUTAGE_S
# ---------------------------------------------------------------------------------------------

SUMMARY_S = 0.5  # the JSON side's records
LATENCY_BOUND = 1.5  # s from the end of a summary's interval to its arrival at the JSON broker


async def test_sparkplug_broker_outage_beside_a_json_upstream(tmp_path, mosquitto_factory, sp_collector_factory):
    persist = tmp_path / "scada-db"
    persist.mkdir()
    scada = mosquitto_factory(extra_conf=f"persistence true\npersistence_location {persist}/\n"
                                         "queue_qos0_messages true\n")
    cloud = mosquitto_factory()
    sim = await start_sim(model=always_running(), ramps={COUNTER: 1})
    at_scada = sp_collector_factory(scada, persistent=True, name="scada")
    at_cloud = Subscriber(cloud.port, "cloud")
    tags = [{"name": "counter", "address": COUNTER, "type": "uint16"}]
    raw = gateway_config(tmp_path, [{"name": "scada", **sparkplug_upstream(scada)}, {"name": "cloud", **link(cloud)}],
                         [modbus_device(sim_port(sim), tags)])
    raw["summaries"] = {"interval": f"{SUMMARY_S}s"}
    summaries = lambda: [(t, p) for t, tp, p in list(at_cloud.got) if tp == f"edge/{NODE}/data/press1"]  # noqa: E731
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: app.pipeline is not None, 10)
            ups = {u.name: u for u in app.pipeline.upstreams}
            buffer = app.pipeline.buffer
            assert await until(lambda: all(u.connected for u in ups.values()), 15)
            assert await until(lambda: len(at_scada.of("DDATA")) >= 5 and len(summaries()) >= 2, 15)

            scada.stop()
            down_at = time.time()
            assert await until(lambda: not ups["scada"].connected, 5)
            await asyncio.sleep(OUTAGE_S)
            held = buffer.link_depth("scada")
            cloud_depth = buffer.link_depth("cloud")
            scada.start()
            up_at = time.time()

            # the JSON side kept delivering in real time all along
            during = [(t, p) for t, p in summaries() if down_at + 1 < t < up_at]
            assert len(during) >= 0.7 * (OUTAGE_S - 1) / SUMMARY_S, len(during)
            late = [round(t - (parse_ts(p["ts"]) + SUMMARY_S), 2) for t, p in during
                    if t - (parse_ts(p["ts"]) + SUMMARY_S) > LATENCY_BOUND]
            assert not late, late
            assert cloud_depth <= 10 and held >= 0.5 * OUTAGE_S / 0.1, (cloud_depth, held)

            # the Sparkplug side gets it all afterwards; then production stops and the buffer empties
            assert await until(lambda: ups["scada"].connected, 15)
            live = lambda: [p for p in ddata_points(at_scada.all(), "press1")  # noqa: E731
                            if not p.is_historical and p.msg.at > up_at]
            assert await until(lambda: len(live()) >= 5, 20), buffer.link_depth("scada")
            await sim.stop()
            assert await until(lambda: buffer.depth == 0, 20), buffer.stats()
            assert buffer.link_depth("scada") == buffer.link_depth("cloud") == 0
            assert buffer.dropped_total == 0
        messages = at_scada.all()
    finally:
        at_cloud.close()
        await sim.stop()
    points = [p for p in ddata_points(messages, "press1") if p.name == "counter"]
    values = [p.value for p in points]
    assert sorted(set(values)) == list(range(values[0], max(values) + 1))  # nothing lost
    # nothing twice, but for at-least-once: a message in flight as the broker went down (received,
    # its PUBACK lost) is sent again after the outage
    twice = [p for p in points if values.count(p.value) > 1]
    assert all(abs(p.timestamp / 1000 - down_at) < 2.0 for p in twice), [(p.value, p.timestamp) for p in twice]
    outage = [p for p in points if down_at * 1000 + 500 < p.timestamp < up_at * 1000 - 500]
    assert len(outage) >= 0.5 * OUTAGE_S / 0.1, len(outage)
    assert [p.value for p in outage] == sorted(p.value for p in outage)  # in measurement order
    assert all(p.is_historical and p.msg.at >= up_at for p in outage)  # sent after, marked as history
    births = [m for m in messages if m.kind == "NBIRTH"]
    assert len(births) == 2 and bdseq_of(births[1]) > bdseq_of(births[0])
    order = {id(m): i for i, m in enumerate(messages)}
    assert all(order[id(p.msg)] > order[id(births[1])] for p in outage)  # the new births before the history
    reborn = messages[order[id(births[1])] + 1]
    assert reborn.kind == "DBIRTH" and reborn.device == "press1"
    assert_seq_runs(messages)


# ---------------------------------------------------------------------------------------------
# 9. DCMD: a write of a writable tag, refused for the others
# ---------------------------------------------------------------------------------------------

TARGET, LOCKED = SCRATCH + 40, SCRATCH + 41


async def test_dcmd_writes_a_writable_tag_and_refuses_the_others(tmp_path, mosquitto_factory, sp_collector_factory):
    scada, cloud = mosquitto_factory(), mosquitto_factory()
    sim = await start_sim(model=always_running())
    sim.holding()[LOCKED] = 5
    col = sp_collector_factory(scada)
    audit = Collector(cloud.host, cloud.port, f"edge/{NODE}/events/#")
    tags = [{"name": "target", "address": TARGET, "type": "uint16", "writable": True},
            {"name": "locked", "address": LOCKED, "type": "uint16"},
            {"name": "speed", "address": 6, "type": "uint16"}]
    raw = gateway_config(tmp_path, [{"name": "scada", **sparkplug_upstream(scada)}, {"name": "cloud", **link(cloud)}],
                         [modbus_device(sim_port(sim), tags)], commands={"write": True})
    dcmd_topic = topic("DCMD", "press1")
    reg = sim.holding()
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: col.of("DBIRTH", "press1") and col.of("DDATA", "press1"), 20)
            birth = by_name(dbirth(col.of("DBIRTH", "press1")[0]))

            col.publish(dcmd_topic, dcmd(("target", None, DT.UINT16, 4321)))  # by name
            assert await until(lambda: reg[TARGET] == 4321, 10)
            assert await until(lambda: 4321 in values_of(ddata_points(col.all(), "press1"), "target"), 10)
            by_alias = dcmd((None, birth["target"].alias, DT.UINT16, 77), dtypes=False)  # alias, value: no more
            (sent,) = sp_pb.Payload.FromString(by_alias).metrics
            assert not sent.HasField("name") and not sent.HasField("datatype") and sent.int_value == 77
            col.publish(dcmd_topic, by_alias)
            assert await until(lambda: reg[TARGET] == 77, 10)
            assert sim.writes[(1, "holding")] == 2

            # two different commands in the same millisecond are two commands
            ts = ps.get_current_timestamp() + 5
            col.publish(dcmd_topic, dcmd(("target", None, DT.UINT16, 1111), ts=ts))
            col.publish(dcmd_topic, dcmd(("target", None, DT.UINT16, 2222), ts=ts))
            assert await until(lambda: len(audit_events(audit)) >= 4, 10), audit_events(audit)
            assert await until(lambda: reg[TARGET] == 2222, 5), reg[TARGET]
            # the same message again (an MQTT redelivery) is not run twice
            again = dcmd(("target", None, DT.UINT16, 3333))
            col.publish(dcmd_topic, again)
            col.publish(dcmd_topic, again)
            assert await until(lambda: len(audit_events(audit)) >= 6, 10), audit_events(audit)
            assert reg[TARGET] == 3333 and sim.writes[(1, "holding")] == 5

            col.publish(dcmd_topic, dcmd(("locked", None, DT.UINT16, 9)))  # not writable: refused
            assert await until(lambda: len(audit_events(audit)) >= 7, 10), audit_events(audit)
            await asyncio.sleep(0.3)
        events = audit_events(audit)
    finally:
        audit.close()
        await sim.stop()
    assert reg[LOCKED] == 5 and reg[TARGET] == 3333
    assert sim.writes[(1, "holding")] == 5  # the refused one sent nothing to the device
    assert [(e["tag"], e["value"], e["outcome"]) for e in events] == [
        ("target", 4321, "done"), ("target", 77, "done"), ("target", 1111, "done"), ("target", 2222, "done"),
        ("target", 3333, "done"), ("target", 3333, "duplicate"), ("locked", 9, "refused")]
    refused = events[-1]
    assert refused["reason"] == "not_writable" and refused["device"] == "press1" and refused["ok"] is False
    assert all(e["read_back"] == e["value"] for e in events[:5])
