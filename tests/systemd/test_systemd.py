"""The unit file verifies, and the daemon speaks sd_notify over a real unix datagram socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

UNIT = REPO / "systemd" / "edge-gateway.service"


def test_unit_has_what_a_shop_floor_box_needs():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID",
                 "User=edge-gateway", "StateDirectory=edge-gateway", "ConfigurationDirectory=edge-gateway",
                 "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "RestrictAddressFamilies=", "CapabilityBoundingSet=\n", "SupplementaryGroups=dialout"):
        assert line in text, line


def test_unit_verifies_with_systemd_analyze(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing (.ci/run installs the systemd package)")
    unit = tmp_path / "edge-gateway.service"
    exe = Path(sys.executable).with_name("edge-gateway")
    unit.write_text(UNIT.read_text().replace("/opt/edge-gateway/venv/bin/edge-gateway", str(exe)))
    res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in res.stderr.splitlines() if "edge-gateway.service" in l]
    assert res.returncode == 0 and not problems, res.stderr


def test_sd_notify_ready_watchdog_reloading_stopping(tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway:\n  id: gw1\n  state_dir: {tmp_path}/state\nupstream:\n  port: {free_port()}\n")
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[tuple[float, str]] = []

    def read_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            got.extend((time.monotonic(), line) for line in data.splitlines())

    try:
        read_for(4.0)
        proc.send_signal(signal.SIGHUP)
        read_for(1.5)
        proc.send_signal(signal.SIGTERM)
        read_for(1.5)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    lines = [l for _, l in got]
    assert lines[0] == "READY=1" or "READY=1" in lines[:3]
    dog = [t for t, l in got if l == "WATCHDOG=1"]
    assert len(dog) >= 6, lines
    gaps = [b - a for a, b in zip(dog, dog[1:])]
    assert 0.3 < sorted(gaps)[len(gaps) // 2] < 0.7, gaps  # half of WATCHDOG_USEC (1 s)
    assert "RELOADING=1" in lines
    assert lines.index("RELOADING=1") < len(lines) - 1 - lines[::-1].index("READY=1"), "READY again after reload"
    assert "STOPPING=1" in lines
    assert any(l.startswith("STATUS=") for l in lines)
