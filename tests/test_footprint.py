"""Load only what the configuration uses: the real `edge-gateway run` and `check-config`, in a
subprocess, report the modules they imported. A Modbus-only gateway must not load the OPC UA
stack, cryptography, NumPy or SciPy; a configuration that uses them must load them (so that the
check can fail)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from drivers.sim.modbus import ModbusSimulator
from tests.conftest import REPO, free_port

HEAVY = ("asyncua", "cryptography", "numpy", "scipy")

# Runs the CLI as `edge-gateway` does, then prints the top-level modules it imported.
_WRAPPER = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted({m.split('.')[0] for m in sys.modules})), flush=True))
from gateway.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _config(tmp_path, broker_port: int, devices: list[dict], **sections) -> str:
    raw = {"gateway": {"id": "fp", "state_dir": str(tmp_path / "state")},
           "upstream": {"host": "127.0.0.1", "port": broker_port, "health_interval": "0.5s", "reconnect_max": "1s"},
           "summaries": {"interval": "0.5s"}, "devices": devices, **sections}
    (tmp_path / "state").mkdir(exist_ok=True)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _modules(output: str) -> set[str]:
    line = next(l for l in output.splitlines() if l.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


async def _run_until(path: str, predicate, timeout: float = 20.0) -> set[str]:
    """`edge-gateway run -c path` until predicate() holds, then SIGTERM; the modules it imported."""
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, "run", "-c", path], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline and proc.poll() is None:
            await asyncio.sleep(0.05)
        assert predicate(), f"the gateway never got there; exit {proc.poll()}"
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err[-2000:]
    return _modules(out)


async def test_modbus_only_run_loads_no_opcua_crypto_numpy_scipy(tmp_path, mosquitto, collector_factory):
    port = free_port()
    async with ModbusSimulator() as sim:
        await sim.start_tcp("127.0.0.1", port)
        collector = collector_factory(mosquitto, "edge/fp/data/#")
        path = _config(tmp_path, mosquitto.port, [{
            "name": "plc", "driver": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": "100ms",
            "tags": [{"name": "temperature", "address": 0, "type": "float32"}, {"name": "speed", "address": 6}]}],
            rules=[{"name": "hot", "type": "threshold", "input": "plc.temperature", "above": 80, "clear": 75}])
        modules = await _run_until(path, lambda: any(p["tags"].get("temperature", {}).get("count")
                                                     for _, p in collector.json("edge/fp/data/plc")))
    assert "pymodbus" in modules  # it did poll the device
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


async def test_opcua_device_and_analysis_load_their_libraries(tmp_path, mosquitto, collector_factory):
    """The same check sees the libraries when the configuration uses them: an OPC UA device (its
    server is down, so the driver keeps trying) and a vibration analysis (NumPy; SciPy only in
    the worker processes)."""
    collector = collector_factory(mosquitto, "edge/fp/health")
    path = _config(tmp_path, mosquitto.port, [
        {"name": "oven", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{free_port()}/", "timeout": "0.2s",
         "reconnect_max": "0.5s", "tags": [{"name": "t", "node": "ns=2;s=Oven.T"}]},
        {"name": "motor", "driver": "mqtt", "host": "127.0.0.1", "port": mosquitto.port,
         "subscriptions": [{"topic": "s/accel", "tag": "accel", "format": "f32le", "sample_rate": 12800, "unit": "g"}]}],
        analyses=[{"name": "de", "input": "motor.accel", "window": 4096, "features": ["rms", "spectrum"]}])

    def oven_tried() -> bool:
        return any((p["devices"]["oven"].get("last_error") or "") for _, p in collector.json("edge/fp/health"))

    modules = await _run_until(path, oven_tried)
    assert {"asyncua", "cryptography", "numpy"} <= modules  # NumPy for cutting the windows
    assert "scipy" not in modules  # the FFTs run in the feature worker processes only


def test_check_config_knows_every_driver_without_their_libraries(tmp_path):
    """Validation builds every driver's config model (an OPC UA node id is checked too) without
    importing a protocol library, NumPy or SciPy."""
    path = _config(tmp_path, 1883, [
        {"name": "plc", "driver": "modbus", "port": 5020, "tags": [{"name": "a", "address": 0, "count": 4}]},
        {"name": "oven", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/",
         "tags": [{"name": "t", "node": "ns=2;s=Oven.T"}]},
        {"name": "motor", "driver": "mqtt", "subscriptions": [{"topic": "s/t", "tag": "t"}]}])
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, "check-config", "-c", path], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "configuration is valid" in proc.stdout
    modules = _modules(proc.stdout)
    assert not modules & {*HEAVY, "pymodbus"}, sorted(modules & {*HEAVY, "pymodbus"})

    bad = tmp_path / "bad.yaml"
    bad.write_text(open(path).read().replace("ns=2;s=Oven.T", "not a node id;;"))
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, "check-config", "-c", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "not an OPC UA node id" in proc.stderr
    assert "asyncua" not in _modules(proc.stdout)
