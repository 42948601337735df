"""A simulated OPC UA oven and motor vibration collector (asyncua server).

Nodes, all in the namespace `urn:edge-gateway:sim` (index 2, so ids read `ns=2;s=Oven.X`):

  Oven.Temperature  Double   degC, drifts around 180 with a little noise
  Oven.Setpoint     Double   writable, 180
  Oven.Running      Boolean  cycles: `run_s` on, `stop_s` off
  Oven.Parts        UInt32   +1 every 2 s while running
  Oven.State        String   "running" / "idle"
  Oven.Broken       Double   always status BadSensorFailure, for bad-quality tests
  Oven.Counter      Int64    +1 every update, for throughput measurements
  Oven.Batches      UInt32   writable, +1 every `batch_s` seconds; write 0 to reset it
  Oven.Mode         Int16    writable, 0
  Oven.StartTest    method   (step Int16, duration_s Double) -> (accepted Boolean, run UInt32):
                             accepted when 0 <= step <= 10; run counts the accepted calls. Every
                             call is kept in `calls` (the tests count them)
  Motor.Capture     Float[]  a vibration capture (g): `capture_samples` at `capture_rate` Hz of a
                             bearing with an outer-race defect (drivers.sim.vibration), a new one
                             every `capture_every` seconds, stamped with the capture's start;
                             with `capture_every=None` the arrays follow each other without a
                             pause (one continuous stream cut into arrays)
  Motor.SampleRate  Double   the capture's sample rate, for `sample_rate_node`

Every update carries a source timestamp. With `secure=True` the only endpoint is Basic256Sha256
SignAndEncrypt with a self-signed server certificate generated into `cert_dir`; with `users`
only those username/password pairs may connect.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import random
import time
from collections import deque
from pathlib import Path

import numpy as np

from asyncua import Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers.sim.vibration import make_signal

NAMESPACE = "urn:edge-gateway:sim"
SERVER_URI = "urn:edge-gateway:sim:server"
NODES = ("Temperature", "Setpoint", "Running", "Parts", "State", "Broken", "Counter", "Batches", "Mode")
MOTOR_NODES = ("Capture", "SampleRate")


def generate_certificate(directory: str | Path, name: str, app_uri: str, *, server: bool,
                         host: str = "localhost") -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate (DER) and its key (PEM): (cert, key)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {"organizationName": "edge-gateway"},
        [x509.UniformResourceIdentifier(app_uri), x509.DNSName(host)], extended=usage, days=365)
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


class _Users:
    """Only the configured username/password pairs may open a session."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver, username=None, password=None, certificate=None):  # noqa: ANN001
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaSimulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 4840, *, secure: bool = False,
                 cert_dir: str | Path | None = None, users: dict[str, str] | None = None,
                 period: float = 0.1, run_s: float = 20.0, stop_s: float = 5.0,
                 capture_samples: int = 4096, capture_rate: float = 12800.0, capture_every: float | None = 1.0,
                 shaft_hz: float = 29.93, batch_s: float = 5.0) -> None:
        self.endpoint = f"opc.tcp://{host}:{port}/"
        self.secure = secure
        self.cert_dir = Path(cert_dir) if cert_dir else None
        self.users = users
        self.period = period
        self.run_s, self.stop_s = run_s, stop_s
        self.server: Server | None = None
        self.nodes: dict[str, object] = {}
        self.server_certificate: Path | None = None
        self._tasks: list[asyncio.Task] = []
        self._rng = random.Random(2)
        self.t0 = time.time()
        self.capture_samples, self.capture_rate, self.capture_every = capture_samples, capture_rate, capture_every
        self.shaft_hz = shaft_hz
        self.captures: deque[float] = deque(maxlen=10_000)  # source timestamps of the captures written
        self.batch_s = batch_s
        self.calls: list[tuple[int, float]] = []  # StartTest arguments, one entry per call
        self._signal_rng = np.random.default_rng(7)

    async def start(self) -> "OpcUaSimulator":
        server = Server(user_manager=_Users(self.users) if self.users else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-gateway simulated oven")
        await server.set_application_uri(SERVER_URI)
        if self.secure:
            if self.cert_dir is None:
                raise ValueError("secure=True needs cert_dir")
            if self.server_certificate is None:  # keep the same certificate across restarts
                self.server_certificate, self._server_key = generate_certificate(
                    self.cert_dir, "sim-server", SERVER_URI, server=True)
            await server.load_certificate(str(self.server_certificate))
            await server.load_private_key(str(self._server_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        if self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await server.register_namespace(NAMESPACE)
        oven = await server.nodes.objects.add_object(ua.NodeId("Oven", idx), ua.QualifiedName("Oven", idx))
        initial = {"Temperature": (180.0, ua.VariantType.Double), "Setpoint": (180.0, ua.VariantType.Double),
                   "Running": (True, ua.VariantType.Boolean), "Parts": (0, ua.VariantType.UInt32),
                   "State": ("running", ua.VariantType.String), "Broken": (0.0, ua.VariantType.Double),
                   "Counter": (0, ua.VariantType.Int64), "Batches": (0, ua.VariantType.UInt32),
                   "Mode": (0, ua.VariantType.Int16)}
        for name, (value, vtype) in initial.items():
            node = await oven.add_variable(ua.NodeId(f"Oven.{name}", idx), ua.QualifiedName(name, idx),
                                           ua.Variant(value, vtype))
            self.nodes[name] = node
        motor = await server.nodes.objects.add_object(ua.NodeId("Motor", idx), ua.QualifiedName("Motor", idx))
        self.nodes["Capture"] = await motor.add_variable(
            ua.NodeId("Motor.Capture", idx), ua.QualifiedName("Capture", idx), ua.Variant([0.0], ua.VariantType.Float))
        first = time.time() - self.capture_duration
        await self._write_capture(first)
        self.nodes["SampleRate"] = await motor.add_variable(
            ua.NodeId("Motor.SampleRate", idx), ua.QualifiedName("SampleRate", idx),
            ua.Variant(float(self.capture_rate), ua.VariantType.Double))
        for name in ("Setpoint", "Batches", "Mode"):
            await self.nodes[name].set_writable()
        await oven.add_method(ua.NodeId("Oven.StartTest", idx), ua.QualifiedName("StartTest", idx), self._start_test,
                              [ua.VariantType.Int16, ua.VariantType.Double],
                              [ua.VariantType.Boolean, ua.VariantType.UInt32])
        await self.nodes["Broken"].write_value(ua.DataValue(
            ua.Variant(0.0, ua.VariantType.Double), ua.StatusCode(ua.StatusCodes.BadSensorFailure),
            SourceTimestamp=_dt.datetime.now(_dt.timezone.utc)))
        await server.start()
        self.server = server
        self._tasks = [asyncio.create_task(self._update(), name="sim.opcua.update"),
                       asyncio.create_task(self._capture(first), name="sim.opcua.capture")]
        return self

    async def _start_test(self, parent, step: ua.Variant, duration: ua.Variant) -> list[ua.Variant]:  # noqa: ANN001
        self.calls.append((step.Value, duration.Value))
        accepted = 0 <= step.Value <= 10
        run = sum(1 for s, _ in self.calls if 0 <= s <= 10)
        return [ua.Variant(accepted, ua.VariantType.Boolean), ua.Variant(run, ua.VariantType.UInt32)]

    @property
    def capture_duration(self) -> float:
        return self.capture_samples / self.capture_rate

    async def _write_capture(self, t0: float) -> None:
        """One capture starting at `t0`, as a Float array stamped with its start."""
        signal = make_signal(self.capture_rate, self.capture_samples, t0, self.shaft_hz, fault="outer",
                             severity=0.3, rng=self._signal_rng)
        stamp = _dt.datetime.fromtimestamp(t0, _dt.timezone.utc)
        # Noted before the write: a subscriber can be told of the value while write_value is
        # still being awaited, and must find its stamp here.
        self.captures.append(stamp.timestamp())
        await self.nodes["Capture"].write_value(ua.DataValue(
            ua.Variant(signal.tolist(), ua.VariantType.Float), SourceTimestamp=stamp,
            ServerTimestamp=_dt.datetime.now(_dt.timezone.utc)))

    async def _capture(self, first: float) -> None:
        step = self.capture_every if self.capture_every is not None else self.capture_duration
        k = 1
        while True:
            t0 = first + k * step
            # written once complete, as a data collector would; late writes keep their stamps
            await asyncio.sleep(max(0.0, t0 + self.capture_duration - time.time()))
            await self._write_capture(t0)
            k += 1

    def running(self, now: float) -> bool:
        return (now - self.t0) % (self.run_s + self.stop_s) < self.run_s

    async def _update(self) -> None:
        counter = 0
        last_batch = time.monotonic()
        while True:
            if time.monotonic() - last_batch >= self.batch_s:  # counts on from a value a client wrote
                last_batch = time.monotonic()
                batches = await self.nodes["Batches"].read_value()
                await self.nodes["Batches"].write_value(ua.Variant(batches + 1, ua.VariantType.UInt32))
            now = time.time()
            stamp = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
            running = self.running(now)
            cycle = self.run_s + self.stop_s
            runtime = (now - self.t0) // cycle * self.run_s + min((now - self.t0) % cycle, self.run_s)
            temp = 180.0 + 4.0 * math.sin((now - self.t0) / 60.0) + self._rng.gauss(0.0, 0.1)
            counter += 1
            values = {"Temperature": ua.Variant(temp, ua.VariantType.Double),
                      "Running": ua.Variant(running, ua.VariantType.Boolean),
                      "Parts": ua.Variant(int(runtime // 2), ua.VariantType.UInt32),
                      "State": ua.Variant("running" if running else "idle", ua.VariantType.String),
                      "Counter": ua.Variant(counter, ua.VariantType.Int64)}
            for name, variant in values.items():
                await self.nodes[name].write_value(ua.DataValue(variant, SourceTimestamp=stamp, ServerTimestamp=stamp))
            await asyncio.sleep(self.period)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.server is not None:
            await self.server.stop()
            self.server = None


async def serve(host: str = "127.0.0.1", port: int = 4840, secure: bool = False, cert_dir: str | None = None,
                users: dict[str, str] | None = None, period: float = 0.5, capture_samples: int = 4096,
                capture_rate: float = 12800.0, capture_every: float | None = 1.0,
                ready: asyncio.Event | None = None) -> None:
    """Run the simulated oven and motor until cancelled."""
    sim = await OpcUaSimulator(host, port, secure=secure, cert_dir=cert_dir, users=users, period=period,
                               capture_samples=capture_samples, capture_rate=capture_rate,
                               capture_every=capture_every).start()
    from drivers.sim import hold

    await hold(sim, ready)
