"""MQTT in: subscribe to a site broker and turn payloads into samples or waveform blocks (paho 2.x).

One `gateway.mqttclient.Session` per connection: its network thread hands each message to the
event loop through a bounded queue and waits for room, so a slow gateway slows the broker
connection down (TCP back-pressure) instead of growing memory. Messages still queued when a
session ends are dropped and counted (`dropped`).

Waveform blocks come as raw samples (f32le, f32be, i16le, csv) or as self-describing JSON (`format:
json` with `values_path`), which may carry the sample rate, the sensor's time of the first sample
and a block counter. The driver decides whether a block continues its stream (see `_place`) and,
when it does not, says why in `Waveform.restart`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import paho.mqtt.client as mqtt
from pydantic import Field, field_validator, model_validator

from drivers.base import (DeviceConfig, DeviceDisconnected, DriverContext, DriverError, DriverType, Emit, supervise,
                          until_lost)
from gateway import logs
from gateway.health import DeviceHealth
from gateway.lazy import lazy
from gateway.model import Quality, Sample, Waveform, source_of
from gateway.mqttclient import Inbox, Session, SessionError
from gateway.schema import BrokerConfig, Duration, Name, Reported, StrictModel

# NumPy only for waveform payloads, imported with the first one (see gateway.lazy).
np = lazy("numpy")

log = logs.get("drivers.mqtt")

Format = Literal["json", "f32le", "f32be", "i16le", "csv", "text"]
Encoding = Literal["array", "base64_f32le", "base64_i16le"]
WAVEFORM_FORMATS = frozenset({"f32le", "f32be", "i16le", "csv"})
_DTYPES = {"f32le": "<f4", "f32be": ">f4", "i16le": "<i2", "base64_f32le": "<f4", "base64_i16le": "<i2"}
_NUMBER_TYPES = frozenset({int, float})
MAX_SAMPLE_RATE = 1e9  # Hz; a payload's sample rate outside (0, this] is a bad block
_TS_RANGE = (0.0, 253402300799.0)  # 1970 .. the end of 9999: what ISO 8601 output can show


class PayloadError(DriverError):
    """A payload that cannot be turned into a value: malformed, NaN, wrong length."""


class MqttSubscription(Reported):
    topic: str = Field(min_length=1)  # MQTT filter, + and # allowed
    tag: Name
    format: Format = "json"
    value_path: str | None = Field(None, description="json: dotted path to a scalar value (list indices as numbers)")
    values_path: str | None = Field(None, description="json: dotted path to a waveform block's samples; "
                                                      "makes the subscription a waveform")
    values_encoding: Encoding = Field("array", description="json waveform: a JSON array of numbers, or a base64 "
                                                           "string of little-endian float32 or int16")
    sample_rate_path: str | None = Field(None, description="json waveform: path to the sample rate in Hz "
                                                           "(else sample_rate)")
    ts_path: str | None = Field(None, description="json: path to the source time (of the first sample): epoch s, "
                                                  "epoch ms or ISO 8601")
    seq_path: str | None = Field(None, description="json waveform: path to a block counter that grows by one "
                                                   "per block")
    sample_rate: float | None = Field(None, gt=0, description="Hz; waveforms without sample_rate_path")
    samples: int | None = Field(None, ge=1, description="expected samples per block; other lengths are rejected")
    # Waveforms without seq_path or ts_path: how late a block may arrive (beyond half a block) and
    # still continue the previous one; later than that, a block is taken as lost.
    jitter: Duration = Field(0.1, description="waveforms timed by arrival: lateness (beyond half a block) "
                                              "still taken as a continuation")
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
        json_only = [k for k in ("value_path", "values_path", "ts_path", "sample_rate_path", "seq_path")
                     if getattr(self, k)]
        if self.format != "json" and json_only:
            raise ValueError(f"{', '.join(json_only)}: for format json only")
        if self.value_path and self.values_path:
            raise ValueError("value_path (a scalar) and values_path (a waveform block) exclude each other")
        block_only = [k for k in ("sample_rate_path", "seq_path") if getattr(self, k)]
        if self.values_encoding != "array":
            block_only.append("values_encoding")
        if block_only and not self.values_path:
            raise ValueError(f"{', '.join(block_only)}: for waveform blocks (values_path) only")
        if self.waveform and self.sample_rate is None and self.sample_rate_path is None:
            what = "json with values_path" if self.format == "json" else f"format {self.format}"
            raise ValueError(f"{what} is a waveform: sample_rate or sample_rate_path is required")
        if not self.waveform and self.samples is not None:
            raise ValueError("samples applies to waveform formats only")
        return self

    @property
    def waveform(self) -> bool:
        return self.format in WAVEFORM_FORMATS or self.values_path is not None


class MqttConfig(DeviceConfig, BrokerConfig):
    """Broker keys as for `upstream:` (host, port, protocol, username, password(_file), tls, keepalive)."""

    driver: Literal["mqtt"]
    queue_size: int = Field(1000, ge=1)  # messages waiting for the gateway before paho is held back
    subscriptions: list[MqttSubscription] = Field(min_length=1)

    def tag_names(self) -> list[str]:
        return [s.tag for s in self.subscriptions]

    def tag_units(self) -> dict[str, str | None]:
        return {s.tag: s.unit for s in self.subscriptions}

    def waveform_tags(self) -> set[str]:
        return {s.tag for s in self.subscriptions if s.waveform}

    def tag_models(self) -> list[tuple[str, Any]]:
        return [(s.tag, s) for s in self.subscriptions]


# ---------------------------------------------------------------------------------------------
# Pure payload decoding


@dataclass(slots=True)
class Block:
    """A decoded waveform payload: its samples and what the payload said about them."""

    samples: np.ndarray  # 1-D, finite, float32 or float64
    sample_rate: float
    ts: float | None = None  # the sensor's time of the first sample (ts_path)
    seq: int | None = None  # the block counter (seq_path)


def decode_payload(sub: MqttSubscription, payload: bytes) -> Block | tuple[Any, float | None]:
    """A waveform subscription's payload -> Block; any other -> (value, source timestamp or None).

    Raises PayloadError, and nothing else, for anything that must not be forwarded: a payload
    that makes a decoder fail in any way (nested too deep, too large, ...) is a bad payload.
    """
    if not payload:
        raise PayloadError("empty payload")
    try:
        return _decode_block(sub, payload) if sub.waveform else _decode_value(sub, payload)
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, OverflowError, ...: hostile input
        raise PayloadError(f"undecodable payload ({type(exc).__name__})") from None


def _decode_value(sub: MqttSubscription, payload: bytes) -> tuple[Any, float | None]:
    if sub.format == "text":
        return _scaled(sub, _number(_utf8(payload))), None
    doc = _json(payload)
    value = _scaled(sub, _number(_walk(doc, sub.value_path)))
    ts = parse_timestamp(_walk(doc, sub.ts_path)) if sub.ts_path else None
    return value, ts


def _decode_block(sub: MqttSubscription, payload: bytes) -> Block:
    if sub.format in _DTYPES:
        return Block(_finish_waveform(sub, _from_bytes(sub, payload, sub.format)), sub.sample_rate or 0.0)
    if sub.format == "csv":
        fields = [f for f in _utf8(payload).replace(",", " ").replace(";", " ").split() if f]
        try:
            array = np.array([float(f) for f in fields], dtype=np.float64)
        except ValueError:
            raise PayloadError("csv holds a field that is not a number") from None
        return Block(_finish_waveform(sub, array), sub.sample_rate or 0.0)
    doc = _json(payload)
    values = _walk(doc, sub.values_path)
    if sub.values_encoding == "array":
        if not isinstance(values, list) or not set(map(type, values)) <= _NUMBER_TYPES:
            raise PayloadError(f"{sub.values_path!r} is not an array of numbers")
        array = np.array(values, dtype=np.float64)
    else:
        if not isinstance(values, str):
            raise PayloadError(f"{sub.values_path!r} is not a base64 string")
        try:
            raw = base64.b64decode(values, validate=True)
        except ValueError:
            raise PayloadError(f"{sub.values_path!r} is not valid base64") from None
        array = _from_bytes(sub, raw, sub.values_encoding)
    rate = _walk(doc, sub.sample_rate_path) if sub.sample_rate_path else sub.sample_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= MAX_SAMPLE_RATE:
        raise PayloadError(f"sample rate {str(rate)[:20]} is not a number in (0, {MAX_SAMPLE_RATE:g}] Hz")
    ts = parse_timestamp(_walk(doc, sub.ts_path)) if sub.ts_path else None
    seq = _counter(_walk(doc, sub.seq_path)) if sub.seq_path else None
    return Block(_finish_waveform(sub, array), float(rate), ts, seq)


def _utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8") from None


def _json(payload: bytes) -> Any:
    """orjson: several times faster than the json module on arrays of numbers; it refuses NaN,
    Infinity and nesting deeper than 1,024 levels outright."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"malformed JSON: {str(exc)[:80]}") from None


def _from_bytes(sub: MqttSubscription, raw: bytes, encoding: str) -> np.ndarray:
    dtype = np.dtype(_DTYPES[encoding])
    if len(raw) % dtype.itemsize:
        raise PayloadError(f"{len(raw)} bytes is not a whole number of {encoding} samples")
    array = np.frombuffer(raw, dtype=dtype)
    plain = (sub.scale, sub.offset) == (1.0, 0.0)
    return array.astype(np.float32 if dtype.kind == "i" or plain else np.float64)


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


def _counter(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise PayloadError(f"block counter {str(value)[:20]} is not an integer")
    return value


def parse_timestamp(value: Any) -> float:
    """Epoch seconds, epoch milliseconds (recognised by size) or an ISO 8601 string -> epoch s."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        ts = value / 1000.0 if value > 1e11 else float(value)
    elif isinstance(value, str):
        try:
            parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise PayloadError(f"bad timestamp {value[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_dt.timezone.utc)
        ts = parsed.timestamp()
    else:
        raise PayloadError("bad timestamp")
    if not _TS_RANGE[0] <= ts <= _TS_RANGE[1]:
        raise PayloadError(f"timestamp {str(value)[:40]} is before 1970 or after 9999")
    return ts


def _scaled(sub: MqttSubscription, value: float | int | bool) -> float | int | bool:
    if isinstance(value, bool) or (sub.scale == 1.0 and sub.offset == 0.0):
        return value
    return value * sub.scale + sub.offset


def _finish_waveform(sub: MqttSubscription, array: np.ndarray) -> np.ndarray:
    if array.size == 0:
        raise PayloadError("a block without samples")
    if sub.samples is not None and array.size != sub.samples:
        raise PayloadError(f"{array.size} samples, expected {sub.samples}")
    if not np.isfinite(array).all():
        raise PayloadError("waveform holds NaN or infinity")
    if sub.scale != 1.0 or sub.offset != 0.0:
        array = array * sub.scale + sub.offset
        if not np.isfinite(array).all():
            raise PayloadError("waveform scaled beyond the float range")
    return array


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(slots=True)
class _Stream:
    """Where one waveform stream (one subscription on one topic) stands after its last block."""

    next_start: float  # where a block that continues the stream starts
    sample_rate: float
    seq: int | None
    broken: str | None = None  # why the next block cannot continue: a bad block came in between


class MqttDriver:
    def __init__(self, config: MqttConfig, health: DeviceHealth) -> None:
        self.config = config
        self.health = health
        self.health.extra.setdefault("dropped", 0)
        self._streams: dict[tuple[str, str], _Stream] = {}  # (tag, topic) -> its stream

    async def run(self, emit: Emit) -> None:
        await supervise(lambda: self._session(emit), self.health, self.config.reconnect_min,
                        self.config.reconnect_max)

    def _place(self, key: tuple[str, str], block: Block, received: float, jitter: float) -> tuple[float, str | None]:
        """(time of the block's first sample, why it does not continue its stream or None).

        A block continues the previous one unless a bad block came between or the sample rate
        changed. Beyond that, what the payload carries decides:

        * a block counter (seq): exactly when it is the previous one + 1; a skipped or repeated
          number, or a counter that starts again, is a "seq gap", and arrival time is ignored;
        * the sensor's time (ts): the block starts there, and it is a "ts gap" when that is more
          than one sample period from the end of the previous block;
        * neither: the sample clock. A block is published once complete, so on arrival its first
          sample is one block duration old; it continues the stream exactly unless it arrives
          later than half a block plus `jitter` ("late block": one was lost, or the sensor
          paused). A block that arrives early continues the stream however early it is: a
          sensor that holds data back and pushes it in bursts, or a replay at full speed.
        """
        n, fs = block.samples.size, block.sample_rate
        prev = self._streams.get(key)
        cause = None
        if prev is not None:
            expected = prev.next_start
            if prev.broken:
                cause = prev.broken
            elif fs != prev.sample_rate:
                cause = "rate change"
            elif block.seq is not None and prev.seq is not None and block.seq != prev.seq + 1:
                cause = "seq gap"
            elif block.ts is not None and abs(block.ts - expected) > 1.0 / fs:
                cause = "ts gap"
            elif block.ts is None and block.seq is None and received - n / fs - expected > 0.5 * n / fs + jitter:
                cause = "late block"
        if block.ts is not None:
            start = block.ts  # within a sample period of `expected` when it continues
        elif prev is not None and cause is None:
            start = expected
        else:
            start = received - n / fs
        self._streams[key] = _Stream(start + n / fs, fs, block.seq)
        return start, cause

    def matching(self, topic: str) -> list[MqttSubscription]:
        return [s for s in self.config.subscriptions if mqtt.topic_matches_sub(s.topic, topic)]

    async def handle(self, topic: str, payload: bytes, received: float, emit: Emit) -> None:
        """One message: decode it for every subscription whose filter matches the topic."""
        device = self.config.name
        for sub in self.matching(topic):
            key = f"payload:{sub.tag}"
            try:
                decoded = decode_payload(sub, payload)
            except PayloadError as exc:
                self.health.bad_value(f"{topic}: {exc}", key=key)
                stream = self._streams.get((sub.tag, topic))
                if stream is not None:
                    stream.broken = "bad block"
                continue
            self.health.good_value(key=key)
            source = source_of(device, sub.tag)
            if isinstance(decoded, Block):
                start, cause = self._place((sub.tag, topic), decoded, received, sub.jitter)
                await emit(Waveform(source, decoded.samples, decoded.sample_rate, start, sub.unit, restart=cause))
            else:
                value, ts = decoded
                await emit(Sample(source, value, ts if ts is not None else received, Quality.GOOD, sub.unit))

    def _dropped(self) -> None:
        self.health.extra["dropped"] += 1

    async def _session(self, emit: Emit) -> None:
        cfg = self.config
        queue = Inbox(cfg.queue_size)
        session = Session(cfg, cfg.client_id or f"edge-in-{cfg.name}", ready_timeout=max(cfg.timeout, 1.0) * 5,
                          subscriptions=[(s.topic, s.qos) for s in cfg.subscriptions], inbox=queue,
                          put_timeout=max(1.0, cfg.timeout), on_dropped=self._dropped)
        try:
            async with session:
                self.health.ok()
                # until_lost hands on what is queued before it reports the lost connection.
                async with contextlib.aclosing(until_lost(queue, session.lost, "broker connection lost")) as messages:
                    async for msg, received in messages:
                        self.health.ok(now=received)
                        await self.handle(msg.topic, msg.payload, received, emit)
        except SessionError as exc:
            raise DeviceDisconnected(str(exc), retry_soon=exc.retry_soon) from None


def _factory(config: DeviceConfig, health: DeviceHealth, context: DriverContext) -> MqttDriver:
    assert isinstance(config, MqttConfig)
    return MqttDriver(config, health)


DRIVER = DriverType("mqtt", MqttConfig, _factory)
