"""`format: sparkplug`: the gateway as a Sparkplug B 3.0 edge node (see gateway.upstream_format).

Topics are `spBv1.0/{group_id}/{TYPE}/{edge node id}[/{device}]`, the edge node id being the
gateway id. What goes where:

- NBIRTH: `bdSeq`, `Node Control/Rebirth` and, per alarm rule, `Alarms/{rule}/State`,
  `/Severity` and `/Value`. NDEATH (the MQTT will, and sent on a clean stop) carries the same
  `bdSeq`, which grows by one per connection attempt (each CONNECT carries its will; one
  refused before CONNECT skips a number, which hosts do not mind: they match an NDEATH's bdSeq
  to the NBIRTH's) and survives restarts (a file in the state dir).
- DBIRTH per device: every scalar tag (its Sparkplug type from the driver type), and the
  features of each analysis whose input is on the device (`{analysis}/velocity_rms`,
  `{analysis}/bearing/bpfo/amplitude`, ...), each with an alias, its last value and a `Quality`
  property. DDATA: changed metrics by alias only. DDEATH when the device is disconnected, a
  DBIRTH when it is back. A metric not in the last birth (or a value its type cannot hold)
  makes a new DBIRTH first, so a birth always lists what the data uses.
- Tag values come from `values/` rows (report by exception, gateway.report), features from
  `features/` rows, alarm states from `alarms/` rows as NDATA. A values row is stored already
  encoded as DDATA metrics (ValueEncoder, against the configuration's Catalog), so a backlog is
  sent by joining bytes; rows encoded against another catalog are read back and encoded anew. `seq` runs 0..255 over every
  node message after NBIRTH (which is 0).
- Store and forward: rows wait in the buffer while the broker, or the primary host application
  (`primary_host_id`, its retained `spBv1.0/STATE/{id}` JSON `online`), is away. A STATE offline
  makes the node send NDEATH and connect anew, and no birth goes out until the host's STATE says
  online. Then: births, then what waited, as DDATA/NDATA with `is_historical`, in measurement
  order, then live data.
- NCMD `Node Control/Rebirth` = true: every birth again (and the alarm states, through the same
  `rebirth` command as the JSON `cmd/rebirth`). DCMD: each metric is a write of that tag, through
  the same `write` command as `cmd/write`, with its permissions and audit; a String metric named
  `token` carries `commands.token_file`'s secret.

Births and deaths go at QoS 0 (the will at QoS 1), as the specification says. DDATA and NDATA go
at QoS 1: a row leaves the buffer only once the broker has acknowledged the message carrying it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gateway import logs
from gateway import sparkplug_pb as pb
from gateway.buffer import ENCODED, VALUES, Row, row_kind
from gateway.model import split_source
from gateway.statelock import write_durably
from gateway.upstream_format import Command, Inbound, Message

log = logs.get("gateway.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"
# The OPC DA quality codes Sparkplug hosts (Ignition) read from a metric's Quality property.
QUALITY_CODE = {"good": 192, "uncertain": 64, "bad": 0}
QUALITY_NAME = {code: name for name, code in QUALITY_CODE.items()}
GOOD, BAD = QUALITY_CODE["good"], QUALITY_CODE["bad"]
TYPES = {"bool": pb.BOOLEAN, "int16": pb.INT16, "uint16": pb.UINT16, "int32": pb.INT32, "uint32": pb.UINT32,
         "int64": pb.INT64, "uint64": pb.UINT64, "float32": pb.FLOAT, "float64": pb.DOUBLE, "string": pb.STRING}
ALARM_RULE_TYPES = ("threshold", "iso10816", "rate", "stale")  # rule types that raise alarms
COMPANION = ("threshold", "iso10816", "rate")  # ... and have a `.bad_input` companion alarm
MAX_METRICS = 2000  # metrics per DDATA before another message starts
BEARING_PARTS = ("hz", "amplitude", "snr_db")  # the metrics of one bearing defect line
_NO_TS = object()  # no timestamp converted yet (encode's one-entry cache of _ms)


def _ms(ts: float) -> int:
    return int(round(ts * 1000))


def _epoch(iso: str | None) -> float:
    if not iso:
        return time.time()
    return _dt.datetime.fromisoformat(iso).timestamp()


def _infer(value: Any) -> int:
    """The Sparkplug type for a value whose driver did not say."""
    if isinstance(value, bool):
        return pb.BOOLEAN
    if isinstance(value, int):
        return pb.INT64
    if isinstance(value, str):
        return pb.STRING
    return pb.DOUBLE


class _Metric:
    """One metric's birth entry and what was last sent of it."""

    __slots__ = ("name", "alias", "datatype", "value", "ts", "quality")

    def __init__(self, name: str, alias: int, datatype: int) -> None:
        self.name = name
        self.alias = alias
        self.datatype = datatype
        self.value: Any = None
        self.ts: float | None = None
        self.quality = BAD  # no value yet: born null with quality bad, never a good-looking null


class _Set:
    """The metrics of the node or of one device, by name, in birth order."""

    def __init__(self, aliases: "_Aliases") -> None:
        self.by_name: dict[str, _Metric] = {}
        self._aliases = aliases

    def declare(self, name: str, datatype: int) -> _Metric:
        m = self.by_name.get(name)
        if m is None:
            m = self.by_name[name] = _Metric(name, self._aliases.next(), datatype)
        return m


class _Aliases:
    """Aliases are unique over the whole edge node and never reused while the process runs."""

    def __init__(self) -> None:
        self._next = 0

    def next(self) -> int:
        self._next += 1
        return self._next


class Catalog:
    """The metrics the configuration names, with aliases and types, in a fixed order: NBIRTH's
    (`bdSeq`, `Node Control/Rebirth`, the alarms), then each device's tags, then the features of
    each analysis. Every `format: sparkplug` upstream starts from it (and declares more as data
    brings them), and values rows are encoded against it when stored (ValueEncoder); its
    fingerprint tells a row encoded against another configuration."""

    def __init__(self, gateway_cfg: Any) -> None:
        self.aliases = _Aliases()
        self.node = _Set(self.aliases)
        self.node.declare(BDSEQ, pb.INT64)
        self.node.declare(REBIRTH, pb.BOOLEAN).value = False
        for rule in gateway_cfg.rules:
            if rule.type in ALARM_RULE_TYPES:
                self._declare_alarm(rule.name)
                if rule.type in COMPANION and getattr(rule, "bad_input_alarm", True):
                    self._declare_alarm(f"{rule.name}.bad_input")
        self.devices: dict[str, _Set] = {}
        self.tags: dict[str, dict[str, tuple[int, int]]] = {}  # device -> tag -> (alias, datatype)
        for d in gateway_cfg.devices:
            if not d.enabled:
                continue
            metrics = self.devices[d.name] = _Set(self.aliases)
            for tag, report in d.reporting().items():
                m = metrics.declare(tag, TYPES.get(report.type, pb.DOUBLE))
                self.tags.setdefault(d.name, {})[tag] = (m.alias, m.datatype)
        self.analysis_device: dict[str, str] = {}
        for a in gateway_cfg.analyses:
            device = split_source(a.input)[0]
            self.analysis_device[a.name] = device
            metrics = self.devices.setdefault(device, _Set(self.aliases))
            for name, datatype in _feature_metric_names(a):
                metrics.declare(name, datatype)
        entries = [(d, t, a, dt) for d, tags in self.tags.items() for t, (a, dt) in tags.items()]
        self.fingerprint = hashlib.blake2b(repr(entries).encode(), digest_size=8).digest()

    def _declare_alarm(self, rule: str) -> None:
        self.node.declare(f"Alarms/{rule}/State", pb.STRING)
        self.node.declare(f"Alarms/{rule}/Severity", pb.STRING)
        self.node.declare(f"Alarms/{rule}/Value", pb.DOUBLE)


# An encoded values row (after the buffer's NUL): the catalog's fingerprint, the newest
# measurement time in it and its number of metrics; then the metrics, marked `is_historical`.
STORED = struct.Struct("<8sdI")
CATALOG_KEY = "sparkplug.catalog."  # + the fingerprint in hex: a catalog kept in the buffer


class ValueEncoder:
    """Encodes a values row's metrics when it is stored (the ExceptionReporter's `encode`), as
    `SparkplugFormat.encode` sends them, by alias, marked historical: an upstream draining a
    backlog then only joins bytes (and live, clears the mark). A row with a tag the catalog does
    not have, or a value its type cannot carry, is not encoded: it is stored as JSON, and the
    format encodes it with the births it needs. The catalog goes into the buffer (`catalog_key`)
    so that rows stay readable when the configuration, and so the catalog, has changed."""

    def __init__(self, tags: dict[str, dict[str, tuple[int, int]]], fingerprint: bytes) -> None:
        self.tags = tags  # a Catalog's
        self.fingerprint = fingerprint
        self.catalog_key = catalog_key(fingerprint)

    def catalog_json(self) -> str:
        return orjson.dumps(self.tags).decode()

    def keep_in(self, buffer: Any) -> bool:
        """Note the catalog in `buffer` (a Buffer). When the buffer holds no row, older catalogs
        go: no row can need them (else they stay as long as rows may). False: the catalog could
        not be written (the disk is full)."""
        if not buffer.note(self.catalog_key, self.catalog_json()):
            return False
        if buffer.depth == 0:
            gone = buffer.forget(CATALOG_KEY, keep=self.catalog_key)
            if gone:
                log.info("sparkplug.catalogs_forgotten", count=gone, reason="no buffered row was encoded against them")
        return True

    def __call__(self, device: str, rows: list[list[Any]], said: list[bool]) -> bytes | None:
        tags = self.tags.get(device)
        if tags is None:
            return None
        p = pb.Payload()
        add = p.metrics.add
        last_ts, last_ms, newest = _NO_TS, 0, 0.0
        for (tag, value, ts, quality), say in zip(rows, said):
            entry = tags.get(tag)
            if entry is None:
                return None
            alias, datatype = entry
            if not (type(value) is float and datatype not in _NOT_NUMBERS) and not _fits(datatype, value):
                return None  # (floats, most values, skip the call, as in _needs_birth: 0.07 µs/metric)
            if ts != last_ts:
                last_ts, last_ms = ts, _ms(ts)
                if ts > newest:
                    newest = ts
            pm = add(alias=alias, timestamp=last_ms, is_historical=True)
            _set_value(pm, datatype, value)
            if say:
                _say_quality(pm, QUALITY_CODE.get(quality, 0))
        return STORED.pack(self.fingerprint, newest, len(rows)) + p.SerializeToString()


def _say_quality(pm: Any, code: int) -> None:
    """The metric's Quality property (Int32, an OPC DA code)."""
    pm.properties.keys.append("Quality")
    pm.properties.values.add(type=pb.INT32, int_value=code)


def catalog_key(fingerprint: bytes) -> str:
    """Where the buffer keeps the catalog of that fingerprint (Buffer.note)."""
    return CATALOG_KEY + fingerprint.hex()


def _stored_catalog(fingerprint: bytes, noted: Callable[[str], str | None] | None) -> dict[int, tuple[str, int]] | None:
    """alias -> (tag, datatype) of the catalog kept in the buffer (None: it holds none)."""
    text = noted(catalog_key(fingerprint)) if noted is not None else None
    return _by_alias(orjson.loads(text)) if text else None


def _by_alias(tags: dict[str, dict[str, Any]]) -> dict[int, tuple[str, int]]:
    return {alias: (tag, datatype) for of_device in tags.values() for tag, (alias, datatype) in of_device.items()}


def _stored_points(metrics_bytes: bytes, by_alias: dict[int, tuple[str, int]]) -> list[tuple[str, Any, float, str]]:
    """(tag, value, ts, quality) of encoded metrics, by the catalog they were encoded against."""
    points = []
    for pm in pb.Payload.FromString(metrics_bytes).metrics:
        tag, datatype = by_alias[pm.alias]
        code = pm.properties.values[0].int_value if pm.properties.keys else GOOD  # said unless good
        points.append((tag, _get_value(pm, datatype), pm.timestamp / 1000, QUALITY_NAME.get(code, "bad")))
    return points


def read_stored(encoded: bytes, noted: Callable[[str], str | None]) -> dict[str, Any]:
    """An encoded values row as its JSON would be (`buffer dump`); `noted`: Buffer.noted."""
    fingerprint, _, _ = STORED.unpack_from(encoded)
    by_alias = _stored_catalog(fingerprint, noted)
    if by_alias is None:
        return {"error": f"encoded against catalog {fingerprint.hex()}, which the buffer does not hold"}
    return {"values": [list(p) for p in _stored_points(encoded[STORED.size:], by_alias)]}


def _live(historical: bytes) -> bytes:
    """Stored metrics without their `is_historical` mark."""
    p = pb.Payload.FromString(historical)
    for m in p.metrics:
        m.ClearField("is_historical")
    return p.SerializeToString()


class SparkplugFormat:
    name = "sparkplug"
    kinds: frozenset[str] | None = frozenset({VALUES, "features", "alarms"})  # topics' first segments

    def __init__(self, upstream_cfg: Any, gateway_cfg: Any, *, started_at: float) -> None:
        self.group = upstream_cfg.group_id
        self.node = gateway_cfg.gateway.id
        self.host_id: str | None = upstream_cfg.primary_host_id
        self.upstream = upstream_cfg.name
        self._bdseq_file = Path(gateway_cfg.gateway.state_dir) / f"sparkplug-{upstream_cfg.name}.bdseq"
        self.bdseq = self._load_bdseq()  # the one of the current (or last) connection
        self.seq = 0
        self.host_online = self.host_id is None
        self._host_ts = 0  # the newest STATE timestamp seen (an older one is stale)
        self.node_born = False  # NBIRTH sent on this connection
        self.born: set[str] = set()  # devices with a DBIRTH on this connection
        self.device_up: dict[str, bool] = {}
        self._down_since: dict[str, float] = {}  # devices that were up and went down: when we were told
        catalog = Catalog(gateway_cfg)  # this format's own: it declares more as data comes
        self._aliases = catalog.aliases
        self.node_metrics = catalog.node
        self.devices: dict[str, _Set] = catalog.devices
        self._analysis_device = catalog.analysis_device  # analysis -> the device of its input
        self._stored_tags = catalog.tags  # what values rows are encoded against when stored ...
        self._fingerprint = catalog.fingerprint  # ... and its fingerprint
        self._drifted: set[str] = set()  # devices born with a tag of another type than the catalog's
        # source -> (value, measurement time, quality) last reported (the ExceptionReporter's
        # `last`): births carry the newest value, also of values sent as they were stored
        self.reported: Callable[[str], tuple[Any, float, str] | None] | None = None
        # key -> what the buffer keeps under it (Buffer.noted): the catalogs of encoded rows
        self.stored_catalog: Callable[[str], str | None] | None = None
        self._catalogs: dict[bytes, dict[int, tuple[str, int]]] = {}  # fingerprint -> alias -> (tag, datatype)
        self.max_metrics = MAX_METRICS  # a DDATA holding this many goes out (bench_forward varies it)

    def value_encoder(self) -> ValueEncoder:
        """What encodes values rows when they are stored (the ExceptionReporter's `encode`); every
        `format: sparkplug` upstream of one configuration has the same catalog."""
        return ValueEncoder(self._stored_tags, self._fingerprint)

    # ----- topics -----

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.node}"
        return f"{base}/{device}" if device else base

    # ----- bdSeq -----

    def _load_bdseq(self) -> int:
        try:
            return int(self._bdseq_file.read_text().strip()) % 256
        except (OSError, ValueError):
            return 255  # so that the first connection ever is bdSeq 0

    def _store_bdseq(self) -> None:
        try:
            write_durably(self._bdseq_file, str(self.bdseq))
        except OSError as exc:
            log.warning("sparkplug.bdseq_not_saved", path=str(self._bdseq_file), error=str(exc),
                        hint="after a restart the bdSeq may repeat")

    # ----- the Format calls -----

    def will(self) -> Message | None:
        """Before each CONNECT: a new session, a new bdSeq (saved before the broker knows it)."""
        self.bdseq = (self.bdseq + 1) % 256
        self._store_bdseq()
        self.node_born = False
        self.born.clear()
        self.host_online = self.host_id is None
        return self._ndeath(qos=1)

    def subscriptions(self) -> list[tuple[str, int]]:
        subs = [(self.topic("NCMD"), 1), (self.topic("DCMD") + "/+", 1)]
        if self.host_id is not None:
            subs.append((f"{NAMESPACE}/STATE/{self.host_id}", 1))
        return subs

    def on_connect(self) -> list[Message]:
        return self.births() if self.host_online else []

    def ready(self) -> bool:
        return self.host_online and self.node_born

    def on_clean_stop(self) -> list[Message]:
        return [self._ndeath(qos=0)]

    def device_state(self, device: str, connected: bool) -> list[Message]:
        was_up = self.device_up.get(device)
        self.device_up[device] = connected
        if connected:
            self._down_since.pop(device, None)
        elif was_up:  # went down (a device that has not connected yet has no death to tell)
            self._down_since[device] = time.time()
        if not self.node_born:
            return []  # the births after the node's birth say it
        if connected and device not in self.born:
            return [self._dbirth(device)]
        if not connected and device in self.born:
            return [self._ddeath(device)]
        return []

    def on_message(self, topic: str, payload: bytes, props: Any, retain: bool) -> Inbound | None:
        if self.host_id is not None and topic == f"{NAMESPACE}/STATE/{self.host_id}":
            return self._on_state(payload)
        if topic == self.topic("NCMD"):
            return self._on_ncmd(payload)
        base = self.topic("DCMD") + "/"
        if topic.startswith(base):
            return self._on_dcmd(topic[len(base):], payload)
        return None

    # ----- births and deaths -----

    def births(self) -> list[Message]:
        """NBIRTH (seq 0), then a DBIRTH for every device that is up or has sent data."""
        self.seq = 0
        self.node_metrics.by_name[BDSEQ].value = self.bdseq
        out = [self._message("NBIRTH", None, self._birth_metrics(self.node_metrics), qos=0, seq=0)]
        self.node_born = True
        self.born.clear()
        for device in self.devices:
            if self.device_up.get(device):
                out.append(self._dbirth(device))
        return out

    def _dbirth(self, device: str) -> Message:
        self.born.add(device)
        metrics = self.devices[device]
        if self.reported is not None:
            self._newest_reported(device, metrics)
        # Values rows are stored encoded with the catalog's types: with another type in this birth
        # (a value that did not fit made it), the device's rows are read back and encoded afresh.
        by_name = metrics.by_name
        if any(by_name[tag].datatype != datatype for tag, (_, datatype) in self._stored_tags.get(device, {}).items()):
            self._drifted.add(device)
        else:
            self._drifted.discard(device)
        return self._message("DBIRTH", device, self._birth_metrics(metrics), qos=0)

    def _newest_reported(self, device: str, metrics: _Set) -> None:
        """A birth carries each tag's newest value: the one last reported, when it is newer than
        the one last sent (values sent as they were stored do not pass through here)."""
        reported = self.reported
        for m in metrics.by_name.values():
            got = reported(f"{device}.{m.name}")
            if got is not None and (m.ts is None or got[1] > m.ts) and _fits(m.datatype, got[0]):
                m.value, m.ts, m.quality = got[0], got[1], QUALITY_CODE.get(got[2], BAD)

    def _ddeath(self, device: str) -> Message:
        self.born.discard(device)
        return self._message("DDEATH", device, [], qos=0)

    def _ndeath(self, qos: int) -> Message:
        p = pb.Payload(timestamp=_ms(time.time()))
        p.metrics.add(name=BDSEQ, datatype=pb.INT64, long_value=self.bdseq)
        return Message(self.topic("NDEATH"), p.SerializeToString(), qos=qos, retain=False)

    def _birth_metrics(self, metrics: _Set) -> list[Any]:
        out = []
        for m in metrics.by_name.values():
            pm = pb.Metric(name=m.name, alias=m.alias, datatype=m.datatype)
            if m.ts is not None:
                pm.timestamp = _ms(m.ts)
            _set_value(pm, m.datatype, m.value)
            if m.name not in (BDSEQ, REBIRTH):
                _say_quality(pm, m.quality)
            out.append(pm)
        return out

    def _message(self, kind: str, device: str | None, metrics: list[Any], qos: int, seq: int | None = None,
                 body: list[Any] | None = None) -> Message:
        """`body`: metrics already encoded (DDATA/NDATA; bytes or memoryviews), after `metrics`."""
        if seq is None:
            self.seq = (self.seq + 1) % 256
            seq = self.seq
        p = pb.Payload(timestamp=_ms(time.time()), seq=seq)
        p.metrics.extend(metrics)
        head = p.SerializeToString()
        payload = b"".join([head, *body]) if body else head  # one copy of a backlog's bytes, not two
        return Message(self.topic(kind, device), payload, qos=qos, retain=False)

    # ----- data -----

    def encode(self, rows: list[Row], historical: bool) -> list[tuple[list[Row], Message]]:
        """Rows -> DDATA per device (and NDATA for alarms), a run of rows of one device in one
        message; births first wherever a metric is new to its birth. A values row stored with
        its metrics encoded (ValueEncoder) is joined as it is, when it was encoded against
        this format's catalog and the device's birth has the catalog's types."""
        out: list[tuple[list[Row], Message]] = []
        # device (None: node) -> [rows, encoded metrics, how many]
        groups: dict[str | None, list] = {}
        max_metrics = self.max_metrics

        def flush(device: str | None) -> None:
            got = groups.pop(device, None)
            if got is None:
                return
            kind = "NDATA" if device is None else "DDATA"
            out.append((got[0], self._message(kind, device, [], qos=1, body=got[1])))

        def birth_if_needed(device: str | None, metrics: _Set, points: list[tuple]) -> None:
            if self._needs_birth(device, metrics, points):
                flush(device)
                for message in self._rebirth_for(device):
                    out.append(([], message))

        def add(device: str | None, row: Row, chunk: bytes, count: int) -> None:
            """A row's encoded metrics into its device's message (protobuf reads a repeated field
            split across a message as one list), which goes out once it holds `max_metrics`."""
            entry = groups.get(device)
            if entry is None:
                entry = groups[device] = [[], [], 0]
            entry[0].append(row)
            entry[1].append(chunk)
            entry[2] += count
            if entry[2] >= max_metrics:
                flush(device)

        def back(device: str | None, newest: float) -> None:
            down_since = self._down_since.get(device)
            if down_since is not None and newest > down_since:
                del self._down_since[device]  # measured after it went: it is back (device_state says so later)

        for row in rows:
            kind = row_kind(row.topic)
            payload = row.payload
            if kind == VALUES:
                device = row.topic.split("/", 1)[-1]
                if payload[:1] == ENCODED:
                    fingerprint, newest, count = STORED.unpack_from(payload, 1)
                    metrics_bytes = memoryview(payload)[1 + STORED.size:]  # not copied before the join
                    if fingerprint == self._fingerprint and device not in self._drifted:
                        back(device, newest)
                        if device not in self.born:
                            birth_if_needed(device, self.devices[device], [])
                        add(device, row, metrics_bytes if historical else _live(metrics_bytes), count)
                        continue
                    points = self._read_stored(fingerprint, metrics_bytes, row)
                    if points is None:
                        continue
                else:
                    body = orjson.loads(payload)
                    points = [(tag, value, ts, quality) for tag, value, ts, quality in body.get("values", ())]
            elif kind == "features":
                body = orjson.loads(payload)
                analysis = body.get("analysis") or row.topic.split("/", 1)[-1]
                device = self._analysis_device.get(analysis) or split_source(body.get("input", ""))[0]
                points = _feature_points(analysis, body)
            elif kind == "alarms":
                device = None
                points = _alarm_points(orjson.loads(payload))
            else:
                continue  # a kind this format does not take (never fetched for it)
            if points:
                back(device, max(p[2] for p in points))
            metrics = self.node_metrics if device is None else self.devices.setdefault(device, _Set(self._aliases))
            birth_if_needed(device, metrics, points)
            p = pb.Payload()
            add_metric, by_name = p.metrics.add, metrics.by_name
            last_ts, last_ms = _NO_TS, 0  # the points of a row mostly share one timestamp
            for name, value, ts, quality in points:
                if ts != last_ts:
                    last_ts, last_ms = ts, _ms(ts)
                self._data_metric(add_metric, by_name[name], value, ts, last_ms, quality, historical)
            add(device, row, p.SerializeToString(), len(points))
        for device in list(groups):
            flush(device)
            if device in self._down_since and device in self.born:
                out.append(([], self._ddeath(device)))  # late data of a device that is down
        return out

    def _read_stored(self, fingerprint: bytes, metrics_bytes: bytes, row: Row) -> list[tuple] | None:
        """The points of an encoded values row that cannot be sent as it is (encoded against
        another catalog, or its device's birth has other types now), read back with the catalog
        it was encoded against. None: that catalog is not to be found (logged; the row is lost)."""
        by_alias = self._catalogs.get(fingerprint)
        if by_alias is None:
            if fingerprint == self._fingerprint:
                by_alias = _by_alias(self._stored_tags)
            else:
                by_alias = _stored_catalog(fingerprint, self.stored_catalog)
            if by_alias is None:
                log.error("sparkplug.stored_row_unreadable", upstream=self.upstream, seq=row.seq, topic=row.topic,
                          reason=f"no catalog {fingerprint.hex()} in the buffer")
                return None
            self._catalogs[fingerprint] = by_alias
        return _stored_points(metrics_bytes, by_alias)

    def _needs_birth(self, device: str | None, metrics: _Set, points: list[tuple]) -> bool:
        """Declare what is new; True when a (re)birth must go before these points."""
        fresh = device is not None and device not in self.born
        by_name = metrics.by_name
        for name, value, _, _ in points:
            m = by_name.get(name)
            if m is None:
                metrics.declare(name, _infer(value))
                fresh = True
            elif type(value) is float and m.datatype not in _NOT_NUMBERS:
                continue  # fits (the common case, without the call)
            elif not _fits(m.datatype, value):
                m.datatype = _infer(value)  # e.g. an OPC UA string tag: its type as the values say
                fresh = True
        return fresh

    def _rebirth_for(self, device: str | None) -> list[Message]:
        if device is None:
            log.info("sparkplug.rebirth", upstream=self.upstream, reason="a node metric new to the NBIRTH")
            return self.births()
        return [self._dbirth(device)]

    def _data_metric(self, add: Any, m: _Metric, value: Any, ts: float, ms: int, quality: str,
                     historical: bool) -> None:
        """A data metric, added with `add` (its Payload's `metrics.add`); `ms` is `_ms(ts)`."""
        pm = add(alias=m.alias, timestamp=ms)
        if historical:
            pm.is_historical = True
        _set_value(pm, m.datatype, value)
        code = QUALITY_CODE.get(quality, 0)
        if code != GOOD or m.quality != GOOD:  # good is the default: said only when it becomes good
            _say_quality(pm, code)
        m.value, m.ts, m.quality = value, ts, code

    # ----- incoming -----

    def _on_state(self, payload: bytes) -> Inbound | None:
        try:
            state = json.loads(payload) if payload else {"online": False}
            online = bool(state["online"])
            ts = int(state.get("timestamp") or 0)
        except (ValueError, KeyError, TypeError):
            log.warning("sparkplug.bad_state", upstream=self.upstream, payload=payload[:200].decode(errors="replace"))
            return None
        if ts and ts < self._host_ts:
            return None  # older than one already seen: stale
        self._host_ts = max(self._host_ts, ts)
        if online == self.host_online:
            return None
        self.host_online = online
        log.info("sparkplug.primary_host", upstream=self.upstream, host=self.host_id, online=online)
        if not online:
            # As the specification asks: NDEATH, a new connection, no birth before the host is
            # back. The data waits in the buffer and goes as historical once it is.
            return Inbound(publish=[self._ndeath(qos=1)], ready_changed=True,
                           reconnect=f"primary host {self.host_id} is offline")
        return Inbound(publish=self.births(), ready_changed=True)

    def _on_ncmd(self, payload: bytes) -> Inbound | None:
        decoded = _decode(payload, self.node_metrics, self.upstream, "NCMD")
        if decoded is None:
            return None
        metrics, _ = decoded
        if any(name == REBIRTH and value is True for name, value in metrics):
            log.info("sparkplug.rebirth", upstream=self.upstream, reason="NCMD Node Control/Rebirth")
            if not self.host_online:
                return None  # the births follow the primary host's STATE online
            return Inbound(publish=self.births(), command=Command("rebirth"))
        log.warning("sparkplug.ncmd_refused", upstream=self.upstream, metrics=[n for n, _ in metrics],
                    hint=f"the only node command is {REBIRTH} = true")
        return None

    def _on_dcmd(self, device: str, payload: bytes) -> Inbound | None:
        metrics = self.devices.get(device)
        if metrics is None:
            log.warning("sparkplug.dcmd_refused", upstream=self.upstream, device=device, reason="unknown device")
            return None
        decoded = _decode(payload, metrics, self.upstream, "DCMD")
        if decoded is None:
            return None
        decoded, stamp = decoded
        token = next((v for n, v in decoded if n == "token"), None)
        writes = [{"tag": n, "value": v} for n, v in decoded if n != "token"]
        if not writes:
            return None
        request: dict[str, Any] = {"id": f"spb-{device}-{stamp}", "device": device, "writes": writes}
        if token is not None:
            request["token"] = token
        return Inbound(command=Command("write", request))


def _decode(payload: bytes, metrics: _Set, upstream: str, what: str) -> tuple[list[tuple[str, Any]], str] | None:
    """(name, value) of each metric of an NCMD/DCMD, aliases resolved by the last birth, and the
    payload's `{timestamp}-{seq}-{digest}` (what tells a redelivery from a new command)."""
    try:
        p = pb.Payload.FromString(payload)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
        log.warning(f"sparkplug.{what.lower()}_bad_payload", upstream=upstream, error=str(exc))
        return None
    by_alias = {m.alias: m for m in metrics.by_name.values()}
    out = []
    for pm in p.metrics:
        name = pm.name
        known = metrics.by_name.get(name) if name else by_alias.get(pm.alias)
        if not name:
            if known is None:
                log.warning(f"sparkplug.{what.lower()}_unknown_alias", upstream=upstream, alias=pm.alias)
                continue
            name = known.name
        datatype = pm.datatype or (known.datatype if known else 0)
        out.append((name, _get_value(pm, datatype)))
    # With a digest of the payload: two commands in one millisecond (pysparkplug and many hosts
    # send no seq in NCMD/DCMD) are two commands; only the very same message is a redelivery.
    digest = hashlib.blake2b(payload, digest_size=6).hexdigest()
    stamp = f"{p.timestamp}-{p.seq}-{digest}" if p.HasField("timestamp") else str(time.time_ns())
    return out, stamp


def _set_value(pm: Any, datatype: int, value: Any) -> None:
    if type(value) is float and (datatype == pb.DOUBLE or datatype == pb.FLOAT):
        wire = value  # what wire_value makes of it, without its checks (most values are these)
    else:
        wire = pb.wire_value(datatype, value)
    if wire is None:
        pm.is_null = True
    else:
        setattr(pm, pb.VALUE_FIELD[datatype], wire)


_NOT_NUMBERS = (pb.BOOLEAN, pb.STRING, pb.TEXT)  # the types a number does not fit


def _fits(datatype: int, value: Any) -> bool:
    """Can a metric of `datatype` carry this kind of value (a number out of range is sent null)?"""
    if value is None:
        return True
    if isinstance(value, bool):
        return datatype == pb.BOOLEAN
    if isinstance(value, str):
        return datatype in (pb.STRING, pb.TEXT)
    return datatype not in _NOT_NUMBERS


def _get_value(pm: Any, datatype: int) -> Any:
    if pm.is_null:
        return None
    field = next((f for f in ("boolean_value", "string_value", "double_value", "float_value", "long_value",
                              "int_value") if pm.HasField(f)), None)
    if field is None:
        return None
    value = getattr(pm, field)
    if field == "int_value" and datatype in (pb.INT8, pb.INT16, pb.INT32):
        bits = {pb.INT8: 8, pb.INT16: 16, pb.INT32: 32}[datatype]
        return value - (1 << bits) if value >= 1 << (bits - 1) else value
    if field == "long_value" and datatype == pb.INT64:
        return value - (1 << 64) if value >= 1 << 63 else value
    return value


def _feature_metric_names(analysis: Any) -> list[tuple[str, int]]:
    """The metrics an analysis gives its input's device, from its configuration alone."""
    from gateway.analytics import feature_names  # noqa: PLC0415 - no NumPy: names only

    out: list[tuple[str, int]] = []
    prefix = f"{analysis.name}."
    for qualified in feature_names(analysis):
        name = qualified[len(prefix):]
        if not name.startswith("bearing."):
            out.append((f"{analysis.name}/{name}", pb.DOUBLE))
    if "envelope" in analysis.features and analysis.bearing is not None:
        out.append((f"{analysis.name}/bearing/shaft_hz", pb.DOUBLE))
        for d in analysis.bearing.orders:
            for part in BEARING_PARTS:
                out.append((f"{analysis.name}/bearing/{d}/{part}", pb.DOUBLE))
        out.append((f"{analysis.name}/bearing/dominant", pb.STRING))
    return out


_FEATURE_META = frozenset({"gateway", "seq", "ts", "analysis", "input", "unit", "quality", "samples", "sample_rate",
                           "window_start", "duration_s", "spectrum", "bearing"})


def _feature_points(analysis: str, body: dict[str, Any]) -> list[tuple[str, Any, float, str]]:
    ts = _epoch(body.get("window_start") or body.get("ts"))
    quality = body.get("quality") or "good"
    points = [(f"{analysis}/{k}", v, ts, quality) for k, v in body.items()
              if k not in _FEATURE_META and (v is None or isinstance(v, (int, float, str)))]
    bearing = body.get("bearing")
    if isinstance(bearing, dict):
        for d, line in bearing.items():
            if isinstance(line, dict):
                for part in BEARING_PARTS:
                    if part in line:
                        points.append((f"{analysis}/bearing/{d}/{part}", line[part], ts, quality))
            elif d in ("shaft_hz", "dominant"):
                points.append((f"{analysis}/bearing/{d}", line, ts, quality))
    return points


def _alarm_points(body: dict[str, Any]) -> list[tuple[str, Any, float, str]]:
    rule = body.get("rule", "?")
    ts = _epoch(body.get("ts"))
    value = body.get("value")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        value = None
    return [(f"Alarms/{rule}/State", body.get("state"), ts, "good"),
            (f"Alarms/{rule}/Severity", body.get("severity"), ts, "good"),
            (f"Alarms/{rule}/Value", value, ts, "good")]
