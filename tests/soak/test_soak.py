"""Soak: the daemon as a process with every device kind, broker outages, reloads and kill -9s.

Marked slow (run with `pytest -m slow`); SOAK_SECONDS sets the length (default 600, i.e. 10
minutes; 120 is enough to check the harness). Modbus, OPC UA and an MQTT vibration sensor run as
`edge-gateway simulate` processes. On a fixed timeline the broker is down for 5 s every 60 s, the
daemon gets SIGHUP every 30 s, and it is killed with SIGKILL 3 times (and restarted at once) in the
first half. At the end: every seq the buffer issued reached the subscriber, no seq carried two
different payloads, the daemon's RSS over the last (longest) process life stayed within 10 MB
after warm-up, buffer.db + -wal + -shm stayed under `buffer.max_bytes` at every 1 s sample, and
SIGTERM ended the daemon with exit 0 within 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, run_cli, wait_port
from tests.gateway.test_upstream import PersistentCollector
from tests.integration.conftest import base_config

pytestmark = pytest.mark.slow

OUTAGE_EVERY, OUTAGE_S = 60.0, 5.0
RELOAD_EVERY = 30.0
KILLS_AT = (0.15, 0.30, 0.45)  # fractions of the run; the last process lives for the remaining 55 %
MAX_BYTES = 4 * 2**20  # small, as on a device with little flash: the WAL must fit too
RSS_GROWTH_MB = 10.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def disk_bytes(db: Path) -> int:
    return sum(os.stat(f"{db}{suffix}").st_size for suffix in ("", "-wal", "-shm") if os.path.exists(f"{db}{suffix}"))


def events(log: Path, name: str) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("{") and json.loads(line).get("event") == name)


def simulator(kind: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway", "simulate", kind, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Daemon:
    """`edge-gateway run`, one log file per process life."""

    def __init__(self, cfg: Path, logdir: Path) -> None:
        self.cfg, self.logdir, self.lives = cfg, logdir, 0
        self.proc: subprocess.Popen | None = None
        self.log = logdir / "daemon-0.log"
        self.reloads_sent = 0  # in this life

    def start(self) -> None:
        self.lives += 1
        self.log = self.logdir / f"daemon-{self.lives}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(self.cfg)], stdout=out,
                                         stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.reloads_sent = 0
        self.started_at = time.monotonic()

    def started(self) -> bool:
        return events(self.log, "gateway.started") > 0

    def reload_settled(self) -> bool:
        return events(self.log, "config.reloaded") >= self.reloads_sent

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def logs(self) -> list[Path]:
        return sorted(self.logdir.glob("daemon-*.log"))


# The suite's 300 s per-test limit is shorter than the soak itself.
@pytest.mark.timeout(float(os.environ.get("SOAK_SECONDS", "600")) + 300)
def test_soak_outages_reloads_and_kills_lose_nothing(tmp_path, mosquitto_factory):
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    broker = mosquitto_factory(extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    collector = PersistentCollector(broker.port, "edge/gw1/#")
    modbus_port, opcua_port = free_port(), free_port()
    sims = [simulator("modbus", "--port", str(modbus_port)), simulator("opcua", "--port", str(opcua_port)),
            simulator("vibration", "--port", str(broker.port), "--fault", "bpfo", "--grow", str(seconds))]
    raw = base_config(
        tmp_path, broker, buffer={"max_bytes": MAX_BYTES},
        devices=[{"name": "press1", "driver": "modbus", "port": modbus_port, "poll_interval": "100ms",
                  "tags": [{"name": "temperature", "address": 0, "type": "float32"},
                           {"name": "speed_rpm", "address": 6, "type": "uint16"},
                           {"name": "running", "table": "coil", "address": 0, "type": "bool"}]},
                 {"name": "oven", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}/",
                  "tags": [{"name": "temp", "node": "ns=2;s=Oven.Temperature", "unit": "degC"},
                           {"name": "running", "node": "ns=2;s=Oven.Running"}]},
                 {"name": "motor1", "driver": "mqtt", "port": broker.port,
                  "subscriptions": [{"topic": "sensors/motor1/accel", "tag": "accel", "format": "f32le",
                                     "sample_rate": 12000, "unit": "g"},
                                    {"topic": "sensors/motor1/temp", "tag": "temp", "format": "json",
                                     "value_path": "value", "unit": "degC"}]}],
        analyses=[{"name": "motor1_de", "input": "motor1.accel", "window": 8192,
                   "features": ["rms", "peak", "kurtosis", "velocity_rms", "spectrum", "envelope"],
                   "bearing": {"shaft_hz": 29.93}}],
        rules=[{"name": "stopped", "type": "threshold", "input": "press1.speed_rpm", "below": 100, "clear": 500},
               {"name": "oven_hot", "type": "threshold", "input": "oven.temp", "above": 182, "clear": 181},
               {"name": "iso", "type": "iso10816", "input": "motor1_de.velocity_rms", "group": 2,
                "foundation": "rigid"},
               {"name": "downtime", "type": "downtime", "input": "press1.running"}])
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    db = tmp_path / "state" / "buffer.db"
    daemon = Daemon(cfg, tmp_path)
    # the timeline: (due, action); an action whose precondition does not hold yet waits a second
    plan = sorted([(t, "outage") for t in _every(OUTAGE_EVERY, seconds)]
                  + [(t, "reload") for t in _every(RELOAD_EVERY, seconds)]
                  + [(f * seconds, "kill") for f in KILLS_AT])
    planned = {action: sum(1 for _, a in plan if a == action) for action in ("outage", "reload", "kill")}
    done = {"outage": 0, "reload": 0, "kill": 0}
    disk_peak, depth_in_outage, rss = 0, [], {}
    outage_ends: float | None = None
    try:
        wait_port(modbus_port, 20)
        wait_port(opcua_port, 30)
        daemon.start()
        start = time.monotonic()
        while (now := time.monotonic() - start) < seconds:
            disk_peak = max(disk_peak, disk_bytes(db))
            assert daemon.proc.poll() is None, f"the daemon died: {daemon.log.read_text()[-3000:]}"
            if outage_ends is not None and now >= outage_ends:
                depth_in_outage.append(_stats(cfg)["depth"])  # what the buffer held while the broker was away
                broker.start()
                outage_ends = None
            if daemon.lives == len(KILLS_AT) + 1 and daemon.started():
                warm = daemon.started_at + min(60.0, (seconds - KILLS_AT[-1] * seconds) / 3)
                if time.monotonic() >= warm:
                    rss.setdefault("warm", rss_mb(daemon.proc.pid))
                    rss["end"] = rss_mb(daemon.proc.pid)
            while plan and plan[0][0] <= now:
                _, action = plan[0]
                if action == "outage" and outage_ends is None:
                    broker.stop()
                    outage_ends = now + OUTAGE_S
                elif action == "reload" and daemon.started():
                    daemon.proc.send_signal(signal.SIGHUP)
                    daemon.reloads_sent += 1
                elif action == "kill" and daemon.started() and daemon.reload_settled():
                    daemon.kill()
                    daemon.start()
                else:
                    break  # not yet: try again at the next tick
                plan.pop(0)
                done[action] += 1
            time.sleep(1.0)
        if outage_ends is not None:
            broker.start()
        assert _until(lambda: _stats(cfg)["depth"] == 0, 90), "the backlog did not drain"
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        rc = daemon.proc.wait(15)
        took = time.monotonic() - t0
        final = _stats(cfg)
        # what the stop itself wrote stays in the buffer for the next start: kept, not lost
        kept = {json.loads(line)["seq"] for line in run_cli("buffer", "dump", "-c", str(cfg)).stdout.splitlines()}
        produced = set(range(1, final["next_seq"]))
        _until(lambda: produced - kept <= {p["seq"] for _, p in list(collector.messages) if "seq" in p}, 30)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        for sim in sims:
            sim.send_signal(signal.SIGINT)
        for sim in sims:
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()
        collector.close()
    logs = daemon.logs()
    report = (f"{seconds:.0f}s: {done}, lives {daemon.lives}, produced {len(produced)}, kept {len(kept)}, disk peak "
              f"{disk_peak} B (max_bytes {MAX_BYTES}), depth at outage ends {depth_in_outage}, RSS {rss}, SIGTERM {took:.1f}s")
    print(report)
    payloads: dict[int, set[str]] = {}
    for _, p in list(collector.messages):
        if "seq" in p:
            payloads.setdefault(p["seq"], set()).add(json.dumps(p, sort_keys=True))
    # a reload waits for the daemon to be up, so the last one may fall past the end
    assert done["outage"] == planned["outage"] >= 1 and done["kill"] == planned["kill"], report
    assert planned["reload"] - 1 <= done["reload"] <= planned["reload"], report
    assert sum(events(log, "config.reloaded") for log in logs) == done["reload"], report
    assert max(depth_in_outage, default=0) > 0, f"the buffer never held anything during an outage: {report}"
    assert final["dropped"] == 0, f"the buffer dropped records: {final}"
    lost = produced - payloads.keys() - kept
    assert not lost, f"lost {len(lost)} of {len(produced)} seqs, e.g. {sorted(lost)[:10]}; {report}"
    reused = {s: v for s, v in payloads.items() if len(v) > 1}
    assert not reused, f"{len(reused)} seqs carried different payloads, e.g. {next(iter(reused.items()))}"
    assert rc == 0 and took < 5.0, f"SIGTERM: rc {rc} after {took:.1f}s"
    assert not any("Traceback" in log.read_text() for log in logs), "a traceback in the daemon log"
    assert "warm" in rss and rss["end"] - rss["warm"] < RSS_GROWTH_MB, f"RSS grew: {report}"
    assert disk_peak < MAX_BYTES, f"buffer files reached {disk_peak} bytes, max_bytes is {MAX_BYTES}: {report}"


def _every(period: float, seconds: float) -> list[float]:
    return [period * k for k in range(1, int(seconds // period) + 1) if period * k < seconds]


def _stats(cfg: Path) -> dict:
    res = run_cli("buffer", "stats", "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return bool(predicate())
