"""A Modbus TCP client that keeps several requests in flight on one connection.

Modbus TCP numbers every request (the MBAP transaction id) so that a device may take more than
one before it answers; pymodbus 3.16's client sends one and waits (a lock around each
exchange). A 5,000-register poll is 40 requests, and one after the other they overran a 50 ms
poll interval. The driver uses this client when a device has `max_outstanding` > 1: up to that
many requests are on the wire at once, answers are matched by transaction id, whatever order
they come in.

It offers the subset of pymodbus' client API the driver calls (read and write methods with
`count=` and `device_id=`, responses with `isError()`, `registers`, `bits`, `exception_code`), so
the driver's code is the same over both. Only the client side, only TCP; no pymodbus import.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

_HEADER = struct.Struct(">HHHB")  # transaction id, protocol id (0), length of what follows, unit id
_READ = struct.Struct(">BHH")  # function code, address, count (also: write single, value)
_MAX_FRAME = 260  # MBAP header 7 + PDU at most 253


class NoResponse(Exception):
    """A request got no answer within the timeout (after the retries); the link is still up."""


@dataclass(slots=True)
class Response:
    """The answer to one request, shaped like pymodbus' responses where the driver reads them."""

    function_code: int
    registers: list[int] = field(default_factory=list)
    bits: list[bool] = field(default_factory=list)
    exception_code: int = 0

    def isError(self) -> bool:  # noqa: N802 - pymodbus' name, so that the driver reads both alike
        return self.function_code >= 0x80


class _Protocol(asyncio.Protocol):
    def __init__(self, client: "PipelinedClient") -> None:
        self.client = client
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        # Every complete frame in the buffer: several answers often arrive in one segment.
        while len(buf) >= 7:
            tid, protocol, length, _unit = _HEADER.unpack_from(buf)
            if protocol != 0 or not 2 <= length <= _MAX_FRAME - 6:
                self.client._lost(ConnectionError(f"not a Modbus TCP frame (protocol {protocol}, length {length})"))
                return
            end = 6 + length
            if len(buf) < end:
                return
            pdu = bytes(buf[7:end])
            del buf[:end]
            self.client._answer(tid, pdu)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc or ConnectionError("connection closed by the device"))


class PipelinedClient:
    """See the module docstring. `max_outstanding` requests at most are on the wire at once."""

    def __init__(self, host: str, port: int = 502, *, timeout: float = 1.0, retries: int = 0,
                 max_outstanding: int = 4) -> None:
        self.host, self.port = host, port
        self.timeout, self.retries = float(timeout), int(retries)
        self.max_outstanding = int(max_outstanding)
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, asyncio.Future[bytes]] = {}  # transaction id -> its answer
        self._slots: asyncio.Semaphore | None = None
        self._next_tid = 0
        self._error: BaseException | None = None

    async def connect(self) -> bool:
        loop = asyncio.get_running_loop()
        self._error = None
        self._slots = asyncio.Semaphore(self.max_outstanding)
        async with asyncio.timeout(self.timeout):
            await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
        return self.connected

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and self._error is None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._lost(ConnectionError("closed"))

    # ----- requests -----

    async def execute(self, unit: int, pdu: bytes) -> bytes:
        """Send one request PDU, return the answer's PDU. Raises ConnectionError when the link
        is gone and NoResponse when the device stays silent (after `retries` more tries)."""
        if self._slots is None:
            raise ConnectionError("not connected")
        async with self._slots:
            for _ in range(self.retries + 1):
                if not self.connected:
                    raise ConnectionError(f"connection lost: {self._error}")
                tid = self._tid()
                answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                self._waiting[tid] = answer
                assert self._transport is not None
                self._transport.write(_HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu)
                try:
                    async with asyncio.timeout(self.timeout):
                        return await answer
                except TimeoutError:
                    continue  # an answer that comes later finds no one waiting and is dropped
                finally:
                    self._waiting.pop(tid, None)
        raise NoResponse(f"no answer within {self.timeout:g} s ({self.retries + 1} tries)")

    def _tid(self) -> int:
        for _ in range(65536):  # the next id not waiting for an answer (at most 16 are)
            self._next_tid = (self._next_tid + 1) & 0xFFFF
            if self._next_tid not in self._waiting:
                return self._next_tid
        raise RuntimeError("every transaction id is in use")

    def _answer(self, tid: int, pdu: bytes) -> None:
        waiting = self._waiting.get(tid)
        if waiting is not None and not waiting.done():
            waiting.set_result(pdu)

    def _lost(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._transport is not None:
            self._transport.close()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(ConnectionError(f"connection lost: {exc}"))
        self._waiting.clear()

    # ----- the pymodbus-shaped API -----

    async def _read(self, function: int, address: int, count: int, device_id: int) -> Response:
        pdu = await self.execute(device_id, _READ.pack(function, address, count))
        return _decode_read(function, count, pdu)

    async def read_coils(self, address: int, *, count: int = 1, device_id: int = 1) -> Response:
        return await self._read(1, address, count, device_id)

    async def read_discrete_inputs(self, address: int, *, count: int = 1, device_id: int = 1) -> Response:
        return await self._read(2, address, count, device_id)

    async def read_holding_registers(self, address: int, *, count: int = 1, device_id: int = 1) -> Response:
        return await self._read(3, address, count, device_id)

    async def read_input_registers(self, address: int, *, count: int = 1, device_id: int = 1) -> Response:
        return await self._read(4, address, count, device_id)

    async def write_coil(self, address: int, value: bool, *, device_id: int = 1) -> Response:
        pdu = await self.execute(device_id, _READ.pack(5, address, 0xFF00 if value else 0))
        return _decode_write(5, pdu)

    async def write_register(self, address: int, value: int, *, device_id: int = 1) -> Response:
        pdu = await self.execute(device_id, _READ.pack(6, address, value & 0xFFFF))
        return _decode_write(6, pdu)

    async def write_coils(self, address: int, values: Sequence[bool], *, device_id: int = 1) -> Response:
        packed = bytearray((len(values) + 7) // 8)
        for i, bit in enumerate(values):
            if bit:
                packed[i // 8] |= 1 << (i % 8)
        pdu = await self.execute(device_id, _READ.pack(15, address, len(values)) + bytes([len(packed)]) + packed)
        return _decode_write(15, pdu)

    async def write_registers(self, address: int, values: Sequence[int], *, device_id: int = 1) -> Response:
        body = struct.pack(f">{len(values)}H", *(v & 0xFFFF for v in values))
        pdu = await self.execute(device_id, _READ.pack(16, address, len(values)) + bytes([len(body)]) + body)
        return _decode_write(16, pdu)


def _exception(function: int, pdu: bytes) -> Response | None:
    if pdu and pdu[0] == function | 0x80:
        return Response(pdu[0], exception_code=pdu[1] if len(pdu) > 1 else 0)
    if not pdu or pdu[0] != function:
        raise ConnectionError(f"answer with function code {pdu[0] if pdu else None} to a request with {function}")
    return None


def _decode_read(function: int, count: int, pdu: bytes) -> Response:
    error = _exception(function, pdu)
    if error is not None:
        return error
    size = pdu[1] if len(pdu) > 1 else -1
    data = pdu[2:]
    if function in (1, 2):
        if size != len(data) or size * 8 < count:
            raise ConnectionError(f"bit answer of {len(data)} bytes for {count} bits")
        bits = [bool(data[i // 8] >> (i % 8) & 1) for i in range(size * 8)]
        return Response(function, bits=bits)
    if size != len(data) or size != 2 * count:
        raise ConnectionError(f"register answer of {len(data)} bytes for {count} registers")
    return Response(function, registers=list(struct.unpack(f">{count}H", data)))


def _decode_write(function: int, pdu: bytes) -> Response:
    error = _exception(function, pdu)
    return error if error is not None else Response(function)
