"""Buffer -> broker forwarding against a real Mosquitto: outage, refusal, TLS, commands."""

from __future__ import annotations

import asyncio
import json
import os
import time

import paho.mqtt.client as mqtt
import pytest

from gateway.buffer import Buffer
from gateway.config import UpstreamConfig
from gateway.model import Record
from gateway.upstream import Upstream


def make_upstream(buffer: Buffer, port: int, **kw) -> Upstream:
    cfg = UpstreamConfig(host="127.0.0.1", port=port, reconnect_min=0.1, reconnect_max=0.5,
                         **{k: v for k, v in kw.items() if k not in ("on_command",)})
    return Upstream(cfg, buffer, gateway_id="gw1", topic_prefix="edge/gw1", client_id=f"gw1-{os.getpid()}-{id(buffer)}",
                    started_at=time.time(), on_command=kw.get("on_command"))


class PersistentCollector:
    """A subscriber whose session (and queued QoS 1 messages) survives a broker restart."""

    def __init__(self, port: int, topic: str = "edge/#") -> None:
        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"collector-{port}", protocol=mqtt.MQTTv5)
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.on_connect = lambda c, u, f, rc, p=None: (not f.session_present) and c.subscribe(topic, qos=1)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def seqs(self, prefix: str = "edge/gw1/data") -> list[int]:
        return [p["seq"] for t, p in list(self.messages) if t.startswith(prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_broker_outage_loses_nothing(tmp_path, mosquitto_factory):
    broker = mosquitto_factory(extra_conf=f"persistence true\npersistence_location {tmp_path}/\n".replace(
        "persistence false\n", ""))
    # the fixture wrote 'persistence false' first; mosquitto takes the last value
    collector = PersistentCollector(broker.port)
    buffer = Buffer(tmp_path / "b.db", "gw1")
    up = make_upstream(buffer, broker.port)
    task = asyncio.create_task(up.run())
    produced: list[int] = []

    async def produce(seconds: float) -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            produced.extend(buffer.append([Record("data/press1", {"i": i}, time.time())]))
            up.wake()
            i += 1
            await asyncio.sleep(0.01)

    try:
        assert await wait_until(lambda: up.connected, 10)
        await produce(2.0)
        broker.stop()
        await produce(10.0)  # the broker is down for these 10 s; the buffer holds everything
        assert not up.connected and buffer.depth > 0
        depth_during_outage = buffer.depth
        broker.start()
        await produce(2.0)
        assert await wait_until(lambda: set(produced) <= set(collector.seqs()), 30), (
            f"missing {len(set(produced) - set(collector.seqs()))} of {len(produced)}")
        assert await wait_until(lambda: buffer.depth == 0, 10)
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)
        collector.close()
    got = sorted(set(collector.seqs()))
    assert got == list(range(got[0], got[-1] + 1)), "seq must have no gap"
    assert depth_during_outage > 500
    assert up.connects >= 2


async def test_refused_publish_stays_buffered_and_others_flow(tmp_path, mosquitto_factory, collector_factory):
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\ntopic deny edge/gw1/data/forbidden\n")
    os.chmod(acl, 0o644)
    broker = mosquitto_factory(extra_conf=f"acl_file {acl}\n")
    collector = collector_factory(broker, "edge/#")
    buffer = Buffer(tmp_path / "b.db", "gw1")
    buffer.append([Record("data/forbidden", {"i": i}, time.time()) for i in range(5)])
    ok = buffer.append([Record("data/allowed", {"i": i}, time.time()) for i in range(20)])
    up = make_upstream(buffer, broker.port)
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: len(collector.json("edge/gw1/data/allowed")) >= 20, 15)
        assert await wait_until(lambda: up.refused >= 5, 10)
        assert await wait_until(lambda: buffer.depth == 5, 5)  # acks are deleted in batches
        assert buffer.refused_count() == 5
        assert {p["seq"] for _, p in collector.json("edge/gw1/data/allowed")} == set(ok)
        assert collector.json("edge/gw1/data/forbidden") == []
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def tls_broker(tmp_path, mosquitto_factory):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    for f in (ca_file, cert_file, key_file):
        os.chmod(f, 0o644)  # mosquitto may drop to its own user
    from tests.conftest import free_port

    tls_port = free_port()
    broker = mosquitto_factory(extra_conf=(
        f"listener {tls_port} 127.0.0.1\ncafile {ca_file}\ncertfile {cert_file}\nkeyfile {key_file}\n"
        "allow_anonymous true\n"))
    return broker, tls_port, ca_file, tmp_path


async def test_tls_with_the_right_ca_connects(tls_broker, collector_factory):
    broker, tls_port, ca_file, tmp = tls_broker
    collector = collector_factory(broker, "edge/gw1/#")  # plain listener of the same broker
    buffer = Buffer(tmp / "b.db", "gw1")
    seqs = buffer.append([Record("data/x", {"i": 1}, time.time())])
    up = make_upstream(buffer, tls_port, tls={"ca_file": str(ca_file)})
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: [p["seq"] for _, p in collector.json("edge/gw1/data")] == seqs, 10)
        assert any(p["state"] == "online" for _, p in collector.json("edge/gw1/status"))
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)


async def test_tls_with_a_wrong_ca_refuses_and_says_why(tls_broker):
    import trustme

    _, tls_port, _, tmp = tls_broker
    other = tmp / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    buffer = Buffer(tmp / "b.db", "gw1")
    buffer.append([Record("data/x", {"i": 1}, time.time())])
    up = make_upstream(buffer, tls_port, tls={"ca_file": str(other)})
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: up.last_error is not None, 10)
        await asyncio.sleep(0.5)
        assert not up.connected and up.connects == 0
        assert "TLS" in up.last_error and "certificate" in up.last_error
        assert buffer.depth == 1  # nothing was sent in clear text instead
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)


async def test_commands_get_replies(tmp_path, mosquitto, collector_factory):
    async def handler(name, request, meta=None):
        if name == "ping":
            return {"ok": True, "pong": True}
        return {"ok": False, "error": "unknown command"}

    collector = collector_factory(mosquitto, "edge/gw1/cmd/#")
    buffer = Buffer(tmp_path / "b.db", "gw1")
    up = make_upstream(buffer, mosquitto.port, on_command=handler)
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: up.connected, 10)
        await asyncio.sleep(0.3)  # the gateway's subscription is in place
        collector.client.publish("edge/gw1/cmd/ping", json.dumps({"id": 7}), qos=1)
        collector.client.publish("edge/gw1/cmd/nope", "not json", qos=1)
        assert await wait_until(lambda: len(collector.json("edge/gw1/cmd/ping/reply")) == 1
                                and len(collector.json("edge/gw1/cmd/nope/reply")) == 1, 10)
        ping = collector.json("edge/gw1/cmd/ping/reply")[0][1]
        assert ping["ok"] is True and ping["pong"] is True and ping["id"] == 7
        nope = collector.json("edge/gw1/cmd/nope/reply")[0][1]
        assert nope["ok"] is False and nope["error"]
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)


async def test_commands_run_one_at_a_time_from_a_bounded_queue(tmp_path, mosquitto, collector_factory):
    """One command in hand, 100 waiting: two more find no room, are dropped and counted; the
    rest run in the order they came once the first one finishes."""
    release = asyncio.Event()
    ran: list[int] = []

    async def handler(name, request, meta=None):
        if not ran:
            await release.wait()
        ran.append(request["id"])
        return {"ok": True}

    collector = collector_factory(mosquitto, "edge/gw1/cmd/#")
    buffer = Buffer(tmp_path / "b.db", "gw1")
    up = make_upstream(buffer, mosquitto.port, on_command=handler)
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: up.connected, 10)
        await asyncio.sleep(0.3)  # the gateway's subscription is in place
        for i in range(103):
            collector.client.publish("edge/gw1/cmd/ping", json.dumps({"id": i}), qos=1)
        assert await wait_until(lambda: up.commands_dropped == 2, 10)
        assert ran == []
        release.set()
        assert await wait_until(lambda: len(collector.json("edge/gw1/cmd/ping/reply")) == 101, 10)
        assert ran == list(range(101))
        assert [p["id"] for _, p in collector.json("edge/gw1/cmd/ping/reply")] == list(range(101))
        assert up.commands_dropped == 2
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)


class Requester:
    """An MQTT 5 client that sees everything on the broker ('#'), with publish properties."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[str, dict, bytes | None]] = []  # topic, payload, correlation data
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p=None: loop.call_soon_threadsafe(subscribed.set)
        self.client.on_message = lambda c, u, m: self.got.append(
            (m.topic, json.loads(m.payload) if m.payload else {},
             getattr(m.properties, "CorrelationData", None)))
        self.subscribed = subscribed
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def request(self, name: str, body: dict, response_topic: str, correlation: bytes | None = None) -> None:
        props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.client.publish(f"edge/gw1/cmd/{name}", json.dumps(body), qos=1, properties=props)

    def on(self, topic: str) -> list[tuple[str, dict, bytes | None]]:
        return [m for m in self.got if m[0] == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_a_response_topic_is_honoured_only_below_the_gateways_cmd_prefix(tmp_path, mosquitto):
    from structlog.testing import capture_logs

    async def handler(name, request, meta=None):
        return {"ok": True, "pong": True}

    buffer = Buffer(tmp_path / "b.db", "gw1")
    up = make_upstream(buffer, mosquitto.port, on_command=handler)
    task = asyncio.create_task(up.run())
    requester = Requester(mosquitto.port)
    refused = ["plc/line1/setpoint/write", "edge/gw1/alarms/spindle_overtemp",
               "edge/gw1/cmd/rebirth",  # a command topic: the reply would run as a command
               "edge/gw1/cmdx/y", "edge/gw2/cmd/ping/reply"]
    try:
        await asyncio.wait_for(requester.subscribed.wait(), 10)
        assert await wait_until(lambda: up.connected, 10)
        await asyncio.sleep(0.3)  # the gateway's subscription is in place
        with capture_logs() as logged:
            for i, topic in enumerate(refused):
                requester.request("ping", {"id": i}, topic)
            requester.request("ping", {"id": "mine"}, "edge/gw1/cmd/ping/reply/hmi7", b"corr-42")
            assert await wait_until(lambda: len(requester.on("edge/gw1/cmd/ping/reply")) == len(refused) + 1
                                    and requester.on("edge/gw1/cmd/ping/reply/hmi7"), 10)
            await asyncio.sleep(0.5)  # anything published where it must not be has arrived too
        for topic in refused:
            assert requester.on(topic) == [], f"the gateway published to {topic}"
        assert not [m for m in requester.got if m[0].startswith(("plc/", "edge/gw1/alarms", "edge/gw2"))]
        replies = {m[1]["id"]: m[1] for m in requester.on("edge/gw1/cmd/ping/reply")}
        for i, topic in enumerate(refused):
            assert replies[i]["ok"] is True and replies[i]["response_topic_refused"] == topic
        assert "response_topic_refused" not in replies["mine"]
        ((_, mine, correlation),) = requester.on("edge/gw1/cmd/ping/reply/hmi7")
        assert mine["id"] == "mine" and mine["pong"] is True and correlation == b"corr-42"
        refusals = [e for e in logged if e["event"] == "upstream.response_topic_refused"]
        assert sorted(e["response_topic"] for e in refusals) == sorted(refused)
        assert all(e["log_level"] == "warning" and e["command"] == "ping" for e in refusals)
        assert up.response_topics_refused == len(refused)
    finally:
        requester.close()
        up.stop()
        await asyncio.wait_for(task, 10)


async def test_username_password_and_mqtt_3_1_1(tmp_path, mosquitto_factory, collector_factory):
    import shutil
    import subprocess

    passwd = tmp_path / "passwd"
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", "-c", str(passwd),
                    "line1", "s3cret"], check=True, capture_output=True)
    os.chmod(passwd, 0o644)  # mosquitto may drop to its own user
    broker = mosquitto_factory(extra_conf=f"password_file {passwd}\n")
    broker.stop()
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    buffer = Buffer(tmp_path / "b.db", "gw1")
    seqs = buffer.append([Record("data/x", {"i": i}, time.time()) for i in range(5)])
    # wrong password: refused, nothing leaves the buffer
    bad = make_upstream(buffer, broker.port, username="line1", password="nope", protocol="3.1.1")
    task = asyncio.create_task(bad.run())
    try:
        assert await wait_until(lambda: bad.last_error is not None, 10)
        assert "refused the connection" in bad.last_error and buffer.depth == 5
    finally:
        bad.stop()
        await asyncio.wait_for(task, 10)
    got: list[dict] = []
    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sub.username_pw_set("line1", "s3cret")
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edge/gw1/data/#", qos=1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    await asyncio.sleep(0.5)
    good = make_upstream(buffer, broker.port, username="line1", password_file=str(secret), protocol="3.1.1")
    task = asyncio.create_task(good.run())
    try:
        assert await wait_until(lambda: sorted(p["seq"] for p in got) == seqs, 10)
        assert await wait_until(lambda: buffer.depth == 0, 5)
    finally:
        good.stop()
        await asyncio.wait_for(task, 10)
        sub.loop_stop()
