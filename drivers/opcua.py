"""OPC UA client driver (asyncua): data-change subscriptions or polling.

asyncua's own auto-reconnect is left off: one reconnect policy (`drivers.base.supervise`) for
every driver, and a fresh session re-creates the subscriptions from the config, which also
works after a server restart that forgot every session.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import time
from pathlib import Path
from typing import Any, Literal

from asyncua import Client, ua
from asyncua.crypto import security_policies
from cryptography import x509
from pydantic import Field, field_validator, model_validator

from drivers.base import DeviceConfig, DeviceDisconnected, DriverError, Emit, every, register, supervise, until_lost
from gateway import logs
from gateway.health import DeviceHealth
from gateway.model import Quality, Sample
from gateway.schema import Duration, Name, SecretFile, StrictModel, read_secret

log = logs.get("drivers.opcua")

_POLICIES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}


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


class OpcUaTag(StrictModel):
    name: Name
    node: str  # e.g. "ns=2;s=Oven.Temperature"
    unit: str | None = None
    sampling_interval: Duration | None = None  # subscribe mode; default: the device's
    deadband: float | None = Field(None, ge=0)  # subscribe mode; absolute unless deadband_type percent
    deadband_type: Literal["absolute", "percent"] = "absolute"

    @field_validator("node")
    @classmethod
    def _node_id(cls, node: str) -> str:
        try:
            ua.NodeId.from_string(node)
        except Exception:  # noqa: BLE001 - asyncua raises several types for a bad id
            raise ValueError(f"not an OPC UA node id: {node!r}") from None
        return node


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

    @model_validator(mode="after")
    def _check(self) -> "OpcUaConfig":
        names = [t.name for t in self.tags]
        if len(names) != len(set(names)):
            raise ValueError("tag names must be unique within a device")
        return self

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
    return Sample(source, None, ts, Quality.BAD, unit)


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
def _peer_errors(what: str):
    """asyncua and socket errors, turned into the driver's own: a lost link ends the session
    (reconnect), an OPC UA service error is a driver error."""
    try:
        yield
    except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
        raise DeviceDisconnected(f"{what} failed: {type(exc).__name__}: {exc}") from None
    except ua.UaError as exc:
        raise DriverError(f"{what} failed: {exc}") from None


class OpcUaDriver:
    def __init__(self, config: OpcUaConfig, health: DeviceHealth) -> None:
        self.config = config
        self.health = health
        self.health.extra.setdefault("mode", config.mode)

    async def run(self, emit: Emit) -> None:
        await supervise(lambda: self._session(emit), self.health, self.config.reconnect_min,
                        self.config.reconnect_max)

    async def _client(self) -> Client:
        cfg = self.config
        client = Client(cfg.endpoint, timeout=cfg.timeout, watchdog_intervall=max(1.0, cfg.timeout))
        client.name = client.description = f"edge-gateway {cfg.name}"
        sec = cfg.security
        uri = cfg.application_uri
        if sec.policy != "None":
            assert sec.certificate is not None and sec.private_key is not None
            if uri is None:
                uri = _certificate_uri(sec.certificate)
            password = read_secret(sec.private_key_password_file)
            try:
                await client.set_security(
                    _POLICIES[sec.policy], str(sec.certificate), str(sec.private_key),
                    private_key_password=password,
                    server_certificate=str(sec.server_certificate) if sec.server_certificate else None,
                    mode=_MODES[sec.mode])
            except (OSError, asyncio.TimeoutError, ua.UaError) as exc:
                raise DeviceDisconnected(f"security set-up failed: {type(exc).__name__}: {exc}") from None
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
            try:
                await asyncio.wait_for(client.connect(), timeout=max(cfg.timeout * 5, 5.0))
            except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError) as exc:
                raise DeviceDisconnected(f"connect failed: {type(exc).__name__}: {exc}") from None
            self.health.ok()
            nodes = [client.get_node(t.node) for t in cfg.tags]
            try:
                if cfg.mode == "poll":
                    await self._poll_forever(client, nodes, lost, emit)
                else:
                    await self._subscribe_forever(client, nodes, lost, emit)
            except DriverError:
                # Consumers must see that the values stopped being true, once per outage.
                now = time.time()
                for tag in cfg.tags:
                    await emit(Sample(f"{cfg.name}.{tag.name}", None, now, Quality.BAD, tag.unit))
                raise
        finally:
            try:
                await asyncio.wait_for(client.disconnect(), timeout=2.0)
            except Exception:  # noqa: BLE001 - the server may already be gone; nothing to do
                pass

    async def _poll_forever(self, client: Client, nodes: list, lost: asyncio.Event, emit: Emit) -> None:
        cfg = self.config

        async def poll() -> None:
            if lost.is_set():
                raise DeviceDisconnected("connection lost")
            started = time.monotonic()
            with _peer_errors("read"):
                values = await client.read_attributes(nodes)
            received = time.time()
            self.health.ok((time.monotonic() - started) * 1000.0, now=received)
            for tag, dv in zip(cfg.tags, values):
                await self._emit_value(tag, dv, received, emit)

        await every(cfg.poll_interval, poll, self.health)

    async def _subscribe_forever(self, client: Client, nodes: list, lost: asyncio.Event, emit: Emit) -> None:
        cfg = self.config
        queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.queue_size)
        by_handle = dict(enumerate(cfg.tags, start=1))  # client handle -> tag
        with _peer_errors("subscribe"):
            subscription = await client.create_subscription(cfg.poll_interval * 1000.0, _Changes(queue, lost))
            params = [self._monitored_item(node, tag, handle)
                      for handle, (node, tag) in enumerate(zip(nodes, cfg.tags), start=1)]
            results = await subscription.create_monitored_items(params)
        now = time.time()
        for tag, result in zip(cfg.tags, results):
            if isinstance(result, ua.StatusCode) and not result.is_good():
                # the node does not exist or cannot be monitored: the tag is bad, not the device
                self.health.bad_value(f"{tag.node}: {result.name}", key=f"tag:{tag.name}")
                await emit(Sample(f"{cfg.name}.{tag.name}", None, now, Quality.BAD, tag.unit))
        async with contextlib.aclosing(until_lost(queue, lost, "connection lost")) as changes:
            async for handle, dv, received in changes:
                tag = by_handle.get(handle)
                if tag is not None:
                    self.health.ok(now=received)
                    await self._emit_value(tag, dv, received, emit)

    def _monitored_item(self, node, tag: OpcUaTag, handle: int) -> ua.MonitoredItemCreateRequest:  # noqa: ANN001
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = (tag.sampling_interval if tag.sampling_interval is not None
                                   else self.config.sampling_interval) * 1000.0
        params.QueueSize = 10
        params.DiscardOldest = True
        if tag.deadband is not None:
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

    async def _emit_value(self, tag: OpcUaTag, dv: ua.DataValue, received: float, emit: Emit) -> None:
        sample = to_sample(f"{self.config.name}.{tag.name}", tag.unit, dv, received)
        key = f"tag:{tag.name}"
        if sample.quality is Quality.BAD:
            code = dv.StatusCode.name if dv.StatusCode is not None else "bad"
            self.health.bad_value(f"{tag.node}: {code}", key=key)
        else:
            self.health.good_value(key=key)
        await emit(sample)


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


def _factory(config: DeviceConfig, health: DeviceHealth) -> OpcUaDriver:
    assert isinstance(config, OpcUaConfig)
    return OpcUaDriver(config, health)


register("opcua", OpcUaConfig, _factory)
