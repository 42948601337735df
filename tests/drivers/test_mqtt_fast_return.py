"""Fast return of the MQTT-in driver: subscribed again within 1 s of a nearby broker's restart,
however long it was away (gateway.backoff: a TCP refusal on loopback or the LAN is retried soon)."""

from __future__ import annotations

import asyncio
import time

import paho.mqtt.client as mqtt

from drivers.mqtt import MqttConfig, MqttDriver
from gateway.health import DeviceHealth

# With reconnect_min 2 s the plain back-off tries 2 s after the loss, then 2-4 s later, then 4-8 s
# later: nothing between 6 s and 8 s, so a broker back at 6.5 s would wait more than 1 s for sure.
OUTAGE = 6.5


async def test_mqtt_in_driver_delivers_within_1s_of_the_broker_restart(mosquitto, run_driver):
    cfg = MqttConfig(name="m", driver="mqtt", host="127.0.0.1", port=mosquitto.port, reconnect_min=2.0,
                     reconnect_max=30.0, subscriptions=[{"topic": "s/t", "tag": "t", "format": "text"}])
    run = run_driver(MqttDriver(cfg, DeviceHealth("m")))
    publisher = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    deadline = time.monotonic() + 10
    while not run.samples() and time.monotonic() < deadline:
        publisher.publish("s/t", b"1", qos=1)
        await asyncio.sleep(0.05)
    publisher.loop_stop()
    publisher.disconnect()
    assert run.samples()
    mosquitto.stop()
    await asyncio.sleep(OUTAGE)
    before = len(run.samples())
    await asyncio.to_thread(mosquitto.start)
    back = time.monotonic()
    publisher = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    try:
        # a sensor that publishes every 50 ms; what it sent before the driver subscribed is gone
        while len(run.samples()) == before and time.monotonic() - back < 3:
            publisher.publish("s/t", b"2", qos=1)
            await asyncio.sleep(0.05)
        first = time.monotonic()
    finally:
        publisher.loop_stop()
        publisher.disconnect()
    assert len(run.samples()) > before
    assert first - back < 1.0, f"first sample {first - back:.2f} s after the broker was back"
