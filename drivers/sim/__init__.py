"""Simulated devices for tests, the demo and `edge-gateway simulate {modbus,opcua,vibration}`.

`run_simulator(kind, **options)` runs one until cancelled. Options per kind (all optional):

modbus     host="127.0.0.1", port=5020, unit_ids=(1,), serial_port=None (RTU on that port
           instead of TCP), baudrate=19200, run_s=20.0, stop_s=5.0 (running-coil cycle),
           ready=asyncio.Event. Register map: drivers/sim/modbus.py.
opcua      host="127.0.0.1", port=4840, secure=False (Basic256Sha256 SignAndEncrypt only, with a
           self-signed certificate written to cert_dir), cert_dir=None, users=None
           ({"name": "password"}: username token required), period=0.5 (s between updates),
           capture_samples=4096, capture_rate=12800.0, capture_every=1.0 (s between vibration
           captures in Motor.Capture; None: back to back), ready=asyncio.Event.
           Node ids: ns=2;s=Oven.Temperature ..., ns=2;s=Motor.Capture (drivers/sim/opcua.py).
vibration  host="127.0.0.1", port=1883 (an MQTT broker), topic="sensors/motor1/accel",
           sample_rate=12000.0, block=4096, shaft_hz=29.93, fault="outer" ("inner" or None),
           severity=0.05, grow_s=300.0, max_severity=1.0, noise_g=0.02,
           temp_topic="sensors/motor1/temp" (None: no temperature), qos=0, username=None,
           password=None, blocks=None (stop after that many), seed=None, mode="stream"
           ("burst": held back and pushed every burst_s=10.0 s; "json": self-describing JSON
           blocks), ready=asyncio.Event.
"""

from __future__ import annotations

import asyncio
from typing import Any

KINDS = ("modbus", "opcua", "vibration")


async def hold(sim: Any, ready: asyncio.Event | None) -> None:
    """Signal `ready`, then keep a started simulator serving until cancelled, and stop it."""
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


async def run_simulator(kind: str, **options: Any) -> Any:
    """Run the simulator `kind` until cancelled (vibration: or until `blocks` are sent)."""
    if kind == "modbus":
        from drivers.sim import modbus

        return await modbus.serve(**options)
    if kind == "opcua":
        from drivers.sim import opcua

        return await opcua.serve(**options)
    if kind == "vibration":
        from drivers.sim import vibration

        return await vibration.serve(**options)
    raise ValueError(f"unknown simulator {kind!r}: expected one of {', '.join(KINDS)}")
