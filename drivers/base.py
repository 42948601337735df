"""The driver protocol, `DriverType` and what every driver shares.

A driver module defines a config model (a `DeviceConfig` subclass whose `driver` field is a
Literal) and a driver class, and ends with `DRIVER = DriverType(...)`. `drivers/registry.py`
lists them in one static table, from which `gateway.config` builds the discriminated union of
device configs.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.backoff import Backoff
from gateway.health import DeviceHealth
from gateway.model import Sample, TagReport, Waveform, source_of
from pydantic import model_validator

from gateway.schema import Duration, Name, StrictModel

# How a driver hands over what it read: one Sample, one Waveform, or a list of Samples read
# together (cheaper per value). Awaiting it applies back-pressure (bounded queue).
Emit = Callable[[Sample | Waveform | list[Sample]], Awaitable[None]]


class DeviceConfig(StrictModel):
    name: Name
    driver: str
    enabled: bool = True
    timeout: Duration = 1.0
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0

    @model_validator(mode="after")
    def _unique_tag_names(self) -> "DeviceConfig":
        names = self.tag_names()
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tag names must be unique within a device: {', '.join(twice)}")
        return self

    def tag_names(self) -> list[str]:
        """The tag names this device produces (for check-config and input validation)."""
        return [t.name for t in getattr(self, "tags", [])]

    def tag_units(self) -> dict[str, str | None]:
        return {t.name: getattr(t, "unit", None) for t in getattr(self, "tags", [])}

    def waveform_tags(self) -> set[str]:
        """Tags that produce Waveform blocks rather than scalar Samples."""
        return set()

    def reporting(self) -> dict[str, TagReport]:
        """Each scalar tag's report-by-exception settings (waveform tags have none)."""
        waves = self.waveform_tags()
        return {name: TagReport(self.value_type(t), self.report_deadband(t), getattr(t, "max_silence", None))
                for name, t in self.tag_models() if name not in waves}

    def tag_models(self) -> list[tuple[str, Any]]:
        """(tag name, tag model) of every tag."""
        return [(t.name, t) for t in getattr(self, "tags", [])]

    def value_type(self, tag: Any) -> str:
        """The type of the tag's values as TagReport names it; drivers that know it say so."""
        return "float64"

    def report_deadband(self, tag: Any) -> float:
        return float(getattr(tag, "deadband", 0.0) or 0.0)

    def summary(self) -> str:
        """One line of what check-config shows besides the tags ("" for nothing more)."""
        return ""


class Driver(Protocol):
    config: DeviceConfig
    health: DeviceHealth

    async def run(self, emit: Emit) -> None:
        """Connect, read, emit; reconnect with back-off on failure; return only when cancelled."""


@dataclass
class DriverContext:
    """What the drivers of one pipeline share; the pipeline owns it and hands it to every factory.

    `shared` holds the resources several devices use at once (the client of one serial line), by
    a key of the driver's choosing. Its values are weak: a resource goes when its last device
    lets go of it.
    """

    shared: "weakref.WeakValueDictionary[Any, Any]" = field(default_factory=weakref.WeakValueDictionary)


Factory = Callable[[DeviceConfig, DeviceHealth, DriverContext], Driver]


@dataclass(frozen=True)
class DriverType:
    name: str
    config: type[DeviceConfig]
    factory: Factory


async def mark_bad(config: DeviceConfig, emit: Emit, tags: Iterable[str] | None = None) -> None:
    """A BAD sample, now, for every scalar tag of the device (or for `tags` only): consumers must
    see that the values stopped being true. A waveform tag gets none: there is no block to send,
    and its analysis sees the missing time as a gap."""
    units = config.tag_units()
    waveforms = config.waveform_tags()
    now = time.time()
    for tag in units if tags is None else tags:
        if tag not in waveforms:
            await emit(Sample.bad(source_of(config.name, tag), now, units[tag]))


class DriverError(Exception):
    """A device exchange failed. Peer-library exceptions are turned into this at the boundary."""


class DeviceDisconnected(DriverError):
    """The link to the device is gone: the session ends and the driver reconnects with back-off.

    `retry_soon`: a peer on this host or the LAN refused the TCP connection (it is restarting):
    `supervise` retries within `gateway.backoff.SOON` instead of backing off."""

    def __init__(self, message: str = "", *, retry_soon: bool = False) -> None:
        super().__init__(message)
        self.retry_soon = retry_soon


async def until_lost(queue: asyncio.Queue, lost: asyncio.Event, what: str) -> AsyncIterator[Any]:
    """Items of a callback-fed queue, until `lost` is set: then DeviceDisconnected(what).

    For drivers whose peer library pushes data through callbacks (paho, asyncua subscriptions):
    waiting on the queue alone would never notice that the link is gone.
    """
    while True:
        while not queue.empty():  # what arrived before the loss is handed on first
            yield queue.get_nowait()
            check_cancelled()
        if lost.is_set():
            raise DeviceDisconnected(what)
        async with asyncio.TaskGroup() as tg:  # whichever comes first cancels the other
            get = tg.create_task(queue.get(), name="until_lost.get")
            gone = tg.create_task(lost.wait(), name="until_lost.lost")
            get.add_done_callback(lambda _: gone.cancel())
            gone.add_done_callback(lambda _: get.cancel())
        if not get.cancelled():  # an item taken in the same pass as the loss is still handed on
            yield get.result()
            check_cancelled()


def check_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop and the request got lost on the way.

    Python 3.11's `asyncio.wait_for`, used inside pymodbus, asyncua and paho bridges, returns the
    awaited result when a cancellation lands in the same loop pass as the result, and the
    CancelledError is gone (fixed in 3.12). A poll loop that never checks would then run on after
    SIGTERM or a reload for ever. `Task.cancelling()` still counts the request, so every driver
    loop calls this once per turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("cancellation swallowed by a peer library's wait_for")


async def supervise(session: Callable[[], Awaitable[None]], health: DeviceHealth, reconnect_min: float,
                    reconnect_max: float) -> None:
    """Run `session` forever; after it fails, wait a jittered back-off and start it again.

    The back-off restarts from `reconnect_min` once a session has had a successful exchange, so a
    device that drops once after a week reconnects quickly.
    """
    backoff = Backoff(reconnect_min, reconnect_max)
    while True:
        last_ok = health.last_ok
        soon = False
        check_cancelled()
        try:
            await session()
            raise DeviceDisconnected("session ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing device must never stop the daemon
            health.error(exc, disconnected=True)
            soon = getattr(exc, "retry_soon", False)
        check_cancelled()
        if health.last_ok != last_ok:
            backoff.reset()
        await asyncio.sleep(backoff.next(soon=soon))


async def every(interval: float, poll: Callable[[], Awaitable[None]], health: DeviceHealth) -> None:
    """Call `poll` on a fixed tick grid. A poll still running at the next tick skips that tick.

    Polls run one after another, so they never pile up; each tick that passed while a poll was
    still running is counted as a missed poll deadline.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0
    while True:
        await poll()
        check_cancelled()
        now = loop.time()
        if interval <= 0:  # flat out (benchmarks): the poll's own I/O is where others get their turn
            continue
        due = int((now - start) // interval) + 1
        for _ in range(max(0, due - tick - 1)):
            health.missed_poll()
        tick = max(tick + 1, due)
        await asyncio.sleep(max(0.0, start + tick * interval - loop.time()))
