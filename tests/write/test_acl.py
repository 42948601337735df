"""The shipped Mosquitto ACL (systemd/mosquitto-acl.example) with a password file: the command
user's cmd/write reaches the gateway; a read-only user's does not, and nothing is written."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import REPO
from tests.integration.conftest import base_config, running_gateway
from tests.write.conftest import until
from tests.write.test_gateway_commands import press_device

USERS = {"gw1": "gw-pass", "line1-operator": "op-pass", "line1-reader": "rd-pass"}


@pytest.fixture
def acl_broker(tmp_path, mosquitto_factory):
    acl = tmp_path / "edge.acl"
    acl.write_text((REPO / "systemd" / "mosquitto-acl.example").read_text().replace("line1-gw01", "gw1"))
    passwd = tmp_path / "edge.passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                       check=True, capture_output=True)
    for f in (acl, passwd):
        os.chmod(f, 0o644)
    return mosquitto_factory(extra_conf=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")


def client(port: int, user: str) -> tuple[mqtt.Client, list]:
    got: list = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, USERS[user])
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe("edge/gw1/#", qos=1)
    c.on_message = lambda cl, u, m: got.append((m.topic, json.loads(m.payload)))
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c, got


async def test_only_the_command_user_can_write(tmp_path, acl_broker, modbus_sim):
    secret = tmp_path / "gw.password"
    secret.write_text(USERS["gw1"])
    port = modbus_sim.server.comm_params.source_address[1]
    raw = base_config(tmp_path, acl_broker, devices=[press_device(port)], commands={"write": True})
    raw["upstream"].update(username="gw1", password_file=str(secret))
    operator, operator_got = client(acl_broker.port, "line1-operator")
    reader, reader_got = client(acl_broker.port, "line1-reader")
    try:
        async with running_gateway(tmp_path, raw) as app:
            assert await until(lambda: app.pipeline and app.pipeline.upstream.connected
                               and app.pipeline.drivers[0].health.connected, 15)
            await asyncio.sleep(0.5)
            body = {"device": "press1", "tag": "scratch", "value": 5}
            reader.publish("edge/gw1/cmd/write", json.dumps({"id": "from-reader", **body}), qos=1)
            await asyncio.sleep(1.0)
            operator.publish("edge/gw1/cmd/write", json.dumps({"id": "from-operator", **body}), qos=1)
            assert await until(lambda: any(t == "edge/gw1/cmd/write/reply" for t, _ in operator_got), 10)
            assert await until(lambda: any(t == "edge/gw1/events/commands" for t, _ in reader_got), 10)
        replies = [p for t, p in operator_got if t == "edge/gw1/cmd/write/reply"]
        assert [r["id"] for r in replies] == ["from-operator"] and replies[0]["ok"]
        assert not any(t.startswith("edge/gw1/cmd/") for t, _ in reader_got), "readers see no commands or replies"
        audits = [p["id"] for t, p in reader_got if t == "edge/gw1/events/commands"]
        assert audits == ["from-operator"]  # the reader's command never reached the gateway
        assert modbus_sim.writes[(1, "holding")] == 1
    finally:
        for c in (operator, reader):
            c.loop_stop()
            c.disconnect()
