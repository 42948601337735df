"""`edge-gateway discover {opcua,modbus}`: what a device offers, as a config skeleton.

The protocol work lives in `drivers.discover_opcua` and `drivers.discover_modbus`; this module
holds what both share: the command line, the bounds (requests, nodes, time), the progress line
on stderr, tag names that the config accepts, and YAML scalars. The YAML goes to stdout, every
remark as a comment, so that the output can be pasted (or redirected) into a configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `discover` subcommand and its two kinds (wired into gateway.cli)."""
    p = sub.add_parser("discover", help="ask a device what it offers and print a config skeleton (read-only)")
    kinds = p.add_subparsers(dest="kind", required=True)

    def common(q: argparse.ArgumentParser, time_limit: float) -> None:
        q.add_argument("--time-limit", type=float, default=time_limit,
                       help=f"stop after this many seconds (default {time_limit:.0f})")
        q.add_argument("--progress", action="store_true", help="progress lines on stderr even when it is not a terminal")
        q.add_argument("--name", help="device name in the skeleton (default: from the address)")

    q = kinds.add_parser("opcua", help="endpoints, security policies and variables of an OPC UA server")
    q.add_argument("endpoint", help="opc.tcp://HOST:PORT[/PATH]")
    q.add_argument("--root", default="i=85", help="node id to browse from (default: the Objects folder, i=85)")
    q.add_argument("--depth", type=int, default=10, help="levels below the root to browse (default 10)")
    q.add_argument("--max-nodes", type=int, default=5000, help="nodes to visit at most (default 5000)")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    q.add_argument("--policy", default="None",
                   choices=["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"])
    q.add_argument("--mode", default="None", choices=["None", "Sign", "SignAndEncrypt"])
    q.add_argument("--certificate", help="client application certificate (PEM or DER)")
    q.add_argument("--private-key", help="private key of the client certificate")
    q.add_argument("--private-key-password-file")
    q.add_argument("--server-certificate", help="pin the server certificate")
    q.add_argument("--application-uri")
    q.add_argument("--username")
    q.add_argument("--password-file", help="file holding the password (trailing newline ignored)")
    common(q, 120.0)

    q = kinds.add_parser("modbus", help="unit ids and readable register ranges of a Modbus device or line")
    q.add_argument("host", nargs="?", help="HOST[:PORT] for Modbus TCP (default port 502)")
    q.add_argument("--serial", metavar="PORT", help="Modbus RTU on this serial port instead of TCP")
    q.add_argument("--baudrate", type=int, default=19200)
    q.add_argument("--parity", choices=["N", "E", "O"], default="N")
    q.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    q.add_argument("--bytesize", type=int, choices=[7, 8], default=8)
    q.add_argument("--units", help="unit ids to try, e.g. 1-10,17 (default: 1-247 on serial, 1 on TCP)")
    q.add_argument("--addresses", default="0-9999",
                   help="register and bit addresses to probe in each table (default 0-9999; 0-65535 for all)")
    q.add_argument("--tables", default="coil,discrete,holding,input", help="tables to probe (default: all four)")
    q.add_argument("--timeout", type=float, default=0.3, help="seconds to wait for each answer (default 0.3)")
    q.add_argument("--max-requests", type=int, default=10000, help="requests to send at most (default 10000)")
    common(q, 600.0)  # 247 silent unit ids on a serial line alone take 74 s at the default timeout
    p.set_defaults(func=main)


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


def main(args: argparse.Namespace) -> int:
    """Run one discovery; the YAML on stdout, exit 0; or one line on stderr, exit 1."""
    progress = Progress(always=args.progress)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # its warnings would garble the progress line
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # each timeout is an expected answer here
    try:
        if args.kind == "opcua":
            from drivers.discover_opcua import discover
        else:
            from drivers.discover_modbus import discover
        text = asyncio.run(discover(args, progress))
    except DiscoverError as exc:
        progress.done()
        print(f"edge-gateway: discover {args.kind}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.done()
        print(f"edge-gateway: discover {args.kind}: interrupted", file=sys.stderr)
        return 1
    progress.done()
    sys.stdout.write(text)
    return 0
