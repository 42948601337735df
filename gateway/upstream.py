"""The upstream MQTT link: drains the buffer to the broker, deleting only what was acknowledged.

paho-mqtt 2.x runs its network loop in a thread of ours (one per connection); every callback is handed
to the asyncio loop with `call_soon_threadsafe`, so all state here is touched by one thread.
Because a callback is only processed after the current loop step, a PUBACK can never be
handled before `publish()` returned and its message id was registered.

A fresh paho client is made for each connection: rows unacknowledged when a connection drops
stay in the buffer and are sent again on the next one (at least once; `seq` tells duplicates).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import paho.mqtt.client as mqtt

from gateway import __version__, logs
from gateway.buffer import Buffer, Row
from gateway.health import Transitions
from gateway.model import iso_ts
from gateway.mqttclient import connect_kwargs, make_client

log = logs.get("gateway.upstream")

CommandHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class UpstreamError(Exception):
    """The broker could not be reached or refused the connection."""


def describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate was not accepted: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: handshake failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class Upstream:
    def __init__(self, cfg, buffer: Buffer, *, gateway_id: str, topic_prefix: str, client_id: str,
                 started_at: float, on_connected: Callable[[], None] | None = None,
                 on_command: CommandHandler | None = None) -> None:
        self.cfg = cfg  # UpstreamConfig (a BrokerConfig with topic/inflight settings)
        self.buffer = buffer
        self.gateway_id = gateway_id
        self.prefix = topic_prefix
        self.client_id = client_id
        self.started_at = started_at
        self.on_connected = on_connected
        self.on_command = on_command
        self.connected = False
        self.last_error: str | None = None
        self.connects = 0
        self.published = 0  # acknowledged with success, since start
        self.refused = 0  # acknowledged with a failure reason code, since start
        self.response_topics_refused = 0  # command requests whose ResponseTopic was not allowed
        self._wake = asyncio.Event()
        self._stopping = False
        self._final = True
        self._transitions = Transitions("upstream", broker=f"{cfg.host}:{cfg.port}")
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window = min(max(4 * cfg.max_inflight, 1000), 60_000)  # never near paho's 16-bit mids

    # ----- API for the app -----

    def wake(self) -> None:
        """New rows are in the buffer."""
        self._wake.set()

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    def publish_direct(self, suffix: str, payload: dict[str, Any], *, qos: int = 0, retain: bool = False) -> bool:
        """Live messages that are not buffered (health, command replies). False when offline."""
        client = self._client
        if client is None or not self.connected:
            return False
        info = client.publish(self.topic(suffix), json.dumps(payload, separators=(",", ":")), qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"gateway": self.gateway_id, "state": state, "version": __version__,
                           "started_at": iso_ts(self.started_at), "ts": iso_ts(time.time())}).encode()

    def stop(self, *, final: bool = True) -> None:
        """End the link. `final=False` (a reload): the gateway is not going offline, so no
        `offline` status; a clean DISCONNECT keeps the broker from sending the will either."""
        self._final = final
        self._stopping = True
        self._wake.set()

    # ----- the connection loop -----

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        attempt = 0
        while not self._stopping:
            try:
                await self._session()
                attempt = 0
            except UpstreamError as exc:
                self.last_error = str(exc)
                self._transitions.bad("connection", str(exc))
            if self._stopping:
                break
            attempt += 1
            delay = min(self.cfg.reconnect_max, self.cfg.reconnect_min * 2 ** min(attempt, 20))
            delay = random.uniform(delay / 2, delay)
            try:
                await asyncio.wait_for(self._wait_stop(), timeout=delay)
            except TimeoutError:
                pass

    async def _wait_stop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        connected: asyncio.Future = loop.create_future()
        lost: asyncio.Future = loop.create_future()
        inflight: dict[int, Row] = {}
        acked: list[Row] = []
        refused: list[Row] = []
        space = asyncio.Event()

        def settle(fut: asyncio.Future, value: Any) -> None:
            if not fut.done():
                fut.set_result(value)

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            loop.call_soon_threadsafe(settle, connected, reason_code)

        def on_disconnect(client, userdata, flags, reason_code, properties) -> None:
            loop.call_soon_threadsafe(settle, lost, reason_code)
            loop.call_soon_threadsafe(settle, connected, reason_code)

        # PUBACKs arrive on the network thread. They are queued there and handed to the loop in
        # bursts: one wake-up of the loop per burst rather than one per acknowledgement.
        arrived: collections.deque = collections.deque()
        scheduled = [False]

        def take_acks() -> None:
            scheduled[0] = False
            while arrived:
                mid, reason_code = arrived.popleft()
                row = inflight.pop(mid, None)
                if row is None:
                    continue
                if reason_code.is_failure:
                    refused.append(row)
                    self._transitions.bad(f"refused:{row.topic}", f"broker refused publish: {reason_code}",
                                          topic=self.topic(row.topic))
                else:
                    acked.append(row)
            # Wake the pump when there is room for a batch, not on every ack.
            if len(inflight) <= self._window // 2 or len(acked) >= self.cfg.batch:
                space.set()

        def on_publish(client, userdata, mid, reason_code, properties) -> None:
            arrived.append((mid, reason_code))
            if not scheduled[0]:
                scheduled[0] = True
                loop.call_soon_threadsafe(take_acks)

        def on_message(client, userdata, msg) -> None:
            if msg.retain:
                return  # a retained command would run again at every connect
            props = getattr(msg, "properties", None)
            loop.call_soon_threadsafe(self._command, msg.topic, bytes(msg.payload), props)

        client = make_client(self.cfg, self.client_id)
        client.max_inflight_messages_set(self.cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.will_set(self.topic("status"), self._status_payload("offline"), qos=1, retain=True)
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = on_message
        # Only the network thread may write to the socket. Without paho's own thread, publish()
        # would write directly from the calling thread, interleaving bytes with the network
        # thread's writes (a corrupt stream: the broker drops the connection). With a write
        # callback registered, publish() queues the packet and wakes the network thread instead.
        client.on_socket_register_write = lambda client, userdata, sock: None
        try:
            await loop.run_in_executor(None, lambda: client.connect(**connect_kwargs(self.cfg)))
        except Exception as exc:  # noqa: BLE001 - every connect failure is reported the same way
            raise UpstreamError(describe_connect_error(exc)) from None
        halt = threading.Event()
        network = threading.Thread(target=self._network, args=(client, halt, loop, lost),
                                   name="upstream.network", daemon=True)
        network.start()
        try:
            try:
                rc = await asyncio.wait_for(asyncio.shield(connected), timeout=max(5.0, self.cfg.keepalive))
            except TimeoutError:
                raise UpstreamError("no CONNACK from the broker") from None
            if rc.is_failure:
                raise UpstreamError(f"broker refused the connection: {rc}")
            self._client = client
            self.connected = True
            self.connects += 1
            self.last_error = None
            if not self._transitions.ok("connection"):
                log.info("upstream.connected", broker=f"{self.cfg.host}:{self.cfg.port}", client_id=self.client_id)
            client.publish(self.topic("status"), self._status_payload("online"), qos=1, retain=True)
            client.subscribe(self.topic("cmd/+"), qos=1)
            if self.on_connected:
                self.on_connected()
            await self._pump(client, inflight, acked, refused, space, lost)
            if self._stopping:
                await self._settle(client, inflight, acked, refused, space)
                if self._final:
                    info = client.publish(self.topic("status"), self._status_payload("offline"), qos=1, retain=True)
                    await loop.run_in_executor(None, lambda: info.wait_for_publish(2.0))
                client.disconnect()
                # The network thread writes what is queued (command replies, DISCONNECT) and
                # ends by itself when the broker closes the link.
                await loop.run_in_executor(None, network.join, 2.0)
            elif lost.done():
                raise UpstreamError(f"connection lost: {lost.result()}")
        finally:
            self.connected = False
            self._client = None
            self._flush(acked, refused)
            halt.set()
            await loop.run_in_executor(None, network.join, 5.0)
            client.disconnect()  # no-op when already gone; never leave a socket behind

    @staticmethod
    def _network(client: mqtt.Client, halt: threading.Event, loop: asyncio.AbstractEventLoop,
                 lost: asyncio.Future) -> None:
        """paho's network loop for one connection, without paho's own reconnect: a lost link
        ends the session and the outer loop makes a fresh client, so no stale socket lingers."""
        rc = mqtt.MQTT_ERR_SUCCESS
        while not halt.is_set() and rc == mqtt.MQTT_ERR_SUCCESS:
            rc = client.loop(timeout=0.2)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            loop.call_soon_threadsafe(lambda: lost.done() or lost.set_result(mqtt.error_string(rc)))

    def _flush(self, acked: list[Row], refused: list[Row]) -> None:
        if acked:
            self.buffer.ack(acked)
            self.published += len(acked)
            acked.clear()
        if refused:
            self.buffer.defer(refused, self.cfg.refused_retry)
            self.refused += len(refused)
            refused.clear()

    async def _pump(self, client: mqtt.Client, inflight: dict[int, Row], acked: list[Row], refused: list[Row],
                    space: asyncio.Event, lost: asyncio.Future) -> None:
        cursor: dict[int, int] = {}
        last_rewind = 0.0
        rewound = False  # after a rewind, rows still in flight come back from fetch: skip them
        batch = self.cfg.batch
        while not lost.done() and not self._stopping:
            # Clear before looking, so a wake-up that lands while we fetch is not lost.
            self._wake.clear()
            space.clear()
            self._flush(acked, refused)
            free = self._window - len(inflight)
            want = min(free, batch)
            rows: list[Row] = []
            if free >= min(batch, self._window // 4):
                due = self.buffer.next_due()
                now = self.buffer.now()  # monotonic: a wall-clock step neither hastens nor delays retries
                if due is not None and due <= now and now - last_rewind >= 1.0:
                    cursor.clear()  # deferred rows are due again: look behind the cursors once
                    last_rewind, rewound = now, True
                rows = self.buffer.fetch(cursor, want, now)
                if not rows:
                    rewound = False
            sending = {r.seq for r in inflight.values()} if rewound and inflight else ()
            for row in rows:
                cursor[row.priority] = max(cursor.get(row.priority, 0), row.seq)
                if row.seq in sending:
                    continue
                info = client.publish(self.topic(row.topic), row.payload, qos=1, retain=row.retain)
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    raise UpstreamError(f"publish failed: {mqtt.error_string(info.rc)}")
                inflight[info.mid] = row
            if rows and len(rows) >= want:
                await asyncio.sleep(0)  # more to send: let acks and other tasks in
                continue
            # Idle or window full: wait for an ack, new rows, the link dropping, or a deferred row.
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(space.wait())]
            try:
                await asyncio.wait([*waiters, lost], timeout=0.25 if acked or refused else 1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    async def _settle(self, client, inflight, acked, refused, space, timeout: float = 5.0) -> None:
        """On a clean stop, give the broker a moment to acknowledge what is in flight."""
        deadline = time.monotonic() + timeout
        while inflight and time.monotonic() < deadline:
            space.clear()
            try:
                await asyncio.wait_for(space.wait(), timeout=deadline - time.monotonic())
            except TimeoutError:
                break
        self._flush(acked, refused)
        if inflight:
            log.warning("upstream.unsettled", count=len(inflight), hint="they stay buffered and are sent after restart")

    # ----- commands -----

    def _command(self, topic: str, payload: bytes, props) -> None:
        name = topic.rsplit("/", 1)[-1]
        asyncio.get_running_loop().create_task(self._run_command(name, payload, props), name=f"upstream.cmd.{name}")

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
            reply = await self.on_command(name, request)
        except Exception as exc:  # noqa: BLE001 - a bad command gets an error reply, never kills the link
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)}
        reply.setdefault("ok", True)
        reply.setdefault("error", None)
        reply.update({"gateway": self.gateway_id, "command": name, "ts": iso_ts(time.time())})
        if "id" in request:
            reply["id"] = request["id"]
        response_topic = self._response_topic(name, props, reply)
        client = self._client
        if client is None:
            return
        body = json.dumps(reply, separators=(",", ":"), default=str)
        client.publish(self.topic(f"cmd/{name}/reply"), body, qos=1)
        if response_topic:
            out = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
            corr = getattr(props, "CorrelationData", None)
            if corr:
                out.CorrelationData = corr
            client.publish(response_topic, body, qos=1, properties=out)

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
