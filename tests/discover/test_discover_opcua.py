"""`edge-gateway discover opcua` against the simulator and a plain asyncua server: the printed
tags, pasted into a configuration, pass check-config and every one of them reads."""

from __future__ import annotations

import re

from asyncua import Server, ua

from drivers.sim.opcua import OpcUaSimulator
from drivers.discovery import Names, tag_name
from gateway.model import Waveform
from tests.conftest import free_port, run_cli
from tests.discover.conftest import discover, parse, read_all, write_config

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


async def test_simulator_tags_check_and_read(tmp_path):
    port = free_port()
    sim = await OpcUaSimulator("127.0.0.1", port, capture_samples=512, capture_every=0.5, period=0.1).start()
    try:
        res = await discover("opcua", f"opc.tcp://127.0.0.1:{port}/", "--name", "oven")
        assert res.returncode == 0, res.stderr
        assert "policy None, mode None" in res.stdout  # the endpoints offered, as comments
        tags = {t["name"]: t["node"] for t in parse(res.stdout)["devices"][0]["tags"]}
        assert tags == {f"{obj}_{n}": f"ns=2;s={obj}.{n}" for obj, names in
                        (("Oven", ("Temperature", "Setpoint", "Running", "Parts", "State", "Broken", "Counter", "Batches",
                                   "Mode")),
                         ("Motor", ("Capture", "SampleRate"))) for n in names}
        assert "Float array 512" in res.stdout and "value now BadSensorFailure" in res.stdout
        # the waveform suggestion, filled in as the comment says
        cfg = write_config(tmp_path, res.stdout.replace("# sample_rate: <fill in>", "sample_rate: 12800"))
        device = cfg.devices[0]
        assert device.waveform_tags() == {"Motor_Capture"}
        got = await read_all(device, bad=frozenset({"Oven_Broken"}))  # the simulator's always-bad node
    finally:
        await sim.stop()
    assert set(got) == set(tags) - {"Oven_Broken"}
    assert isinstance(got["Motor_Capture"], Waveform) and got["Motor_Capture"].samples.size == 512


async def plain_server(port: int) -> tuple[Server, dict[str, str]]:
    """A few variables of different types, a nested folder, names that need cleaning up."""
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    idx = await server.register_namespace("urn:test:plain")
    plant = await server.nodes.objects.add_folder(idx, "Plant")
    line = await plant.add_folder(idx, "Line 1")
    cell = await line.add_object(idx, "Cell/A")
    other = await plant.add_folder(idx, "Line_1")
    values = [
        (line, "Temp", ua.Variant(21.5, ua.VariantType.Double)),
        (other, "Temp", ua.Variant(22.5, ua.VariantType.Float)),  # the same clean name: Line_1_Temp
        (cell, "Count", ua.Variant(7, ua.VariantType.UInt64)),
        (cell, "Level", ua.Variant(-3, ua.VariantType.Int16)),
        (cell, "On", ua.Variant(True, ua.VariantType.Boolean)),
        (cell, "Recipe", ua.Variant("bread", ua.VariantType.String)),
        (cell, "Trace", ua.Variant([1.0, 2.0, 3.0], ua.VariantType.Double)),
        (plant, "Codes", ua.Variant([1, 2], ua.VariantType.UInt16)),
    ]
    nodes = {}
    for parent, name, variant in values:
        node = await parent.add_variable(idx, name, variant)
        nodes[name if name not in nodes else f"{name}2"] = node.nodeid.to_string()
    empty = await cell.add_variable(idx, "Empty", ua.Variant(None, ua.VariantType.Null),
                                    datatype=ua.NodeId(ua.ObjectIds.Float))
    await empty.write_attribute(ua.AttributeIds.ValueRank, ua.DataValue(ua.Variant(1, ua.VariantType.Int32)))
    nodes["Empty"] = empty.nodeid.to_string()  # no value yet: an array by its declared rank
    await server.start()
    return server, nodes


async def test_plain_server_nested_folders_types_and_names(tmp_path):
    port = free_port()
    server, nodes = await plain_server(port)
    try:
        res = await discover("opcua", f"opc.tcp://127.0.0.1:{port}/", "--progress")
        assert res.returncode == 0, res.stderr
        tags = parse(res.stdout)["devices"][0]["tags"]
        names = [t["name"] for t in tags]
        assert all(NAME.match(n) for n in names) and len(set(names)) == len(names)
        assert {t["node"] for t in tags} == set(nodes.values())
        assert {"Plant_Line_1_Temp", "Plant_Line_1_Temp_2", "Plant_Line_1_Cell_A_Count"} <= set(names)
        for expected in ("UInt64", "Int16", "Boolean", "String", "Double array 3", "UInt16 array 2"):
            assert expected in res.stdout
        assert "Float array ?" in res.stdout
        assert res.stdout.count("# sample_rate: <fill in>") == 2  # the Double array and the empty Float one
        assert "a UInt16 array: waveform tags take Float, Double, Int16 or Int32" in res.stdout
        assert "nodes" in res.stderr  # progress lines, asked for with --progress
        device = write_config(tmp_path, res.stdout).devices[0]
        got = await read_all(device)
        assert set(got) == set(names)

        shallow = await discover("opcua", f"opc.tcp://127.0.0.1:{port}/", "--depth", "2")
        assert [t["name"] for t in parse(shallow.stdout)["devices"][0]["tags"]] == ["Plant_Codes"]
        visited = int(re.search(r"variables in (\d+) nodes", res.stdout).group(1))
        capped = await discover("opcua", f"opc.tcp://127.0.0.1:{port}/", "--max-nodes", str(visited - 1))
        assert capped.returncode == 0, capped.stderr
        assert "INCOMPLETE" in capped.stdout and f"in {visited - 1} nodes" in capped.stdout and len(parse(capped.stdout)["devices"][0]["tags"]) < len(names)
        missing = await discover("opcua", f"opc.tcp://127.0.0.1:{port}/", "--root", "ns=2;s=Nope")
        assert missing.returncode == 1 and "cannot browse ns=2;s=Nope: BadNodeId" in missing.stderr
    finally:
        await server.stop()


def test_unreachable_endpoint_is_one_line_and_exit_1():
    res = run_cli("discover", "opcua", f"opc.tcp://127.0.0.1:{free_port()}/", timeout=30)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("edge-gateway: discover opcua: cannot reach") and "Traceback" not in res.stderr
    bad = run_cli("discover", "opcua", "http://example/", timeout=30)
    assert bad.returncode == 1 and "endpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_names_are_valid_and_unique():
    names = Names()
    assert [names(p) for p in (["Line 1", "Temp"], ["Line_1", "Temp"], ["Ünit", "ä"])] == \
        ["Line_1_Temp", "Line_1_Temp_2", "nit"]
    long = names(["x" * 100])
    assert len(long) == 64 and NAME.match(long) and tag_name("///") == "tag"
