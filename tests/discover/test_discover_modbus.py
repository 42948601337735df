"""`edge-gateway discover modbus` against the pymodbus simulator, on TCP and on RTU over a socat
pty pair: the unit ids and readable ranges it defines, within the request budget."""

from __future__ import annotations

import re

from drivers.sim.modbus import ModbusSimulator
from tests.conftest import free_port, run_cli
from tests.discover.conftest import discover, parse, read_all, write_config
from tests.drivers.test_modbus_rtu import BAUD, pty_pair  # noqa: F401 - the socat fixture

# The simulator's map (drivers/sim/modbus.py), as discover reports it.
SIM_MAP = {"coil": [(0, 15)], "discrete": [(0, 15)], "holding": [(0, 17), (100, 399)], "input": [(0, 2)]}


def ranges(device: str, stdout: str) -> dict[str, list[tuple[int, int]]]:
    """The readable ranges reported for one device (comments in the YAML)."""
    block = stdout.split(f'  - name: "{device}"', 1)[1].split("\n  - name:", 1)[0]
    found: dict[str, list[tuple[int, int]]] = {}
    for table, first, last in re.findall(r"# (\w+) (\d+)-(\d+) readable", block):
        found.setdefault(table, []).append((int(first), int(last)))
    return found


def requests(stdout: str) -> int:
    return int(re.search(r"; (\d+) requests in", stdout).group(1))


async def test_tcp_finds_the_units_and_ranges_within_budget(tmp_path):
    port = free_port()
    sim = await ModbusSimulator(unit_ids=(1, 3)).start_tcp("127.0.0.1", port)
    try:
        res = await discover("modbus", f"127.0.0.1:{port}", "--units", "1-4", "--addresses", "0-999",
                             "--max-requests", "1000", "--name", "press")
        assert res.returncode == 0, res.stderr
        devices = parse(res.stdout)["devices"]
        assert [(d["name"], d["unit_id"]) for d in devices] == [("press_unit1", 1), ("press_unit3", 3)]
        assert ranges("press_unit1", res.stdout) == ranges("press_unit3", res.stdout) == SIM_MAP
        assert sim.total_requests == requests(res.stdout) <= 1000
        assert {r[1] for r in sim.requests} == {"holding", "coil", "discrete", "input"}  # read functions only
        cfg = write_config(tmp_path, res.stdout)
        got = await read_all(cfg.devices[0])
    finally:
        await sim.stop()
    assert set(got) == {"coil_0", "discrete_0", "holding_0", "holding_100", "input_0"}


async def test_narrowing_finds_a_refused_register_and_respects_a_small_budget():
    port = free_port()
    sim = await ModbusSimulator().start_tcp("127.0.0.1", port)
    # refused with a device-failure exception: holding 5, and 100-119 so that the scratch range
    # begins just before a block that reads in one go
    sim.fail = {5, *range(100, 120)}
    try:
        res = await discover("modbus", f"127.0.0.1:{port}", "--addresses", "0-499", "--tables", "holding")
        assert res.returncode == 0, res.stderr
        assert ranges("modbus_127_0_0_1", res.stdout) == {"holding": [(0, 4), (6, 17), (120, 399)]}
        before = sim.total_requests
        small = await discover("modbus", f"127.0.0.1:{port}", "--max-requests", "40")
        assert small.returncode == 0, small.stderr
        assert "INCOMPLETE: stopped because the budget of 40 requests is used up" in small.stdout
        assert sim.total_requests - before == requests(small.stdout) == 40
        parse(small.stdout)  # still a valid skeleton
    finally:
        await sim.stop()


async def test_rtu_finds_the_units_on_a_serial_line(pty_pair, tmp_path):  # noqa: F811
    server_end, client_end = pty_pair
    sim = await ModbusSimulator(unit_ids=(2, 5)).start_rtu(server_end, baudrate=BAUD)
    try:
        res = await discover("modbus", "--serial", client_end, "--baudrate", str(BAUD), "--units", "1-6",
                             "--timeout", "0.2", "--addresses", "0-499", "--max-requests", "800", "--progress")
        assert res.returncode == 0, res.stderr
        devices = parse(res.stdout)["devices"]
        assert [d["unit_id"] for d in devices] == [2, 5]
        assert devices[0]["serial"] == {"port": client_end, "baudrate": BAUD, "parity": "N", "stopbits": 1,
                                        "bytesize": 8}
        assert ranges("rtu_line_unit2", res.stdout) == ranges("rtu_line_unit5", res.stdout) == SIM_MAP
        assert sim.total_requests <= requests(res.stdout) <= 800  # the silent ids' requests are not counted
        assert "unit ids tried" in res.stderr and "blocks" in res.stderr  # progress lines
        cfg = write_config(tmp_path, res.stdout)
        got = await read_all(cfg.devices[1])
    finally:
        await sim.stop()
    assert set(got) == {"coil_0", "discrete_0", "holding_0", "holding_100", "input_0"}


def test_nothing_there_is_one_line_and_exit_1():
    closed = run_cli("discover", "modbus", f"127.0.0.1:{free_port()}", timeout=30)
    assert closed.returncode == 1 and closed.stdout == ""
    assert closed.stderr.startswith("edge-gateway: discover modbus: cannot connect to 127.0.0.1:") 
    assert "Traceback" not in closed.stderr and len(closed.stderr.splitlines()) == 1
    for args, message in ((["--serial", "/nonexistent/tty"], "cannot open /nonexistent/tty"),
                          ([], "give HOST[:PORT] for Modbus TCP or --serial PORT"),
                          (["host:99999"], "not HOST[:PORT]"),
                          (["host", "--units", "1-300"], "'1-300' is not a range within 0-255")):
        res = run_cli("discover", "modbus", *args, timeout=30)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


async def test_no_unit_answers():
    port = free_port()
    sim = await ModbusSimulator(unit_ids=(9,)).start_tcp("127.0.0.1", port)
    try:
        res = await discover("modbus", f"127.0.0.1:{port}", "--units", "1-3")
    finally:
        await sim.stop()
    assert res.returncode == 1 and "no unit id of 1-3 answers" in res.stderr and res.stdout == ""


async def test_time_limit_bounds_the_search():
    port = free_port()
    sim = await ModbusSimulator().start_tcp("127.0.0.1", port)
    try:
        res = await discover("modbus", f"127.0.0.1:{port}", "--addresses", "0-65535", "--time-limit", "0.3")
    finally:
        await sim.stop()
    assert res.returncode == 0, res.stderr
    assert "INCOMPLETE: stopped because the time limit was reached" in res.stdout
    assert re.search(r"requests in 0\.\d s", res.stdout)
    assert ranges("modbus_127_0_0_1", res.stdout)["coil"] == [(0, 15)]  # what it found so far is kept
