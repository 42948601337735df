"""The whole road against a real Mosquitto: cmd/write in over MQTT 5, the reply, the audit event
on events/commands; the audit event survives a broker outage and a kill -9 of the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import paho.mqtt.client as mqtt
import yaml

from drivers.sim.modbus import SCRATCH, SETPOINT
from tests.gateway.test_upstream import PersistentCollector
from tests.integration.conftest import base_config, running_gateway
from tests.write.conftest import until

PRESS_TAGS = [
    {"name": "temperature", "address": 0, "type": "float32", "unit": "degC"},
    {"name": "setpoint", "address": SETPOINT, "type": "float32", "unit": "degC", "writable": True,
     "min": 20, "max": 90},
    {"name": "scratch", "address": SCRATCH, "type": "uint16", "writable": True},
]


class Commander:
    """An MQTT 5 client that sends commands (with a client_id user property) and sees replies."""

    def __init__(self, port: int, prefix: str = "edge/gw1") -> None:
        self.prefix = prefix
        self.got: list[tuple[str, dict, bytes | None]] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_message = lambda c, u, m: self.got.append(
            (m.topic, json.loads(m.payload) if m.payload else {}, getattr(m.properties, "CorrelationData", None)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, name: str, body: dict, *, client_id: str | None = None, response_topic: str | None = None,
             correlation: bytes | None = None) -> None:
        props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        if client_id:
            props.UserProperty = ("client_id", client_id)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation:
            props.CorrelationData = correlation
        self.client.publish(f"{self.prefix}/cmd/{name}", json.dumps(body), qos=1, properties=props)

    def on(self, suffix: str) -> list[dict]:
        return [p for t, p, _ in list(self.got) if t == f"{self.prefix}/{suffix}"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def press_device(port: int) -> dict:
    return {"name": "press1", "driver": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": "200ms",
            "tags": PRESS_TAGS}


async def test_cmd_write_over_mqtt_replies_and_audits(tmp_path, mosquitto, modbus_sim):
    port = modbus_sim.server.comm_params.source_address[1]
    raw = base_config(tmp_path, mosquitto, devices=[press_device(port)], commands={"write": True})
    commander = Commander(mosquitto.port)
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: app.pipeline and app.pipeline.upstream.connected
                               and app.pipeline.drivers[0]._live is not None, 15)
            await asyncio.sleep(0.3)  # the gateway's subscription is in place
            commander.send("write", {"id": "sp-1", "device": "press1", "tag": "setpoint", "value": 62.5},
                           client_id="hmi-7", response_topic="edge/gw1/cmd/write/reply/hmi-7", correlation=b"c-1")
            commander.send("write", {"id": "sp-2", "device": "press1", "tag": "setpoint", "value": 95})
            commander.send("write", {"id": "sp-1", "device": "press1", "tag": "setpoint", "value": 62.5})
            assert await until(lambda: len(commander.on("cmd/write/reply")) == 3
                               and len(commander.on("events/commands")) == 3, 15), commander.got
            first, refused, repeat = commander.on("cmd/write/reply")
            assert first["ok"] and first["id"] == "sp-1"
            assert first["results"] == [{"tag": "setpoint", "value": 62.5, "read_back": 62.5, "error": None}]
            assert refused["ok"] is False and refused["reason"] == "out_of_bounds" and "max 90" in refused["error"]
            assert repeat["duplicate"] and repeat["results"] == first["results"]
            assert commander.on("cmd/write/reply/hmi-7")[0]["id"] == "sp-1"
            audit = commander.on("events/commands")
            assert [(a["id"], a["outcome"]) for a in audit] == [("sp-1", "done"), ("sp-2", "refused"),
                                                                 ("sp-1", "duplicate")]
            assert audit[0]["client_id"] == "hmi-7" and audit[0]["read_back"] == 62.5
            assert all(a["gateway"] == "gw1" and "seq" in a and "ts" in a for a in audit)
            assert modbus_sim.writes[(1, "holding")] == 1
    finally:
        commander.close()


def _acl(path, deny_audit: bool) -> None:
    path.write_text("topic readwrite #\n" + ("topic deny edge/gw1/events/commands\n" if deny_audit else ""))
    os.chmod(path, 0o644)


def _broker_conf(tmp_path, acl) -> str:
    return f"acl_file {acl}\npersistence true\npersistence_location {tmp_path}/\n"


async def test_audit_survives_a_broker_outage(tmp_path, mosquitto_factory, modbus_sim):
    """The broker refuses the audit topic at first (so the record must wait in the buffer), then
    goes down; when it is back and allows it, the record arrives."""
    acl = tmp_path / "acl"
    _acl(acl, deny_audit=True)
    broker = mosquitto_factory(extra_conf=_broker_conf(tmp_path, acl))
    collector = PersistentCollector(broker.port, "edge/gw1/events/#")
    port = modbus_sim.server.comm_params.source_address[1]
    raw = base_config(tmp_path, broker, devices=[press_device(port)], commands={"write": True})
    raw["upstream"]["refused_retry"] = "1s"
    commander = Commander(broker.port)
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: app.pipeline and app.pipeline.upstream.connected
                               and app.pipeline.drivers[0]._live is not None, 15)
            await asyncio.sleep(0.3)
            commander.send("write", {"id": "out-1", "device": "press1", "tag": "scratch", "value": 4242},
                           client_id="scada")
            assert await until(lambda: commander.on("cmd/write/reply"), 10)
            assert commander.on("cmd/write/reply")[0]["ok"]
            assert await until(lambda: app.pipeline.upstream.refused >= 1, 10)
            commander.close()
            broker.stop()
            await until(lambda: not app.pipeline.upstream.connected, 10)
            assert [m for m in collector.messages if m[0].endswith("events/commands")] == []
            _acl(acl, deny_audit=False)
            broker.start()
            assert await until(lambda: any(t.endswith("events/commands") for t, _ in collector.messages), 30)
        (event,) = [p for t, p in collector.messages if t.endswith("events/commands")]
        assert event["id"] == "out-1" and event["outcome"] == "done" and event["client_id"] == "scada"
        assert event["value"] == 4242 and event["read_back"] == 4242
    finally:
        collector.close()


async def test_audit_survives_kill_9_before_forwarding(tmp_path, mosquitto_factory, modbus_sim):
    acl = tmp_path / "acl"
    _acl(acl, deny_audit=True)
    broker = mosquitto_factory(extra_conf=_broker_conf(tmp_path, acl))
    collector = PersistentCollector(broker.port, "edge/gw1/events/#")
    port = modbus_sim.server.comm_params.source_address[1]
    raw = base_config(tmp_path, broker, devices=[press_device(port)], commands={"write": True})
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))

    def start(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], stdout=log, stderr=log,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    commander = Commander(broker.port)
    proc = start("first")
    try:
        assert await until(lambda: any(p.get("state") == "online" for p in commander.on("status")), 30)
        await asyncio.sleep(0.5)  # subscribed, and the press is connected (polls at 200 ms)
        for attempt in range(20):  # until the device link is up: a refusal `disconnected` is retried
            commander.send("write", {"id": f"k9-{attempt}", "device": "press1", "tag": "scratch", "value": 99})
            assert await until(lambda: len(commander.on("cmd/write/reply")) > attempt, 10)
            if commander.on("cmd/write/reply")[-1]["ok"]:
                break
            await asyncio.sleep(0.3)
        reply = commander.on("cmd/write/reply")[-1]
        assert reply["ok"], reply
        proc.kill()  # SIGKILL: the audit record is only in the buffer file now
        proc.wait(5)
        assert [m for m in collector.messages if m[0].endswith("events/commands")] == []
        commander.close()
        broker.stop()
        _acl(acl, deny_audit=False)
        broker.start()
        proc = start("second")
        assert await until(lambda: any(p.get("id") == reply["id"] for t, p in collector.messages
                                       if t.endswith("events/commands")), 30), collector.messages
        events = [p for t, p in collector.messages if t.endswith("events/commands")]
        assert events[-1]["outcome"] == "done" and events[-1]["value"] == 99
        assert modbus_sim.writes[(1, "holding")] == 1  # written once; the restart runs nothing again
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        collector.close()


async def test_request_ids_are_remembered_across_a_reload(tmp_path, mosquitto, modbus_sim):
    port = modbus_sim.server.comm_params.source_address[1]
    raw = base_config(tmp_path, mosquitto, devices=[press_device(port)], commands={"write": True})
    async with running_gateway(tmp_path, raw) as app:
        assert await until(lambda: app.pipeline and app.pipeline.drivers[0].health.connected, 15)
        request = {"id": "before-reload", "device": "press1", "tag": "scratch", "value": 11}
        assert (await app.command("write", dict(request), {}))["ok"]
        old = app.pipeline
        assert app.request_reload() == []
        assert await until(lambda: app.pipeline is not old and app.pipeline.drivers[0].health.connected, 15)
        again = await app.command("write", dict(request), {})
        assert again["ok"] and again.get("duplicate") is True, again
        assert app.pipeline.health_payload()["commands"]["duplicate"] == 1
    assert modbus_sim.writes[(1, "holding")] == 1
