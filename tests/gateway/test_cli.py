"""Commands that are not the daemon: simulate, buffer stats/dump, --version."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import time

from pymodbus.client import ModbusTcpClient

from gateway.buffer import Buffer
from gateway.model import Record
from tests.conftest import free_port, run_cli, wait_port


def test_simulate_modbus_serves_a_real_modbus_device():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "modbus", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, 20)
        client = ModbusTcpClient("127.0.0.1", port=port)
        assert client.connect()
        rr = client.read_holding_registers(0, count=16, device_id=1)
        client.close()
        assert not rr.isError()
        temperature = client.convert_from_registers(rr.registers[0:2], client.DATATYPE.FLOAT32)
        assert 30 < temperature < 60
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    assert f"modbus simulator listening on 127.0.0.1:{port}" in out


def test_simulate_vibration_publishes_waveforms(mosquitto, collector_factory):
    collector = collector_factory(mosquitto, "sensors/#")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "vibration", "--port", str(mosquitto.port),
                             "--fault", "bpfi"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert collector.wait_for(lambda c: len([m for m in c.messages if m[0] == "sensors/motor1/accel"]) >= 2, 20)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    block = next(p for t, p, _ in collector.messages if t == "sensors/motor1/accel")
    assert len(block) % 4 == 0 and len(block) >= 4 * 1024  # f32le samples


def test_buffer_stats_and_dump(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway:\n  id: gw1\n  state_dir: {tmp_path}\n")
    missing = run_cli("buffer", "stats", "-c", str(cfg))
    assert missing.returncode == 1 and "no buffer" in missing.stderr
    b = Buffer(tmp_path / "buffer.db", "gw1")
    b.append([Record("data/a", {"i": i}, time.time()) for i in range(3)] + [Record("alarms/r", {"state": "raised"},
                                                                                time.time(), kind="alarm", retain=True)])
    b.close()
    stats = run_cli("buffer", "stats", "--json", "-c", str(cfg))
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["depth"] == 4 and data["by_kind"] == {"alarm": 1, "data": 3} and data["next_seq"] == 5
    dump = run_cli("buffer", "dump", "--limit", "2", "-c", str(cfg))
    rows = [json.loads(line) for line in dump.stdout.splitlines()]
    assert [r["topic"] for r in rows] == ["alarms/r", "data/a"] and rows[0]["retain"] is True
    assert rows[1]["payload"]["seq"] == 1 and rows[1]["payload"]["gateway"] == "gw1"


def test_run_fixes_the_mmap_threshold_unless_the_environment_sets_one(monkeypatch):
    from gateway import cli

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert cli.fix_mmap_threshold() is False  # the operator's setting rules
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert cli.fix_mmap_threshold() is (sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()))


def test_version():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("edge-gateway ")


def test_buffer_stats_next_seq_of_a_drained_buffer(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway:\n  id: gw1\n  state_dir: {tmp_path}\n")
    b = Buffer(tmp_path / "buffer.db", "gw1")
    b.append([Record("data/a", {"i": i}, time.time()) for i in range(658)])
    b.ack(b.fetch({}, 1000))
    b.close()
    stats = run_cli("buffer", "stats", "--json", "-c", str(cfg))
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["depth"] == 0 and data["next_seq"] == 659
    assert Buffer(tmp_path / "buffer.db", "gw1").next_seq == 659  # what the daemon continues with


def test_run_refuses_a_state_dir_it_cannot_write_like_check_config(tmp_path, read_only_dir):
    (tmp_path / "file").write_text("not a directory")
    cfg = tmp_path / "gw.yaml"
    for state_dir in (tmp_path / "file" / "state", read_only_dir):
        cfg.write_text(f"gateway:\n  id: gw1\n  state_dir: {state_dir}\nupstream:\n  port: {free_port()}\n")
        checked = run_cli("check-config", "-c", str(cfg))
        ran = run_cli("run", "-c", str(cfg), timeout=30)
        assert ran.returncode == checked.returncode == 2
        assert ran.stderr.splitlines()[0].startswith(f"{cfg}:3: gateway.state_dir: {state_dir}"), ran.stderr
        assert ran.stderr == checked.stderr and "Traceback" not in ran.stderr
        assert "gateway.started" not in ran.stderr + ran.stdout


def test_run_logs_an_include_that_matches_nothing_at_start_and_reload(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway:\n  id: gw1\n  state_dir: {tmp_path}/state\ninclude: [conf.d/*.yaml]\n"
                   f"upstream:\n  port: {free_port()}\n  reconnect_max: 1s\n")
    log = tmp_path / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], stdout=out, stderr=out)
    warning = f"{cfg}:4: include.0: conf.d/*.yaml matches no file"

    def warnings() -> list[dict]:
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [e for e in events if e.get("event") == "config.warning"]

    try:
        deadline = time.monotonic() + 20
        while not warnings() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert [w["warning"] for w in warnings()] == [warning], log.read_text()
        proc.send_signal(signal.SIGHUP)  # a reload reads the files again and warns again
        deadline = time.monotonic() + 20
        while len(warnings()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w["warning"] for w in warnings()] == [warning, warning]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
    assert rc == 0 and "Traceback" not in log.read_text()
