"""cmd/write to a real pymodbus server: every type over the wire, refusals that send nothing,
a request id that runs once, the token."""

from __future__ import annotations

import asyncio

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus import decode
from drivers.sim.modbus import SCRATCH
from tests.write.conftest import modbus_driver, router_for, running

# one tag of every type and order, in the simulator's writable scratch registers
TYPED = [
    ("u16", {"type": "uint16"}, 65535),
    ("i16", {"type": "int16", "byte_order": "little"}, -12345),
    ("u32", {"type": "uint32", "word_order": "little"}, 4_000_000_000),
    ("i32", {"type": "int32", "byte_order": "little", "word_order": "little"}, -2_000_000_000),
    ("u64", {"type": "uint64"}, 18_000_000_000_000_000_000),
    ("i64", {"type": "int64", "word_order": "little"}, -9_000_000_000_000_000_000),
    ("f32", {"type": "float32", "byte_order": "little"}, 12.5),
    ("f64", {"type": "float64", "word_order": "little", "byte_order": "little"}, -1234.000244140625),
    ("scaled", {"type": "int16", "scale": 0.1, "offset": -40.0}, 21.5),
    ("text", {"type": "string", "count": 4}, "AB-12"),
]


def typed_tags() -> list[dict]:
    tags, address = [], SCRATCH
    for name, spec, _ in TYPED:
        tags.append({"name": name, "address": address, "writable": True, **spec})
        address += 4
    tags.append({"name": "pulse", "table": "coil", "address": 1, "type": "bool", "writable": True})
    tags.append({"name": "limited", "address": SCRATCH + 60, "type": "uint16", "writable": True, "min": 10, "max": 90})
    tags.append({"name": "mode", "address": SCRATCH + 61, "type": "uint16", "writable": True, "allowed": [1, 2, 3]})
    tags.append({"name": "temperature", "address": 0, "type": "float32"})  # read-only
    return tags


async def raw_registers(port: int, address: int, count: int) -> list[int]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        return (await client.read_holding_registers(address, count=count, device_id=1)).registers
    finally:
        client.close()


def sim_port(sim) -> int:
    return sim.server.comm_params.source_address[1]


async def test_every_type_round_trips_over_the_wire(modbus_sim):
    port = sim_port(modbus_sim)
    async with running(modbus_driver(port, typed_tags())) as driver:
        router, audit = router_for(driver)
        for i, (name, spec, value) in enumerate(TYPED):
            reply = await router.handle("write", {"id": f"w{i}", "device": "press1", "tag": name, "value": value})
            assert reply["ok"], reply
            assert reply["results"] == [{"tag": name, "value": value, "read_back": value, "error": None}]
        # the server holds the registers the decoder reads as those values (not just the read-back)
        registers = await raw_registers(port, SCRATCH, 4 * len(TYPED))
        for i, (name, spec, value) in enumerate(TYPED):
            tag = driver.config.tags[i]
            raw = decode(registers[4 * i:4 * i + tag.width], tag.type, tag.byte_order, tag.word_order)
            assert (raw * tag.scale + tag.offset if tag.type != "string" else raw) == pytest.approx(value), name
        reply = await router.handle("write", {"id": "c1", "device": "press1", "tag": "pulse", "value": True})
        assert reply["ok"] and reply["results"][0]["read_back"] is True
    assert [p["outcome"] for p in audit.payloads()] == ["done"] * (len(TYPED) + 1)
    # multi-register values go in one write_registers request: one write per tag, never more
    assert modbus_sim.writes[(1, "holding")] == len(TYPED) - 1 + 1  # u16 and scaled: fc 6; the rest fc 16
    assert modbus_sim.writes[(1, "coil")] == 1


async def test_several_tags_in_order_and_a_bad_one_refuses_them_all(modbus_sim):
    port = sim_port(modbus_sim)
    async with running(modbus_driver(port, typed_tags())) as driver:
        router, audit = router_for(driver)
        reply = await router.handle("write", {"id": "m1", "device": "press1", "writes": [
            {"tag": "u16", "value": 7}, {"tag": "f32", "value": 1.5}, {"tag": "limited", "value": 50}]})
        assert reply["ok"] and [r["read_back"] for r in reply["results"]] == [7, 1.5, 50]
        before = await raw_registers(port, SCRATCH, 64)
        writes = modbus_sim.writes.copy()
        reply = await router.handle("write", {"id": "m2", "device": "press1", "writes": [
            {"tag": "u16", "value": 8}, {"tag": "limited", "value": 91}]})
        assert not reply["ok"] and reply["reason"] == "out_of_bounds"
        assert reply["results"][1]["error"].startswith("91 is above max 90")
        assert "not sent" in reply["results"][0]["error"]
        # the driver's own refusal (overflow) of a later tag also stops the earlier ones
        reply = await router.handle("write", {"id": "m3", "device": "press1", "writes": [
            {"tag": "u16", "value": 8}, {"tag": "i16", "value": 40000}]})
        assert not reply["ok"] and reply["reason"] == "out_of_range", reply
        assert await raw_registers(port, SCRATCH, 64) == before
        assert modbus_sim.writes == writes


@pytest.mark.parametrize("request_, reason", [
    ({"tag": "temperature", "value": 20.0}, "not_writable"),
    ({"tag": "limited", "value": 9}, "out_of_bounds"),
    ({"tag": "limited", "value": 91}, "out_of_bounds"),
    ({"tag": "limited", "value": "50"}, "wrong_type"),
    ({"tag": "mode", "value": 4}, "not_allowed"),
    ({"tag": "mode", "value": True}, "not_allowed"),  # true == 1 in Python, not here
    ({"tag": "u16", "value": 70000}, "out_of_range"),
    ({"tag": "u16", "value": 1.5}, "out_of_range"),
    ({"tag": "u16", "value": None}, "wrong_type"),
    ({"tag": "f32", "value": "hot"}, "wrong_type"),
    ({"tag": "nope", "value": 1}, "unknown_tag"),
    ({"device": "press9", "tag": "u16", "value": 1}, "unknown_device"),
    ({"tag": "u16"}, "bad_request"),
])
async def test_refusals_send_nothing(modbus_sim, request_, reason):
    port = sim_port(modbus_sim)
    async with running(modbus_driver(port, typed_tags())) as driver:
        router, audit = router_for(driver)
        before = await raw_registers(port, SCRATCH, 64)
        requests_before = modbus_sim.requests.copy()
        reply = await router.handle("write", {"id": "r1", "device": "press1", **request_})
        assert reply["ok"] is False and reply["reason"] == reason, reply
        assert reply["error"]
        assert modbus_sim.writes.total() == 0
        assert await raw_registers(port, SCRATCH, 64) == before
        assert modbus_sim.requests[(1, "holding")] >= requests_before[(1, "holding")]  # polls went on
    (record,) = audit.payloads()
    assert record["outcome"] == "refused" and record["reason"] == reason and record["id"] == "r1"


async def test_writes_disabled_and_disconnected_device_send_nothing(modbus_sim):
    port = sim_port(modbus_sim)
    driver = modbus_driver(port, typed_tags())
    async with running(driver):
        router, audit = router_for(driver, write=False)
        reply = await router.handle("write", {"id": "d1", "device": "press1", "tag": "u16", "value": 1})
        assert reply["reason"] == "disabled" and "commands.write" in reply["error"]
        reply = await router.handle("call", {"id": "d2", "device": "press1", "method": "x", "args": []})
        assert reply["reason"] == "disabled"
    router, audit = router_for(driver)  # the driver's session has ended: no link
    reply = await router.handle("write", {"id": "d3", "device": "press1", "tag": "u16", "value": 1})
    assert reply["reason"] == "disconnected" and "nothing was sent" in reply["results"][0]["error"]
    assert modbus_sim.writes.total() == 0


async def test_a_repeated_request_id_writes_once(modbus_sim):
    port = sim_port(modbus_sim)
    async with running(modbus_driver(port, typed_tags())) as driver:
        router, audit = router_for(driver)
        request = {"id": "pulse-1", "device": "press1", "tag": "pulse", "value": True}
        first = await router.handle("write", dict(request))
        again = await router.handle("write", dict(request))  # an MQTT redelivery
        assert first["ok"] and again["ok"] and again["duplicate"] is True
        assert again["results"] == first["results"]
        # while the first is still running, the repeat waits for its answer instead of writing
        both = await asyncio.gather(router.handle("write", {**request, "id": "pulse-2"}),
                                    router.handle("write", {**request, "id": "pulse-2"}))
        assert all(r["ok"] for r in both) and sum(bool(r.get("duplicate")) for r in both) == 1
    assert modbus_sim.writes[(1, "coil")] == 2  # one per id
    assert [p["outcome"] for p in audit.payloads()] == ["done", "duplicate", "done", "duplicate"]


async def test_token(modbus_sim, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    port = sim_port(modbus_sim)
    async with running(modbus_driver(port, typed_tags())) as driver:
        router, audit = router_for(driver, token_file=secret)
        base = {"device": "press1", "tag": "u16", "value": 5}
        missing = await router.handle("write", {"id": "t1", **base})
        wrong = await router.handle("write", {"id": "t2", **base, "token": "s3cret-tokeN"})
        not_text = await router.handle("write", {"id": "t3", **base, "token": 12})
        assert [r["reason"] for r in (missing, wrong, not_text)] == ["token"] * 3
        assert "missing token" in missing["error"] and wrong["error"] == "bad token"
        assert modbus_sim.writes.total() == 0
        # a refused token does not take the id: the rightful sender can still use it
        good = await router.handle("write", {"id": "t2", **base, "token": "s3cret-token"})
        assert good["ok"] and good["results"][0]["read_back"] == 5
    assert modbus_sim.writes.total() == 1
    assert all("token" not in p and "s3cret" not in str(p) for p in audit.payloads())
    assert [p["outcome"] for p in audit.payloads()] == ["refused"] * 3 + ["done"]


async def test_a_device_exception_is_a_failure_not_a_success(modbus_sim):
    """Holding 0-15 of the simulator refuse writes (exception 2): the reply says so."""
    port = sim_port(modbus_sim)
    tags = [{"name": "live", "address": 6, "type": "uint16", "writable": True}]
    async with running(modbus_driver(port, tags)) as driver:
        router, audit = router_for(driver)
        reply = await router.handle("write", {"id": "x1", "device": "press1", "tag": "live", "value": 1})
    assert reply["ok"] is False and reply["reason"] == "device_error" and "exception code 2" in reply["error"]
    assert modbus_sim.writes[(1, "holding")] == 1
    assert audit.payloads()[0]["outcome"] == "failed"
