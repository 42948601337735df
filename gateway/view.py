"""The live view of what a gateway publishes upstream: used by `edge-gateway demo` and `watch`.

`LiveView` subscribes to `{topic_prefix}/#` on the upstream broker (its own client id, never the
gateway's) and keeps the latest message of each topic; `render()` draws one screen of it and
`take_lines()` gives the one-line-per-event form for `--plain` (a log, a pipe, a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.model import split_source
from gateway.mqttclient import connect_kwargs, make_client
from gateway.schema import BrokerConfig

REFRESH = 0.5  # seconds between screen redraws (and between batches of plain lines)


class LiveView:
    """What the control room would see: a subscriber to the gateway's topics."""

    def __init__(self, broker: BrokerConfig, client_id: str, prefix: str) -> None:
        self.prefix = prefix
        self.broker = f"{broker.host}:{broker.port}"
        self.lock = threading.Lock()
        self.latest: dict[str, dict[str, Any]] = {}
        self.alarms: dict[str, dict[str, Any]] = {}
        self.history: deque[str] = deque(maxlen=8)
        self.counts: dict[str, int] = {}
        self.connected = False
        self._unreachable = False  # said once, not at every retry
        self.new_lines: list[str] = []
        self.client = make_client(broker, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.connect_async(**connect_kwargs(broker))
        self.client.loop_start()  # paho's thread, with paho's reconnect: a broker restart is survived

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._note(f"broker {self.broker} refused the connection: {reason_code}")
            return
        self.connected = True
        self._unreachable = False
        client.subscribe(f"{self.prefix}/#", qos=1)
        self._note(f"connected to {self.broker}, watching {self.prefix}/#")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if self.connected:
            self._note(f"lost the broker {self.broker} ({reason_code}); reconnecting")
        self.connected = False

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._unreachable:
            self._unreachable = True
            self._note(f"cannot reach the broker {self.broker}; retrying")

    def _note(self, text: str) -> None:
        with self.lock:
            self.new_lines.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        sub = msg.topic[len(self.prefix) + 1:]
        kind, _, name = sub.partition("/")
        line = describe(kind, name, payload)
        if line and msg.retain:
            line += " (retained)"
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.latest[sub] = payload
            if kind == "alarms":
                self.alarms[name] = payload
            if line is None:
                return
            line = f"{time.strftime('%H:%M:%S')} {line}"
            if kind in ("alarms", "events"):
                self.history.appendleft(line)
            self.new_lines.append(line)

    def take_lines(self) -> list[str]:
        with self.lock:
            lines, self.new_lines = self.new_lines, []
        return lines

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


def describe(kind: str, name: str, p: dict[str, Any]) -> str | None:
    """One log line for a message, or None for what is not worth a line (a PASS, a reply)."""
    if kind == "alarms":
        zone = f" zone {p['zone']}" if p.get("zone") else ""
        return (f"ALARM {p.get('rule', name)} {str(p.get('state', '?')).upper()} [{p.get('severity')}]{zone} "
                f"value={fmt(p.get('value'))} limit={fmt(p.get('limit'))}")
    if kind == "events" and name == "commands":  # the write-back audit trail
        if p.get("command") == "call":
            what = f"call {p.get('device')}.{p.get('method')}({', '.join(map(fmt, p.get('args') or []))})"
        else:
            what = f"write {p.get('device')}." + ", ".join(f"{r.get('tag')}={fmt(r.get('value'))}"
                                                        for r in p.get("results") or [])
        back = f" read_back={fmt(p.get('read_back'))}" if p.get("read_back") is not None else ""
        why = f" ({p.get('reason')}: {p.get('error')})" if p.get("error") else ""
        by = f" by {p['client_id']}" if p.get("client_id") else ""
        return f"command {what} {str(p.get('outcome', '?')).upper()}{back}{why} id={p.get('id')}{by}"
    if kind == "events":
        what = p.get("result") or p.get("state")
        if what == "PASS":
            return None  # passes are counted in health; the list is for what needs a look
        duration = f" duration={fmt(p.get('duration_s'))}s" if p.get("duration_s") is not None else ""
        return f"event {p.get('rule', name)} {what} value={fmt(p.get('value'))}{duration}"
    if kind == "features":
        bearing = p.get("bearing") or {}
        return (f"features {name}: rms={fmt(p.get('rms'))} g velocity={fmt(p.get('velocity_rms'))} mm/s "
                f"kurtosis={fmt(p.get('kurtosis'))} dominant={bearing.get('dominant')}")
    if kind == "data":
        tags = p.get("tags", {})
        return f"data {name}: " + ", ".join(
            f"{t}={fmt(v.get('last'))}{v.get('unit') or ''}" for t, v in list(tags.items())[:6])
    if kind == "status":
        return f"status {p.get('gateway', '-')} {p.get('state', '?')} (version {p.get('version', '-')}, started {p.get('started_at', '-')})"
    if kind == "health":
        devices = p.get("devices", {})
        buf, up = p.get("buffer", {}), p.get("upstream", {})
        return (f"health: devices {sum(1 for d in devices.values() if d.get('connected'))}/{len(devices)} connected, "
                f"buffer {buf.get('depth', '-')} rows, published {up.get('published', '-')}, "
                f"dropped {p.get('dropped', 0)}, alarms active {(p.get('rules') or {}).get('alarms_active', 0)}")
    return None


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "-"


def iso_boundaries(cfg) -> dict[str, tuple[float, float, float]]:
    """analysis name -> ISO zone boundaries of the iso10816 rule watching its velocity_rms."""
    out = {}
    for rule in cfg.rules:
        if rule.type == "iso10816" and rule.input.endswith(".velocity_rms"):
            out[split_source(rule.input)[0]] = rule.boundaries()
    return out


def render(view: LiveView, title: str, zones: dict[str, tuple[float, float, float]]) -> str:
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
    link = "" if view.connected else " | NOT CONNECTED to the broker"
    age = buf.get("oldest_age_s")
    lag = (health.get("loop_lag") or {}).get("max_ms")
    out = [
        title,
        f"gateway {status.get('gateway', '-')}: {status.get('state', 'starting')} (version {status.get('version', '-')},"
        f" started {status.get('started_at', '-')}) | last health {health.get('ts', '-')}"
        f" | received {sum(counts.values())} messages{link}",
        f"buffer {buf.get('depth', '-')} rows, {fmt(buf.get('bytes'))} bytes" + (f", oldest {fmt(age)} s" if age else "")
        + f" | dropped {health.get('dropped', 0)} | upstream connected {up.get('connected', '-')},"
        f" published {up.get('published', 0)} ({up.get('publish_rate', 0)}/s), refused {up.get('refused', 0)},"
        f" connects {up.get('connects', '-')}" + (f" | loop lag max {fmt(lag)} ms" if lag is not None else ""),
        "",
        "DEVICES        connected  errors  last_ok",
    ]
    for name, dev in sorted(health.get("devices", {}).items()):
        out.append(f"  {name:<12} {str(dev.get('connected')):<10} {dev.get('errors', 0):<7} {dev.get('last_ok') or '-'}")
    out += ["", "TAG SUMMARIES  (last / mean / min / max, quality)"]
    for sub, payload in sorted(latest.items()):
        if sub.startswith("data/"):
            for tag, s in payload.get("tags", {}).items():
                out.append(f"  {sub[5:] + '.' + tag:<24} {fmt(s.get('last')):>9} {fmt(s.get('mean')):>9} "
                           f"{fmt(s.get('min')):>9} {fmt(s.get('max')):>9} {s.get('unit') or '':<5} {s.get('quality')}")
    out += ["", "VIBRATION"]
    for sub, f in sorted(latest.items()):
        if sub.startswith("features/"):
            bearing = f.get("bearing") or {}
            bpfo = bearing.get("bpfo") or {}
            out.append(f"  {sub[9:]}: rms {fmt(f.get('rms'))} g, peak {fmt(f.get('peak'))} g, crest "
                       f"{fmt(f.get('crest_factor'))}, kurtosis {fmt(f.get('kurtosis'))}")
            velocity, bounds = f.get("velocity_rms"), zones.get(sub[9:])
            zone = zone_of(velocity, bounds) if velocity is not None and bounds else "-"
            out.append(f"    velocity {fmt(velocity)} mm/s -> ISO 10816-3 zone {zone}"
                       f" | envelope BPFO {fmt(bpfo.get('hz'))} Hz, SNR {fmt(bpfo.get('snr_db'))} dB"
                       f" | dominant defect: {bearing.get('dominant') or 'none'}")
    for rule, tests in sorted((health.get("rules", {}).get("pass_fail") or {}).items()):
        out.append(f"  test {rule}: pass {tests.get('pass')}, fail {tests.get('fail')}, yield {_pct(tests.get('yield'))}")
    out += ["", "ALARMS"]
    active = [a for a in alarms.values() if a.get("state") == "raised"]
    if not active:
        out.append("  none active")
    for a in sorted(active, key=lambda a: a.get("rule", "")):
        zone = f" zone {a['zone']}" if a.get("zone") else ""
        out.append(f"  {a.get('rule'):<22} {a.get('severity'):<9}{zone} value {fmt(a.get('value'))} since {a.get('since')}")
    out += ["", "RECENT ALARMS AND EVENTS"] + [f"  {h}" for h in history]
    return "\n".join(out)


async def show(view: LiveView, *, plain: bool, title: Callable[[], str],
               zones: dict[str, tuple[float, float, float]]) -> None:
    """Until cancelled: redraw the screen in place, or print new lines (`plain`)."""
    while True:
        await asyncio.sleep(REFRESH)
        if plain:
            for line in view.take_lines():
                print(line, flush=True)
        else:
            view.take_lines()  # the screen shows the same; do not let them pile up
            sys.stdout.write("\x1b[H\x1b[2J" + render(view, title(), zones) + "\n")
            sys.stdout.flush()
