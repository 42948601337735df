"""The daemon as a process: crash mid-drain, SIGTERM, SIGHUP, health and status topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from gateway.buffer import Buffer
from gateway.model import Record


def write_config(tmp_path, port: int, extra: str = "", name: str = "gw.yaml"):
    path = tmp_path / name
    path.write_text(
        f"gateway:\n  id: gw1\n  state_dir: {tmp_path}/state\n"
        f"upstream:\n  host: 127.0.0.1\n  port: {port}\n  reconnect_max: 1s\n  health_interval: 1s\n" + extra
    )
    return path


def start(cfg, tmp_path, name="daemon"):
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], stdout=log, stderr=log,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(proc, timeout=5.0) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout)
    return rc, time.monotonic() - t0


def test_kill_9_while_draining_loses_nothing(tmp_path, mosquitto, collector_factory):
    cfg = write_config(tmp_path, mosquitto.port)
    buf = Buffer(tmp_path / "state" / "buffer.db", "gw1")
    seqs = set()
    for start_i in range(0, 10_000, 1000):
        seqs.update(buf.append([Record("data/bulk", {"i": i, "pad": "x" * 150}, time.time())
                                for i in range(start_i, start_i + 1000)]))
    buf.close()
    collector = collector_factory(mosquitto, "edge/gw1/data/#")
    received = lambda: {p["seq"] for _, p in collector.json("edge/gw1/data")}  # noqa: E731
    proc = start(cfg, tmp_path)
    try:
        assert collector.wait_for(lambda c: len(received()) >= 300, 30), "the daemon did not start draining"
        proc.kill()  # SIGKILL mid-drain: no chance to clean up
        proc.wait(5)
        got_before_restart = len(received())
        assert got_before_restart < 10_000, "drained before the kill: the test proves nothing"
        proc = start(cfg, tmp_path, "daemon2")
        assert collector.wait_for(lambda c: seqs <= received(), 60), f"lost {len(seqs - received())} records"
    finally:
        rc, _ = stop(proc) if proc.poll() is None else (proc.returncode, 0)
    assert rc == 0
    stats = Buffer(tmp_path / "state" / "buffer.db", "gw1", readonly=True).stats()
    assert stats["depth"] == 0


def test_sigterm_exits_0_quickly_with_buffer_intact(tmp_path):
    # no broker at all: the rows must stay in the buffer, the daemon must still stop cleanly
    from tests.conftest import free_port

    cfg = write_config(tmp_path, free_port())
    buf = Buffer(tmp_path / "state" / "buffer.db", "gw1")
    buf.append([Record("data/x", {"i": i}, time.time()) for i in range(100)])
    buf.close()
    proc = start(cfg, tmp_path)
    deadline = time.monotonic() + 20
    while "gateway.started" not in (tmp_path / "daemon.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # running, and trying to reach the missing broker
    rc, took = stop(proc)
    assert rc == 0 and took < 5.0
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log and "gateway.stopped" in log
    b = Buffer(tmp_path / "state" / "buffer.db", "gw1")
    assert b.depth == 100 and b.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sighup_with_a_broken_file_keeps_running(tmp_path, mosquitto, collector_factory):
    cfg = write_config(tmp_path, mosquitto.port)
    collector = collector_factory(mosquitto, "edge/gw1/#")
    proc = start(cfg, tmp_path)
    try:
        assert collector.wait_for(lambda c: any(p.get("state") == "online" for _, p in c.json("edge/gw1/status")), 20)
        good = cfg.read_text()
        cfg.write_text(good + "buffer:\n  max_bytes: twelve\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, "a bad reload must not stop the daemon"
        log = (tmp_path / "daemon.log").read_text()
        assert "config.reload_rejected" in log and "buffer.max_bytes" in log
        # health keeps flowing from the old configuration
        n = len(collector.json("edge/gw1/health"))
        assert collector.wait_for(lambda c: len(c.json("edge/gw1/health")) > n, 5)
        # a good file is taken
        cfg.write_text(good.replace("health_interval: 1s", "health_interval: 2s"))
        proc.send_signal(signal.SIGHUP)
        assert collector.wait_for(lambda c: "config.reloaded" in (tmp_path / "daemon.log").read_text(), 10)
        assert proc.poll() is None
        assert collector.wait_for(lambda c: len(c.json("edge/gw1/status")) >= 2, 10)  # online again after reload
        assert {p["state"] for _, p in collector.json("edge/gw1/status")} == {"online"}, "a reload is not offline"
    finally:
        rc, _ = stop(proc)
    assert rc == 0


def test_status_health_and_commands(tmp_path, mosquitto, collector_factory):
    cfg = write_config(tmp_path, mosquitto.port)
    collector = collector_factory(mosquitto, "edge/gw1/#")
    proc = start(cfg, tmp_path)
    try:
        assert collector.wait_for(lambda c: len(c.json("edge/gw1/health")) >= 2, 20)
        health = collector.json("edge/gw1/health")[-1][1]
        for key in ("uptime_s", "devices", "buffer", "dropped"):
            assert key in health
        assert {"depth", "bytes", "oldest_ts"} <= set(health["buffer"])
        assert health["upstream"]["connected"] is True
        status = [p for _, p in collector.json("edge/gw1/status")]
        assert status[-1]["state"] == "online" and status[-1]["version"] and status[-1]["started_at"]
        collector.client.publish("edge/gw1/cmd/ping", "{}", qos=1)
        assert collector.wait_for(lambda c: c.json("edge/gw1/cmd/ping/reply"), 10)
        assert collector.json("edge/gw1/cmd/ping/reply")[0][1]["ok"] is True
        # cmd/reload: a broken file is refused with the reasons, a good one is taken
        good = cfg.read_text()
        cfg.write_text(good + "summaries:\n  interval: often\n")
        collector.client.publish("edge/gw1/cmd/reload", '{"id": "r1"}', qos=1)
        assert collector.wait_for(lambda c: c.json("edge/gw1/cmd/reload/reply"), 10)
        refused = collector.json("edge/gw1/cmd/reload/reply")[0][1]
        assert refused["ok"] is False and "summaries.interval" in refused["error"] and refused["id"] == "r1"
        cfg.write_text(good)
        collector.client.publish("edge/gw1/cmd/reload", "{}", qos=1)
        assert collector.wait_for(lambda c: len(c.json("edge/gw1/cmd/reload/reply")) == 2, 10)
        assert collector.json("edge/gw1/cmd/reload/reply")[1][1]["ok"] is True
        assert proc.poll() is None
    finally:
        rc, _ = stop(proc)
    assert rc == 0
    assert collector.wait_for(lambda c: c.json("edge/gw1/status")[-1][1]["state"] == "offline", 5)
    retained = collector_factory(mosquitto, "edge/gw1/status")
    assert retained.wait_for(lambda c: c.messages and c.messages[-1][2], 5), "status must be retained"
    assert json.loads(retained.messages[-1][1])["state"] == "offline"


def test_rebirth_burst_is_merged_and_replays_are_marked(tmp_path, mosquitto, collector_factory):
    """50 cmd/rebirth at once: one writes the active alarms into the buffer, the others are
    answered `merged` and served by one more rebirth 5 s later. Every re-published alarm says
    `replay: true` and points at its raise; the raise itself does not."""
    from tests.conftest import free_port

    cfg = write_config(tmp_path, mosquitto.port, extra=(
        # a device nobody answers for: its stale rule and a companion bad_input alarm raise
        f"devices:\n  - name: press1\n    driver: modbus\n    host: 127.0.0.1\n    port: {free_port()}\n"
        "    poll_interval: 200ms\n    tags:\n      - {name: temperature, table: holding, address: 0, type: float32}\n"
        "rules:\n  - {name: press1_down, type: stale, device: press1, after: 1s}\n"
        "  - {name: hot, type: threshold, input: press1.temperature, above: 80, bad_input_after: 1s}\n"))
    collector = collector_factory(mosquitto, "edge/gw1/#")
    alarms = ("edge/gw1/alarms/press1_down", "edge/gw1/alarms/hot.bad_input")

    def published(replay: bool) -> list[tuple[str, dict]]:
        return [(t, p) for t, p in collector.json("edge/gw1/alarms/") if bool(p.get("replay")) == replay]

    proc = start(cfg, tmp_path)
    try:
        assert collector.wait_for(lambda c: {t for t, _ in published(False)} == set(alarms), 20)
        raises = {t: p for t, p in published(False)}
        assert all(p["state"] == "raised" and "raised_seq" not in p for p in raises.values())
        for i in range(50):
            collector.client.publish("edge/gw1/cmd/rebirth", json.dumps({"id": i}), qos=1)
        assert collector.wait_for(lambda c: len(c.json("edge/gw1/cmd/rebirth/reply")) == 50, 10)
        replies = [p for _, p in collector.json("edge/gw1/cmd/rebirth/reply")]
        assert all(r["ok"] is True for r in replies)
        done = [r for r in replies if not r["merged"]]
        assert len(done) == 1 and done[0]["alarms"] == 2
        assert all(0 < r["due_in_s"] <= 5 for r in replies if r["merged"])
        assert collector.wait_for(lambda c: len(published(True)) >= 2, 5)
        time.sleep(1.0)
        assert sorted(t for t, _ in published(True)) == sorted(alarms)  # once, not 50 times
        assert collector.wait_for(lambda c: len(published(True)) >= 4, 6)  # the merged ones' rebirth
        time.sleep(1.0)
        assert len(published(True)) == 4 and len(published(False)) == 2
        for topic, replay in published(True):
            original = raises[topic]
            assert replay["raised_seq"] == original["seq"] and replay["seq"] > original["seq"]
            assert replay["since"] == original["since"] and replay["state"] == "raised"
        health = collector.json("edge/gw1/health")[-1][1]
        assert health["upstream"]["response_topics_refused"] == 0
    finally:
        rc, _ = stop(proc)
    assert rc == 0


def test_uptime_is_measured_on_the_monotonic_clock(tmp_path, monkeypatch):
    import asyncio

    from gateway import app as app_mod, config as config_mod
    from tests.rules.helpers import FakeClock

    clock = FakeClock()
    monkeypatch.setattr(app_mod, "time", clock)
    path = write_config(tmp_path, 1883)
    app = app_mod.App(config_mod.load(path), str(path))
    clock.advance(10)
    clock.step_wall(3600)
    assert app.uptime() == 10
    clock.advance(5)
    clock.step_wall(-7200)
    pong = asyncio.run(app.command("ping", {}))
    assert pong["uptime_s"] == 15


def test_reloads_under_modbus_polling_then_sigterm_stops_within_bound(tmp_path, mosquitto):
    """Issue recipe: a Modbus device polled every 100 ms, SIGHUP twice, then SIGTERM. Each reload
    must complete and the stop must end the process, whatever the driver was doing."""
    from tests.conftest import free_port, wait_port

    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "modbus", "--port", str(sim_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(sim_port, 20)
        cfg = write_config(tmp_path, mosquitto.port, extra=(
            "summaries:\n  interval: 100ms\n"
            "devices:\n  - name: press1\n    driver: modbus\n    host: 127.0.0.1\n"
            f"    port: {sim_port}\n    poll_interval: 100ms\n    tags:\n"
            "      - {name: temperature, table: holding, address: 0, type: float32}\n"
            "      - {name: running, table: coil, address: 0, type: bool}\n"))
        proc = start(cfg, tmp_path)
        log_path = tmp_path / "daemon.log"
        try:
            deadline = time.monotonic() + 20
            while "gateway.started" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            for n in (1, 2, 3):
                time.sleep(1.5)
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 8
                while log_path.read_text().count("config.reloaded") < n and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert log_path.read_text().count("config.reloaded") == n, f"reload {n} never completed"
            time.sleep(1.0)
            rc, took = stop(proc, timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert rc == 0 and took < 5.0, (rc, took)
        assert "gateway.stopped" in log_path.read_text()
    finally:
        sim.terminate()
        sim.wait(5)


def test_second_daemon_on_the_same_state_dir_exits_2(tmp_path):
    from tests.conftest import free_port, run_cli

    cfg = write_config(tmp_path, free_port())  # no broker needed: the lock is taken before connecting
    first = start(cfg, tmp_path)
    try:
        deadline = time.monotonic() + 20
        while "gateway.started" not in (tmp_path / "daemon.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, (tmp_path / "daemon.log").read_text()
        lock = tmp_path / "state" / "edge-gateway.lock"
        assert lock.read_text().strip() == str(first.pid)
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], capture_output=True,
                                text=True, timeout=20)
        assert second.returncode == 2 and time.monotonic() - t0 < 10
        message = [line for line in second.stderr.splitlines() if line.startswith("edge-gateway:")]
        assert len(message) == 1 and str(lock) in message[0] and f"PID {first.pid}" in message[0], second.stderr
        assert "gateway.already_running" in second.stderr and "gateway.started" not in second.stderr
        # read-only inspection is still allowed beside the running daemon
        stats = run_cli("buffer", "stats", "--json", "-c", str(cfg))
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["depth"] == 0
        assert first.poll() is None, "the second instance must not disturb the first"
    finally:
        rc, _ = stop(first)
    assert rc == 0
    third = start(cfg, tmp_path, "daemon3")
    try:
        deadline = time.monotonic() + 20
        while "gateway.started" not in (tmp_path / "daemon3.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert third.poll() is None and "gateway.started" in (tmp_path / "daemon3.log").read_text()
        assert (tmp_path / "state" / "edge-gateway.lock").read_text().strip() == str(third.pid)
    finally:
        rc, _ = stop(third)
    assert rc == 0


def test_full_disk_keeps_the_daemon_running_and_shows_in_health(tmp_path, mosquitto_factory, collector_factory):
    """Issue recipe: a 2 MiB tmpfs as state_dir, the broker down, a Modbus device polled every
    100 ms. The buffer fills the disk; the daemon must go on (not exit 1) and report disk_full.
    Needs root and a tmpfs mount (the unit tests in test_buffer.py cover the other cases)."""
    import pytest

    from tests.conftest import free_port, wait_port

    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    sim_port, broker_port = free_port(), free_port()
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "modbus", "--port", str(sim_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        (state / "filler").write_bytes(b"\0" * 800 * 1024)  # leaves room for the reserve and ~100 KB
        wait_port(sim_port, 20)
        cfg = write_config(tmp_path, broker_port, extra=(
            "summaries:\n  interval: 100ms\n"
            "devices:\n  - name: press1\n    driver: modbus\n    host: 127.0.0.1\n"
            f"    port: {sim_port}\n    poll_interval: 100ms\n    tags:\n"
            "      - {name: temperature, table: holding, address: 0, type: float32}\n"
            "      - {name: running, table: coil, address: 0, type: bool}\n"))
        proc = start(cfg, tmp_path)
        log_path = tmp_path / "daemon.log"
        deadline = time.monotonic() + 60
        while "buffer.disk_full" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "buffer.disk_full" in log_path.read_text(), log_path.read_text()[-2000:]
        time.sleep(3.0)  # polling on, against a full disk
        assert proc.poll() is None, log_path.read_text()[-2000:]
        broker = mosquitto_factory(port=broker_port)
        collector = collector_factory(broker, "edge/gw1/health")
        assert collector.wait_for(lambda c: c.json("edge/gw1/health"), 20), "no health after the broker came up"
        health = collector.json("edge/gw1/health")[0][1]
        assert health["buffer"]["disk_full"] is True
        assert health["devices"]["press1"]["connected"] is True
        rc, _ = stop(proc)
        assert rc == 0
        log = log_path.read_text()
        assert "Traceback" not in log and "cannot rollback" not in log and log.count("buffer.disk_full") == 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        sim.terminate()
        sim.wait(5)
        subprocess.run(["umount", "-l", str(state)])


def test_startup_objects_are_frozen_out_of_the_collectors_sight_and_the_daemon_goes_on(
        tmp_path, mosquitto, collector_factory):
    """After FREEZE_AFTER, what the start made is gc.freeze()d (full collections had walked it on
    the event loop: the longest loop lags under load); health keeps coming afterwards."""
    from gateway.cli import FREEZE_AFTER

    cfg = write_config(tmp_path, mosquitto.port)
    collector = collector_factory(mosquitto, "edge/gw1/health")
    proc = start(cfg, tmp_path)
    log_path = tmp_path / "daemon.log"
    try:
        deadline = time.monotonic() + FREEZE_AFTER + 15
        while "gateway.gc_frozen" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next((ln for ln in log_path.read_text().splitlines() if "gateway.gc_frozen" in ln), "{}")
        frozen = json.loads(line).get("objects", 0)  # the daemon logs JSON when not on a terminal
        assert frozen > 20_000, log_path.read_text()[-2000:]  # modules, the configuration, the pipeline
        seen = len(collector.json("edge/gw1/health"))
        assert collector.wait_for(lambda c: len(c.json("edge/gw1/health")) >= seen + 2, 10)
        assert proc.poll() is None
    finally:
        rc, _ = stop(proc)
    assert rc == 0 and "Traceback" not in log_path.read_text()
