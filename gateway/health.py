"""Counters and states that the `health` topic shows, and systemd's sd_notify.

The rule for logs: a state that turns bad is logged once, its recovery once; the attempts in
between only count.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway import logs
from gateway.model import iso_ts

log = logs.get("gateway.health")


class Transitions:
    """Logs a condition when it turns bad (or its error text changes) and when it recovers."""

    def __init__(self, event_prefix: str, **fields: Any) -> None:
        self._prefix = event_prefix
        self._fields = fields
        self._bad: dict[str, str] = {}

    def bad(self, key: str, error: str, **fields: Any) -> bool:
        """Returns True when this call changed the state (and logged)."""
        if self._bad.get(key) == error:
            return False
        self._bad[key] = error
        log.error(f"{self._prefix}.error", key=key, error=error, **self._fields, **fields)
        return True

    def ok(self, key: str, **fields: Any) -> bool:
        if key not in self._bad:
            return False
        error = self._bad.pop(key)
        log.info(f"{self._prefix}.recovered", key=key, previous_error=error, **self._fields, **fields)
        return True

    def is_bad(self, key: str) -> bool:
        return key in self._bad


@dataclass
class DeviceHealth:
    """Per-device health, owned by the driver, read by the `health` publisher."""

    name: str
    connected: bool = False
    last_ok: float | None = None
    errors: int = 0
    bad_values: int = 0
    missed_polls: int = 0
    latency_ms: float | None = None
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _log: Transitions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._log = Transitions("device", device=self.name)

    def ok(self, latency_ms: float | None = None, now: float | None = None) -> None:
        """A successful exchange with the device."""
        self.connected = True
        self.last_ok = time.time() if now is None else now
        if latency_ms is not None:
            self.latency_ms = round(latency_ms, 3)
        self.last_error = None
        self._log.ok("io")

    def error(self, error: str | BaseException, *, disconnected: bool = False) -> None:
        """A failed exchange: counted every time, logged only when the error changes."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.errors += 1
        self.last_error = text
        if disconnected:
            self.connected = False
        self._log.bad("io", text)

    def bad_value(self, reason: str, key: str = "value") -> None:
        """A value that could not be used (malformed payload, NaN, bad status): counted, logged once."""
        self.bad_values += 1
        self._log.bad(key, reason)

    def good_value(self, key: str = "value") -> None:
        self._log.ok(key)

    def missed_poll(self) -> None:
        self.missed_polls += 1

    def to_dict(self) -> dict[str, Any]:
        out = {
            "connected": self.connected,
            "last_ok": iso_ts(self.last_ok) if self.last_ok else None,
            "errors": self.errors,
            "bad_values": self.bad_values,
            "missed_polls": self.missed_polls,
            "latency_ms": self.latency_ms,
            "last_error": self.last_error,
        }
        out.update(self.extra)
        return out


class LoopLag:
    """How late the event loop runs a timer: a sleep's overshoot, measured twice a second.

    A lag of tens of milliseconds means something blocks the loop (a long computation, a slow
    disk under SQLite); `max_s` is the worst of the last minute, since single spikes matter."""

    INTERVAL = 0.5

    def __init__(self) -> None:
        self.last_s = 0.0
        self._recent: deque[float] = deque(maxlen=int(60 / self.INTERVAL))

    @property
    def max_s(self) -> float:
        return max(self._recent, default=0.0)

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.INTERVAL)
            self.last_s = max(0.0, time.monotonic() - before - self.INTERVAL)
            self._recent.append(self.last_s)

    def to_dict(self) -> dict[str, float]:
        return {"last_ms": round(self.last_s * 1000, 3), "max_ms": round(self.max_s * 1000, 3)}


class Notifier:
    """systemd's sd_notify datagram protocol; a no-op when NOTIFY_SOCKET is not set."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._sock: socket.socket | None = None
        if self._address:
            if self._address.startswith("@"):  # abstract namespace
                self._address = "\0" + self._address[1:]
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: never fatal for the daemon
            log.warning("sd_notify.failed", error=str(exc))

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *( [f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 for Type=notify-reload.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
