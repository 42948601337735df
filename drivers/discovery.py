"""What `edge-gateway discover` shares between the protocols: the bounds (requests, nodes,
time), the progress line on stderr, tag names that the config accepts, and YAML scalars.

The protocol work is in `drivers.discover_opcua` and `drivers.discover_modbus`; the command
line in `gateway.discover`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import TextIO

NAME_MAX = 64  # gateway.schema.Name
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class DiscoverError(Exception):
    """The device cannot be discovered (unreachable, refused, nothing answers): one line for the user."""


def tag_name(parts: list[str] | str) -> str:
    """A valid config Name from a browse path (or any text): other characters become `_`."""
    text = "_".join(parts) if isinstance(parts, list) else parts
    name = _NOT_NAME.sub("_", text).strip("_") or "tag"
    return name[-NAME_MAX:].lstrip("_-") or "tag"  # the end of a long path says most


class Names:
    """Hands out unique valid names: a second `Temp` becomes `Temp_2`."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, parts: list[str] | str) -> str:
        base = tag_name(parts)
        name, n = base, 1
        while name in self.used:
            n += 1
            suffix = f"_{n}"
            name = base[: NAME_MAX - len(suffix)] + suffix
        self.used.add(name)
        return name


def scalar(value: str) -> str:
    """A YAML scalar for any text (a JSON string is a YAML double-quoted scalar)."""
    return json.dumps(value)


class Bounds:
    """A request (or node) budget and a time limit; `exhausted` says why the search stopped."""

    def __init__(self, max_count: int, time_limit: float, what: str = "requests") -> None:
        self.max_count, self.what = max_count, what
        self.count = 0
        self.deadline = time.monotonic() + time_limit
        self.started = time.monotonic()
        self.exhausted: str | None = None

    def take(self, n: int = 1) -> bool:
        """Spend n; False (and `exhausted` set) when the budget or the time is used up."""
        if self.exhausted is None:
            if self.count + n > self.max_count:
                self.exhausted = f"the budget of {self.max_count} {self.what} is used up"
            elif time.monotonic() > self.deadline:
                self.exhausted = "the time limit was reached"
        if self.exhausted is not None:
            return False
        self.count += n
        return True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """One progress line on stderr: redrawn in place on a terminal; with `always`, plain lines
    (at most one a second) elsewhere; silent otherwise."""

    def __init__(self, always: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = self.tty or always
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int | None, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < 1.0:
            return
        self._last = now
        if total:
            filled = min(20, 20 * done // total)
            line = f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} {text}"
        else:
            line = f"{done} {text}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line[:120])
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def parse_ranges(text: str, low: int, high: int) -> list[int]:
    """`1-10,17` -> [1, ..., 10, 17]; ValueError outside low..high."""
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        a, b = int(first), int(last or first)
        if not low <= a <= b <= high:
            raise ValueError(f"{part.strip()!r} is not a range within {low}-{high}")
        out.extend(range(a, b + 1))
    return sorted(set(out))
