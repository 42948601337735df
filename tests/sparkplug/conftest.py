"""Sparkplug B end-to-end helpers: a collector of `spBv1.0/#`, decoding with pysparkplug (never
with the gateway's own `gateway.sparkplug_pb`), a Modbus simulator with registers that count
their reads, and the gateway configuration for a Sparkplug upstream."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pysparkplug as ps
import pytest
from pysparkplug import _protobuf as sp_pb  # pysparkplug's generated classes: for fields it drops

from drivers.sim.modbus import ModbusSimulator
from tests.conftest import closing_factory, free_port

GROUP = "plant"
NODE = "gw1"  # the gateway id is the edge node id
NS = "spBv1.0"


def topic(kind: str, device: str | None = None) -> str:
    base = f"{NS}/{GROUP}/{kind}/{NODE}"
    return f"{base}/{device}" if device else base


# ----- the collector -----


@dataclass(frozen=True)
class Msg:
    at: float  # time.time() on arrival
    topic: str
    raw: bytes
    retain: bool
    qos: int  # as delivered: min(the publisher's, the subscription's 1)

    @property
    def kind(self) -> str:
        parts = self.topic.split("/")
        if len(parts) > 1 and parts[1] == "STATE":
            return "STATE"
        return parts[2] if len(parts) > 2 else ""

    @property
    def device(self) -> str | None:
        parts = self.topic.split("/")
        return parts[4] if len(parts) > 4 else None

    def pb(self) -> Any:
        """pysparkplug's protobuf Payload (has what its dataclasses drop: properties)."""
        return sp_pb.Payload.FromString(self.raw)

    @property
    def seq(self) -> int | None:
        p = self.pb()
        return p.seq if p.HasField("seq") else None


class SparkplugCollector:
    """Subscribes to `spBv1.0/#` and keeps every message: arrival time, topic, raw payload.

    `persistent`: an MQTT 5 session that outlives a broker restart (with the broker's
    `persistence true` and `queue_qos0_messages true`, births sent while the collector is away are
    kept for it too)."""

    def __init__(self, port: int, topics: str = f"{NS}/#", *, persistent: bool = False, name: str = "sp") -> None:
        self.messages: list[Msg] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"{name}-{port}-{os.getpid()}", protocol=mqtt.MQTTv5)
        props = None
        if persistent:
            props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600

        def on_connect(client, userdata, flags, rc, p=None):
            if not flags.session_present:
                client.subscribe(topics, qos=1)
            else:
                subscribed.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.3)
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert subscribed.wait(10), "the Sparkplug collector did not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(Msg(time.time(), msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def all(self) -> list[Msg]:
        with self._lock:
            return list(self.messages)

    def of(self, kind: str, device: str | None = None) -> list[Msg]:
        return [m for m in self.all() if m.kind == kind and (device is None or m.device == device)]

    def publish(self, topic_: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic_, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def sp_collector_factory():
    yield from closing_factory(lambda broker, **kw: SparkplugCollector(broker.port, **kw))


# ----- decoding (pysparkplug) -----


def nbirth(m: Msg) -> ps.NBirth:
    return ps.NBirth.decode(m.raw)


def dbirth(m: Msg) -> ps.DBirth:
    return ps.DBirth.decode(m.raw)


def by_name(birth: ps.Birth) -> dict[str, ps.Metric]:
    return {metric.name: metric for metric in birth.metrics}


def bdseq_of(m: Msg) -> int:
    """The bdSeq of an NBIRTH or NDEATH."""
    p = m.pb()
    (metric,) = [x for x in p.metrics if x.name == "bdSeq"]
    return ps.Metric.from_pb(metric).value


@dataclass(frozen=True)
class Point:
    """One metric of a DDATA, with its name resolved by the DBIRTH in force."""

    msg: Msg
    name: str
    alias: int | None
    value: Any
    timestamp: int | None
    is_historical: bool
    is_null: bool
    had_name: bool  # the DDATA carried the name itself (it should carry the alias only)


def ddata_points(messages: list[Msg], device: str) -> list[Point]:
    """Every metric of `device`'s DDATA in arrival order, each decoded by pysparkplug with the
    DBIRTH that came before it."""
    birth: ps.DBirth | None = None
    out: list[Point] = []
    for m in messages:
        if m.device != device:
            continue
        if m.kind == "DBIRTH":
            birth = dbirth(m)
        elif m.kind == "DDATA":
            assert birth is not None, f"DDATA of {device} before any DBIRTH"
            named = [bool(x.name) for x in m.pb().metrics]
            data = ps.DData.decode(m.raw, birth=birth)
            for metric, had_name in zip(data.metrics, named):
                out.append(Point(m, metric.name, metric.alias, metric.value, metric.timestamp, metric.is_historical,
                                 metric.is_null, had_name))
    return out


def values_of(points: list[Point], name: str) -> list[Any]:
    return [p.value for p in points if p.name == name]


# ----- a Modbus simulator whose registers count -----


class CountingSimulator(ModbusSimulator):
    """The simulator, plus holding registers that go up by `step` at every read that covers them
    (a counter that changes at every poll: every poll sees a new value, in order)."""

    def __init__(self, *args: Any, ramps: dict[int, int] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ramps = dict(ramps or {})

    async def _action(self, function_code, start_address, address, count, registers, set_values):
        result = await super()._action(function_code, start_address, address, count, registers, set_values)
        if result is None and function_code == 3:
            for addr, step in self.ramps.items():
                if address <= addr < address + count:
                    registers[addr - start_address] = (registers[addr - start_address] + step) & 0xFFFF
        return result

    def holding(self, unit: int = 1) -> list[int]:
        """The live holding table of a unit (address 0 first), to look at and to set."""
        assert self.server is not None, "the simulator is not running"
        return self.server.context.devices[unit].block["h"][2]


async def start_sim(port: int | None = None, **kw: Any) -> CountingSimulator:
    return await CountingSimulator(**kw).start_tcp("127.0.0.1", port or free_port())


def sim_port(sim: ModbusSimulator) -> int:
    return sim.server.comm_params.source_address[1]


# ----- gateway configuration -----


def link(broker, **extra: Any) -> dict:
    return {"host": "127.0.0.1", "port": broker.port, "health_interval": "1s", "reconnect_min": "0.1s",
            "reconnect_max": "0.5s", **extra}


def sparkplug_upstream(broker, **extra: Any) -> dict:
    return link(broker, format="sparkplug", group_id=GROUP, **extra)


def modbus_device(port: int, tags: list[dict], name: str = "press1", poll: str = "100ms", **kw: Any) -> dict:
    return {"name": name, "driver": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": poll,
            "timeout": "1s", "reconnect_min": "0.1s", "reconnect_max": "0.5s", "tags": tags, **kw}


def gateway_config(tmp_path, upstream: dict | list[dict], devices: list[dict], **sections: Any) -> dict:
    raw: dict[str, Any] = {"gateway": {"id": NODE, "state_dir": str(tmp_path / "state")}}
    if isinstance(upstream, list):
        raw["upstreams"] = upstream
    else:
        raw["upstream"] = upstream
    raw["devices"] = devices
    raw["summaries"] = {"interval": "1s"}
    raw.update(sections)
    return raw


def start_daemon(cfg_path, tmp_path, name: str) -> subprocess.Popen:
    """The real `edge-gateway run` in a subprocess (as systemd runs it)."""
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg_path)], stdout=log, stderr=log,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
