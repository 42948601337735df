"""`edge-gateway demo`: simulators, a broker and the gateway in one process, with a live view.

Starts a Modbus TCP press, an OPC UA oven and an MQTT vibration sensor whose bearing develops an
outer-race fault, an embedded MQTT broker (amqtt, the `demo` extra) unless `--broker` is given,
and the gateway with `config/demo.yaml`; then shows what arrives upstream, refreshed in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from gateway import logs
from gateway.model import split_source

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


class Upstream:
    """What the control room would see: a subscriber to the gateway's topics."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        import paho.mqtt.client as mqtt

        self.prefix = prefix
        self.lock = threading.Lock()
        self.latest: dict[str, dict[str, Any]] = {}
        self.alarms: dict[str, dict[str, Any]] = {}
        self.history: deque[str] = deque(maxlen=8)
        self.counts: dict[str, int] = {}
        self.new_lines: list[str] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"demo-view-{os.getpid()}", protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect_async(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        sub = msg.topic[len(self.prefix) + 1:]
        kind = sub.split("/", 1)[0]
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.latest[sub] = payload
            stamp = time.strftime("%H:%M:%S")
            if kind == "alarms":
                self.alarms[sub.split("/", 1)[1]] = payload
                zone = f" zone {payload['zone']}" if payload.get("zone") else ""
                line = (f"{stamp} ALARM {payload.get('rule')} {payload.get('state', '?').upper()} "
                        f"[{payload.get('severity')}]{zone} value={_fmt(payload.get('value'))} "
                        f"limit={_fmt(payload.get('limit'))}")
                self.history.appendleft(line)
                self.new_lines.append(line)
            elif kind == "events":
                what = payload.get("result") or payload.get("state")
                if what == "PASS":
                    return  # passes are counted in health; the list is for what needs a look
                line = f"{stamp} event {payload.get('rule')} {what} value={_fmt(payload.get('value'))}" + (
                    f" duration={_fmt(payload.get('duration_s'))}s" if payload.get("duration_s") is not None else "")
                self.history.appendleft(line)
                self.new_lines.append(line)
            elif kind == "features":
                bearing = payload.get("bearing") or {}
                self.new_lines.append(
                    f"{stamp} features {sub.split('/', 1)[1]}: rms={_fmt(payload.get('rms'))} g "
                    f"velocity={_fmt(payload.get('velocity_rms'))} mm/s kurtosis={_fmt(payload.get('kurtosis'))} "
                    f"dominant={bearing.get('dominant')}")
            elif kind == "data":
                tags = payload.get("tags", {})
                self.new_lines.append(f"{stamp} data {sub.split('/', 1)[1]}: " + ", ".join(
                    f"{t}={_fmt(v.get('last'))}{v.get('unit') or ''}" for t, v in list(tags.items())[:6]))

    def take_lines(self) -> list[str]:
        with self.lock:
            lines, self.new_lines = self.new_lines, []
        return lines

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def iso_boundaries(cfg) -> dict[str, tuple[float, float, float]]:
    """analysis name -> ISO zone boundaries of the iso10816 rule watching its velocity_rms."""
    out = {}
    for rule in cfg.rules:
        if rule.type == "iso10816" and rule.input.endswith(".velocity_rms"):
            out[split_source(rule.input)[0]] = rule.boundaries()
    return out


def render(view: Upstream, broker: str, started: float, duration: float | None,
           zones: dict[str, tuple[float, float, float]]) -> str:
    from rules.iso10816 import zone_of

    with view.lock:
        latest = dict(view.latest)
        alarms = dict(view.alarms)
        history = list(view.history)
        counts = dict(view.counts)
    health = latest.get("health", {})
    status = latest.get("status", {})
    buf = health.get("buffer", {})
    up = health.get("upstream", {})
    left = f", stops in {max(0, duration - (time.time() - started)):.0f}s" if duration else ", Ctrl-C to stop"
    out = [
        f"edge-gateway demo - broker mqtt://{broker} - running {time.time() - started:.0f}s{left}",
        f"gateway {status.get('gateway', '-')}: {status.get('state', 'starting')} | buffer {buf.get('depth', '-')} rows"
        f" | published {up.get('published', 0)} ({up.get('publish_rate', 0)}/s) | dropped {health.get('dropped', 0)}"
        f" | received {sum(counts.values())} messages",
        "",
        "DEVICES        connected  errors  last_ok",
    ]
    for name, dev in sorted(health.get("devices", {}).items()):
        out.append(f"  {name:<12} {str(dev.get('connected')):<10} {dev.get('errors', 0):<7} {dev.get('last_ok') or '-'}")
    out += ["", "TAG SUMMARIES  (last / mean / min / max, quality)"]
    for sub, payload in sorted(latest.items()):
        if sub.startswith("data/"):
            for tag, s in payload.get("tags", {}).items():
                out.append(f"  {sub[5:] + '.' + tag:<24} {_fmt(s.get('last')):>9} {_fmt(s.get('mean')):>9} "
                           f"{_fmt(s.get('min')):>9} {_fmt(s.get('max')):>9} {s.get('unit') or '':<5} {s.get('quality')}")
    out += ["", "VIBRATION"]
    for sub, f in sorted(latest.items()):
        if sub.startswith("features/"):
            bearing = f.get("bearing") or {}
            bpfo = bearing.get("bpfo") or {}
            out.append(f"  {sub[9:]}: rms {_fmt(f.get('rms'))} g, peak {_fmt(f.get('peak'))} g, crest "
                       f"{_fmt(f.get('crest_factor'))}, kurtosis {_fmt(f.get('kurtosis'))}")
            velocity, bounds = f.get("velocity_rms"), zones.get(sub[9:])
            zone = zone_of(velocity, bounds) if velocity is not None and bounds else "-"
            out.append(f"    velocity {_fmt(velocity)} mm/s -> ISO 10816-3 zone {zone}"
                       f" | envelope BPFO {_fmt(bpfo.get('hz'))} Hz, SNR {_fmt(bpfo.get('snr_db'))} dB"
                       f" | dominant defect: {bearing.get('dominant') or 'none'}")
    for rule, counts in sorted((health.get("rules", {}).get("pass_fail") or {}).items()):
        out.append(f"  test {rule}: pass {counts.get('pass')}, fail {counts.get('fail')}, yield {_pct(counts.get('yield'))}")
    out += ["", "ALARMS"]
    active = [a for a in alarms.values() if a.get("state") == "raised"]
    if not active:
        out.append("  none active")
    for a in sorted(active, key=lambda a: a.get("rule", "")):
        zone = f" zone {a['zone']}" if a.get("zone") else ""
        out.append(f"  {a.get('rule'):<22} {a.get('severity'):<9}{zone} value {_fmt(a.get('value'))} since {a.get('since')}")
    out += ["", "RECENT ALARMS AND EVENTS"] + [f"  {h}" for h in history]
    return "\n".join(out)


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
    view = Upstream(host, port, cfg.topic_prefix)
    print(f"gateway: {cfg.gateway.id}, config {cfg_path}, log {state_dir / 'gateway.log'}", flush=True)

    zones = iso_boundaries(cfg)
    started = time.time()
    gateway = asyncio.create_task(app.run(), name="demo.gateway")

    async def screen() -> None:
        while True:
            await asyncio.sleep(1.0)
            if plain:
                for line in view.take_lines():
                    print(line, flush=True)
            else:
                sys.stdout.write("\x1b[H\x1b[2J" + render(view, f"{host}:{port}", started, args.duration, zones) + "\n")
                sys.stdout.flush()

    screen_task = asyncio.create_task(screen(), name="demo.screen")
    try:
        if args.duration:
            done, _ = await asyncio.wait({gateway}, timeout=args.duration)
            if not done:
                app.request_stop()
        rc = await gateway
    finally:
        screen_task.cancel()
        vibration.cancel()
        await asyncio.gather(screen_task, vibration, return_exceptions=True)
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


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "-"
