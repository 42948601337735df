"""OPC UA client driver (asyncua): data-change subscriptions or polling.

A tag with `sample_rate` (or `sample_rate_node`) is a waveform tag: its node holds a 1-D numeric
array, and each new value of it (a new source timestamp) is one Waveform block whose first
sample is at the value's source timestamp.

asyncua's own auto-reconnect is left off: one reconnect policy (`drivers.base.supervise`) for
every driver, and a fresh session re-creates the subscriptions from the config, which also
works after a server restart that forgot every session.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import math
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from drivers.base import (DeviceConfig, DeviceDisconnected, DriverContext, DriverError, DriverType, Emit, every,
                          mark_bad, supervise, until_lost)
from gateway import logs
from gateway.health import DeviceHealth
from gateway.lazy import lazy
from gateway.model import NEW_CAPTURE, Quality, Sample, Waveform, WriteFailed, WriteRefused, source_of
from gateway.schema import Duration, Name, SecretFile, StrictModel, WritePermission, read_secret

if TYPE_CHECKING:
    from asyncua import Client

# asyncua (and with it cryptography) and NumPy are imported by the first session, not by config
# validation: a gateway without an OPC UA device never loads them (see gateway.lazy).
asyncua = lazy("asyncua")
ua = lazy("asyncua.ua")
security_policies = lazy("asyncua.crypto.security_policies")
x509 = lazy("cryptography.x509")
np = lazy("numpy")

log = logs.get("drivers.opcua")

# security policy name -> the asyncua class name (in asyncua.crypto.security_policies)
_POLICIES = {
    "Basic256Sha256": "SecurityPolicyBasic256Sha256",
    "Aes128_Sha256_RsaOaep": "SecurityPolicyAes128Sha256RsaOaep",
    "Aes256_Sha256_RsaPss": "SecurityPolicyAes256Sha256RsaPss",
}


def check_node_id(text: str) -> None:
    """Raise ValueError unless asyncua's `NodeId.from_string` accepts `text`. The same grammar,
    without importing asyncua: `ns=`, `srv=`, `nsu=` and one of `i=` (integer), `s=` (the rest of
    the string, `;` and `=` included), `g=` (GUID), `b=` (base64, or hex after `0x`), joined by
    `;`; keys it does not know are ignored, as asyncua does."""
    elements = text.split(";")
    identifier = False
    while elements:
        element = elements.pop(0)
        if not element:
            continue
        if "=" not in element:
            raise ValueError(f"{element!r} is not key=value")
        key, value = element.split("=", 1)
        key = key.strip()
        if key in ("ns", "srv", "i"):
            int(value.strip())
        elif key == "g":
            uuid.UUID(f"urn:uuid:{value}")
        elif key == "b" and value[0:2] == "0x":
            bytes.fromhex(value[2:])
        elif key == "b":
            value.encode("ascii")  # base64, or else the bytes as written: ASCII either way
        elif key == "s":
            elements = []  # a string identifier takes the rest, separators included
        if key in ("i", "s", "g", "b"):
            identifier = True
    if not identifier:
        raise ValueError("no identifier (i=, s=, g= or b=)")


class OpcUaSecurity(StrictModel):
    policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = "None"
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    certificate: Path | None = None  # client application certificate, PEM or DER
    private_key: Path | None = None
    private_key_password_file: SecretFile | None = None
    server_certificate: Path | None = None  # pin it; otherwise taken from the server's endpoint list

    @model_validator(mode="after")
    def _check(self) -> "OpcUaSecurity":
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError("policy and mode are both None or both set")
        if self.policy != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"policy {self.policy} needs certificate and private_key")
        return self


class OpcUaTag(WritePermission):
    name: Name
    node: str  # e.g. "ns=2;s=Oven.Temperature"
    unit: str | None = None
    sampling_interval: Duration | None = None  # subscribe mode; default: the device's
    deadband: float | None = Field(None, ge=0)  # subscribe mode; absolute unless deadband_type percent
    deadband_type: Literal["absolute", "percent"] = "absolute"
    max_silence: Duration | None = Field(None, gt=0, description="sparkplug: send the value at least this often, "
                                                                 "changed or not")
    # Waveform tags: the node holds a 1-D Float/Double/Int16/Int32 array sampled at this rate (Hz),
    # or at the rate held by `sample_rate_node`.
    sample_rate: float | None = Field(None, gt=0)
    sample_rate_node: str | None = None
    # separate: each array is a capture of its own (windows start afresh, a short one is dropped);
    # continuous: successive arrays are one stream, glued by the sample clock.
    capture: Literal["separate", "continuous"] = "separate"

    @field_validator("node", "sample_rate_node")
    @classmethod
    def _node_id(cls, node: str | None) -> str | None:
        if node is None:
            return None
        try:
            check_node_id(node)
        except ValueError:
            raise ValueError(f"not an OPC UA node id: {node!r}") from None
        return node

    @model_validator(mode="after")
    def _check(self) -> "OpcUaTag":
        if self.sample_rate is not None and self.sample_rate_node is not None:
            raise ValueError("sample_rate and sample_rate_node: give one")
        if self.writable and self.waveform:
            raise ValueError("writable: a waveform tag cannot be written")
        if not self.waveform and "capture" in self.model_fields_set:
            raise ValueError("capture applies to waveform tags only (with sample_rate or sample_rate_node)")
        return self

    @property
    def waveform(self) -> bool:
        return self.sample_rate is not None or self.sample_rate_node is not None


# The scalar types a write or a method argument can take, and the range of the integer ones.
ArgType = Literal["Boolean", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64",
                  "Float", "Double", "String"]
_INT_RANGES = {"SByte": (-(1 << 7), (1 << 7) - 1), "Byte": (0, (1 << 8) - 1),
               "Int16": (-(1 << 15), (1 << 15) - 1), "UInt16": (0, (1 << 16) - 1),
               "Int32": (-(1 << 31), (1 << 31) - 1), "UInt32": (0, (1 << 32) - 1),
               "Int64": (-(1 << 63), (1 << 63) - 1), "UInt64": (0, (1 << 64) - 1)}
_FLOAT_MAX = 3.4028234663852886e38


class OpcUaMethod(StrictModel):
    """A method the gateway may call (`cmd/call`): nothing else on the server is callable."""

    name: Name
    object: str  # node id of the object the method belongs to
    method: str  # node id of the method
    args: list[ArgType] = Field(default_factory=list, description="the input argument types, in order")

    _node_ids = field_validator("object", "method")(lambda cls, v: OpcUaTag._node_id(v))


def to_variant(value: Any, vtype: str, what: str) -> ua.Variant:
    """A JSON value as a Variant of the node's (or argument's) own type; WriteRefused when it does
    not fit: never a silent conversion (a float into an Int16, a string into a Double)."""
    if vtype == "Boolean":
        if isinstance(value, bool):
            return ua.Variant(value, ua.VariantType.Boolean)
        raise WriteRefused(f"wrong type: {what} is Boolean, not {value!r}", "wrong_type")
    if vtype == "String":
        if isinstance(value, str):
            return ua.Variant(value, ua.VariantType.String)
        raise WriteRefused(f"wrong type: {what} is String, not {value!r}", "wrong_type")
    if vtype not in _INT_RANGES and vtype not in ("Float", "Double"):
        raise WriteRefused(f"wrong type: {what} is {vtype}, which the gateway does not write", "wrong_type")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WriteRefused(f"wrong type: {what} is {vtype}, not {value!r}", "wrong_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise WriteRefused(f"wrong type: {what} takes a finite number", "wrong_type")
    if vtype in _INT_RANGES:
        if isinstance(value, float) and not value.is_integer():
            raise WriteRefused(f"wrong type: {what} is {vtype}, an integer, not {value!r}", "wrong_type")
        low, high = _INT_RANGES[vtype]
        if not low <= value <= high:
            raise WriteRefused(f"out of range: {value!r} does not fit {what} ({vtype}: {low}..{high})", "out_of_range")
        return ua.Variant(int(value), getattr(ua.VariantType, vtype))
    if vtype == "Float" and abs(value) > _FLOAT_MAX:
        raise WriteRefused(f"out of range: {value!r} does not fit {what} (Float)", "out_of_range")
    return ua.Variant(float(value), getattr(ua.VariantType, vtype))


class OpcUaConfig(DeviceConfig):
    driver: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    security: OpcUaSecurity = Field(default_factory=OpcUaSecurity)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    password_file: SecretFile | None = None
    application_uri: str | None = None  # default: the URI in the client certificate
    mode: Literal["subscribe", "poll"] = "subscribe"
    poll_interval: Duration = 1.0  # poll mode: read period; subscribe mode: publishing interval
    sampling_interval: Duration = 0.0  # subscribe mode: 0 lets the server sample as fast as it can
    queue_size: int = Field(1000, ge=1)
    tags: list[OpcUaTag] = Field(min_length=1)
    methods: list[OpcUaMethod] = Field(default_factory=list, description="methods cmd/call may call; nothing else is callable")

    @model_validator(mode="after")
    def _unique_methods(self) -> "OpcUaConfig":
        methods = [m.name for m in self.methods]
        if len(methods) != len(set(methods)):
            raise ValueError("method names must be unique within a device")
        return self

    def waveform_tags(self) -> set[str]:
        return {t.name for t in self.tags if t.waveform}

    def report_deadband(self, tag: OpcUaTag) -> float:
        """An absolute `deadband` filters at the server and again before a Sparkplug upstream; a
        percent one only at the server (its range is the server's)."""
        return float(tag.deadband or 0.0) if tag.deadband_type == "absolute" else 0.0

    def resolved_password(self) -> str | None:
        return self.password if self.password is not None else read_secret(self.password_file)


def _epoch(stamp: _dt.datetime | None) -> float | None:
    if stamp is None:
        return None
    if stamp.tzinfo is None:  # OPC UA DateTime is UTC
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    epoch = stamp.timestamp()
    return epoch if epoch > 0 else None  # DateTime 0 (1601) means "not given"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, _dt.datetime):
        return _epoch(value)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    return str(value)


def to_sample(source: str, unit: str | None, dv: ua.DataValue, received: float) -> Sample:
    """A DataValue as a Sample: the status code sets the quality, the source timestamp is kept."""
    ts = _epoch(dv.SourceTimestamp) or _epoch(dv.ServerTimestamp) or received
    status = dv.StatusCode if dv.StatusCode is not None else ua.StatusCode()
    value = _plain(dv.Value.Value) if dv.Value is not None else None
    if status.is_good():
        return Sample(source, value, ts, Quality.GOOD, unit)
    if status.is_uncertain():
        return Sample(source, value, ts, Quality.UNCERTAIN, unit)
    return Sample.bad(source, ts, unit)


# Array types a waveform node may hold (ua.VariantType names), and the dtype its samples keep
# (exact for each).
_ARRAY_DTYPES = {"Float": "float32", "Int16": "float32", "Double": "float64", "Int32": "float64"}


class ArrayError(ValueError):
    """A waveform tag's value that is not a block: a scalar, 2-D, non-numeric, empty, NaN."""


def to_block(variant: ua.Variant | None) -> np.ndarray:
    """The samples of a waveform tag's value (a 1-D numeric array); ArrayError otherwise."""
    if variant is None or variant.Value is None:
        raise ArrayError("no value")
    if not variant.is_array:
        raise ArrayError(f"a scalar {variant.VariantType.name}, not an array")
    if variant.Dimensions and len(variant.Dimensions) > 1:
        raise ArrayError(f"a {len(variant.Dimensions)}-D array, not 1-D")
    dtype = _ARRAY_DTYPES.get(variant.VariantType.name)
    if dtype is None:
        raise ArrayError(f"a {variant.VariantType.name} array, not Float, Double, Int16 or Int32")
    try:
        samples = np.asarray(variant.Value, dtype=dtype)
    except (TypeError, ValueError):
        raise ArrayError("an array that does not convert to numbers") from None
    if samples.ndim != 1:
        raise ArrayError(f"a {samples.ndim}-D array, not 1-D")
    if samples.size == 0:
        raise ArrayError("an empty array")
    if not np.isfinite(samples).all():
        raise ArrayError("an array holding NaN or infinity")
    return samples


def _rate(dv: ua.DataValue) -> float | None:
    """A sample rate read from a `sample_rate_node`: a good, finite, positive number, or None."""
    if dv.StatusCode is not None and not dv.StatusCode.is_good():
        return None
    value = dv.Value.Value if dv.Value is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


class _Changes:
    """asyncua subscription handler: hands data changes to the driver's bounded queue."""

    def __init__(self, queue: asyncio.Queue, lost: asyncio.Event) -> None:
        self.queue = queue
        self.lost = lost

    async def datachange_notification(self, node, val, data) -> None:  # noqa: ANN001
        # awaiting put() holds asyncua's dispatch task back while the gateway is busy
        await self.queue.put((data.subscription_data.client_handle, data.monitored_item.Value, time.time()))

    async def status_change_notification(self, status) -> None:  # noqa: ANN001
        code = getattr(status, "Status", None)
        if code is not None and not code.is_good():
            self.lost.set()


@contextlib.contextmanager
def _peer_errors(what: str, service_error: type[DriverError] = DriverError):
    """asyncua and socket errors, turned into the driver's own: the one place they are translated.
    A lost link ends the session (reconnect); an OPC UA service error is a `service_error`, which
    is DeviceDisconnected too while the session is being set up."""
    try:
        yield
    except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
        raise DeviceDisconnected(f"{what} failed: {type(exc).__name__}: {exc}") from None
    except ua.UaError as exc:
        raise service_error(f"{what} failed: {type(exc).__name__}: {exc}") from None


class OpcUaDriver:
    def __init__(self, config: OpcUaConfig, health: DeviceHealth) -> None:
        self.config = config
        self.health = health
        self.health.extra.setdefault("mode", config.mode)
        self._rate_tags = [t for t in config.tags if t.sample_rate_node is not None]
        self._rates: dict[str, float] = {}  # tag -> rate read from its sample_rate_node
        self._last_stamp: dict[str, tuple] = {}  # waveform tag -> timestamps of the last array seen
        self._next_ts: dict[str, float] = {}  # continuous waveform tag -> where its next block starts
        self._live: Client | None = None  # the connected client, while a session runs
        self._types: dict[str, str] = {}  # node id -> its DataType as a VariantType name, read once
        self._tags = {t.name: t for t in config.tags}
        self._methods = {m.name: m for m in config.methods}

    async def run(self, emit: Emit) -> None:
        await supervise(lambda: self._session(emit), self.health, self.config.reconnect_min,
                        self.config.reconnect_max)

    async def _client(self) -> Client:
        cfg = self.config
        client = asyncua.Client(cfg.endpoint, timeout=cfg.timeout, watchdog_intervall=max(1.0, cfg.timeout))
        client.name = client.description = f"edge-gateway {cfg.name}"
        sec = cfg.security
        uri = cfg.application_uri
        if sec.policy != "None":
            assert sec.certificate is not None and sec.private_key is not None
            if uri is None:
                uri = _certificate_uri(sec.certificate)
            password = read_secret(sec.private_key_password_file)
            with _peer_errors("security set-up", DeviceDisconnected):
                await client.set_security(
                    getattr(security_policies, _POLICIES[sec.policy]), str(sec.certificate), str(sec.private_key),
                    private_key_password=password,
                    server_certificate=str(sec.server_certificate) if sec.server_certificate else None,
                    mode=getattr(ua.MessageSecurityMode, sec.mode))
        client.application_uri = uri or f"urn:edge-gateway:{cfg.name}"
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.resolved_password() or "")
        return client

    async def _session(self, emit: Emit) -> None:
        cfg = self.config
        lost = asyncio.Event()
        client = await self._client()

        async def on_lost(exc: Exception) -> None:
            lost.set()

        client.connection_lost_callback = on_lost
        try:
            with _peer_errors("connect", DeviceDisconnected):
                await asyncio.wait_for(client.connect(), timeout=max(cfg.timeout * 5, 5.0))
            self.health.ok()
            self._live = client  # writes and calls use the session the reads use
            nodes = [client.get_node(t.node) for t in cfg.tags]
            rate_nodes = [client.get_node(t.sample_rate_node) for t in self._rate_tags]
            try:
                if cfg.mode == "poll":
                    await self._poll_forever(client, nodes, rate_nodes, lost, emit)
                else:
                    await self._subscribe_forever(client, nodes, rate_nodes, lost, emit)
            except DriverError:
                await mark_bad(cfg, emit)  # once per outage
                raise
        finally:
            self._live = None
            try:
                await asyncio.wait_for(client.disconnect(), timeout=2.0)
            except Exception:  # noqa: BLE001 - the server may already be gone; nothing to do
                pass

    async def _poll_forever(self, client: Client, nodes: list, rate_nodes: list, lost: asyncio.Event,
                            emit: Emit) -> None:
        cfg = self.config

        async def poll() -> None:
            if lost.is_set():
                raise DeviceDisconnected("connection lost")
            started = time.monotonic()
            with _peer_errors("read"):
                values = await client.read_attributes(nodes + rate_nodes)
            received = time.time()
            self.health.ok((time.monotonic() - started) * 1000.0, now=received)
            for tag, dv in zip(self._rate_tags, values[len(nodes):]):
                self._set_rate(tag, dv)
            for tag, dv in zip(cfg.tags, values):
                await self._emit_value(tag, dv, received, emit)

        await every(cfg.poll_interval, poll, self.health)

    async def _subscribe_forever(self, client: Client, nodes: list, rate_nodes: list, lost: asyncio.Event,
                                 emit: Emit) -> None:
        cfg = self.config
        queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.queue_size)
        # client handle -> (tag, is its rate node): tags first, then the rate nodes
        items = [(t, False) for t in cfg.tags] + [(t, True) for t in self._rate_tags]
        by_handle = dict(enumerate(items, start=1))
        with _peer_errors("subscribe"):
            if rate_nodes:  # before the first array arrives; the subscription then reports changes
                for tag, dv in zip(self._rate_tags, await client.read_attributes(rate_nodes)):
                    self._set_rate(tag, dv)
            subscription = await client.create_subscription(cfg.poll_interval * 1000.0, _Changes(queue, lost))
            params = [self._monitored_item(node, tag, handle, rate)
                      for handle, (node, (tag, rate)) in enumerate(zip(nodes + rate_nodes, items), start=1)]
            results = await subscription.create_monitored_items(params)
        for (tag, rate), result in zip(items, results):
            if isinstance(result, ua.StatusCode) and not result.is_good():
                # the node does not exist or cannot be monitored: the tag is bad, not the device
                node = tag.sample_rate_node if rate else tag.node
                self.health.bad_value(f"{node}: {result.name}", key=f"{'rate' if rate else 'tag'}:{tag.name}")
                await mark_bad(self.config, emit, [tag.name])
        async with contextlib.aclosing(until_lost(queue, lost, "connection lost")) as changes:
            async for handle, dv, received in changes:
                item = by_handle.get(handle)
                if item is None:
                    continue
                self.health.ok(now=received)
                tag, rate = item
                if rate:
                    self._set_rate(tag, dv)
                else:
                    await self._emit_value(tag, dv, received, emit)

    def _monitored_item(self, node, tag: OpcUaTag, handle: int,  # noqa: ANN001
                        rate_node: bool = False) -> ua.MonitoredItemCreateRequest:
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = (tag.sampling_interval if tag.sampling_interval is not None
                                   else self.config.sampling_interval) * 1000.0
        params.QueueSize = 10
        params.DiscardOldest = True
        if tag.deadband is not None and not rate_node:
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            flt.DeadbandType = 1 if tag.deadband_type == "absolute" else 2
            flt.DeadbandValue = tag.deadband
            params.Filter = flt
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=node.nodeid, AttributeId=ua.AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = params
        return request

    def _set_rate(self, tag: OpcUaTag, dv: ua.DataValue) -> None:
        rate = _rate(dv)
        key = f"rate:{tag.name}"
        if rate is None:
            self._rates.pop(tag.name, None)
            shown = dv.Value.Value if dv.Value is not None else None
            code = dv.StatusCode.name if dv.StatusCode is not None else "Good"
            self.health.bad_value(f"{tag.sample_rate_node}: not a sample rate ({code}, {shown!r:.40})", key=key)
        else:
            self._rates[tag.name] = rate
            self.health.good_value(key=key)

    async def _emit_value(self, tag: OpcUaTag, dv: ua.DataValue, received: float, emit: Emit) -> None:
        if tag.waveform:
            await self._emit_array(tag, dv, received, emit)
            return
        sample = to_sample(source_of(self.config.name, tag.name), tag.unit, dv, received)
        key = f"tag:{tag.name}"
        if sample.quality is Quality.BAD:
            code = dv.StatusCode.name if dv.StatusCode is not None else "bad"
            self.health.bad_value(f"{tag.node}: {code}", key=key)
        else:
            self.health.good_value(key=key)
        await emit(sample)

    async def _emit_array(self, tag: OpcUaTag, dv: ua.DataValue, received: float, emit: Emit) -> None:
        """One new array value -> one Waveform block. A value seen before (polling reads the same
        capture until the server has a new one) is skipped; a bad status or a value that is not a
        1-D numeric array is counted in bad_values and gives no block."""
        stamp = (dv.SourceTimestamp, dv.ServerTimestamp)
        if stamp != (None, None):
            if self._last_stamp.get(tag.name) == stamp:
                return
            self._last_stamp[tag.name] = stamp
        key = f"tag:{tag.name}"
        status = dv.StatusCode if dv.StatusCode is not None else ua.StatusCode()
        if not (status.is_good() or status.is_uncertain()):
            self.health.bad_value(f"{tag.node}: {status.name}", key=key)
            return
        try:
            samples = to_block(dv.Value)
        except ArrayError as exc:
            self.health.bad_value(f"{tag.node}: {exc} (waveform tag)", key=key)
            return
        fs = tag.sample_rate if tag.sample_rate is not None else self._rates.get(tag.name)
        if fs is None:
            self.health.bad_value(f"{tag.node}: no sample rate from {tag.sample_rate_node}", key=key)
            return
        self.health.good_value(key=key)
        ts = _epoch(dv.SourceTimestamp) or _epoch(dv.ServerTimestamp) or received
        if tag.capture == "separate":
            restart: str | None = NEW_CAPTURE
        else:
            ts, restart = self._sample_clock(tag.name, ts, samples.size, fs)
        quality = Quality.GOOD if status.is_good() else Quality.UNCERTAIN
        await emit(Waveform(source_of(self.config.name, tag.name), samples, fs, ts, tag.unit, quality, restart))

    def _sample_clock(self, name: str, ts: float, n: int, fs: float) -> tuple[float, str | None]:
        """Continuous capture: (first-sample time, restart cause). An array whose source timestamp
        is within half an array (plus 1.5 sample periods) of where the previous one ended
        continues it exactly, so timestamp rounding never breaks the stream; otherwise arrays
        were missed (or the device restarted) and the windows start again ("ts gap")."""
        expected = self._next_ts.get(name)
        restart = None
        if expected is not None:
            if abs(ts - expected) <= 0.5 * n / fs + 1.5 / fs:
                ts = expected
            else:
                restart = "ts gap"
        self._next_ts[name] = ts + n / fs
        return ts, restart


    # ----- writes and method calls (the command router has checked permission and bounds) -----

    def _client_now(self) -> Client:
        client = self._live
        if client is None:
            raise WriteRefused(f"device disconnected: {self.config.name}; nothing was sent", "disconnected")
        return client

    async def check(self, tag_name: str, value: Any) -> None:
        """WriteRefused if `value` does not fit the tag's node; reads its data type (once)."""
        await self._prepare(tag_name, value)

    async def _prepare(self, tag_name: str, value: Any) -> tuple[OpcUaTag, Any, ua.Variant]:
        tag = self._tags.get(tag_name)
        if tag is None or not tag.writable:
            raise WriteRefused(f"not writable: {self.config.name}.{tag_name}", "not_writable")
        client = self._client_now()
        node = client.get_node(tag.node)
        timeout = self.config.timeout
        vtype = self._types.get(tag.node)
        if vtype is None:
            try:
                async with asyncio.timeout(timeout):
                    vtype = (await node.read_data_type_as_variant_type()).name
            except (TimeoutError, OSError, ua.UaError) as exc:
                raise WriteFailed(f"cannot read the data type of {tag.node}: {type(exc).__name__}: {exc}; "
                                  "nothing was written", "no_answer") from None
            self._types[tag.node] = vtype
        return tag, node, to_variant(value, vtype, f"{tag.name} ({tag.node})")

    async def write(self, tag_name: str, value: Any) -> Any:
        """Write a tag's node with the node's own data type, then (unless `verify: false`) read
        it back and return the value read."""
        tag, node, variant = await self._prepare(tag_name, value)
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                await node.write_value(ua.DataValue(variant))
        except ua.UaStatusCodeError as exc:
            raise WriteFailed(f"the server refused the write of {tag.name}: {exc}") from None
        except (TimeoutError, OSError, ua.UaError) as exc:
            raise WriteFailed(f"no answer to the write of {tag.name} within {timeout:g}s ({type(exc).__name__}); "
                              "the server may have taken it", "no_answer") from None
        if not tag.verify:
            return None
        try:
            async with asyncio.timeout(timeout):
                return _plain(await node.read_value())
        except (TimeoutError, OSError, ua.UaError) as exc:
            raise WriteFailed(f"written, but the read-back of {tag.name} failed: {type(exc).__name__}: {exc}",
                              "read_back_failed") from None

    async def call(self, method_name: str, args: list[Any]) -> list[Any]:
        """Call a configured method with its declared argument types; its output arguments."""
        method = self._methods.get(method_name)
        if method is None:
            raise WriteRefused(f"unknown method: {self.config.name} has no method {method_name!r}", "unknown_method")
        if len(args) != len(method.args):
            raise WriteRefused(f"wrong type: {method_name} takes {len(method.args)} arguments "
                               f"({', '.join(method.args) or 'none'}), got {len(args)}", "wrong_type")
        variants = [to_variant(a, t, f"{method_name} argument {i + 1}") for i, (a, t) in enumerate(zip(args, method.args))]
        client = self._client_now()
        request = ua.CallMethodRequest(ObjectId=ua.NodeId.from_string(method.object),
                                       MethodId=ua.NodeId.from_string(method.method), InputArguments=variants)
        try:
            async with asyncio.timeout(self.config.timeout):
                result, = await client.uaclient.call([request])
        except (TimeoutError, OSError, ua.UaError) as exc:
            raise WriteFailed(f"no answer to the call of {method_name} within {self.config.timeout:g}s "
                              f"({type(exc).__name__}); the server may have run it", "no_answer") from None
        if not result.StatusCode.is_good():
            raise WriteFailed(f"the server refused the call of {method_name}: {result.StatusCode.name}")
        return [_plain(v.Value) for v in result.OutputArguments or []]


def _certificate_uri(path: Path) -> str | None:
    """The application URI in a certificate's subject alternative names (servers check it)."""
    try:
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        return uris[0] if uris else None
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None


def _factory(config: DeviceConfig, health: DeviceHealth, context: DriverContext) -> OpcUaDriver:
    assert isinstance(config, OpcUaConfig)
    return OpcUaDriver(config, health)


DRIVER = DriverType("opcua", OpcUaConfig, _factory)
