"""The Format seam against a real Mosquitto, with a small format of the test's own: readiness
held by a retained state message, several rows per message, historical marking, a row the
format does not send, control messages answered by the format, commands, device states, will
and clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import time

from gateway.buffer import Buffer
from gateway.config import UpstreamConfig
from gateway.model import Record
from gateway.upstream import Upstream
from gateway.upstream_format import Command, Inbound, Message
from tests.integration.conftest import until


class PairFormat:
    """Takes `data` and `values`; sends rows two to a message, as {"seqs", "historical"}; skips
    `data/skip`; drains only while `t/ctl/state` says online."""

    name = "pairs"
    kinds = frozenset({"data", "values"})

    def __init__(self) -> None:
        self.online = False
        self.encoded: list[tuple[list[int], bool]] = []

    def will(self):
        return Message("t/will", b"dead", qos=1, retain=True)

    def subscriptions(self):
        return [("t/ctl/#", 1)]

    def on_connect(self):
        return [Message("t/birth", b"born")]

    def ready(self):
        return self.online

    def encode(self, rows, historical):
        out = []
        sendable = [r for r in rows if r.topic != "data/skip"]
        for i in range(0, len(sendable), 2):
            pair = sendable[i:i + 2]
            self.encoded.append(([r.seq for r in pair], historical))
            out.append((pair, Message("t/data", json.dumps({"seqs": [r.seq for r in pair],
                                                             "historical": historical}).encode())))
        return out

    def on_message(self, topic, payload, props, retain):
        if topic == "t/ctl/state":
            self.online = payload == b"online"
            return Inbound(ready_changed=True)
        if topic == "t/ctl/rebirth":
            return Inbound(publish=[Message("t/birth", b"reborn")])
        if topic == "t/ctl/cmd":
            return Inbound(command=Command("ping", {"from": "pairs"}))
        return None

    def on_clean_stop(self):
        return [Message("t/bye", b"bye")]

    def device_state(self, device, connected):
        return [Message(f"t/dev/{device}", b"up" if connected else b"down")]


def payloads(collector, topic):
    return [p for t, p, _ in list(collector.messages) if t == topic]


async def test_a_format_drives_the_link(tmp_path, mosquitto, collector_factory):
    seen = collector_factory(mosquitto, "t/#")
    fmt = PairFormat()
    buffer = Buffer(tmp_path / "b.db", "gw1")
    buffer.set_links([("pairs", fmt.kinds)])
    before = buffer.append([Record("data/p1", {"i": i}, time.time()) for i in range(4)])
    commands: list[tuple[str, dict]] = []

    async def on_command(name, request, meta):
        commands.append((name, request))
        assert meta == {"upstream": "pairs"}
        return {"ok": True}

    devices = {"d1": False}
    cfg = UpstreamConfig(name="pairs", host="127.0.0.1", port=mosquitto.port, reconnect_min=0.1, reconnect_max=0.5)
    up = Upstream(cfg, buffer, gateway_id="gw1", topic_prefix="edge/gw1", client_id=f"pairs-{os.getpid()}",
                  started_at=time.time(), on_command=on_command, format=fmt, devices=lambda: dict(devices))
    task = asyncio.create_task(up.run())
    try:
        assert await until(lambda: payloads(seen, "t/birth") == [b"born"], 10)
        await asyncio.sleep(0.5)
        assert payloads(seen, "t/data") == [] and buffer.depth == 4  # not ready: nothing drains

        seen.client.publish("t/ctl/state", b"online", qos=1, retain=True)
        assert await until(lambda: buffer.depth == 0, 10)
        live = buffer.append([Record("data/p1", {"i": 9}, time.time()), Record("data/skip", {}, time.time()),
                              Record("values/p1", {"v": 1}, time.time())])
        up.wake()
        assert await until(lambda: buffer.depth == 0, 10)  # the skipped row is acked too
        assert await until(lambda: len(payloads(seen, "t/data")) == 3, 5)
        got = [json.loads(p) for p in payloads(seen, "t/data")]
        assert got == [{"seqs": before[:2], "historical": True}, {"seqs": before[2:], "historical": True},
                       {"seqs": [live[0], live[2]], "historical": False}]

        # the host goes away: rows wait, and are history when it is back
        seen.client.publish("t/ctl/state", b"offline", qos=1, retain=True)
        assert await until(lambda: not fmt.online, 5)
        waiting = buffer.append([Record("data/p1", {"i": 10}, time.time())])
        up.wake()
        await asyncio.sleep(0.5)
        assert buffer.depth == 1
        seen.client.publish("t/ctl/state", b"online", qos=1, retain=True)
        assert await until(lambda: buffer.depth == 0, 10)
        assert fmt.encoded[-1] == (waiting, True)

        seen.client.publish("t/ctl/rebirth", b"", qos=1)
        assert await until(lambda: payloads(seen, "t/birth") == [b"born", b"reborn"], 5)
        seen.client.publish("t/ctl/cmd", b"", qos=1)
        assert await until(lambda: commands == [("ping", {"from": "pairs"})], 5)

        # the first look came before the connection: the format heard it, nothing went out
        assert payloads(seen, "t/dev/d1") == []
        devices["d1"] = True
        assert await until(lambda: payloads(seen, "t/dev/d1") == [b"up"], 5)
        devices["d1"] = False
        assert await until(lambda: payloads(seen, "t/dev/d1") == [b"up", b"down"], 5)
        assert up.published == 8 and up.publish_direct("health", {}) is False  # not a JSON upstream
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)
    assert await until(lambda: payloads(seen, "t/bye") == [b"bye"], 5)
    assert payloads(seen, "t/will") == []  # a clean stop: the broker keeps the will


async def test_the_will_fires_when_the_link_dies(tmp_path, mosquitto, collector_factory):
    seen = collector_factory(mosquitto, "t/#")
    fmt = PairFormat()
    buffer = Buffer(tmp_path / "b.db", "gw1")
    buffer.set_links([("pairs", fmt.kinds)])
    cfg = UpstreamConfig(name="pairs", host="127.0.0.1", port=mosquitto.port, keepalive=1.0,
                         reconnect_min=0.1, reconnect_max=0.5)
    up = Upstream(cfg, buffer, gateway_id="gw1", topic_prefix="edge/gw1", client_id=f"pairs-will-{os.getpid()}",
                  started_at=time.time(), format=fmt)
    task = asyncio.create_task(up.run())
    try:
        assert await until(lambda: up.connected, 10)
        session = up._session
        session.client.socket().close()  # the link dies without DISCONNECT
        assert await until(lambda: payloads(seen, "t/will") == [b"dead"], 10)
    finally:
        up.stop()
        await asyncio.wait_for(task, 10)
