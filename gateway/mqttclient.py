"""paho-mqtt 2.x in one place: a BrokerConfig made into a client, and one broker session bridged
into asyncio (`Session`), used by the upstream link and the MQTT input driver."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from gateway.backoff import refused_nearby
from gateway.schema import BrokerConfig


def make_client(cfg: BrokerConfig, client_id: str, *, clean: bool = True) -> mqtt.Client:
    protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean}
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        **kwargs,
    )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.resolved_password())
    if cfg.tls.enabled:
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
        if cfg.tls.cert_file:
            ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file) if cfg.tls.key_file else None)
        if cfg.tls.insecure_skip_verify:
            ctx.check_hostname = False
        client.tls_set_context(ctx)
    client.reconnect_delay_set(min_delay=max(1, int(cfg.reconnect_min)), max_delay=max(1, int(cfg.reconnect_max)))
    return client


def connect_kwargs(cfg: BrokerConfig) -> dict:
    kwargs = {"host": cfg.host, "port": cfg.port, "keepalive": max(1, int(cfg.keepalive))}
    if cfg.protocol == "5":
        kwargs["clean_start"] = True
    return kwargs


class SessionError(Exception):
    """The broker could not be reached, refused the connection or a subscription, or the link dropped.

    `retry_soon`: the TCP connection was refused by a broker on this host or the LAN, which is
    restarting; the owner retries within `gateway.backoff.SOON` instead of backing off."""

    def __init__(self, message: str, *, retry_soon: bool = False) -> None:
        super().__init__(message)
        self.retry_soon = retry_soon


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


class Inbox(asyncio.Queue):
    """A bounded queue of (paho message, time.time() on arrival), filled by a network thread.

    The thread takes a slot of `room` before it hands a message to the loop, and every `get`
    gives one back: the thread waits for room without a task on the loop per message."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.room = threading.Semaphore(maxsize)

    def _get(self) -> Any:
        item = super()._get()
        self.room.release()
        return item


class Session:
    """One connection to a broker, bridged into asyncio: a fresh paho client and its network thread.

    `async with Session(...) as session:` connects, waits for CONNACK (and the SUBACK of
    `subscriptions`), and on the way out disconnects, ends the network thread, forgets the
    pending message ids and drops, counting them, the messages left in the inbox. A lost link
    ends no session by itself: it sets `lost` (with `lost_reason`) and calls `on_lost`, and the
    owner decides.

    Threads. paho calls the `on_*` methods on the network thread; they hand everything to the
    event loop with `call_soon_threadsafe`, except messages: these are put into the bounded
    `inbox`, and the network thread waits for room (up to `put_timeout`, then the message is
    dropped and `on_dropped` called), so a slow consumer slows the broker down (TCP
    back-pressure) instead of growing memory.

    Only the network thread writes to the socket. paho's `publish()` from another thread would
    write directly, interleaving bytes with the network thread's writes (a corrupt stream: the
    broker drops the connection); with a write callback registered it queues the packet and wakes
    the network thread instead. The thread is ours, not paho's `loop_start()`: paho's own
    reconnect would keep a stale socket; a lost link ends our loop, and the owner makes a fresh
    Session.

    Publish acknowledgements. `publish(..., item=x)` registers the message id with `x`; PUBACKs
    are handed to the loop in bursts (one wake-up per step of paho's loop, for every PUBACK read
    in it) and `on_acks` gets `[(x, reason_code), ...]`. The burst runs in a later loop step, so an ack that paho reports
    before `publish()` returned still finds its id registered.
    """

    def __init__(self, cfg: BrokerConfig, client_id: str, *, ready_timeout: float,
                 subscriptions: list[tuple[str, int]] | None = None, inbox: Inbox | None = None,
                 put_timeout: float = 1.0, on_acks: Callable[[list[tuple[Any, Any]]], None] | None = None,
                 on_dropped: Callable[[], None] | None = None, on_lost: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.client = make_client(cfg, client_id)
        self.pending: dict[int, Any] = {}  # message id -> item, until its PUBACK
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._ready_timeout = ready_timeout
        self._subscriptions = subscriptions or []
        self._inbox, self._put_timeout = inbox, put_timeout
        self._on_acks, self._on_dropped, self._on_lost = on_acks, on_dropped, on_lost  # see the class doc
        self._closing = False
        self._arrived: collections.deque = collections.deque()  # (mid, reason code), filled by the network thread
        self._acks_scheduled = False
        self._halt = threading.Event()
        self._network: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        client = self.client
        client.on_connect = self.on_connect
        client.on_subscribe = self.on_subscribe
        client.on_disconnect = self.on_disconnect
        client.on_publish = self.on_publish
        client.on_message = self.on_message
        client.on_socket_register_write = lambda client, userdata, sock: None

    async def __aenter__(self) -> "Session":
        loop = self._loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        broker = f"{self.cfg.host}:{self.cfg.port}"
        try:
            await loop.run_in_executor(None, lambda: self.client.connect(**connect_kwargs(self.cfg)))
        except Exception as exc:  # noqa: BLE001 - every connect failure is reported the same way
            # a name is resolved again to tell; only on a refusal, and in a thread
            soon = isinstance(exc, ConnectionRefusedError) and await loop.run_in_executor(
                None, refused_nearby, exc, self.cfg.host)
            raise SessionError(f"connect to {broker} failed: {describe_connect_error(exc)}", retry_soon=soon) from None
        self._network = threading.Thread(target=self._run_network, name=f"mqtt.network.{broker}", daemon=True)
        self._network.start()
        try:
            async with asyncio.timeout(self._ready_timeout):
                await self._ready
        except BaseException as exc:
            await self._close()
            if isinstance(exc, TimeoutError):
                raise SessionError(f"no {'CONNACK/SUBACK' if self._subscriptions else 'CONNACK'} "
                                   "from the broker") from None
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing = True
        self.pending.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()  # nobody waits for it any more
        self._drop_inbox()  # also frees a network thread waiting for room
        self.client.disconnect()  # queued: the network thread sends it and ends when the socket closes
        if self._network is not None:
            await loop.run_in_executor(None, self._network.join, 2.0)
            self._halt.set()
            await loop.run_in_executor(None, self._network.join, 5.0)
        self._drop_inbox()  # a message the network thread was still putting

    def end(self, reason: str) -> None:
        """The owner ends the connection as if it were lost (it then leaves the context)."""
        self._set_lost(reason)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False,
                properties: mqtt.Properties | None = None, item: Any = None) -> mqtt.MQTTMessageInfo:
        """Queue a message for the network thread; with `item`, its PUBACK goes to `on_acks`."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if item is not None and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.pending[info.mid] = item
        return info

    def publishing(self) -> contextlib.AbstractContextManager:
        """`with session.publishing():` around a run of `publish` calls (a batch from the buffer).

        paho guards its outgoing messages with one lock, which the network thread holds while it
        handles each PUBACK (and it lets the GIL go in there, to wake itself through a socket).
        Publishing call by call, each `publish` waits for that lock, and the two threads hand the
        lock and the GIL to each other once or twice per message. Holding it (re-entrant) for
        the run, the network thread waits once, then handles the PUBACKs that came meanwhile."""
        lock = getattr(self.client, "_out_message_mutex", None)  # paho's RLock; private, so optional
        return lock if lock is not None else contextlib.nullcontext()

    # ----- the network thread -----

    def _run_network(self) -> None:
        """paho's network loop for this connection, without paho's reconnect."""
        rc = mqtt.MQTT_ERR_SUCCESS
        while not self._halt.is_set() and rc == mqtt.MQTT_ERR_SUCCESS:
            rc = self.client.loop(timeout=0.2)
            self._hand_acks()
        self._hand_acks()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._call(self._set_lost, mqtt.error_string(rc))

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._call(self._set_ready, f"broker refused the connection: {reason_code}")
        elif self._subscriptions:
            client.subscribe(self._subscriptions)
        else:
            self._call(self._set_ready, None)

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        self._call(self._set_ready, f"subscription refused: {', '.join(refused)}" if refused else None)

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._call(self._set_lost, str(reason_code))

    def on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._arrived.append((mid, reason_code))  # handed to the loop by _hand_acks

    def _hand_acks(self) -> None:
        """After each paho loop step (which reads every packet waiting on the socket): one wake-up
        of the event loop for all the PUBACKs it read, not one per PUBACK or two."""
        if self._arrived and not self._acks_scheduled:
            self._acks_scheduled = True
            self._call(self._take_acks)

    def on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self._inbox is None:
            return
        if self._closing or self._loop is None:  # the session is ending: nothing will take it
            self._dropped()
            return
        if not self._inbox.room.acquire(timeout=self._put_timeout):
            self._dropped()  # the consumer is stuck: drop and count
            return
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, (msg, time.time()))
        except RuntimeError:  # the loop is closed
            self._inbox.room.release()
            self._dropped()

    # ----- on the event loop -----

    def _set_ready(self, error: str | None) -> None:
        if self._ready is None or self._ready.done():
            return
        if error:
            self._ready.set_exception(SessionError(error))
        else:
            self._ready.set_result(None)

    def _set_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            if self._on_lost is not None:
                self._on_lost()
        self._set_ready(f"connection lost: {reason}")

    def _take_acks(self) -> None:
        self._acks_scheduled = False
        acks = []
        while self._arrived:
            mid, reason_code = self._arrived.popleft()
            item = self.pending.pop(mid, None)
            if item is not None:
                acks.append((item, reason_code))
        if acks and self._on_acks is not None:
            self._on_acks(acks)

    def _drop_inbox(self) -> None:
        while self._inbox is not None and not self._inbox.empty():
            self._inbox.get_nowait()
            self._dropped()

    def _dropped(self) -> None:
        if self._on_dropped is not None:
            self._on_dropped()
