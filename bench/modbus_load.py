"""A Modbus TCP load server for bench_pipeline: N holding registers, all changing every 100 ms.

    python bench/modbus_load.py PORT N

Lean on purpose: the benchmark measures the gateway, so the device must cost little CPU. It
answers function codes 3 and 4 from one precomputed block of register bytes (refreshed every
100 ms), every complete request of a segment in order (several may be in flight,
`max_outstanding`), and anything else with exception 1 (illegal function).
"""

from __future__ import annotations

import array
import asyncio
import struct
import sys

_HEADER = struct.Struct(">HHHB")
_REQUEST = struct.Struct(">BHH")


class Registers:
    def __init__(self, n: int) -> None:
        self.n = n
        self.data = b""
        self.tick = 0
        self.refresh()

    def refresh(self) -> None:
        """Every register gets a new value: (tick + address) mod 65536, big-endian."""
        values = array.array("H", ((self.tick + i) & 0xFFFF for i in range(self.n)))
        if sys.byteorder == "little":
            values.byteswap()
        self.data = values.tobytes()
        self.tick += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(max(0.0, start + self.tick * 0.1 - loop.time()))
            self.refresh()


class Device(asyncio.Protocol):
    def __init__(self, registers: Registers) -> None:
        self.registers = registers
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # noqa: ANN001
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        out = []
        while len(buf) >= 7:
            tid, _protocol, length, unit = _HEADER.unpack_from(buf)
            end = 6 + length
            if len(buf) < end:
                break
            out.append(self.answer(tid, unit, bytes(buf[7:end])))
            del buf[:end]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def answer(self, tid: int, unit: int, pdu: bytes) -> bytes:
        function = pdu[0] if pdu else 0
        if function in (3, 4) and len(pdu) == 5:
            _, address, count = _REQUEST.unpack(pdu)
            if 1 <= count <= 125 and address + count <= self.registers.n:
                body = bytes((function, 2 * count)) + self.registers.data[2 * address:2 * (address + count)]
                return _HEADER.pack(tid, 0, len(body) + 1, unit) + body
            body = bytes((function | 0x80, 2))  # illegal data address
        else:
            body = bytes(((function | 0x80) & 0xFF, 1))  # illegal function
        return _HEADER.pack(tid, 0, len(body) + 1, unit) + body


async def main(port: int, n: int) -> None:
    registers = Registers(n)
    server = await asyncio.get_running_loop().create_server(lambda: Device(registers), "127.0.0.1", port)
    async with server, asyncio.TaskGroup() as tg:
        tg.create_task(registers.run(), name="load.refresh")
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
