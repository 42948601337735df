"""One upstream MQTT link: drains the buffer to one broker, releasing only what was acknowledged.

What goes on the wire is the link's `gateway.upstream_format.Format` (the JSON topics, or
Sparkplug); this module owns the connection, the cursor, acknowledgements and back-off. Each
configured upstream is one `Upstream` with its own link in the buffer (`Buffer.set_links`), so
one broker being down neither delays nor drops anything for another.

One `gateway.mqttclient.Session` per connection: a fresh paho client with its own network
thread, whose callbacks reach the event loop only, so all state here (and the format's) is
touched by one thread. Rows unacknowledged when a connection drops stay in the buffer and are
sent again on the next one (at least once; `seq` tells duplicates).

Incoming messages (commands, and whatever else a format subscribes to) arrive in a bounded
queue that one task reads, one after another; while it is full, the network thread waits for
room (up to a second, then the message is dropped, counted and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import paho.mqtt.client as mqtt

from gateway import logs
from gateway.backoff import Backoff
from gateway.buffer import Buffer, Row
from gateway.health import Transitions
from gateway.model import iso_ts
from gateway.mqttclient import Inbox, Session, SessionError
from gateway.upstream_format import DEVICE_POLL, Command, Format, JsonFormat, Message

log = logs.get("gateway.upstream")

COMMAND_QUEUE = 100  # commands waiting for the one task that runs them
# (command name, request, MQTT metadata of the request: `client_id` when the sender gave one)
CommandHandler = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any]]]


class UpstreamError(SessionError):
    """The broker could not be reached, refused the connection, or the link failed."""


class Upstream:
    def __init__(self, cfg, buffer: Buffer, *, gateway_id: str, topic_prefix: str, client_id: str,
                 started_at: float, on_connected: Callable[[], None] | None = None,
                 on_command: CommandHandler | None = None, format: Format | None = None,
                 devices: Callable[[], dict[str, bool]] | None = None) -> None:
        self.cfg = cfg  # UpstreamConfig (a BrokerConfig with name, format, topic/inflight settings)
        self.buffer = buffer
        self.name: str = getattr(cfg, "name", None) or "upstream"  # its link in the buffer
        self.gateway_id = gateway_id
        self.prefix = topic_prefix
        self.client_id = client_id
        self.started_at = started_at
        self.on_connected = on_connected
        self.on_command = on_command
        self.format: Format = format if format is not None else JsonFormat(topic_prefix, gateway_id, started_at)
        # JSON sends a row's topic and payload as stored: publish rows directly (the fast path).
        self._passthrough = bool(getattr(self.format, "passthrough", False))
        self.devices = devices  # device name -> connected, polled for Format.device_state
        self.connected = False
        self.last_error: str | None = None
        self.connects = 0
        self.published = 0  # rows acknowledged with success, since start
        self.refused = 0  # rows acknowledged with a failure reason code, since start
        self.response_topics_refused = 0  # command requests whose ResponseTopic was not allowed
        self.commands_dropped = 0  # commands that found the queue full, or still queued when a session ended
        self._stopping = False
        self._final = True
        self._transitions = Transitions("upstream", broker=f"{cfg.host}:{cfg.port}", upstream=self.name)
        self._session: Session | None = None  # while connected
        self._commands = Inbox(COMMAND_QUEUE)
        self._window = min(max(4 * cfg.max_inflight, 1000), 60_000)  # never near paho's 16-bit mids
        # Per connection: rows acknowledged or refused and not yet written back to the buffer.
        self._acked: list[Row] = []
        self._refused: list[Row] = []
        # Rows below this seq were in the buffer when the link connected or its format became
        # ready: `encode` gets them as historical.
        self.historical_below = 0
        # The pump looks again: new rows, a stop, room in the window, the link lost, readiness.
        self._nudge = asyncio.Event()

    # ----- API for the app -----

    def wake(self) -> None:
        """New rows are in the buffer."""
        self._nudge.set()

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    @property
    def is_json(self) -> bool:
        return self.format.name == "json"

    def publish_direct(self, suffix: str, payload: dict[str, Any], *, qos: int = 0, retain: bool = False) -> bool:
        """Live messages that are not buffered (health, command replies), JSON upstreams only.
        False when offline."""
        session = self._session
        if session is None or not self.connected or not self.is_json:
            return False
        info = session.publish(self.topic(suffix), json.dumps(payload, separators=(",", ":")), qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _send(self, session: Session, messages: list[Message]) -> mqtt.MQTTMessageInfo | None:
        info = None
        for m in messages:
            info = session.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
        return info

    def stop(self, *, final: bool = True) -> None:
        """End the link. `final=False` (a reload): the gateway is not going offline, so no
        clean-stop messages (`offline` status); a clean DISCONNECT keeps the broker from sending
        the will either."""
        self._final = final
        self._stopping = True
        self._nudge.set()

    # ----- the connection loop -----

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            commands = tg.create_task(self._serve_commands(), name=f"upstream.{self.name}.commands")
            devices = (tg.create_task(self._watch_devices(), name=f"upstream.{self.name}.devices")
                       if self.devices is not None else None)
            await self._connect_loop()
            commands.cancel()
            if devices is not None:
                devices.cancel()

    async def _connect_loop(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max)
        while not self._stopping:
            connects = self.connects
            soon = False
            try:
                await self._connection()
            except SessionError as exc:
                self.last_error = str(exc)
                self._transitions.bad("connection", str(exc))
                soon = exc.retry_soon  # a nearby broker restarting: back within half a second
            if self._stopping:
                break
            if self.connects != connects:
                backoff.reset()  # it was connected: a link that drops after a week reconnects quickly
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.next(soon=soon)):
                    await self._wait_stop()

    async def _wait_stop(self) -> None:
        while not self._stopping:
            self._nudge.clear()
            await self._nudge.wait()

    async def _connection(self) -> None:
        session = Session(self.cfg, self.client_id, ready_timeout=max(5.0, self.cfg.keepalive),
                          inbox=self._commands, on_acks=self._on_acks, on_dropped=self._command_dropped,
                          on_lost=self._nudge.set)
        client = session.client
        client.max_inflight_messages_set(self.cfg.max_inflight)
        client.max_queued_messages_set(0)
        will = self.format.will()
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        try:
            async with session:
                self._session = session
                self.connected = True
                self.connects += 1
                self.last_error = None
                if not self._transitions.ok("connection"):
                    log.info("upstream.connected", broker=f"{self.cfg.host}:{self.cfg.port}", client_id=self.client_id,
                             upstream=self.name, format=self.format.name)
                self.historical_below = self.buffer.next_seq
                # Subscriptions before the first message: a command (or a Sparkplug rebirth
                # request) answering it is not missed.
                for topic, qos in self.format.subscriptions():
                    client.subscribe(topic, qos=qos)
                self._send(session, self.format.on_connect())
                if self.on_connected:
                    self.on_connected()
                await self._pump(session)
                if self._stopping:
                    await self._settle(session)
                    if self._final:
                        info = self._send(session, self.format.on_clean_stop())
                        if info is not None:
                            await asyncio.get_running_loop().run_in_executor(None, lambda: info.wait_for_publish(2.0))
                elif session.lost.is_set():
                    raise UpstreamError(f"connection lost: {session.lost_reason}")
        finally:
            self.connected = False
            self._session = None
            self._flush()

    def _on_acks(self, acks: list[tuple[Any, Any]]) -> None:
        for item, reason_code in acks:
            rows = item if isinstance(item, list) else (item,)  # a format's message may carry several rows
            if reason_code.is_failure:
                self._refused.extend(rows)
                self._transitions.bad(f"refused:{rows[0].topic}", f"broker refused publish: {reason_code}",
                                      topic=self.topic(rows[0].topic))
            else:
                self._acked.extend(rows)
        # Wake the pump when there is room for a batch, not on every ack.
        session = self._session
        if session is None or len(session.pending) <= self._window // 2 or len(self._acked) >= self.cfg.batch:
            self._nudge.set()

    def _flush(self) -> None:
        if self._acked:
            self.buffer.ack(self._acked, link=self.name)
            self.published += len(self._acked)
            self._acked.clear()
        if self._refused:
            self.buffer.defer(self._refused, self.cfg.refused_retry, link=self.name)
            self.refused += len(self._refused)
            self._refused.clear()

    async def _pump(self, session: Session) -> None:
        inflight = session.pending
        publish = session.publish
        nudge, lost = self._nudge, session.lost
        cursor: dict[int, int] = {}
        last_rewind = 0.0
        rewound = False  # after a rewind, rows still in flight come back from fetch: skip them
        batch = self.cfg.batch
        link = self.name
        fmt = self.format
        passthrough = self._passthrough
        was_ready = True
        while not lost.is_set() and not self._stopping:
            # Clear before looking, so a wake-up that lands while we fetch is not lost.
            nudge.clear()
            self._flush()
            ready = passthrough or fmt.ready()
            if ready and not was_ready:
                self.historical_below = self.buffer.next_seq  # what waited is history now
            was_ready = ready
            free = self._window - len(inflight)
            want = min(free, batch)
            rows: list[Row] = []
            if ready and free >= min(batch, self._window // 4):
                due = self.buffer.next_due(link)
                now = self.buffer.now()  # monotonic: a wall-clock step neither hastens nor delays retries
                if due is not None and due <= now and now - last_rewind >= 1.0:
                    cursor.clear()  # deferred rows are due again: look behind the cursors once
                    last_rewind, rewound = now, True
                rows = self.buffer.fetch(cursor, want, now, link=link)
                if not rows:
                    rewound = False
            sending = {r.seq for item in inflight.values() for r in (item if isinstance(item, list) else (item,))} \
                if rewound and inflight else ()
            if passthrough:
                with session.publishing():
                    for row in rows:
                        cursor[row.priority] = max(cursor.get(row.priority, 0), row.seq)
                        if row.seq in sending:
                            continue
                        info = publish(self.topic(row.topic), row.payload, qos=1, retain=row.retain, item=row)
                        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                            raise UpstreamError(f"publish failed: {mqtt.error_string(info.rc)}")
            elif rows:
                for row in rows:
                    cursor[row.priority] = max(cursor.get(row.priority, 0), row.seq)
                self._publish_encoded(session, [r for r in rows if r.seq not in sending])
            if rows and len(rows) >= want:
                await asyncio.sleep(0)  # more to send: let acks and other tasks in
                continue
            # Idle, not ready, or window full: wait for an ack, new rows, the link dropping,
            # readiness changing, or a deferred row.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25 if self._acked or self._refused else 1.0):
                    await nudge.wait()

    def _publish_encoded(self, session: Session, rows: list[Row]) -> None:
        """Rows through the format, in runs of the same `historical`. A row the format puts in no
        message is acknowledged at once: the format chose not to send it (e.g. a value that did
        not pass its deadband)."""
        mark = self.historical_below
        start = 0
        while start < len(rows):
            historical = rows[start].seq < mark
            end = start
            while end < len(rows) and (rows[end].seq < mark) == historical:
                end += 1
            run = rows[start:end]
            carried: set[int] = set()
            messages = self.format.encode(run, historical)
            with session.publishing():
                for acks, message in messages:
                    info = session.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                                           item=list(acks) if acks else None)
                    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                        raise UpstreamError(f"publish failed: {mqtt.error_string(info.rc)}")
                    carried.update(r.seq for r in acks)
            self._acked.extend(r for r in run if r.seq not in carried)
            start = end

    async def _settle(self, session: Session, timeout: float = 5.0) -> None:
        """On a clean stop, give the broker a moment to acknowledge what is in flight."""
        deadline = time.monotonic() + timeout
        while session.pending and time.monotonic() < deadline:
            self._nudge.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._nudge.wait()
            except TimeoutError:
                break
        self._flush()
        if session.pending:
            log.warning("upstream.unsettled", count=len(session.pending), upstream=self.name,
                        hint="they stay buffered and are sent after restart")

    async def _watch_devices(self) -> None:
        """Tell the format when a device connects or disconnects (Sparkplug DBIRTH/DDEATH)."""
        known: dict[str, bool] = {}
        while True:
            for device, up in (self.devices() if self.devices else {}).items():
                if known.get(device) == up:
                    continue
                known[device] = up
                messages = self.format.device_state(device, up)
                session = self._session
                if messages and session is not None and self.connected:
                    self._send(session, messages)  # offline: the births after the next connect say it
            await asyncio.sleep(DEVICE_POLL)

    # ----- commands -----

    def _command_dropped(self) -> None:
        """Called on the network thread too: a plain counter, read by the health report."""
        self.commands_dropped += 1
        log.warning("upstream.command_dropped", dropped=self.commands_dropped, upstream=self.name,
                    hint=f"more than {COMMAND_QUEUE} commands waiting, or the link ended before they ran")

    async def _serve_commands(self) -> None:
        """The one task that handles incoming messages (commands), in the order they arrived."""
        while True:
            msg, _ = await self._commands.get()
            inbound = self.format.on_message(msg.topic, bytes(msg.payload), getattr(msg, "properties", None),
                                             bool(msg.retain))
            if inbound is None:
                continue
            session = self._session
            if inbound.publish and session is not None:
                self._send(session, inbound.publish)
            if inbound.ready_changed:
                self._nudge.set()
            if inbound.reconnect and session is not None:
                session.end(inbound.reconnect)  # what is in flight stays buffered, sent on the next connection
            command = inbound.command
            if command is None:
                continue
            if command.raw is not None:
                await self._run_command(command.name, command.raw, command.props)
            else:
                await self._run_parsed(command)

    async def _run_parsed(self, command: Command) -> None:
        """A command a format has parsed and will not reply to (its protocol has no reply): run
        it and log the outcome."""
        try:
            if self.on_command is None:
                raise ValueError("commands are not available")
            reply = await self.on_command(command.name, command.request, {**_command_meta(command.props), "upstream": self.name})
        except Exception as exc:  # noqa: BLE001 - a bad command never kills the link
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if reply.get("ok", True):
            log.info("upstream.command_done", upstream=self.name, command=command.name)
        else:
            log.warning("upstream.command_failed", upstream=self.name, command=command.name, error=reply.get("error"))

    async def _run_command(self, name: str, payload: bytes, props) -> None:
        request: dict[str, Any] = {}
        reply: dict[str, Any]
        try:
            if payload.strip():
                request = json.loads(payload)
                if not isinstance(request, dict):
                    raise ValueError("the command payload must be a JSON object")
            if self.on_command is None:
                raise ValueError("commands are not available")
            reply = await self.on_command(name, request, _command_meta(props))
        except Exception as exc:  # noqa: BLE001 - a bad command gets an error reply, never kills the link
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)}
        reply.setdefault("ok", True)
        reply.setdefault("error", None)
        reply.update({"gateway": self.gateway_id, "command": name, "ts": iso_ts(time.time())})
        if "id" in request:
            reply["id"] = request["id"]
        response_topic = self._response_topic(name, props, reply)
        session = self._session
        if session is None:
            return
        body = json.dumps(reply, separators=(",", ":"), default=str)
        session.publish(self.topic(f"cmd/{name}/reply"), body, qos=1)
        if response_topic:
            out = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
            corr = getattr(props, "CorrelationData", None)
            if corr:
                out.CorrelationData = corr
            session.publish(response_topic, body, qos=1, properties=out)

    def _response_topic(self, name: str, props, reply: dict[str, Any]) -> str | None:
        """The request's MQTT 5 ResponseTopic, if the gateway may publish there.

        Anyone allowed to send a command could otherwise have the gateway publish wherever it
        can (a PLC's write topic, its own `alarms/`). Allowed: topics below `{prefix}/cmd/`
        other than a command topic `{prefix}/cmd/{name}` itself (the gateway would run its own
        reply as a command). A refused one is logged, counted, and named in the reply, which
        goes to `cmd/{name}/reply` as always."""
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if not topic:
            return None
        base = self.topic("cmd/")
        below = topic[len(base):] if topic.startswith(base) else ""
        if "/" in below and not any(c in topic for c in "+#\0"):
            return topic
        self.response_topics_refused += 1
        reply["response_topic_refused"] = topic
        log.warning("upstream.response_topic_refused", command=name, response_topic=topic,
                    reply_topic=self.topic(f"cmd/{name}/reply"),
                    hint=f"a response topic must be below {base}, e.g. {base}{name}/reply/<client>")
        return None


def _command_meta(props) -> dict[str, Any]:
    """What the request's MQTT 5 properties say about its sender, for the audit trail. A broker
    passes user properties through unchanged, so `client_id` is what the sender claims (the
    broker's ACL, not this, decides who may send)."""
    meta: dict[str, Any] = {}
    for key, value in (getattr(props, "UserProperty", None) or []) if props is not None else []:
        if key == "client_id":
            meta["client_id"] = value
    return meta
