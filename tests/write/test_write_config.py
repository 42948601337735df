"""Write permissions in the configuration: errors at FILE:LINE, and check-config lists them."""

from __future__ import annotations

from tests.conftest import run_cli

HEAD = """gateway:
  id: gw1
  state_dir: {state}
commands:
  write: true
devices:
  - name: press1
    driver: modbus
    tags:
"""


def check(tmp_path, tags: str, extra: str = ""):
    path = tmp_path / "gw.yaml"
    path.write_text(HEAD.format(state=tmp_path / "state") + tags + extra)
    return path, run_cli("check-config", "-c", str(path))


def test_writable_only_on_holding_and_coil_at_its_line(tmp_path):
    path, res = check(tmp_path, "      - {name: ok, address: 16, type: float32, writable: true}\n"
                                "      - {name: volts, table: input, address: 0, writable: true}\n"
                                "      - {name: door, table: discrete, address: 0, type: bool, writable: true}\n")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert any(line.startswith(f"{path}:11: devices.0.tags.1: ") and "input table is read-only" in line
               for line in lines), lines
    assert any(line.startswith(f"{path}:12: devices.0.tags.2: ") and "discrete table is read-only" in line
               for line in lines), lines


def test_bounds_only_with_writable_and_in_order(tmp_path):
    path, res = check(tmp_path, "      - {name: a, address: 16, max: 90}\n"
                                "      - {name: b, address: 17, writable: true, min: 90, max: 20}\n")
    assert res.returncode == 2
    assert f"{path}:10: devices.0.tags.0: max apply to writable tags only (add writable: true)" in res.stderr
    assert f"{path}:11: devices.0.tags.1: min 90 is above max 20" in res.stderr


def test_check_config_lists_writable_tags_and_methods(tmp_path):
    path, res = check(tmp_path, "      - {name: setpoint, address: 16, type: float32, writable: true, min: 20, max: 90}\n"
                                "      - {name: temperature, address: 0, type: float32}\n",
                      "  - name: oven\n    driver: opcua\n    endpoint: opc.tcp://127.0.0.1:4840\n    tags:\n"
                      "      - {name: mode, node: \"ns=2;s=Oven.Mode\", writable: true, allowed: [0, 1]}\n"
                      "    methods:\n"
                      "      - {name: start_test, object: \"ns=2;s=Oven\", method: \"ns=2;s=Oven.StartTest\","
                      " args: [Int16, Double]}\n")
    assert res.returncode == 0, res.stderr
    assert "commands  writes ENABLED" in res.stdout
    assert "press1           writable: setpoint [20.0..90.0]" in res.stdout
    assert "oven             writable: mode {0, 1}; methods: start_test" in res.stdout
    assert "temperature" not in res.stdout.split("commands", 1)[1].split("summaries")[0]


def test_methods_need_node_ids_and_known_types(tmp_path):
    path, res = check(tmp_path, "      - {name: t, address: 0}\n",
                      "  - name: oven\n    driver: opcua\n    endpoint: opc.tcp://127.0.0.1:4840\n    tags:\n"
                      "      - {name: mode, node: \"ns=2;s=Oven.Mode\"}\n"
                      "    methods:\n"
                      "      - {name: m, object: \"not a node\", method: \"ns=2;s=Oven.M\", args: [Int17]}\n")
    assert res.returncode == 2
    assert "devices.1.methods.0.object: not an OPC UA node id" in res.stderr
    assert "devices.1.methods.0.args.0: Input should be" in res.stderr
