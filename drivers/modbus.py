"""Modbus TCP and RTU (pymodbus 3.x).

Tags of one device are planned into as few read requests as the protocol allows; the decoder is
a pure function of the registers read. Devices on one serial line share one `SerialBus`: one
client, one lock, and the silent interval between frames that RTU needs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from drivers.base import (DeviceConfig, DeviceDisconnected, DriverContext, DriverError, DriverType, Emit,
                          check_cancelled, every, mark_bad, supervise)
from drivers.modbus_tcp import NoResponse, PipelinedClient
from gateway import logs
from gateway.backoff import is_nearby, refused_nearby
from gateway.health import DeviceHealth
from gateway.lazy import lazy
from gateway.model import Quality, Sample, WriteFailed, WriteRefused, source_of
from gateway.schema import Duration, Name, Reported, StrictModel, WritePermission

# Imported by the first connection, not by config validation (see gateway.lazy).
pymodbus = lazy("pymodbus")
pymodbus_client = lazy("pymodbus.client")
pymodbus_exceptions = lazy("pymodbus.exceptions")

log = logs.get("drivers.modbus")

Table = Literal["coil", "discrete", "holding", "input"]
DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"]
Order = Literal["big", "little"]

MAX_REGISTERS = 125  # per read request, Modbus application protocol v1.1b3 §6.3
MAX_BITS = 2000
MAX_OUTSTANDING = 16  # requests in flight on one TCP connection; devices that take more are rare

# struct code and width in registers of every numeric type
_FORMATS: dict[str, tuple[str, int]] = {
    "int16": ("h", 1), "uint16": ("H", 1),
    "int32": ("i", 2), "uint32": ("I", 2),
    "int64": ("q", 4), "uint64": ("Q", 4),
    "float32": ("f", 2), "float64": ("d", 4),
}
_BIT_TABLES = ("coil", "discrete")


class ModbusError(DriverError):
    """The device answered one request with a Modbus exception (or did not answer: NoAnswer)."""


class NoAnswer(ModbusError):
    """One request went unanswered while the link stayed up: a device error as well as bad values."""


class BusBusy(DriverError):
    """A write found no turn on its serial line within the device's timeout; nothing was sent."""


class ModbusTag(WritePermission, Reported):
    name: Name
    table: Table = "holding"
    address: int = Field(ge=0, le=65535)  # zero-based, as on the wire
    type: DataType = "uint16"
    count: int | None = Field(None, ge=1, le=65536, description=(
        "string: its length in registers (2 characters each); any other type: a range of `count` tags "
        "`{name}_0` .. `{name}_{count-1}`, `stride` registers (or bits) apart"))
    stride: int | None = Field(None, ge=1, description="range: address step between its tags; default the type's width")
    byte_order: Order = "big"
    word_order: Order = "big"  # big: most significant register first
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModbusTag":
        bit_table = self.table in _BIT_TABLES
        if bit_table != (self.type == "bool"):
            raise ValueError("coil and discrete tables hold type bool; bool lives only in coil or discrete")
        if self.type == "string" and self.count is None:
            raise ValueError("type string needs count (registers, two characters each)")
        if self.writable and self.table not in ("holding", "coil"):
            raise ValueError(f"writable: the {self.table} table is read-only in Modbus; only holding and coil tags can be written")
        if self.stride is not None and not self.is_range:
            raise ValueError("stride applies to a range: a tag with count and a type other than string")
        if self.is_range and self.step < self.width:
            raise ValueError(f"stride {self.step} is less than the width of a {self.type} ({self.width}): "
                             "the tags of the range would overlap")
        if self.is_range and len(f"{self.name}_{self.count - 1}") > 64:
            raise ValueError(f"the range's last tag name {self.name}_{self.count - 1} is longer than 64 characters")
        last = self.address + (self.count - 1) * self.step if self.is_range else self.address
        if last + self.width - 1 > 65535:
            raise ValueError("tag runs past address 65535" if last == self.address
                             else f"the range's last tag ({self.name}_{self.count - 1} at {last}) runs past address 65535")
        return self

    @property
    def is_range(self) -> bool:
        return self.count is not None and self.type != "string"

    @property
    def step(self) -> int:
        return self.stride or self.width

    def expanded(self) -> list["ModbusTag | RangeTag"]:
        """A range as its tags `{name}_{i}`, i from 0, at consecutive addresses; any other tag: itself.

        The range's tags are `RangeTag`s, not models: the range itself was validated (and so its
        last tag), and a range of thousands of registers is thousands of tags, as long as the
        configuration lives."""
        if not self.is_range:
            return [self]
        assert self.count is not None
        return [RangeTag(f"{self.name}_{i}", self.address + i * self.step, self) for i in range(self.count)]

    @property
    def width(self) -> int:
        """Registers (or bits for coil/discrete) the tag occupies."""
        if self.type == "bool":
            return 1
        if self.type == "string":
            return self.count or 1
        return _FORMATS[self.type][1]


@dataclass(slots=True)
class RangeTag:
    """One tag of a range: its own name and address, every other setting the range's (read
    through to the range's ModbusTag). The same as that tag written out by hand, for the driver,
    the writes and check-config, at about 60 bytes instead of a model's 600: a model keeps a
    ~460-byte `__dict__` of its 18 fields."""

    name: str
    address: int
    range: ModbusTag = field(repr=False)
    count = None  # a tag of a range is a single value (class attributes, not fields)
    stride = None
    is_range = False

    def __getattr__(self, attr: str) -> Any:  # only what the slots and the class do not have
        return getattr(object.__getattribute__(self, "range"), attr)

    def expanded(self) -> list["RangeTag"]:
        return [self]

    def model_dump(self) -> dict[str, Any]:
        """As the tag written out would dump."""
        return {**self.range.model_dump(), "name": self.name, "address": self.address, "count": None, "stride": None}


class SerialConfig(StrictModel):
    port: str
    baudrate: int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    def char_time(self) -> float:
        """Seconds per character on the wire: start bit + data + parity + stop bits."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    def inter_frame_gap(self) -> float:
        # Above 19200 baud the spec fixes t3.5 at 1.75 ms instead of scaling it down.
        return 0.00175 if self.baudrate > 19200 else 3.5 * self.char_time()


class ModbusConfig(DeviceConfig):
    driver: Literal["modbus"]
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    serial: SerialConfig | None = None
    unit_id: int = Field(1, ge=0, le=255)
    poll_interval: Duration = 1.0
    retries: int = Field(0, ge=0, le=5)
    max_gap: int = Field(8, ge=0, le=MAX_REGISTERS)  # unused registers a merged read may span
    max_bit_gap: int = Field(64, ge=0, le=MAX_BITS)
    max_registers: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS)  # some devices accept fewer
    max_bits: int = Field(MAX_BITS, ge=1, le=MAX_BITS)
    max_outstanding: int = Field(1, ge=1, le=MAX_OUTSTANDING, description=(
        "tcp: read requests in flight at once on the connection (the MBAP transaction id tells "
        "the answers apart); 1, the default, waits for each answer, as many PLCs need"))
    tags: list[ModbusTag] = Field(min_length=1)  # once validated, a range's tags are RangeTags

    @field_validator("tags")
    @classmethod
    def _expand_ranges(cls, tags: list[ModbusTag]) -> list[ModbusTag | RangeTag]:
        """Ranges become their tags; every tag name, made by a range or written out, is unique."""
        made_by: dict[str, int] = {}  # tag name -> index of the entry that made it
        expanded: list[ModbusTag | RangeTag] = []
        problems: list[InitErrorDetails] = []
        for i, entry in enumerate(tags):
            mine = entry.expanded()
            clash = next((t.name for t in mine if t.name in made_by), None)
            if clash is not None:
                first = tags[made_by[clash]]
                what = f"the range {first.name!r} (count {first.count})" if first.is_range else "the tag"
                message = f"duplicate tag name {clash!r}: also made by {what} at tags.{made_by[clash]}"
                problems.append(InitErrorDetails(type=PydanticCustomError("value_error", message),
                                                 loc=(i, "name"), input=entry.name))
            made_by.update((t.name, i) for t in mine if t.name not in made_by)
            expanded += mine
        if problems:  # at the entry's own line (raised as a ValidationError: a ValueError has no location)
            raise ValidationError.from_exception_data("ModbusConfig.tags", problems)
        return expanded

    @model_validator(mode="after")
    def _check(self) -> "ModbusConfig":
        if self.transport == "rtu" and self.serial is None:
            raise ValueError("transport rtu needs serial: {port, baudrate, parity, stopbits, bytesize}")
        if self.transport == "rtu" and self.max_outstanding > 1:
            raise ValueError("max_outstanding applies to transport tcp: a serial line carries one request at a time")
        for tag in self.tags:
            limit = self.max_bits if tag.table in _BIT_TABLES else self.max_registers
            if tag.width > limit:
                raise ValueError(f"tag {tag.name} is wider than one request ({limit})")
        return self

    def value_type(self, tag: ModbusTag) -> str:
        return tag.type if tag.scale == 1.0 and tag.offset == 0.0 else "float64"

    def summary(self) -> str:
        requests = len(plan_reads(self.tags, max_gap=self.max_gap, max_bit_gap=self.max_bit_gap,
                                  max_registers=self.max_registers, max_bits=self.max_bits))
        if self.transport == "rtu":
            assert self.serial is not None
            return f"rtu {self.serial.port} unit {self.unit_id}, {requests} requests per poll"
        return (f"tcp {self.host}:{self.port} unit {self.unit_id}, {requests} requests per poll, "
                f"max_outstanding {self.max_outstanding}")


# ---------------------------------------------------------------------------------------------
# Pure functions: decoding and request planning


def bytes_to_registers(data: bytes, byte_order: Order = "big", word_order: Order = "big") -> list[int]:
    regs = [int.from_bytes(data[i:i + 2], byte_order) for i in range(0, len(data), 2)]
    return regs if word_order == "big" else list(reversed(regs))


def encode(value: int | float | str, type: str, byte_order: Order = "big", word_order: Order = "big",
           count: int | None = None) -> list[int]:
    """Registers as a device holds `value`: the inverse of `decode`, used by the simulator and by tests."""
    if type == "string":
        data = str(value).encode("latin-1")[: 2 * (count or 1)].ljust(2 * (count or 1), b"\x00")
        return bytes_to_registers(data, byte_order, "big")
    code, _ = _FORMATS[type]
    return bytes_to_registers(struct.pack(">" + code, value), byte_order, word_order)


def decode(registers: Sequence[int], type: str, byte_order: Order = "big", word_order: Order = "big") -> int | float | str:
    """Registers as the device sent them -> the raw value (before scale and offset), by the same
    compiled decoder the poll loop uses. For strings the word order is not applied: characters
    are stored in address order."""
    if type != "string" and len(registers) != _FORMATS[type][1]:
        raise ValueError(f"{type} needs {_FORMATS[type][1]} registers, got {len(registers)}")
    tag = ModbusTag(name="value", address=0, type=type, byte_order=byte_order, word_order=word_order,
                    count=max(1, len(registers)) if type == "string" else None)
    return compile_decoder(tag, 0)(registers, *_packed(registers))


_INT_RANGES = {"int16": (-(1 << 15), (1 << 15) - 1), "uint16": (0, (1 << 16) - 1),
               "int32": (-(1 << 31), (1 << 31) - 1), "uint32": (0, (1 << 32) - 1),
               "int64": (-(1 << 63), (1 << 63) - 1), "uint64": (0, (1 << 64) - 1)}
_FLOAT32_MAX = 3.4028234663852886e38


def encode_value(tag: ModbusTag, value: Any) -> list[int] | bool:
    """A value in engineering units -> the registers (or the coil state) that the driver's decoder
    reads back as that value: scale and offset reversed, then `encode`. Anything that does not fit
    the tag exactly is a WriteRefused (a wrong type, an integer out of the type's range, a value
    between two steps of the scale): a write must never wrap around or round to a made-up value."""
    what = f"{tag.name} ({tag.type})"
    if tag.type == "bool":
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise WriteRefused(f"wrong type: {what} takes true or false, not {value!r}", "wrong_type")
    if tag.type == "string":
        if not isinstance(value, str):
            raise WriteRefused(f"wrong type: {what} takes a string, not {value!r}", "wrong_type")
        try:
            data = value.encode("latin-1")
        except UnicodeEncodeError:
            raise WriteRefused(f"wrong type: {what} holds Latin-1 characters only", "wrong_type") from None
        if b"\x00" in data or len(data) > 2 * tag.width:
            raise WriteRefused(f"out of range: {what} holds at most {2 * tag.width} characters, without NUL",
                               "out_of_range")
        return encode(value, "string", tag.byte_order, tag.word_order, tag.width)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WriteRefused(f"wrong type: {what} takes a number, not {value!r}", "wrong_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise WriteRefused(f"wrong type: {what} takes a finite number", "wrong_type")
    if tag.scale == 1.0 and tag.offset == 0.0:
        raw: int | float = value
    else:
        raw = (value - tag.offset) / tag.scale
    if tag.type in _INT_RANGES:
        nearest = round(raw)
        # exact values only; a float tolerance for the division (e.g. 42.5 / 0.1 = 424.99999999999994)
        if abs(raw - nearest) > 1e-9 * max(1.0, abs(raw)):
            raise WriteRefused(f"out of range: {value!r} is between two steps of {what} "
                               f"(scale {tag.scale:g}, offset {tag.offset:g}: raw {raw!r})", "out_of_range")
        low, high = _INT_RANGES[tag.type]
        if not low <= nearest <= high:
            raise WriteRefused(f"out of range: {value!r} is raw {nearest} for {what}, outside {low}..{high}",
                               "out_of_range")
        raw = int(nearest)
    elif tag.type == "float32" and abs(raw) > _FLOAT32_MAX:
        raise WriteRefused(f"out of range: {value!r} does not fit a float32", "out_of_range")
    elif not math.isfinite(raw):
        raise WriteRefused(f"out of range: {value!r} does not fit {what}", "out_of_range")
    return encode(raw, tag.type, tag.byte_order, tag.word_order)


def _packed(registers: Sequence[int]) -> tuple[bytes, bytes]:
    """The registers of a response as big-endian bytes, and with the bytes of each swapped."""
    n = len(registers)
    return struct.pack(f">{n}H", *registers), struct.pack(f"<{n}H", *registers)


TagDecoder = Callable[[Sequence[int], bytes, bytes], Any]


def compile_decoder(tag: ModbusTag, off: int) -> TagDecoder:
    """The decoder of one tag at register offset `off` of a response, scale and offset applied:
    the one decode path. It reads from the response packed once per request (`_packed`), and is
    called with (registers, big-endian bytes of the registers, byte-swapped bytes).
    """
    if tag.type == "bool":
        return lambda values, be, le: bool(values[off])
    if tag.type == "string":
        first, last = 2 * off, 2 * (off + tag.width)
        swapped = tag.byte_order == "little"

        def text(values: Sequence[int], be: bytes, le: bytes) -> str:
            return (le if swapped else be)[first:last].split(b"\x00", 1)[0].decode("latin-1").rstrip()
        return text
    code, width = _FORMATS[tag.type]
    unpack_from = struct.Struct(">" + code).unpack_from
    scale, offset = tag.scale, tag.offset
    if tag.word_order == "big":
        use_swapped = tag.byte_order == "little"

        def raw(values: Sequence[int], be: bytes, le: bytes) -> Any:
            return unpack_from(le if use_swapped else be, 2 * off)[0]
    else:
        pack = struct.Struct((">" if tag.byte_order == "big" else "<") + "H" * width).pack

        def raw(values: Sequence[int], be: bytes, le: bytes) -> Any:
            return unpack_from(pack(*values[off + width - 1:off - 1 if off else None:-1]))[0]
    if scale == 1.0 and offset == 0.0:
        return raw
    return lambda values, be, le: raw(values, be, le) * scale + offset


@functools.lru_cache(maxsize=256)
def _shared_struct(fmt: str) -> struct.Struct:
    """One Struct per format: the requests of a range have the same (about 4 KB for 125 registers)."""
    return struct.Struct(fmt)


@dataclass
class ReadRequest:
    """One read request and the tags it serves, each at its offset into the response, its address
    less the request's (`placed`; not kept as a pair per tag: thousands of tags, thousands of tuples)."""

    table: Table
    address: int
    count: int
    tags: list[ModbusTag] = field(default_factory=list)
    _decoders: list[tuple[ModbusTag, TagDecoder, bool]] | None = field(default=None, repr=False, compare=False)
    _block: Any = field(default=None, repr=False, compare=False)  # see block_values; False: not possible

    @property
    def end(self) -> int:
        return self.address + self.count

    def placed(self) -> Iterator[tuple[ModbusTag, int]]:
        """(tag, its register or bit offset into the response), in tag order."""
        return ((tag, tag.address - self.address) for tag in self.tags)

    def block_values(self, values: Sequence[int]) -> list[Any] | None:
        """Every tag's value (scale and offset applied) from one `struct.unpack_from` over the
        whole response, in tag order; None when that cannot be done or a float is not finite,
        and then `decode_request` decodes tag by tag and says what is wrong. Possible when the
        tags are numbers, one byte order, big word order (the registers' own order) and do not
        overlap: a 125-register poll of uint16 tags is then one C call, not 125 decoders."""
        if self._block is None:
            self._block = self._plan_block()
        if self._block is False:
            return None
        unpack_from, swapped, scaled, floats = self._block
        be, le = _packed(values)
        out = list(unpack_from(le if swapped else be, 0))
        for i in floats:
            v = out[i]
            if v - v != 0.0:  # NaN or infinity
                return None
        for i, scale, offset in scaled:
            out[i] = out[i] * scale + offset
        return out

    def _plan_block(self) -> Any:
        if self.table in _BIT_TABLES or not self.tags:
            return False
        orders = {tag.byte_order for tag in self.tags}
        if len(orders) != 1 or any(tag.type == "string" or tag.word_order != "big" for tag in self.tags):
            return False
        fmt, pos = [">"], 0
        scaled, floats = [], []
        for i, (tag, off) in enumerate(self.placed()):
            if off < pos:
                return False  # overlapping tags (a register read as two types)
            code, width = _FORMATS[tag.type]
            fmt.append("x" * (2 * (off - pos)) + code)
            pos = off + width
            if tag.scale != 1.0 or tag.offset != 0.0:
                scaled.append((i, tag.scale, tag.offset))
            if tag.type in ("float32", "float64"):
                floats.append(i)
        return _shared_struct("".join(fmt)).unpack_from, orders == {"little"}, scaled, floats

    def decoders(self) -> list[tuple[ModbusTag, TagDecoder, bool]]:
        if self._decoders is None:
            self._decoders = [(tag, compile_decoder(tag, off), tag.type in ("float32", "float64"))
                              for tag, off in self.placed()]
        return self._decoders


def plan_reads(tags: Sequence[ModbusTag], *, max_gap: int = 8, max_bit_gap: int = 64,
               max_registers: int = MAX_REGISTERS, max_bits: int = MAX_BITS) -> list[ReadRequest]:
    """Merge the tags of one device into as few requests as the limits allow.

    Two tags share a request when the unused span between them is at most the gap and the
    merged request stays within the protocol limit. Overlapping tags (a register read as two
    types) share the same read.
    """
    requests: list[ReadRequest] = []
    for table in ("coil", "discrete", "holding", "input"):
        bits = table in _BIT_TABLES
        gap, limit = (max_bit_gap, max_bits) if bits else (max_gap, max_registers)
        current: ReadRequest | None = None
        for tag in sorted((t for t in tags if t.table == table), key=lambda t: (t.address, t.width)):
            tag_end = tag.address + tag.width
            if current is not None and tag.address - current.end <= gap and tag_end - current.address <= limit:
                current.count = max(current.count, tag_end - current.address)
            else:
                current = ReadRequest(table, tag.address, tag.width)
                requests.append(current)
            current.tags.append(tag)
    return requests


def decode_request(request: ReadRequest, values: Sequence[int] | Sequence[bool]) -> list[tuple[ModbusTag, Any, str | None]]:
    """(tag, value, problem) for every tag of a request, given the registers or bits read."""
    out: list[tuple[ModbusTag, Any, str | None]] = []
    be, le = (b"", b"") if request.table in _BIT_TABLES else _packed(values)
    for tag, decoder, floating in request.decoders():
        try:
            value = decoder(values, be, le)
        except (ValueError, IndexError, struct.error) as exc:
            out.append((tag, None, f"{tag.name}: {exc}"))
            continue
        if floating and (value != value or value in (math.inf, -math.inf)):
            out.append((tag, None, f"{tag.name}: not a finite number"))
        else:
            out.append((tag, value, None))
    return out


# ---------------------------------------------------------------------------------------------
# Links: who owns the client and serialises access


Reader = Callable[[Any], Awaitable[Any]]


class TcpLink:
    """One TCP connection per device. With `max_outstanding` 1 the pymodbus client, which
    serialises requests on it; above 1 the project's `PipelinedClient`, which keeps that many in
    flight (same call interface)."""

    def __init__(self, cfg: ModbusConfig) -> None:
        self.host, self.port, self.timeout = cfg.host, cfg.port, cfg.timeout
        if cfg.max_outstanding > 1:
            self.client: Any = PipelinedClient(cfg.host, cfg.port, timeout=cfg.timeout, retries=cfg.retries,
                                               max_outstanding=cfg.max_outstanding)
            return
        # reconnect_delay=0: pymodbus must not reconnect behind our back; `supervise` does it.
        self.client = pymodbus_client.AsyncModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout, retries=cfg.retries,
                                           reconnect_delay=0, name=f"modbus-{cfg.name}")

    async def open(self) -> None:
        try:
            connected = await self.client.connect()
        except (OSError, TimeoutError) as exc:
            raise DeviceDisconnected(f"connect failed: {exc or type(exc).__name__}",
                                     retry_soon=refused_nearby(exc, self.host)) from None
        except pymodbus_exceptions.ModbusException as exc:
            raise DeviceDisconnected(f"connect failed: {exc}") from None
        if not connected:
            raise DeviceDisconnected("connect failed", retry_soon=await self._refused_nearby())

    async def _refused_nearby(self) -> bool:
        """pymodbus reports a failed connect only as False. One plain TCP connect tells whether a
        device on this host or the LAN refused it (it is restarting: retry within half a second)
        from a timeout or an unreachable network (back off as usual)."""
        if not is_nearby(self.host):
            return False
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except ConnectionRefusedError:
            return True
        except (OSError, TimeoutError):
            return False
        writer.close()  # it answers now: a retry soon is right as well
        return True

    async def exchange(self, read: Reader) -> Any:
        if not self.client.connected:
            raise DeviceDisconnected("connection lost")
        return await read(self.client)

    async def exchange_within(self, op: Reader, wait: float) -> Any:
        """A write's exchange: behind the requests already queued on the connection, all of it
        within `wait` seconds. A cancelled wait never sends later (pymodbus sends under its lock)."""
        async with asyncio.timeout(wait):
            return await self.exchange(op)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def close(self) -> None:
        self.client.close()


class SerialBus:
    """The single owner of one serial port, shared by every device on that RS-485 line.

    Devices are built independently from config yet must share the port, so the bus lives in the
    pipeline's `DriverContext.shared`, keyed by port. It closes when its last device lets go of it.
    """

    def __init__(self, serial: SerialConfig, timeout: float, retries: int) -> None:
        self.settings = serial
        self.gap = serial.inter_frame_gap()
        self.lock = asyncio.Lock()
        self.requests = 0
        self._users = 0
        self.client = pymodbus_client.AsyncModbusSerialClient(serial.port, framer=pymodbus.FramerType.RTU, baudrate=serial.baudrate,
                                              bytesize=serial.bytesize, parity=serial.parity,
                                              stopbits=serial.stopbits, timeout=timeout, retries=retries,
                                              reconnect_delay=0, name=f"rtu-{serial.port}")

    @classmethod
    def for_port(cls, context: DriverContext, serial: SerialConfig, timeout: float, retries: int) -> "SerialBus":
        key = ("modbus.serial", serial.port)
        bus = context.shared.get(key)
        if bus is None:
            bus = context.shared[key] = cls(serial, timeout, retries)
        elif bus.settings != serial:
            log.warning("modbus.serial_settings_differ", port=serial.port, used=bus.settings.model_dump())
        return bus

    async def open(self) -> None:
        async with self.lock:
            self._users += 1
            if self.client.connected:
                return
            try:
                connected = await self.client.connect()
            except (OSError, pymodbus_exceptions.ModbusException) as exc:
                raise DeviceDisconnected(f"cannot open {self.settings.port}: {exc}") from None
            if not connected:
                raise DeviceDisconnected(f"cannot open {self.settings.port}")

    async def exchange(self, read: Reader) -> Any:
        async with self.lock:
            return await self._on_line(read)

    async def exchange_within(self, op: Reader, wait: float) -> Any:
        """A write's exchange: it takes its turn on the line like a poll (the lock is first come,
        first served) but waits for it at most `wait` seconds; then BusBusy, and nothing is sent."""
        try:
            async with asyncio.timeout(wait):
                await self.lock.acquire()
        except TimeoutError:
            raise BusBusy(f"{self.settings.port} was busy for {wait:g}s; nothing was sent") from None
        try:
            return await self._on_line(op)
        finally:
            self.lock.release()

    async def _on_line(self, op: Reader) -> Any:
        """One exchange, the lock held."""
        if not self.client.connected:
            raise DeviceDisconnected(f"{self.settings.port} is closed")
        try:
            return await op(self.client)
        finally:
            self.requests += 1
            # The line must stay silent for t3.5 before the next frame, whoever sends it.
            await asyncio.sleep(self.gap)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self.client.close()


# ---------------------------------------------------------------------------------------------
# The driver


_READS = {
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
    "holding": "read_holding_registers",
    "input": "read_input_registers",
}


class ModbusDriver:
    def __init__(self, config: ModbusConfig, health: DeviceHealth, context: DriverContext | None = None) -> None:
        self.config = config
        self.health = health
        self.context = context or DriverContext()
        self.plan = plan_reads(config.tags, max_gap=config.max_gap, max_bit_gap=config.max_bit_gap,
                               max_registers=config.max_registers, max_bits=config.max_bits)
        self.health.extra["requests_per_poll"] = len(self.plan)
        if config.transport == "tcp":
            self.health.extra["max_outstanding"] = config.max_outstanding
        # per request of the plan (keyed by the object): the sources and the units of its tags, in
        # tag order (two lists, not a pair per tag: thousands of tags are thousands of tuples)
        self._outputs = {id(r): ([source_of(config.name, t.name) for t in r.tags], [t.unit for t in r.tags])
                         for r in self.plan}
        self._bad_tags: set[str] = set()  # so that healthy polls skip the health bookkeeping
        self._live: TcpLink | SerialBus | None = None  # the open link, while a session runs

    @functools.cached_property
    def _tags(self) -> dict[str, Any]:
        """Tag name -> tag, for writes: made by the first one (most gateways never write)."""
        return {t.name: t for t in self.config.tags}

    async def run(self, emit: Emit) -> None:
        await supervise(lambda: self._session(emit), self.health, self.config.reconnect_min,
                        self.config.reconnect_max)

    def _link(self) -> TcpLink | SerialBus:
        cfg = self.config
        if cfg.transport == "rtu":
            assert cfg.serial is not None
            return SerialBus.for_port(self.context, cfg.serial, cfg.timeout, cfg.retries)
        return TcpLink(cfg)

    async def _session(self, emit: Emit) -> None:
        link = self._link()
        try:
            await link.open()
            self._live = link  # writes go through the link the polls use
            try:
                await every(self.config.poll_interval, lambda: self.poll(link, emit), self.health)
            except DeviceDisconnected:
                await mark_bad(self.config, emit)  # once per outage
                raise
        finally:
            self._live = None
            link.close()

    async def _read(self, link: TcpLink | SerialBus, request: ReadRequest) -> Sequence[int] | Sequence[bool]:
        method = _READS[request.table]
        unit = self.config.unit_id

        async def read(client: Any) -> Any:
            return await getattr(client, method)(request.address, count=request.count, device_id=unit)

        try:
            response = await link.exchange(read)
            check_cancelled()  # pymodbus's wait_for can swallow a stop request (Python 3.11)
        except DriverError:
            raise
        except NoResponse:  # the pipelined client (max_outstanding > 1)
            raise NoAnswer(f"no answer to {request.table}@{request.address}+{request.count}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise DeviceDisconnected(f"{type(exc).__name__}: {exc}") from None
        except pymodbus_exceptions.ModbusException as exc:
            if not link.connected:
                raise DeviceDisconnected(str(exc)) from None
            raise NoAnswer(f"no answer to {request.table}@{request.address}+{request.count}") from None
        if response.isError():
            raise ModbusError(f"exception code {response.exception_code} for "
                              f"{request.table}@{request.address}+{request.count}")
        return response.bits[: request.count] if request.table in _BIT_TABLES else response.registers

    async def poll(self, link: TcpLink | SerialBus, emit: Emit) -> None:
        """One pass over the read plan. A failed request marks only its own tags bad.

        With `max_outstanding` k > 1 the next k requests are on the wire while the answer of the
        oldest is decoded; answers are handled in request order, so what is emitted is the same
        as one request at a time, only sooner."""
        if self.config.max_outstanding > 1 and len(self.plan) > 1:
            await self._poll_pipelined(link, emit)
            return
        for request in self.plan:
            started = time.monotonic()
            try:
                values = await self._read(link, request)
            except ModbusError as exc:
                await self._handle(request, exc, started, emit)
                continue
            await self._handle(request, values, started, emit)

    async def _poll_pipelined(self, link: TcpLink | SerialBus, emit: Emit) -> None:
        async def attempt(request: ReadRequest) -> tuple[Any, float]:
            started = time.monotonic()
            try:
                return await self._read(link, request), started
            except DriverError as exc:  # handed back in order; raised there if the link is gone
                return exc, started

        window = self.config.max_outstanding
        lost: DriverError | None = None  # raised after the group: inside, it would become an ExceptionGroup
        async with asyncio.TaskGroup() as tg:
            in_flight: collections.deque[tuple[ReadRequest, asyncio.Task]] = collections.deque()
            for request in self.plan:
                if len(in_flight) >= window:
                    lost = await self._handle_task(*in_flight.popleft(), emit)
                    if lost is not None:
                        break
                in_flight.append((request, tg.create_task(attempt(request), name="modbus.read")))
            while in_flight and lost is None:
                lost = await self._handle_task(*in_flight.popleft(), emit)
            for _, task in in_flight:  # the link is gone: the reads still in flight cannot end well
                task.cancel()
        if lost is not None:
            raise lost

    async def _handle_task(self, request: ReadRequest, task: asyncio.Task, emit: Emit) -> DriverError | None:
        """Handle one read of the pipeline; a failure that ends the session is returned."""
        outcome, started = await task
        if isinstance(outcome, DriverError) and not isinstance(outcome, ModbusError):
            return outcome
        await self._handle(request, outcome, started, emit)
        return None

    async def _handle(self, request: ReadRequest, outcome: Any, started: float, emit: Emit) -> None:
        """One request's answer (the registers or bits) or its ModbusError: samples and health."""
        if isinstance(outcome, ModbusError):
            self.health.bad_value(str(outcome), key=f"read:{request.table}@{request.address}")
            await mark_bad(self.config, emit, [tag.name for tag in request.tags])
            if isinstance(outcome, NoAnswer):
                self.health.error(outcome)
            return
        now = time.time()
        self.health.good_value(key=f"read:{request.table}@{request.address}")
        self.health.ok((time.monotonic() - started) * 1000.0, now=now)
        if not self._bad_tags:
            values = request.block_values(outcome)
            if values is not None:  # the usual case: one hand-over per request, no per-tag work
                good = Quality.GOOD
                sources, units = self._outputs[id(request)]
                await emit([Sample(source, value, now, good, unit)
                            for source, unit, value in zip(sources, units, values)])
                return
        decoded = decode_request(request, outcome)  # in tag order, as the sources
        sources, units = self._outputs[id(request)]
        if self._bad_tags or any(problem is not None for _, _, problem in decoded):
            await self._emit_checked(decoded, sources, now, emit)
        else:  # the usual case: one hand-over per request, no per-tag bookkeeping
            good = Quality.GOOD
            await emit([Sample(source, value, now, good, unit)
                        for source, unit, (_, value, _) in zip(sources, units, decoded)])

    async def _emit_checked(self, decoded: list[tuple[ModbusTag, Any, str | None]], sources: list[str], now: float,
                            emit: Emit) -> None:
        """Tag by tag (`sources` in the same order), counting a tag's problems in health and its recovery."""
        for source, (tag, value, problem) in zip(sources, decoded):
            if problem is not None:
                self._bad_tags.add(tag.name)
                self.health.bad_value(problem, key=f"tag:{tag.name}")
                await emit(Sample.bad(source, now, tag.unit))
            else:
                if tag.name in self._bad_tags:
                    self._bad_tags.discard(tag.name)
                    self.health.good_value(key=f"tag:{tag.name}")
                await emit(Sample(source, value, now, Quality.GOOD, tag.unit))


    # ----- writes (the command router calls these; it has checked permission and bounds) -----

    async def check(self, tag_name: str, value: Any) -> None:
        """WriteRefused if `value` cannot be written to the tag; nothing is sent."""
        tag = self._tags.get(tag_name)
        if tag is None or not tag.writable:
            raise WriteRefused(f"not writable: {self.config.name}.{tag_name}", "not_writable")
        encode_value(tag, value)

    async def write(self, tag_name: str, value: Any) -> Any:
        """Write one tag through the device's own link (behind the polls); then, unless the tag
        says `verify: false`, read it back and return the value read (None without verify)."""
        tag = self._tags.get(tag_name)
        if tag is None or not tag.writable:
            raise WriteRefused(f"not writable: {self.config.name}.{tag_name}", "not_writable")
        encoded = encode_value(tag, value)  # refusals happen here, before the link is touched
        link = self._live
        if link is None or not link.connected:
            raise WriteRefused(f"device disconnected: {self.config.name}; nothing was sent", "disconnected")
        unit = self.config.unit_id

        async def send(client: Any) -> Any:
            if tag.table == "coil":
                return await client.write_coil(tag.address, bool(encoded), device_id=unit)
            assert isinstance(encoded, list)
            if len(encoded) == 1:
                return await client.write_register(tag.address, encoded[0], device_id=unit)
            return await client.write_registers(tag.address, encoded, device_id=unit)  # one request

        response = await self._write_exchange(link, send, f"write {tag.table}@{tag.address}")
        if response.isError():
            raise WriteFailed(f"device refused the write of {tag_name}: exception code {response.exception_code}")
        if not tag.verify:
            return None
        request = ReadRequest(tag.table, tag.address, tag.width, [tag])

        async def read(client: Any) -> Any:
            return await getattr(client, _READS[tag.table])(tag.address, count=tag.width, device_id=unit)

        response = await self._write_exchange(link, read, f"read-back {tag.table}@{tag.address}")
        if response.isError():
            raise WriteFailed(f"written, but the read-back of {tag_name} got exception code {response.exception_code}",
                              "read_back_failed")
        values = response.bits[: tag.width] if tag.table in _BIT_TABLES else response.registers
        (_, read_back, problem), = decode_request(request, values)
        if problem is not None:
            raise WriteFailed(f"written, but the read-back is not a value: {problem}", "read_back_failed")
        return read_back

    async def _write_exchange(self, link: TcpLink | SerialBus, op: Reader, what: str) -> Any:
        try:
            response = await link.exchange_within(op, self.config.timeout)
        except BusBusy as exc:
            raise WriteFailed(str(exc), "busy") from None
        except DeviceDisconnected as exc:
            raise WriteRefused(f"device disconnected: {exc}; nothing was sent", "disconnected") from None
        except (pymodbus_exceptions.ModbusException, OSError, TimeoutError) as exc:
            raise WriteFailed(f"no answer to {what} within {self.config.timeout:g}s "
                              f"({type(exc).__name__}); the device may have taken it", "no_answer") from None
        check_cancelled()
        return response

    async def call(self, method: str, args: list[Any]) -> list[Any]:
        raise WriteRefused(f"unknown method: Modbus device {self.config.name} has no methods", "unknown_method")


def _factory(config: DeviceConfig, health: DeviceHealth, context: DriverContext) -> ModbusDriver:
    assert isinstance(config, ModbusConfig)
    return ModbusDriver(config, health, context)


DRIVER = DriverType("modbus", ModbusConfig, _factory)
