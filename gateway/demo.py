"""`edge-gateway demo`: simulators, a broker and the gateway in one process, with a live view.

Starts a Modbus TCP press, an OPC UA oven and an MQTT vibration sensor whose bearing develops an
outer-race fault, an embedded MQTT broker (amqtt, the `demo` extra) unless `--broker` is given,
and the gateway with `config/demo.yaml`; then shows what arrives upstream, refreshed in place
(the view of `gateway.view`, the same as `edge-gateway watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gateway import logs, view as live

DEMO_YAML_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "config" / "demo.yaml",  # a checkout / editable install
    Path(__file__).resolve().parent / "demo.yaml",  # packaged copy
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_yaml() -> Path:
    for path in DEMO_YAML_CANDIDATES:
        if path.exists():
            return path
    raise SystemExit("edge-gateway demo: config/demo.yaml not found")


class EmbeddedBroker:
    """amqtt on 127.0.0.1:<free port>, in this event loop."""

    def __init__(self) -> None:
        self.port = _free_port()
        self._broker = None

    async def start(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise SystemExit(
                "edge-gateway demo: the embedded broker needs the demo extra: pip install 'edge-gateway[demo]'\n"
                "  (or give an MQTT broker you run: edge-gateway demo --broker 127.0.0.1:1883)"
            ) from None
        self._broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        })
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._broker.shutdown(), 5)


DEMO_WRITE = {"device": "press1", "tag": "setpoint", "value": 60.0}


async def _demo_write(app) -> None:
    """One write-back once the press is connected: `cmd/write`'s own road (the command router,
    the device's link), so its audit event shows in the view like any other."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pipeline = app.pipeline
        if pipeline is not None and any(d.config.name == DEMO_WRITE["device"] and d.health.connected
                                        for d in pipeline.drivers):
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # the upstream link is up too, so the event is forwarded at once
    await app.command("write", {"id": f"demo-{os.getpid()}", **DEMO_WRITE}, {"client_id": "edge-gateway-demo"})


async def _run(args) -> int:
    from drivers.sim.modbus import ModbusSimulator
    from drivers.sim.opcua import OpcUaSimulator
    from drivers.sim.vibration import serve as vibration_serve
    from gateway import config as config_mod
    from gateway.app import App

    plain = args.plain or not sys.stdout.isatty()
    state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="edge-gateway-demo-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(state_dir / "gateway.log", "a")  # the screen belongs to the live view
    logs.configure("info", json=True, stream=log_file)

    broker = None
    if args.broker:
        host, _, port_text = args.broker.rpartition(":")
        host, port = host or "127.0.0.1", int(port_text)
    else:
        broker = EmbeddedBroker()
        await broker.start()
        host, port = "127.0.0.1", broker.port
    print(f"broker: mqtt://{host}:{port}", flush=True)
    if shutil.which("mosquitto_sub"):
        print(f"watch the same topics:  mosquitto_sub -h {host} -p {port} -t 'edge/#' -v", flush=True)
    else:
        print(f"watch the same topics with any MQTT client on {host}:{port}, topic edge/# "
              "(e.g. mosquitto_sub from the mosquitto-clients package)", flush=True)

    modbus_port, opcua_port = _free_port(), _free_port()
    modbus = await ModbusSimulator(unit_ids=(1,)).start_tcp("127.0.0.1", modbus_port)
    opcua = await OpcUaSimulator("127.0.0.1", opcua_port, period=0.5).start()
    vibration = asyncio.create_task(vibration_serve(
        host=host, port=port, topic="sensors/motor1/accel", sample_rate=12800, block=1024, fault="outer",
        severity=0.0, grow_s=90.0, max_severity=1.0, temp_topic="sensors/motor1/temp"), name="sim.vibration")

    raw = yaml.safe_load(_demo_yaml().read_text())
    raw["gateway"]["state_dir"] = str(state_dir)
    raw["upstream"].update(host=host, port=port)
    for dev in raw["devices"]:
        if dev["driver"] == "modbus":
            dev["port"] = modbus_port
        elif dev["driver"] == "opcua":
            dev["endpoint"] = opcua.endpoint
        elif dev["driver"] == "mqtt":
            dev.update(host=host, port=port)
    cfg_path = state_dir / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = config_mod.load(cfg_path)
    app = App(cfg, str(cfg_path))
    view = live.LiveView(cfg.upstream, f"demo-view-{os.getpid()}", cfg.topic_prefix)
    print(f"gateway: {cfg.gateway.id}, config {cfg_path}, log {state_dir / 'gateway.log'}", flush=True)

    started = time.time()
    gateway = asyncio.create_task(app.run(), name="demo.gateway")
    writer = asyncio.create_task(_demo_write(app), name="demo.write")

    def title() -> str:
        running = time.time() - started
        left = f", stops in {max(0, args.duration - running):.0f}s" if args.duration else ", Ctrl-C to stop"
        return f"edge-gateway demo - broker mqtt://{host}:{port} - running {running:.0f}s{left}"

    screen_task = asyncio.create_task(live.show(view, plain=plain, title=title, zones=live.iso_boundaries(cfg)),
                                      name="demo.screen")
    try:
        if args.duration:
            done, _ = await asyncio.wait({gateway}, timeout=args.duration)
            if not done:
                app.request_stop()
        rc = await gateway
    finally:
        screen_task.cancel()
        vibration.cancel()
        writer.cancel()
        await asyncio.gather(screen_task, vibration, writer, return_exceptions=True)
        await asyncio.sleep(0.5)  # let the last messages reach the view
        view.close()
        await opcua.stop()
        await modbus.stop()
        if broker is not None:
            await broker.stop()
        log_file.close()
    with view.lock:
        counts = dict(view.counts)
    print(f"demo stopped; received upstream: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    return rc


def main(args) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0

