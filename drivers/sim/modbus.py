"""A simulated Modbus machine on pymodbus' SimData/SimDevice server API (pymodbus >= 3.10).

Register map of every unit id (zero-based addresses):

holding
  0-1    temperature   float32  degC, drifts slowly around 45 with a little noise
  2-3    pressure      float32  bar, around 6
  4-5    parts         uint32   parts counter, +1 every `part_period` seconds while running
  6      speed_rpm     uint16   1500 while running, 0 when stopped
  7      status        int16    0 stopped, 1 running
  8-11   energy        float64  kWh, grows while running
  12-15  serial        string   "SIM-0001" (4 registers)
  16-17  setpoint      float32  degC, writable (45.0 at start): what the gateway's write-back sets
  100-399 scratch      writable registers (0), for tests and benchmarks
input
  0-1    voltage       float32  V, around 400
  2      current       uint16   A x 10
coil
  0      running       cycles: `run_s` seconds on, `stop_s` seconds off
  1-15   spare         writable
discrete
  0      door_open     always False
  1      overtemp      temperature > 80

Holding 0-15 are read-only (a write answers exception 2); `writes` counts the write requests
received per (unit id, table), so tests can see that a refused write sent nothing.
Addresses outside the map answer with exception 2 (illegal data address). `fail` holds
addresses of the holding table that answer with exception 4 (device failure), for tests.
Unit ids not in `unit_ids` get no answer on RTU, and exception 11 (gateway target failed to
respond) on TCP.
Values are computed from the clock when a request reads them, so the server needs no timer task.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from drivers.modbus import encode

SETPOINT = 16
SETPOINT_DEFAULT = 45.0
SCRATCH = 100
SCRATCH_COUNT = 300

# function code -> table name, for the request counters
_WRITE_FCS = (5, 6, 15, 16)
_TABLE_OF_FC = {1: "coil", 2: "discrete", 3: "holding", 4: "input", 5: "coil", 6: "holding", 15: "coil",
                16: "holding"}


@dataclass
class MachineModel:
    """The physics behind the registers: a pure function of time (plus a little noise)."""

    t0: float = field(default_factory=time.time)
    run_s: float = 20.0
    stop_s: float = 5.0
    part_period: float = 2.0
    seed: int = 1

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def running(self, now: float) -> bool:
        return (now - self.t0) % (self.run_s + self.stop_s) < self.run_s

    def run_time(self, now: float) -> float:
        """Seconds spent running since t0."""
        cycle = self.run_s + self.stop_s
        full, rest = divmod(max(0.0, now - self.t0), cycle)
        return full * self.run_s + min(rest, self.run_s)

    def temperature(self, now: float) -> float:
        t = now - self.t0
        return 45.0 + 5.0 * math.sin(2 * math.pi * t / 600.0) + 1.5 * math.sin(2 * math.pi * t / 47.0) \
            + self._rng.gauss(0.0, 0.05)

    def holding(self, now: float) -> list[int]:
        """Registers 0..15 of the holding table."""
        running = self.running(now)
        regs = encode(self.temperature(now), "float32")
        regs += encode(6.0 + 0.2 * math.sin(now / 13.0) + self._rng.gauss(0.0, 0.01), "float32")
        regs += encode(int(self.run_time(now) // self.part_period) & 0xFFFFFFFF, "uint32")
        regs += encode(1500 if running else 0, "uint16")
        regs += encode(1 if running else 0, "int16")
        regs += encode(self.run_time(now) * 7.5 / 3600.0, "float64")
        regs += encode("SIM-0001", "string", count=4)
        return regs

    def input(self, now: float) -> list[int]:
        return encode(400.0 + self._rng.gauss(0.0, 0.5), "float32") + [
            int(125 if self.running(now) else 3) + self._rng.randint(0, 2)]


class _KnownUnits(SimCore):
    """Unit ids the simulator does not define get no answer on RTU (as on a real line) and the
    TCP gateway exception 11 (target failed to respond) on TCP; pymodbus 3.16 alone answers
    them with a device-failure exception and logs a traceback."""

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1):  # noqa: ANN201
        if device_id not in self.devices:
            raise NoSuchIdException(f"unit id {device_id}")
        return await super().async_getValues(device_id, func_code, address, count)

    async def async_setValues(self, device_id: int, func_code: int, address: int, values):  # noqa: ANN001, ANN201
        if device_id not in self.devices:
            raise NoSuchIdException(f"unit id {device_id}")
        return await super().async_setValues(device_id, func_code, address, values)


class _InOrderHandler(ServerRequestHandler):
    """One TCP connection of the simulator, able to take several requests at once.

    pymodbus 3.16's server handler parses one frame per received segment and answers, a loop pass
    later, whatever request it parsed last: requests that arrive together (a client with several
    in flight, `max_outstanding`) would wait for the next segment or get another's answer. This
    one takes every complete frame of a segment and answers them one after another, in the order
    they came. `latency` delays every answer on its way out (a slow link: a pipelining client
    gains by it), without holding back the requests behind it.
    """

    def __init__(self, owner: "_TcpServer") -> None:
        super().__init__(owner, owner.trace_packet, owner.trace_pdu, owner.trace_connect)
        self.latency = owner.latency
        self._requests: deque = deque()
        self._serving: asyncio.Task | None = None

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        used = 0
        while used < len(data):
            taken = super().callback_data(data[used:], addr)
            if not taken:
                break  # an incomplete frame: the rest comes with the next segment
            used += taken
            if self.last_pdu is not None:
                self._requests.append((self.last_pdu, self.last_addr))
        if self._requests and (self._serving is None or self._serving.done()):
            self._serving = asyncio.get_running_loop().create_task(self._serve(), name="sim.modbus.serve")
        return used

    def handle_later(self) -> None:
        """pymodbus' own hand-over: replaced by `_serve`, which answers every request in turn."""

    async def _serve(self) -> None:
        while self._requests:
            self.last_pdu, self.last_addr = self._requests.popleft()
            await self.handle_request()

    def send(self, data: bytes, addr: tuple | None = None) -> None:
        if self.latency > 0:  # timers of equal delay fire in order: answers keep their order
            asyncio.get_running_loop().call_later(self.latency, super().send, data, addr)
        else:
            super().send(data, addr)

    def callback_disconnected(self, exc: Exception | None) -> None:
        if self._serving is not None:
            self._serving.cancel()
        super().callback_disconnected(exc)


class _TcpServer(ModbusTcpServer):
    latency = 0.0  # seconds added to every answer

    def callback_new_connection(self) -> _InOrderHandler:
        return _InOrderHandler(self)


class ModbusSimulator:
    """A pymodbus server (TCP or RTU) with one or more unit ids sharing the register map.

    `requests` counts the requests received per (unit id, table); `fail` makes holding
    addresses answer with a device-failure exception.
    """

    def __init__(self, unit_ids: tuple[int, ...] = (1,), model: MachineModel | None = None,
                 latency: float = 0.0) -> None:
        self.unit_ids = unit_ids
        self.latency = latency  # TCP: seconds added to every answer (a slow link)
        self.model = model or MachineModel()
        self.requests: Counter[tuple[int, str]] = Counter()
        self.writes: Counter[tuple[int, str]] = Counter()
        self.fail: set[int] = set()
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self._task: asyncio.Task | None = None

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def _devices(self) -> list[SimDevice]:
        devices = []
        for unit in self.unit_ids:
            holding = [
                SimData(0, values=[0] * SETPOINT + encode(SETPOINT_DEFAULT, "float32"), datatype=DataType.REGISTERS),
                SimData(SCRATCH, count=SCRATCH_COUNT, values=0, datatype=DataType.REGISTERS),
            ]
            inputs = [SimData(0, count=3, values=0, datatype=DataType.REGISTERS)]
            coils = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
            discrete = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
            devices.append(SimDevice(id=unit, simdata=(coils, discrete, holding, inputs), action=self._action))
        return devices

    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values: list[int] | list[bool] | None) -> ExcCodes | None:
        """Called by pymodbus before it serves a request: refresh the live values in place."""
        now = time.time()
        table = _TABLE_OF_FC.get(function_code)
        if table == "holding":
            if set_values is None and any(a in self.fail for a in range(address, address + count)):
                return ExcCodes.DEVICE_FAILURE
            if set_values is not None and address < SETPOINT:
                return ExcCodes.ILLEGAL_ADDRESS  # the live values are read-only
            registers[0 - start_address:16 - start_address] = self.model.holding(now)
        elif table == "input":
            registers[0 - start_address:3 - start_address] = self.model.input(now)
        elif table == "coil" and set_values is None:
            # coil block: 16 coils per register, coil 0 in bit 0 of register 0
            registers[0 - start_address] = (registers[0 - start_address] & ~1) | int(self.model.running(now))
        elif table == "discrete":
            overtemp = self.model.temperature(now) > 80.0
            registers[0 - start_address] = int(overtemp) << 1
        return None

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            key = (pdu.dev_id, _TABLE_OF_FC.get(pdu.function_code, str(pdu.function_code)))
            self.requests[key] += 1
            if pdu.function_code in _WRITE_FCS:
                self.writes[key] += 1
        return pdu

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 5020) -> "ModbusSimulator":
        self.server = _TcpServer(self._devices(), address=(host, port), trace_pdu=self._trace_pdu)
        self.server.latency = self.latency
        self.server.context = _KnownUnits(self._devices())
        await self.server.serve_forever(background=True)
        return self

    async def start_rtu(self, port: str, baudrate: int = 19200, parity: str = "N", stopbits: int = 1,
                        bytesize: int = 8) -> "ModbusSimulator":
        self.server = ModbusSerialServer(self._devices(), framer=FramerType.RTU, port=port, baudrate=baudrate,
                                         ignore_missing_devices=True,
                                         parity=parity, stopbits=stopbits, bytesize=bytesize,
                                         trace_pdu=self._trace_pdu)
        self.server.context = _KnownUnits(self._devices())
        await self.server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    async def __aenter__(self) -> "ModbusSimulator":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(host: str = "127.0.0.1", port: int = 5020, unit_ids: tuple[int, ...] = (1,),
                serial_port: str | None = None, baudrate: int = 19200, run_s: float = 20.0,
                stop_s: float = 5.0, ready: asyncio.Event | None = None) -> None:
    """Run the simulator until cancelled: TCP on host:port, or RTU on `serial_port` when given."""
    sim = ModbusSimulator(tuple(unit_ids), MachineModel(run_s=run_s, stop_s=stop_s))
    if serial_port:
        await sim.start_rtu(serial_port, baudrate=baudrate)
    else:
        await sim.start_tcp(host, port)
    from drivers.sim import hold

    await hold(sim, ready)
