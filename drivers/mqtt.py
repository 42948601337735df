"""MQTT in: subscribe to a site broker and turn payloads into samples or waveform blocks (paho 2.x).

paho runs its network loop in its own thread; each message is handed to the event loop through a
bounded queue, and the paho thread waits for room, so a slow gateway slows the broker connection
down (TCP back-pressure) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import time
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
from pydantic import Field, field_validator, model_validator

from drivers.base import DeviceConfig, DeviceDisconnected, DriverError, Emit, register, supervise, until_lost
from gateway import logs
from gateway.health import DeviceHealth
from gateway.model import Quality, Sample, Waveform
from gateway.mqttclient import connect_kwargs, make_client
from gateway.schema import BrokerConfig, Duration, Name, StrictModel

log = logs.get("drivers.mqtt")

Format = Literal["json", "f32le", "f32be", "i16le", "csv", "text"]
WAVEFORM_FORMATS = frozenset({"f32le", "f32be", "i16le", "csv"})
_DTYPES = {"f32le": "<f4", "f32be": ">f4", "i16le": "<i2"}


class PayloadError(DriverError):
    """A payload that cannot be turned into a value: malformed, NaN, wrong length."""


class MqttSubscription(StrictModel):
    topic: str = Field(min_length=1)  # MQTT filter, + and # allowed
    tag: Name
    format: Format = "json"
    value_path: str | None = None  # json: dotted path to the value (list indices as numbers)
    ts_path: str | None = None  # json: dotted path to a source timestamp (epoch s, epoch ms or ISO 8601)
    sample_rate: float | None = Field(None, gt=0)  # Hz, required for waveform formats
    samples: int | None = Field(None, ge=1)  # expected samples per block; other lengths are rejected
    # Waveforms: how late a block may arrive (beyond half a block) and still continue the previous
    # one; later than that, a block is taken as lost and the windows start again.
    jitter: Duration = 0.1
    scale: float = 1.0
    offset: float = 0.0
    qos: Literal[0, 1, 2] = 1
    unit: str | None = None

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        levels = topic.split("/")
        for i, level in enumerate(levels):
            if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
                raise ValueError("wildcards + and # must fill a whole level; # only at the end")
        return topic

    @model_validator(mode="after")
    def _check(self) -> "MqttSubscription":
        if self.waveform and self.sample_rate is None:
            raise ValueError(f"format {self.format} is a waveform: sample_rate is required")
        if not self.waveform and self.samples is not None:
            raise ValueError("samples applies to waveform formats only")
        if self.format != "json" and (self.value_path or self.ts_path):
            raise ValueError("value_path and ts_path apply to format json only")
        return self

    @property
    def waveform(self) -> bool:
        return self.format in WAVEFORM_FORMATS


class MqttConfig(DeviceConfig, BrokerConfig):
    """Broker keys as for `upstream:` (host, port, protocol, username, password(_file), tls, keepalive)."""

    driver: Literal["mqtt"]
    queue_size: int = Field(1000, ge=1)  # messages waiting for the gateway before paho is held back
    subscriptions: list[MqttSubscription] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tags(self) -> "MqttConfig":
        tags = [s.tag for s in self.subscriptions]
        if len(tags) != len(set(tags)):
            raise ValueError("subscription tags must be unique within a device")
        return self

    def tag_names(self) -> list[str]:
        return [s.tag for s in self.subscriptions]

    def tag_units(self) -> dict[str, str | None]:
        return {s.tag: s.unit for s in self.subscriptions}

    def waveform_tags(self) -> set[str]:
        return {s.tag for s in self.subscriptions if s.waveform}


# ---------------------------------------------------------------------------------------------
# Pure payload decoding


def _walk(obj: Any, path: str | None) -> Any:
    if not path:
        return obj
    for key in path.split("."):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.lstrip("-").isdigit() and -len(obj) <= int(key) < len(obj):
            obj = obj[int(key)]
        else:
            raise PayloadError(f"no {path!r} in payload")
    return obj


def _number(value: Any) -> float | int | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise PayloadError(f"not a number: {value[:40]!r}") from None
    else:
        raise PayloadError(f"not a number: {type(value).__name__}")
    if isinstance(number, float) and not math.isfinite(number):
        raise PayloadError("not a finite number")
    return number


def parse_timestamp(value: Any) -> float:
    """Epoch seconds, epoch milliseconds (recognised by size) or an ISO 8601 string -> epoch s."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str):
        try:
            parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise PayloadError(f"bad timestamp {value[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_dt.timezone.utc)
        return parsed.timestamp()
    raise PayloadError("bad timestamp")


def decode_payload(sub: MqttSubscription, payload: bytes) -> tuple[Any, float | None]:
    """(value, source timestamp or None). A waveform value is a 1-D float array.

    Raises PayloadError for anything that must not be forwarded.
    """
    if not payload:
        raise PayloadError("empty payload")
    if sub.format in _DTYPES:
        width = np.dtype(_DTYPES[sub.format]).itemsize
        if len(payload) % width:
            raise PayloadError(f"{len(payload)} bytes is not a whole number of {sub.format} samples")
        array = np.frombuffer(payload, dtype=_DTYPES[sub.format])
        array = array.astype(np.float32 if sub.format == "i16le" or (sub.scale, sub.offset) == (1.0, 0.0)
                             else np.float64)
        return _finish_waveform(sub, array), None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8") from None
    if sub.format == "csv":
        fields = [f for f in text.replace(",", " ").replace(";", " ").split() if f]
        try:
            array = np.array([float(f) for f in fields], dtype=np.float64)
        except ValueError:
            raise PayloadError("csv holds a field that is not a number") from None
        if array.size == 0:
            raise PayloadError("empty csv")
        return _finish_waveform(sub, array), None
    if sub.format == "text":
        return _scaled(sub, _number(text)), None
    try:
        doc = json.loads(text)
    except ValueError:
        raise PayloadError("malformed JSON") from None
    value = _scaled(sub, _number(_walk(doc, sub.value_path)))
    ts = parse_timestamp(_walk(doc, sub.ts_path)) if sub.ts_path else None
    return value, ts


def _scaled(sub: MqttSubscription, value: float | int | bool) -> float | int | bool:
    if isinstance(value, bool) or (sub.scale == 1.0 and sub.offset == 0.0):
        return value
    return value * sub.scale + sub.offset


def _finish_waveform(sub: MqttSubscription, array: np.ndarray) -> np.ndarray:
    if sub.samples is not None and array.size != sub.samples:
        raise PayloadError(f"{array.size} samples, expected {sub.samples}")
    if not np.all(np.isfinite(array)):
        raise PayloadError("waveform holds NaN or infinity")
    if sub.scale != 1.0 or sub.offset != 0.0:
        array = array * sub.scale + sub.offset
    return array


# ---------------------------------------------------------------------------------------------
# The driver

MAX_LEAD_S = 5.0  # a waveform stream may run this far ahead of its arrival clock (bursts)


class MqttDriver:
    def __init__(self, config: MqttConfig, health: DeviceHealth) -> None:
        self.config = config
        self.health = health
        self.health.extra.setdefault("dropped", 0)
        self._next_start: dict[str, float] = {}  # topic -> where the next waveform block starts

    async def run(self, emit: Emit) -> None:
        await supervise(lambda: self._session(emit), self.health, self.config.reconnect_min,
                        self.config.reconnect_max)

    def _block_start(self, topic: str, n: int, fs: float, received: float, jitter: float) -> float:
        """Timestamp of a block's first sample, by the sensor's sample clock.

        A block is published once complete, so on arrival its first sample is one block duration
        old; but arrival times jitter through a broker by more than a short block lasts, which
        would look like gaps to the windows. So a block continues the previous one exactly unless
        it arrives later than half a block plus `jitter` (a block was lost, or the sensor paused)
        or far earlier than the clock says (more than MAX_LEAD_S: a restarted sensor, a clock
        far off); then the clock is set anew from the arrival time. An early block is a burst
        (the sensor catching up after a hiccup), not a loss.
        """
        naive = received - n / fs
        expected = self._next_start.get(topic)
        late = naive - expected if expected is not None else None
        if late is not None and -MAX_LEAD_S <= late <= 0.5 * n / fs + jitter:
            start = expected
        else:
            start = naive
        self._next_start[topic] = start + n / fs
        return start

    def matching(self, topic: str) -> list[MqttSubscription]:
        return [s for s in self.config.subscriptions if mqtt.topic_matches_sub(s.topic, topic)]

    async def handle(self, topic: str, payload: bytes, received: float, emit: Emit) -> None:
        """One message: decode it for every subscription whose filter matches the topic."""
        device = self.config.name
        for sub in self.matching(topic):
            key = f"payload:{sub.tag}"
            try:
                value, ts = decode_payload(sub, payload)
            except PayloadError as exc:
                self.health.bad_value(f"{topic}: {exc}", key=key)
                continue
            self.health.good_value(key=key)
            source = f"{device}.{sub.tag}"
            if sub.waveform:
                assert sub.sample_rate is not None
                await emit(Waveform(source, value, sub.sample_rate, self._block_start(topic, value.size, sub.sample_rate,
                                                                                      received, sub.jitter), sub.unit))
            else:
                await emit(Sample(source, value, ts if ts is not None else received, Quality.GOOD, sub.unit))

    async def _session(self, emit: Emit) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bytes, float]] = asyncio.Queue(maxsize=cfg.queue_size)
        subscribed: asyncio.Future[None] = loop.create_future()
        lost = asyncio.Event()
        closing = False
        client = make_client(cfg, cfg.client_id or f"edge-in-{cfg.name}")

        def resolve(error: str | None) -> None:
            if subscribed.done():
                return
            if error:
                subscribed.set_exception(DeviceDisconnected(error))
            else:
                subscribed.set_result(None)

        def on_connect(client, userdata, flags, reason_code, properties=None):
            if reason_code.is_failure:
                loop.call_soon_threadsafe(resolve, f"broker refused: {reason_code}")
                return
            client.subscribe([(s.topic, s.qos) for s in cfg.subscriptions])

        def on_subscribe(client, userdata, mid, reason_codes, properties=None):
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            loop.call_soon_threadsafe(resolve, f"subscription refused: {', '.join(refused)}" if refused else None)

        def on_disconnect(client, userdata, flags, reason_code, properties=None):
            loop.call_soon_threadsafe(lost.set)

        def on_message(client, userdata, msg):
            if closing:
                return
            future = asyncio.run_coroutine_threadsafe(queue.put((msg.topic, msg.payload, time.time())), loop)
            try:
                future.result(timeout=max(1.0, cfg.timeout))
            except Exception:  # noqa: BLE001 - the loop is closing or stuck: drop and count
                future.cancel()
                self.health.extra["dropped"] += 1

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        try:
            try:
                await asyncio.to_thread(client.connect, **connect_kwargs(cfg))
            except (OSError, ValueError) as exc:
                raise DeviceDisconnected(f"connect to {cfg.host}:{cfg.port} failed: {exc}") from None
            client.loop_start()
            try:
                await asyncio.wait_for(asyncio.shield(subscribed), max(cfg.timeout, 1.0) * 5)
            except asyncio.TimeoutError:
                raise DeviceDisconnected("no CONNACK/SUBACK from broker") from None
            self.health.ok()
            async with contextlib.aclosing(until_lost(queue, lost, "broker connection lost")) as messages:
                async for topic, payload, received in messages:
                    self.health.ok(now=received)
                    await self.handle(topic, payload, received, emit)
        finally:
            closing = True
            while not queue.empty():  # frees a paho thread waiting for room
                queue.get_nowait()
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)


def _factory(config: DeviceConfig, health: DeviceHealth) -> MqttDriver:
    assert isinstance(config, MqttConfig)
    return MqttDriver(config, health)


register("mqtt", MqttConfig, _factory)
