"""How one upstream speaks: the seam between the buffer-draining link and a wire format.

`gateway.upstream.Upstream` owns the connection, the cursor into the buffer, acknowledgements
and back-off; a `Format` decides what goes on the wire. One Format object per upstream and per
pipeline, used from the event loop only (never from paho's network thread), so it may keep
state (sequence numbers, aliases, which devices are born) without locks.

Call order on each connection:

  will()                       before CONNECT (the broker publishes it if the link dies)
  subscriptions()              after CONNACK
  on_connect()                 after CONNACK, published before any buffered row
  ready()                      polled; rows are drained only while True
  encode(rows, historical)     rows fetched from the buffer -> messages, each acking its rows;
                               a row in no message is acknowledged at once (not to be sent).
                               `historical`: the rows were in the buffer when the link connected
                               or ready() last turned True (seq < Upstream.historical_below)
  on_message(...)              every message arriving on a subscription
  device_state(device, up)     a device's connection changed (polled every DEVICE_POLL s)
  on_clean_stop()              a final stop (not a reload), published before DISCONNECT

`kinds` says which buffer rows the upstream takes, by the first segment of the row's topic
(`data/press1` -> `data`); the buffer keeps a row until every upstream taking its kind has
acknowledged it. JSON takes every kind but `values` (per-tag values for report by exception,
written only for formats that want them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway import __version__
from gateway.buffer import VALUES, Row, row_kind, takes  # noqa: F401 - the kind rules, for formats
from gateway.model import iso_ts

DEVICE_POLL = 0.5  # seconds between looks at the pipeline's device health (for device_state)


@dataclass(slots=True)
class Message:
    """One MQTT publish made by a format."""

    topic: str  # the full topic, the format adds any prefix
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(slots=True)
class Command:
    """A command for the app's command router (`App.command(name, request)`).

    `raw` set: the request body as received, parsed by the Upstream, which replies on
    `{prefix}/cmd/{name}/reply` as the JSON contract says (JSON format). `raw` None: `request`
    is already parsed and the format has no reply topic; the result is logged."""

    name: str
    request: dict[str, Any] = field(default_factory=dict)
    props: Any = None  # the MQTT 5 properties of the request (ResponseTopic, CorrelationData)
    raw: bytes | None = None


@dataclass(slots=True)
class Inbound:
    """What a format made of an incoming message."""

    command: Command | None = None
    publish: list[Message] = field(default_factory=list)  # sent at once (e.g. births after a rebirth request)
    ready_changed: bool = False  # ready() may now answer differently: the Upstream looks again
    reconnect: str | None = None  # end this connection (after `publish`) and connect anew, for this reason


@runtime_checkable
class Format(Protocol):
    name: str  # "json", "sparkplug": in health and logs
    kinds: frozenset[str] | None  # row kinds taken; None: all but VALUES

    def will(self) -> Message | None: ...

    def subscriptions(self) -> list[tuple[str, int]]: ...  # (topic filter, qos)

    def on_connect(self) -> list[Message]: ...

    def ready(self) -> bool: ...

    def encode(self, rows: list[Row], historical: bool) -> list[tuple[list[Row], Message]]: ...

    def on_message(self, topic: str, payload: bytes, props: Any, retain: bool) -> Inbound | None: ...

    def on_clean_stop(self) -> list[Message]: ...

    def device_state(self, device: str, connected: bool) -> list[Message]: ...


class FormatUnavailable(Exception):
    """The configured format cannot be used in this build."""


class JsonFormat:
    """The gateway's own topics (`{prefix}/data/...`, `status`, `cmd/+`), unchanged.

    `passthrough`: a row's topic and payload go out as stored, so the Upstream publishes rows
    directly instead of calling `encode` (the fast path)."""

    name = "json"
    kinds: frozenset[str] | None = None
    passthrough = True

    def __init__(self, prefix: str, gateway_id: str, started_at: float) -> None:
        self.prefix = prefix
        self.gateway_id = gateway_id
        self.started_at = started_at

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    def status(self, state: str) -> Message:
        body = json.dumps({"gateway": self.gateway_id, "state": state, "version": __version__,
                           "started_at": iso_ts(self.started_at), "ts": iso_ts(time.time())}).encode()
        return Message(self.topic("status"), body, qos=1, retain=True)

    def will(self) -> Message | None:
        return self.status("offline")

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.topic("cmd/+"), 1)]

    def on_connect(self) -> list[Message]:
        return [self.status("online")]

    def ready(self) -> bool:
        return True

    def encode(self, rows: list[Row], historical: bool) -> list[tuple[list[Row], Message]]:
        return [([r], Message(self.topic(r.topic), r.payload, 1, r.retain)) for r in rows]

    def on_message(self, topic: str, payload: bytes, props: Any, retain: bool) -> Inbound | None:
        if retain:
            return None  # a retained command would run again at every connect
        base = self.topic("cmd/")
        if not topic.startswith(base) or "/" in topic[len(base):]:
            return None
        return Inbound(command=Command(topic[len(base):], props=props, raw=payload))

    def on_clean_stop(self) -> list[Message]:
        return [self.status("offline")]

    def device_state(self, device: str, connected: bool) -> list[Message]:
        return []


def create(upstream_cfg: Any, gateway_cfg: Any, *, started_at: float) -> Format:
    """The format an upstream's configuration asks for (`upstream_cfg.format`).

    `gateway_cfg` is the whole GatewayConfig (a Sparkplug birth lists every device and tag)."""
    gateway_id = gateway_cfg.gateway.id
    if upstream_cfg.format == "json":
        prefix = upstream_cfg.topic_prefix.replace("{gateway_id}", gateway_id).rstrip("/")
        return JsonFormat(prefix, gateway_id, started_at)
    if upstream_cfg.format == "sparkplug":
        try:
            from gateway import sparkplug  # noqa: PLC0415 - optional until the Sparkplug format lands
        except ImportError as exc:
            raise FormatUnavailable(f"upstream {upstream_cfg.name!r}: format sparkplug is not available in this"
                                    f" build ({exc})") from None
        return sparkplug.SparkplugFormat(upstream_cfg, gateway_cfg, started_at=started_at)
    raise FormatUnavailable(f"upstream {upstream_cfg.name!r}: unknown format {upstream_cfg.format!r}")
