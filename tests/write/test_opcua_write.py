"""cmd/write and cmd/call to a real asyncua server: the node's own type, refusals that send
nothing, a resettable counter, a method with outputs, once per request id."""

from __future__ import annotations

from asyncua import ua

from tests.write.conftest import opcua_driver, router_for, running


async def value_of(sim, name: str):
    return await sim.nodes[name].read_value()


async def test_setpoint_counter_and_string_round_trip(opcua_sim):
    async with running(opcua_driver(opcua_sim.endpoint)) as driver:
        router, audit = router_for(driver)
        await opcua_sim.nodes["Batches"].write_value(ua.Variant(17, ua.VariantType.UInt32))
        reply = await router.handle("write", {"id": "o1", "device": "oven", "writes": [
            {"tag": "setpoint", "value": 195.5}, {"tag": "batches", "value": 0}, {"tag": "mode", "value": 3}]})
        assert reply["ok"], reply
        assert [r["read_back"] for r in reply["results"]] == [195.5, 0, 3]
        assert await value_of(opcua_sim, "Setpoint") == 195.5
        assert await value_of(opcua_sim, "Batches") == 0  # reset
        # the node keeps its own data type: an integer for a Double node is written as a Double
        reply = await router.handle("write", {"id": "o2", "device": "oven", "tag": "setpoint", "value": 200})
        assert reply["ok"]
        dv = await opcua_sim.nodes["Setpoint"].read_data_value()
        assert dv.Value.VariantType == ua.VariantType.Double and dv.Value.Value == 200.0
        assert (await opcua_sim.nodes["Mode"].read_data_value()).Value.VariantType == ua.VariantType.Int16


async def test_refusals_leave_the_nodes_alone(opcua_sim):
    async with running(opcua_driver(opcua_sim.endpoint)) as driver:
        router, audit = router_for(driver)
        before = [await value_of(opcua_sim, n) for n in ("Setpoint", "Mode", "Batches", "State")]
        cases = [({"tag": "setpoint", "value": "hot"}, "wrong_type"),  # a string for a Double
                 ({"tag": "setpoint", "value": 260}, "out_of_bounds"),
                 ({"tag": "mode", "value": 40000}, "out_of_range"),  # Int16
                 ({"tag": "mode", "value": 1.5}, "wrong_type"),
                 ({"tag": "mode", "value": "1"}, "wrong_type"),
                 ({"tag": "state", "value": 3}, "wrong_type"),  # String
                 ({"tag": "batches", "value": 5}, "not_allowed"),
                 ({"tag": "temperature", "value": 20.0}, "not_writable")]
        for i, (request, reason) in enumerate(cases):
            reply = await router.handle("write", {"id": f"r{i}", "device": "oven", **request})
            assert reply["ok"] is False and reply["reason"] == reason, (request, reply)
        assert [await value_of(opcua_sim, n) for n in ("Setpoint", "Mode", "Batches", "State")][:3] == before[:3]
    assert [p["outcome"] for p in audit.payloads()] == ["refused"] * len(cases)


async def test_a_method_call_returns_its_outputs_once_per_id(opcua_sim):
    async with running(opcua_driver(opcua_sim.endpoint)) as driver:
        router, audit = router_for(driver)
        reply = await router.handle("call", {"id": "c1", "device": "oven", "method": "start_test", "args": [3, 12.5]},
                                    {"client_id": "hmi-7"})
        assert reply["ok"] and reply["outputs"] == [True, 1], reply
        again = await router.handle("call", {"id": "c1", "device": "oven", "method": "start_test", "args": [3, 12.5]})
        assert again["outputs"] == [True, 1] and again["duplicate"]
        refused = await router.handle("call", {"id": "c2", "device": "oven", "method": "start_test", "args": [3]})
        assert refused["reason"] == "wrong_type"
        refused = await router.handle("call", {"id": "c3", "device": "oven", "method": "start_test",
                                               "args": [70000, 1.0]})
        assert refused["reason"] == "out_of_range"
        unknown = await router.handle("call", {"id": "c4", "device": "oven", "method": "format_disk", "args": []})
        assert unknown["reason"] == "unknown_method" and "start_test" in unknown["error"]
        second = await router.handle("call", {"id": "c5", "device": "oven", "method": "start_test", "args": [11, 1]})
        assert second["ok"] and second["outputs"] == [False, 1]
    assert opcua_sim.calls == [(3, 12.5), (11, 1.0)]  # the repeat and the refusals never reached the server
    first = audit.payloads()[0]
    assert first["client_id"] == "hmi-7" and first["method"] == "start_test" and first["outputs"] == [True, 1]


async def test_verify_false_skips_the_read_back_and_a_lost_session_refuses(opcua_sim):
    tags = [{"name": "mode", "node": "ns=2;s=Oven.Mode", "writable": True, "verify": False}]
    driver = opcua_driver(opcua_sim.endpoint, tags=tags, methods=[])
    async with running(driver):
        router, audit = router_for(driver)
        reply = await router.handle("write", {"id": "v1", "device": "oven", "tag": "mode", "value": -7})
        assert reply["ok"] and reply["results"][0]["read_back"] is None
        assert await value_of(opcua_sim, "Mode") == -7
    reply = await router.handle("write", {"id": "v2", "device": "oven", "tag": "mode", "value": 5})
    assert reply["reason"] == "disconnected" and reply["sent"] is False
    assert await value_of(opcua_sim, "Mode") == -7
