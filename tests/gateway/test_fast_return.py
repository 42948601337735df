"""Fast return: after a broker on this host restarts, the first delivery goes out within 1 s,
however long it was away; a broker that answers and refuses keeps the full back-off."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import paho.mqtt.client as mqtt

from gateway.backoff import SOON, Backoff, is_nearby
from gateway.buffer import Buffer
from gateway.config import UpstreamConfig
from gateway.mqttclient import Session, SessionError
from gateway.model import Record
from gateway.upstream import Upstream
from tests.conftest import free_port

# With reconnect_min 2 s the plain back-off tries 2 s after the loss, then 2-4 s later, then 4-8 s
# later: nothing between 6 s and 8 s, so a broker back at 6.5 s would wait more than 1 s for sure.
OUTAGE = 6.5


def test_soon_caps_the_delay_and_keeps_counting():
    backoff = Backoff(0.5, 30.0, random.Random(1))
    soon = [backoff.next(soon=True) for _ in range(12)]
    assert all(0 < d <= SOON[1] for d in soon), soon
    assert len({round(d, 6) for d in soon}) > 1  # still jittered
    assert backoff.next() > 15.0  # the attempts counted: a refusal at the MQTT level backs off fully


def test_nearby_addresses():
    for host in ("127.0.0.1", "::1", "localhost", "10.1.2.3", "172.20.0.5", "192.168.1.10", "169.254.3.4",
                 "fe80::1", "fd12:3456::1", "::ffff:192.168.0.1"):
        assert is_nearby(host), host
    for host in ("8.8.8.8", "172.32.0.1", "2001:4860::8888", "100.64.0.1", "no-such-host.invalid"):
        assert not is_nearby(host), host


async def test_refused_connect_says_retry_soon_only_for_tcp_refusal(mosquitto_factory, tmp_path):
    closed = UpstreamConfig(host="127.0.0.1", port=free_port())
    try:
        async with Session(closed, "t1", ready_timeout=2):
            raise AssertionError("connected to a closed port")
    except SessionError as exc:
        assert exc.retry_soon, str(exc)
    # MQTT-level refusal (bad credentials): the full back-off
    (tmp_path / "nobody").write_text("")
    broker = mosquitto_factory(extra_conf=f"password_file {tmp_path / 'nobody'}\n")
    try:
        async with Session(UpstreamConfig(host="127.0.0.1", port=broker.port, username="u", password="p"), "t2",
                           ready_timeout=5):
            raise AssertionError("a broker without users accepted one")
    except SessionError as exc:
        assert "refused" in str(exc) and not exc.retry_soon, str(exc)


async def test_upstream_delivers_within_1s_of_the_broker_restart(tmp_path, mosquitto):
    buffer = Buffer(tmp_path / "b.db", "gw1")
    cfg = UpstreamConfig(host="127.0.0.1", port=mosquitto.port, reconnect_min=2.0, reconnect_max=30.0)
    up = Upstream(cfg, buffer, gateway_id="gw1", topic_prefix="edge/gw1", client_id="gw1-fast",
                  started_at=time.time())
    task = asyncio.create_task(up.run())
    try:
        deadline = time.monotonic() + 10
        while not up.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert up.connected
        mosquitto.stop()
        await asyncio.sleep(OUTAGE)
        buffer.append([Record("data/press1", {"i": i}, time.time()) for i in range(20)])
        up.wake()
        published = up.published
        await asyncio.to_thread(mosquitto.start)
        back = time.monotonic()
        received = threading.Event()
        collector = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        collector.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edge/gw1/data/#", qos=1)
        collector.on_message = lambda c, u, m: received.set()
        collector.connect("127.0.0.1", mosquitto.port)
        collector.loop_start()
        # records keep coming, so a collector that subscribed after the backlog went still sees one
        while time.monotonic() - back < 3 and not received.is_set():
            buffer.append([Record("data/press1", {"late": True}, time.time())])
            up.wake()
            await asyncio.sleep(0.05)
        first_delivery = time.monotonic()
        collector.loop_stop()
        collector.disconnect()
        # The broker may hand the message on before the gateway has read its PUBACK, and the
        # upstream counts acks when its pump next turns: wait for the count, briefly.
        counted = time.monotonic() + 2
        while up.published <= published and time.monotonic() < counted:
            await asyncio.sleep(0.02)
        assert received.is_set() and up.published > published
        assert first_delivery - back < 1.0, f"first delivery {first_delivery - back:.2f} s after the broker was back"
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)
        buffer.close()
