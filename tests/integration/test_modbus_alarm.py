"""A simulated Modbus temperature crosses a threshold: the retained alarm appears and clears."""

from __future__ import annotations

from drivers.sim.modbus import MachineModel, ModbusSimulator
from tests.conftest import free_port
from tests.integration.conftest import running_gateway, until


class ControlledMachine(MachineModel):
    """The simulator's machine, with a temperature the test sets."""

    value = 40.0

    def temperature(self, now: float) -> float:
        return self.value


async def test_threshold_alarm_raises_and_clears_end_to_end(tmp_path, mosquitto, collector_factory, gateway_config):
    machine = ControlledMachine()
    port = free_port()
    sim = await ModbusSimulator(model=machine).start_tcp("127.0.0.1", port)
    collector = collector_factory(mosquitto, "edge/gw1/#")
    raw = gateway_config(
        devices=[{"name": "press1", "driver": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": "200ms",
                  "tags": [{"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "degC"},
                           {"name": "running", "table": "coil", "address": 0, "type": "bool"}]}],
        rules=[{"name": "spindle_overtemp", "type": "threshold", "input": "press1.temperature", "above": 80,
                "clear": 75, "for": "600ms", "severity": "warning"}],
    )
    alarms = lambda: [p for _, p in collector.json("edge/gw1/alarms/spindle_overtemp")]  # noqa: E731
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: collector.json("edge/gw1/data/press1"), 10)
            summary = collector.json("edge/gw1/data/press1")[-1][1]
            t = summary["tags"]["temperature"]
            assert t["count"] >= 1 and t["unit"] == "degC" and abs(t["mean"] - 40.0) < 1e-3
            assert t["quality"] == "good" and summary["gateway"] == "gw1" and "seq" in summary
            assert alarms() == []
            machine.value = 90.0
            assert await until(lambda: alarms(), 10), "no alarm after crossing the threshold"
            raised = alarms()[0]
            assert raised["state"] == "raised" and raised["severity"] == "warning"
            assert raised["value"] == 90.0 and raised["limit"] == 80 and raised["input"] == "press1.temperature"
            machine.value = 78.0  # between clear and raise: hysteresis holds the alarm
            await until(lambda: len(alarms()) > 1, 1.5)
            assert len(alarms()) == 1
            machine.value = 70.0
            assert await until(lambda: len(alarms()) == 2, 10)
            assert alarms()[1]["state"] == "cleared"
        # the last state is retained for a late subscriber
        late = collector_factory(mosquitto, "edge/gw1/alarms/#")
        assert late.wait_for(lambda c: c.messages, 5)
        topic, payload, retained = late.messages[-1]
        assert retained and b'"cleared"' in payload
    finally:
        await sim.stop()


async def test_restart_mid_alarm_and_rebirth(tmp_path, mosquitto, collector_factory, gateway_config):
    machine = ControlledMachine()
    machine.value = 90.0
    port = free_port()
    sim = await ModbusSimulator(model=machine).start_tcp("127.0.0.1", port)
    collector = collector_factory(mosquitto, "edge/gw1/#")
    raw = gateway_config(
        devices=[{"name": "press1", "driver": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": "200ms",
                  "tags": [{"name": "temperature", "table": "holding", "address": 0, "type": "float32"}]}],
        rules=[{"name": "hot", "type": "threshold", "input": "press1.temperature", "above": 80, "clear": 75}],
    )
    alarms = lambda: [p for _, p in collector.json("edge/gw1/alarms/hot")]  # noqa: E731
    try:
        async with running_gateway(tmp_path, raw):
            assert await until(lambda: alarms(), 10)
        raised = alarms()
        # restarted while the value is still high: the active alarm is held, not raised again
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: len(collector.json("edge/gw1/data/press1")) >= 3, 10)
            after_restart = alarms()[len(raised):]
            # a reconnect re-publishes the last state (same since), never a new raise: marked as
            # a replay that points at the raise (its seq kept in the persisted state)
            assert after_restart and "replay" not in raised[0] and "raised_seq" not in raised[0]
            assert all(a["state"] == "raised" and a["since"] == raised[0]["since"] for a in after_restart)
            assert all(a["replay"] is True and a["raised_seq"] == raised[0]["seq"] for a in after_restart)
            n = len(alarms())
            collector.client.publish("edge/gw1/cmd/rebirth", "{}", qos=1)
            assert await until(lambda: collector.json("edge/gw1/cmd/rebirth/reply"), 10)
            reply = collector.json("edge/gw1/cmd/rebirth/reply")[0][1]
            assert reply["ok"] is True and reply["alarms"] == 1
            assert await until(lambda: len(alarms()) > n, 10)
            assert alarms()[-1]["since"] == raised[0]["since"] and alarms()[-1]["replay"] is True
            machine.value = 60.0
            assert await until(lambda: alarms()[-1]["state"] == "cleared", 10)
            assert app.pipeline.rules.health()["alarms_active"] == 0
        assert sum(1 for a in alarms() if a["state"] == "cleared") == 1
        assert [a["state"] for a in alarms() if not a.get("replay")] == ["raised", "cleared"]
        assert len({a["seq"] for a in alarms()}) == len(alarms())  # each publication is its own record
    finally:
        await sim.stop()
