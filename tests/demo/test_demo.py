"""`edge-gateway demo --duration 60` on its own: summaries, features and an alarm arrive upstream."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tests.conftest import Collector


def test_demo_runs_60s_and_delivers_summaries_features_and_alarms(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--duration", "60", "--plain", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    collector = None
    output: list[str] = []
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if m := re.match(r"broker: mqtt://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "".join(output)
        collector = Collector("127.0.0.1", port, "edge/demo-gw/#", protocol=4)
        rest, _ = proc.communicate(timeout=120)
        output.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
        if collector is not None:
            collector.close()
    text = "".join(output)
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    got = collector.json("edge/demo-gw/")
    topics = {t for t, _ in got}
    assert {"edge/demo-gw/data/press1", "edge/demo-gw/data/oven", "edge/demo-gw/data/motor1"} <= topics, topics
    features = [p for t, p in got if t == "edge/demo-gw/features/motor1_de"]
    assert len(features) >= 20, "about one feature window per 1.28 s expected"
    assert all(p["velocity_rms"] > 0 and p["sample_rate"] == 12800 for p in features)
    alarms = [p for t, p in got if t.startswith("edge/demo-gw/alarms/")]
    assert any(a["state"] == "raised" for a in alarms), alarms
    assert "demo stopped; received upstream:" in text
    # the demo's one write-back: done, read back, and audited upstream
    (audit,) = [p for t, p in got if t == "edge/demo-gw/events/commands"]
    assert audit["outcome"] == "done" and audit["tag"] == "setpoint" and audit["read_back"] == 60.0
    assert audit["client_id"] == "edge-gateway-demo"
    assert re.search(r"command write press1\.setpoint=60(\.0)? DONE read_back=60", text), text
