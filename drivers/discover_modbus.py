"""`edge-gateway discover modbus`: which unit ids answer, and which addresses of each table read.

Read-only: only the four read functions are sent. A unit id answers when it replies to a read of
holding register 0 at all; an exception reply counts (the unit is there and said no), except the
gateway codes 10 and 11 (a TCP gateway saying nothing answers behind it). Then each table is read
in blocks as large as the protocol allows (125 registers, 2000 bits); a block refused with an
exception is split in two, and so on down to single addresses, so the readable ranges come out
exact. A block that gets no answer is not narrowed (that would cost a timeout per half): it is
reported. Every request counts against `--max-requests` and `--time-limit`.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from drivers.modbus import MAX_BITS, MAX_REGISTERS, SerialConfig
from drivers.discovery import Bounds, DiscoverError, Progress, parse_ranges, scalar, tag_name

_READS = {"coil": "read_coils", "discrete": "read_discrete_inputs", "holding": "read_holding_registers",
          "input": "read_input_registers"}
_GATEWAY_CODES = (10, 11)  # gateway path unavailable, gateway target failed to respond
ILLEGAL_FUNCTION = 1
STRIDE = 16  # single-address probes in a refused block: a readable range of 16 or more is never missed
OK, SILENT = 0, None  # read outcomes besides an exception code


class _Stop(Exception):
    """The request budget or the time is used up."""


class _Unsupported(Exception):
    """The unit answered a table's read with illegal function."""


@dataclass
class Unit:
    unit_id: int
    readable: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # table -> [(first, last)]
    unsupported: list[str] = field(default_factory=list)  # tables refused with illegal function
    silent: list[str] = field(default_factory=list)  # blocks that got no answer


class Prober:
    def __init__(self, client, bounds: Bounds, gap: float) -> None:  # noqa: ANN001 - a pymodbus client
        self.client = client
        self.bounds = bounds
        self.gap = gap  # serial lines: silence between frames

    async def read(self, table: str, address: int, count: int, unit: int) -> int | None:
        """OK, an exception code, or SILENT (no answer in time)."""
        if not self.bounds.take():
            raise _Stop
        try:
            if not self.client.connected:
                await self.client.connect()
            response = await getattr(self.client, _READS[table])(address, count=count, device_id=unit)
        except (ModbusException, OSError, asyncio.TimeoutError):
            return SILENT
        finally:
            if self.gap:
                await asyncio.sleep(self.gap)
        if not response.isError():
            return OK
        return response.exception_code or ILLEGAL_FUNCTION

    async def answers(self, unit: int) -> bool:
        outcome = await self.read("holding", 0, 1, unit)
        return outcome is not SILENT and outcome not in _GATEWAY_CODES

    async def scan(self, unit: Unit, table: str, first: int, last: int, on_block) -> None:  # noqa: ANN001
        """The readable ranges of one table between `first` and `last` (inclusive)."""
        scan = _TableScan(self, unit, table, first, last)
        try:
            pos = first
            while pos <= last:
                pos = await scan.block(pos)
                on_block(table, pos)
        except _Unsupported:
            unit.unsupported.append(table)
        finally:
            if scan.found:
                unit.readable[table] = _merged(scan.found)


class _TableScan:
    def __init__(self, prober: Prober, unit: Unit, table: str, first: int, last: int) -> None:
        self.prober, self.unit, self.table, self.first, self.last = prober, unit, table, first, last
        self.size = MAX_BITS if table in ("coil", "discrete") else MAX_REGISTERS
        self.found: list[tuple[int, int]] = []

    async def ok(self, start: int, n: int) -> bool:
        """start..start+n-1 reads (an exception or no answer: it does not)."""
        outcome = await self.prober.read(self.table, start, n, self.unit.unit_id)
        if outcome == ILLEGAL_FUNCTION:
            raise _Unsupported
        return outcome == OK

    async def block(self, pos: int) -> int:
        """Probe the block at `pos`; returns where the next one starts."""
        # Blocks end on a multiple of STRIDE, so that the next one starts on one.
        n = min(max(STRIDE, (pos + self.size) // STRIDE * STRIDE) - pos, self.last + 1 - pos)
        outcome = await self.prober.read(self.table, pos, n, self.unit.unit_id)
        if outcome == ILLEGAL_FUNCTION:
            raise _Unsupported
        if outcome == OK:
            # The range may begin in the refused block before, after its last single read.
            floor = max(self.first, pos - STRIDE + 1, self.found[-1][1] + 2 if self.found else 0)
            begin = await self.start(floor, pos) if floor < pos else pos
            return await self.add(begin, await self.end(pos + n - 1))
        if outcome is SILENT:
            self.unit.silent.append(f"{self.table} {pos}-{pos + n - 1}")
            return pos + n
        # Refused: single reads at every multiple of STRIDE (before the first, when the block
        # starts after a range: binary narrowing); the first readable address gives a range,
        # found exactly.
        aligned = min(pos + n, -(-pos // STRIDE) * STRIDE)
        if aligned > pos:
            seed = await self.lowest_readable(pos, aligned - 1)
            if seed is not None:
                return await self.add(seed, await self.end(seed))
        for seed in range(aligned, pos + n, STRIDE):
            if await self.ok(seed, 1):
                floor = max(pos, seed - STRIDE + 1)  # the seed before this one did not read
                return await self.add(await self.start(floor, seed), await self.end(seed))
        return pos + n

    async def lowest_readable(self, low: int, high: int) -> int | None:
        """The lowest readable address in low..high, or None: the span, then each half."""
        if await self.ok(low, high - low + 1):
            return low
        if low == high:
            return None
        mid = (low + high) // 2
        found = await self.lowest_readable(low, mid)
        return found if found is not None else await self.lowest_readable(mid + 1, high)

    async def start(self, low: int, high: int) -> int:
        """The lowest s in low..high with s..high readable (high is): binary search."""
        while low < high:
            mid = (low + high) // 2
            if await self.ok(mid, high - mid + 1):
                high = mid
            else:
                low = mid + 1
        return low

    async def end(self, known: int) -> int:
        """The last readable address of the range that reads up to `known`: whole blocks onwards,
        then a binary search in the first block that is refused."""
        while known < self.last:
            n = min(self.size, self.last - known)
            if await self.ok(known + 1, n):
                known += n
                continue
            low, high = 0, n  # known+1..known+low reads; known+1..known+high does not
            while high - low > 1:
                mid = (low + high) // 2
                if await self.ok(known + 1, mid):
                    low = mid
                else:
                    high = mid
            return known + low
        return known

    async def add(self, first: int, last: int) -> int:
        """Note a readable range; the next probe starts after the address that ended it (refused)."""
        self.found.append((first, last))
        return last + 2


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _target(args: argparse.Namespace) -> tuple[str, int | None, SerialConfig | None]:
    if bool(args.host) == bool(args.serial):
        raise DiscoverError("give HOST[:PORT] for Modbus TCP or --serial PORT for RTU (one of them)")
    if args.serial:
        try:
            serial = SerialConfig(port=args.serial, baudrate=args.baudrate, parity=args.parity,
                                  stopbits=args.stopbits, bytesize=args.bytesize)
        except ValueError as exc:
            raise DiscoverError(str(exc).splitlines()[-1]) from None
        return args.serial, None, serial
    host, port = args.host, 502
    if args.host.startswith("["):  # [v6 address]:port
        host, _, rest = args.host[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif args.host.count(":") == 1:
        host, port = args.host.split(":")
    try:
        port = int(port)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise DiscoverError(f"{args.host}: not HOST[:PORT] with a port 1-65535") from None
    return host, port, None


def _span(text: str) -> tuple[int, int]:
    """`A-B` (or one address) -> (A, B) within 0-65535; ValueError otherwise."""
    first, _, last = text.strip().partition("-")
    a, b = int(first), int(last or first)
    if not 0 <= a <= b <= 65535:
        raise ValueError(f"{text!r} is not an address range within 0-65535")
    return a, b


def _client(host: str, port: int | None, serial: SerialConfig | None, timeout: float):  # noqa: ANN202
    if serial is not None:
        return AsyncModbusSerialClient(serial.port, framer=FramerType.RTU, baudrate=serial.baudrate,
                                       bytesize=serial.bytesize, parity=serial.parity, stopbits=serial.stopbits,
                                       timeout=timeout, retries=0, reconnect_delay=0, name="discover")
    return AsyncModbusTcpClient(host, port=port, timeout=timeout, retries=0, reconnect_delay=0, name="discover")


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def _device_lines(unit: Unit, name: str, host: str, port: int | None, serial: SerialConfig | None,
                  tables: list[str], span: str) -> list[str]:
    lines = [f"  - name: {scalar(name)}", "    driver: modbus"]
    if serial is not None:
        lines += ["    transport: rtu",
                  f"    serial: {{port: {scalar(serial.port)}, baudrate: {serial.baudrate}, parity: {serial.parity}, "
                  f"stopbits: {serial.stopbits}, bytesize: {serial.bytesize}}}"]
    else:
        lines += ["    transport: tcp", f"    host: {scalar(host)}", f"    port: {port}"]
    lines += [f"    unit_id: {unit.unit_id}", "    poll_interval: 1s",
              "    tags:  # one per readable range, at its start: set names, types and units from the device's manual"]
    for table in tables:
        for first, last in unit.readable.get(table, []):
            what = "bits" if table in ("coil", "discrete") else "registers"
            kind = "bool" if table in ("coil", "discrete") else "uint16"
            lines.append(f"      # {table} {first}-{last} readable ({last - first + 1} {what})")
            lines.append(f"      - {{name: {table}_{first}, table: {table}, address: {first}, type: {kind}}}")
    if not unit.readable:
        lines.append(f"      # nothing readable in {span}: a placeholder, fill in from the device's manual")
        lines.append("      - {name: holding_0, table: holding, address: 0, type: uint16}")
    if unit.unsupported:
        lines.append(f"      # refused as an illegal function: {', '.join(unit.unsupported)}")
    if unit.silent:
        lines.append(f"      # no answer (not narrowed down): {', '.join(unit.silent)}")
    return lines


async def discover(args: argparse.Namespace, progress: Progress) -> str:
    host, port, serial = _target(args)
    try:
        unit_text = args.units or ("1-247" if serial else "1")
        units = parse_ranges(unit_text, 0, 255)
        first, last = _span(args.addresses)
    except ValueError as exc:
        raise DiscoverError(str(exc)) from None
    tables = [t.strip() for t in args.tables.split(",")]
    if unknown := [t for t in tables if t not in _READS]:
        raise DiscoverError(f"unknown table {unknown[0]!r}: expected coil, discrete, holding, input")
    where = serial.port if serial else f"{host}:{port}"
    bounds = Bounds(args.max_requests, args.time_limit)
    client = _client(host, port, serial, args.timeout)
    try:
        try:
            connected = await client.connect()
        except (OSError, ModbusException) as exc:
            raise DiscoverError(f"cannot connect to {where}: {exc}") from None
        if not connected:
            raise DiscoverError(f"cannot connect to {where}" if serial is None else f"cannot open {where}")
        prober = Prober(client, bounds, serial.inter_frame_gap() if serial else 0.0)
        found: list[Unit] = []
        try:
            for i, unit_id in enumerate(units):
                progress.update(i, len(units), f"unit ids tried, {len(found)} answer")
                if await prober.answers(unit_id):
                    found.append(Unit(unit_id))
            blocks = sum(-(-(last - first + 1) // (MAX_BITS if t in ("coil", "discrete") else MAX_REGISTERS))
                         for t in tables) * len(found)
            done = 0

            for unit in found:
                def on_block(table: str, start: int, unit: Unit = unit) -> None:
                    nonlocal done
                    done += 1
                    progress.update(done, blocks, f"blocks, unit {unit.unit_id} {table} @ {start}")

                for table in tables:
                    await prober.scan(unit, table, first, last, on_block)
        except _Stop:
            pass
    finally:
        client.close()
    if not found:
        raise DiscoverError(f"no unit id of {unit_text} answers at {where} within {args.timeout} s"
                            + (f"; stopped: {bounds.exhausted}" if bounds.exhausted else ""))
    span = f"addresses {first}-{last}"
    out = [f"# edge-gateway discover modbus {where}: unit ids {unit_text} tried, "
           f"{len(found)} answer; {bounds.count} requests in {bounds.elapsed:.1f} s",
           f"# probed {span} of {', '.join(tables)}; read-only"]
    if bounds.exhausted:
        out.append(f"# INCOMPLETE: stopped because {bounds.exhausted} (see --max-requests, --time-limit, "
                   "--addresses, --tables)")
    out.append("devices:")
    base = args.name or tag_name(f"{'rtu' if serial else 'modbus'}_{host if serial is None else 'line'}")
    for unit in found:
        name = base if len(found) == 1 else tag_name(f"{base}_unit{unit.unit_id}")
        out += _device_lines(unit, name, host, port, serial, tables, span)
    return "\n".join(out) + "\n"
