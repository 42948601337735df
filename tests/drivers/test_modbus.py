"""Modbus TCP driver against a real pymodbus server (drivers.sim.modbus), loopback only."""

from __future__ import annotations

import asyncio
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.client import AsyncModbusTcpClient

from drivers import base, registry
from drivers.modbus import (
    MAX_REGISTERS,
    ModbusConfig,
    ModbusDriver,
    ModbusTag,
    RangeTag,
    decode,
    encode,
    plan_reads,
)
from drivers.sim.modbus import SCRATCH, ModbusSimulator
from gateway.health import DeviceHealth
from gateway.model import Quality
from tests.conftest import free_port

ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]
STRUCT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
          "float32": "f", "float64": "d"}


def reference_registers(value, type_: str, byte_order: str, word_order: str) -> list[int]:
    """Registers as a device would hold them, built independently of drivers.modbus.encode."""
    data = struct.pack(">" + STRUCT[type_], value)
    words = [data[i:i + 2] for i in range(0, len(data), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def reference_decode(registers, type_: str, byte_order: str, word_order: str):
    """Registers -> value, written independently of drivers.modbus (the reverse of reference_registers)."""
    words = [int(r).to_bytes(2, byte_order) for r in registers]
    if word_order == "little":
        words.reverse()
    return struct.unpack(">" + STRUCT[type_], b"".join(words))[0]


def values_for(type_: str):
    if type_ == "float32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if type_ == "float64":
        return st.floats(allow_nan=False, allow_infinity=False)
    bits = int(type_.lstrip("uint"))
    if type_.startswith("u"):
        return st.integers(0, 2**bits - 1)
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@st.composite
def typed_values(draw):
    type_ = draw(st.sampled_from(sorted(STRUCT)))
    byte_order, word_order = draw(st.sampled_from(ORDERS))
    return type_, byte_order, word_order, draw(values_for(type_))


@given(typed_values())
@settings(max_examples=400, deadline=None)
def test_decoder_round_trips_every_type_and_order(case):
    type_, byte_order, word_order, value = case
    regs = reference_registers(value, type_, byte_order, word_order)
    assert decode(regs, type_, byte_order, word_order) == value
    assert encode(value, type_, byte_order, word_order) == regs


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=16),
       st.sampled_from(["big", "little"]))
def test_decoder_strings(text, byte_order):
    count = 8
    assert decode(encode(text, "string", byte_order, count=count), "string", byte_order) == text


def test_decoder_rejects_wrong_width():
    with pytest.raises(ValueError):
        decode([1], "float32")


tags_strategy = st.lists(
    st.builds(lambda a, t: ModbusTag(name="x", address=a, type=t), st.integers(0, 2000),
              st.sampled_from(["uint16", "int32", "float64"])),
    min_size=1, max_size=60)


@given(tags_strategy, st.integers(0, 20), st.integers(4, MAX_REGISTERS))
@settings(max_examples=200, deadline=None)
def test_plan_covers_every_tag_within_limits(tags, gap, limit):
    plan = plan_reads(tags, max_gap=gap, max_registers=limit)
    served = sorted(id(tag) for request in plan for tag in request.tags)
    assert served == sorted(id(t) for t in tags)
    for request in plan:
        assert 1 <= request.count <= limit
        for tag, off in request.placed():
            assert request.address + off == tag.address and off + tag.width <= request.count
    # no two requests of the table could have been merged
    for a, b in zip(plan, plan[1:]):
        assert b.address - a.end > gap or max(b.end, a.end) - a.address > limit


def test_plan_merges_contiguous_and_respects_gap():
    tags = [ModbusTag(name=f"t{i}", address=a, type="float32") for i, a in enumerate([0, 2, 4, 20, 22, 300])]
    tags.append(ModbusTag(name="c0", table="coil", address=0, type="bool"))
    tags.append(ModbusTag(name="c1", table="coil", address=1500, type="bool"))
    tags.append(ModbusTag(name="c2", table="coil", address=2500, type="bool"))
    plan = plan_reads(tags, max_gap=16, max_bit_gap=2000)
    assert [(r.table, r.address, r.count) for r in plan] == [
        ("coil", 0, 1501), ("coil", 2500, 1), ("holding", 0, 24), ("holding", 300, 2)]
    plan = plan_reads(tags, max_gap=8, max_bit_gap=10)
    assert [(r.table, r.address, r.count) for r in plan] == [
        ("coil", 0, 1), ("coil", 1500, 1), ("coil", 2500, 1), ("holding", 0, 6), ("holding", 20, 4),
        ("holding", 300, 2)]


def test_config_validation():
    ok = dict(name="p", driver="modbus", tags=[{"name": "t", "address": 0, "type": "float32"}])
    ModbusConfig(**ok)
    with pytest.raises(ValidationError):
        ModbusConfig(**{**ok, "transport": "rtu"})  # no serial settings
    with pytest.raises(ValidationError):
        ModbusConfig(**{**ok, "tags": [{"name": "t", "table": "holding", "address": 0, "type": "bool"}]})
    with pytest.raises(ValidationError):
        ModbusConfig(**{**ok, "tags": [{"name": "t", "address": 0, "type": "string"}]})
    with pytest.raises(ValidationError):
        ModbusConfig(**{**ok, "bogus": 1})
    with pytest.raises(ValidationError):
        ModbusConfig(**{**ok, "tags": [{"name": "t", "address": 0}, {"name": "t", "address": 1}]})
    assert registry.REGISTRY["modbus"].config is ModbusConfig


def test_a_range_is_numbered_tags_at_consecutive_addresses():
    cfg = ModbusConfig(name="p", driver="modbus", tags=[
        {"name": "temp", "address": 100, "type": "float32", "count": 3, "unit": "degC", "scale": 0.5},
        {"name": "flag", "table": "coil", "address": 5, "type": "bool", "count": 2},
        {"name": "level", "address": 10, "type": "uint16", "count": 2, "stride": 4},
        {"name": "serial", "address": 12, "type": "string", "count": 4},  # a string's length, not a range
    ])
    assert [(t.name, t.table, t.address) for t in cfg.tags] == [
        ("temp_0", "holding", 100), ("temp_1", "holding", 102), ("temp_2", "holding", 104),
        ("flag_0", "coil", 5), ("flag_1", "coil", 6), ("level_0", "holding", 10), ("level_1", "holding", 14),
        ("serial", "holding", 12)]
    assert all(t.type == "float32" and t.unit == "degC" and t.scale == 0.5 for t in cfg.tags[:3])
    assert cfg.tags[-1].width == 4 and cfg.tag_names()[0] == "temp_0" and len(cfg.tag_names()) == 8
    assert [len(r.tags) for r in plan_reads(cfg.tags)] == [2, 3, 3]  # coils 5..6; holding 10..15; 100..105

    # built without validation, yet the same tags as written out one by one: RangeTags, not models
    # (a range of thousands of registers is thousands of tags), the range's settings read through
    written = ModbusConfig(name="p", driver="modbus", tags=[
        {"name": f"temp_{i}", "address": 100 + 2 * i, "type": "float32", "unit": "degC", "scale": 0.5} for i in range(3)])
    assert [t.model_dump() for t in cfg.tags[:3]] == [t.model_dump() for t in written.tags]
    same = ("name", "address", "count", "stride", "is_range", "width", "type", "unit", "scale", "writable", "deadband")
    assert [[getattr(t, a) for a in same] for t in cfg.tags[:3]] == [[getattr(t, a) for a in same] for t in written.tags]
    assert all(isinstance(t, RangeTag) and t.range is cfg.tags[0].range for t in cfg.tags[:3])

    def problem(tags) -> str:
        with pytest.raises(ValidationError) as err:
            ModbusConfig(name="p", driver="modbus", tags=tags)
        return str(err.value)

    assert "overlap" in problem([{"name": "t", "address": 0, "type": "float32", "count": 4, "stride": 1}])
    assert "stride applies to a range" in problem([{"name": "t", "address": 0, "stride": 2}])
    assert "t_9 at 65539) runs past address 65535" in problem([{"name": "t", "address": 65530, "count": 10}])
    clash = problem([{"name": "t", "address": 0, "count": 3}, {"name": "t_1", "address": 10}])
    assert "tags.1.name" in clash and "duplicate tag name 't_1': also made by the range 't' (count 3) at tags.0" in clash
    assert "duplicate tag name 't'" in problem([{"name": "t", "address": 0}, {"name": "t", "address": 1}])


# ---------------------------------------------------------------------------------------------
# Against a real server


@pytest.fixture
async def sim():
    port = free_port()
    simulator = await ModbusSimulator(unit_ids=(1,)).start_tcp("127.0.0.1", port)
    simulator.port = port
    yield simulator
    await simulator.stop()


def make_driver(port: int, tags: list[dict], **kw) -> ModbusDriver:
    cfg = ModbusConfig(name="press1", driver="modbus", host="127.0.0.1", port=port, unit_id=1,
                       poll_interval=kw.pop("poll_interval", 0.05), timeout=kw.pop("timeout", 0.5),
                       reconnect_min=0.05, reconnect_max=0.2, tags=tags, **kw)
    return ModbusDriver(cfg, DeviceHealth(cfg.name))


async def test_every_type_and_order_round_trips_through_the_server(sim, run_driver):
    cases: list[tuple[dict, object]] = []
    writes: list[tuple[int, list[int]]] = []
    address = SCRATCH
    samples = {"int16": -12345, "uint16": 54321, "int32": -123456789, "uint32": 3_000_000_000,
               "int64": -(2**62) + 7, "uint64": 2**63 + 11, "float32": 3.25, "float64": -1234.5678901234}
    for type_, value in samples.items():
        for byte_order, word_order in ORDERS:
            regs = reference_registers(value, type_, byte_order, word_order)
            name = f"{type_}_{byte_order[0]}{word_order[0]}"
            cases.append(({"name": name, "address": address, "type": type_, "byte_order": byte_order,
                           "word_order": word_order}, value))
            writes.append((address, regs))
            address += len(regs)
    text_regs = [int.from_bytes(b"HE", "big"), int.from_bytes(b"LL", "big"), int.from_bytes(b"O\0", "big")]
    writes.append((address, text_regs))
    cases.append(({"name": "label", "address": address, "type": "string", "count": 3}, "HELLO"))
    address += 3
    writes.append((address, [1234]))
    cases.append(({"name": "scaled", "address": address, "type": "int16", "scale": 0.1, "offset": -10.0,
                   "unit": "bar"}, 113.4))
    assert address < SCRATCH + 300

    client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, reconnect_delay=0)
    await client.connect()
    for addr, regs in writes:
        assert not (await client.write_registers(addr, regs, device_id=1)).isError()
    client.close()

    driver = make_driver(sim.port, [c for c, _ in cases])
    run = run_driver(driver)
    assert await run.wait_for(lambda r: all(r.latest(f"press1.{c['name']}") for c, _ in cases))
    for tag, expected in cases:
        sample = run.latest(f"press1.{tag['name']}")
        assert sample.quality is Quality.GOOD, tag
        if isinstance(expected, float):
            assert sample.value == pytest.approx(expected, rel=1e-6), tag
        else:
            assert sample.value == expected, tag
    assert run.latest("press1.scaled").unit == "bar"
    assert driver.health.connected and driver.health.errors == 0
    assert driver.health.latency_ms is not None


async def test_live_simulator_values(sim, run_driver):
    driver = make_driver(sim.port, [
        {"name": "temperature", "address": 0, "type": "float32", "unit": "degC"},
        {"name": "parts", "address": 4, "type": "uint32"},
        {"name": "serial", "address": 12, "type": "string", "count": 4},
        {"name": "voltage", "table": "input", "address": 0, "type": "float32"},
        {"name": "running", "table": "coil", "address": 0, "type": "bool"},
        {"name": "door", "table": "discrete", "address": 0, "type": "bool"},
    ])
    run = run_driver(driver)
    assert await run.wait_for(lambda r: len(r.samples("press1.running")) >= 2)
    assert 30 < run.latest("press1.temperature").value < 60
    assert run.latest("press1.serial").value == "SIM-0001"
    assert 390 < run.latest("press1.voltage").value < 410
    assert run.latest("press1.running").value is True  # the cycle starts running
    assert run.latest("press1.door").value is False
    assert isinstance(run.latest("press1.parts").value, int)


async def test_a_polled_range_gives_its_n_values(sim, run_driver):
    n = 150  # 150 registers: two requests (125 at most in one)
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, reconnect_delay=0)
    await client.connect()
    for start in range(0, n, 100):  # a write carries at most 123 registers
        values = [7 * i for i in range(start, min(n, start + 100))]
        assert not (await client.write_registers(SCRATCH + start, values, device_id=1)).isError()
    client.close()
    driver = make_driver(sim.port, [{"name": "level", "address": SCRATCH, "type": "uint16", "count": n, "unit": "mm"}])
    assert len(driver.plan) == 2
    run = run_driver(driver)
    assert await run.wait_for(lambda r: all(r.latest(f"press1.level_{i}") for i in range(n)))
    samples = [run.latest(f"press1.level_{i}") for i in range(n)]
    assert [s.value for s in samples] == [7 * i for i in range(n)]
    assert all(s.quality is Quality.GOOD and s.unit == "mm" for s in samples)
    assert run.latest(f"press1.level_{n}") is None


async def test_request_planning_counted_by_the_server(sim, run_driver):
    tags = [{"name": f"h{a}", "address": a, "type": "uint16"} for a in range(SCRATCH, SCRATCH + 200, 2)]
    tags += [{"name": "temperature", "address": 0, "type": "float32"},
             {"name": "pressure", "address": 2, "type": "float32"},
             {"name": "running", "table": "coil", "address": 0, "type": "bool"},
             {"name": "spare", "table": "coil", "address": 9, "type": "bool"},
             {"name": "voltage", "table": "input", "address": 0, "type": "float32"}]
    # polls far apart, so that stopping between two of them leaves no request half-counted
    driver = make_driver(sim.port, tags, poll_interval=0.25)
    # 100 scratch tags over 199 registers -> 2 requests (125 max); 0..3 -> 1 (too far from 100);
    # coils 0 and 9 -> 1; input -> 1.
    assert len(driver.plan) == 5
    run = run_driver(driver)
    assert await run.wait_for(lambda r: len(r.samples("press1.voltage")) >= 3)
    await run.stop()
    polls = len(run.samples("press1.voltage"))
    assert sim.requests[(1, "holding")] == 3 * polls
    assert sim.requests[(1, "coil")] == polls
    assert sim.requests[(1, "input")] == polls
    assert polls == 3 and sim.total_requests == 5 * polls


async def test_exception_response_marks_only_affected_tags_bad(sim, run_driver):
    driver = make_driver(sim.port, [
        {"name": "temperature", "address": 0, "type": "float32"},
        {"name": "missing", "address": 50, "type": "uint16"},  # not in the map: exception 2
        {"name": "scratch", "address": SCRATCH, "type": "uint16"},
    ])
    run = run_driver(driver)
    assert await run.wait_for(lambda r: len(r.samples("press1.missing")) >= 3)
    missing = run.samples("press1.missing")
    assert all(s.quality is Quality.BAD and s.value is None for s in missing)
    assert run.latest("press1.temperature").quality is Quality.GOOD
    assert run.latest("press1.scratch").quality is Quality.GOOD
    assert driver.health.bad_values >= 3 and driver.health.connected

    sim.fail.add(SCRATCH)  # device failure on a readable address
    n = len(run.samples("press1.scratch"))
    assert await run.wait_for(lambda r: len(r.samples("press1.scratch")) >= n + 3)
    assert run.latest("press1.scratch").quality is Quality.BAD and run.latest("press1.scratch").value is None
    sim.fail.clear()
    assert await run.wait_for(lambda r: r.latest("press1.scratch").quality is Quality.GOOD)


async def test_reconnects_after_server_restart_and_health_shows_outage(sim, run_driver):
    driver = make_driver(sim.port, [{"name": "temperature", "address": 0, "type": "float32"}])
    run = run_driver(driver)
    assert await run.wait_for(lambda r: len(r.samples()) >= 3)
    assert driver.health.connected
    await sim.stop()
    assert await run.wait_for(lambda r: not driver.health.connected and driver.health.errors >= 1)
    assert await run.wait_for(lambda r: r.latest("press1.temperature").quality is Quality.BAD)
    assert run.latest("press1.temperature").value is None
    assert driver.health.last_error
    await asyncio.sleep(0.3)  # a few failed reconnects
    errors = driver.health.errors
    assert errors >= 2

    await sim.start_tcp("127.0.0.1", sim.port)
    assert await run.wait_for(lambda r: driver.health.connected
                              and r.latest("press1.temperature").quality is Quality.GOOD, timeout=10)
    assert driver.health.last_error is None
    assert math.isfinite(run.latest("press1.temperature").value)


async def test_unreachable_device_backs_off_and_never_raises(run_driver):
    driver = make_driver(free_port(), [{"name": "t", "address": 0}])
    run = run_driver(driver)
    await asyncio.sleep(0.6)
    assert not run.task.done()
    assert 2 <= driver.health.errors <= 20  # backing off between 50 and 200 ms, not spinning
    assert not driver.health.connected and run.items == []


async def test_slow_poll_skips_ticks_and_counts_them():
    health = DeviceHealth("slow")
    calls = 0

    async def poll():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.25)

    task = asyncio.create_task(base.every(0.1, poll, health))
    await asyncio.sleep(0.8)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls in (3, 4)
    assert health.missed_polls >= 4  # two ticks missed per poll


def test_backoff_is_jittered_and_bounded():
    import random

    backoff = base.Backoff(0.5, 8.0, random.Random(3))
    delays = [backoff.next() for _ in range(12)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert delays[0] <= 0.5 + 1e-9 and max(delays[-4:]) > 4.0
    assert len(set(delays)) > 6
    backoff.reset()
    assert backoff.next() <= 0.5 + 1e-9


@given(typed_values(), st.integers(0, 6), st.lists(st.integers(0, 0xFFFF), min_size=6, max_size=6))
@settings(max_examples=300, deadline=None)
def test_compiled_decoder_matches_the_reference_decoder(case, off, filler):
    """The poll loop's fast path decodes exactly what `decode` does, at any offset in a response."""
    from drivers.modbus import ReadRequest, decode_request

    type_, byte_order, word_order, value = case
    regs = reference_registers(value, type_, byte_order, word_order)
    response = filler[:off] + regs + filler[off:]
    tag = ModbusTag(name="x", address=10 + off, type=type_, byte_order=byte_order, word_order=word_order,
                    scale=2.0 if type_ == "int16" else 1.0)
    request = ReadRequest("holding", 10, len(response), [tag])
    [(_, decoded, problem)] = decode_request(request, response)
    expected = reference_decode(regs, type_, byte_order, word_order)
    assert problem is None and decoded == (expected * 2.0 if type_ == "int16" else expected)
