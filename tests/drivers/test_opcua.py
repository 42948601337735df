"""OPC UA driver against a real asyncua server (drivers.sim.opcua), loopback only.

asyncua servers take a while to start: one plain and one secured server are shared by the
module (module-scoped event loop); the restart test starts its own.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from drivers.opcua import OpcUaConfig, OpcUaDriver
from drivers.sim.opcua import OpcUaSimulator, generate_certificate
from gateway.health import DeviceHealth
from gateway.model import Quality
from tests.conftest import free_port
from tests.drivers.conftest import Run

pytestmark = pytest.mark.asyncio(loop_scope="module")

TAGS = [
    {"name": "temp", "node": "ns=2;s=Oven.Temperature", "unit": "degC"},
    {"name": "running", "node": "ns=2;s=Oven.Running"},
    {"name": "state", "node": "ns=2;s=Oven.State"},
    {"name": "parts", "node": "ns=2;s=Oven.Parts"},
    {"name": "counter", "node": "ns=2;s=Oven.Counter"},
    {"name": "broken", "node": "ns=2;s=Oven.Broken"},
    {"name": "ghost", "node": "ns=2;s=Oven.DoesNotExist"},
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain_server():
    sim = await OpcUaSimulator("127.0.0.1", free_port(), period=0.05).start()
    yield sim
    await sim.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure_server(tmp_path_factory):
    certs = tmp_path_factory.mktemp("opcua-certs")
    sim = await OpcUaSimulator("127.0.0.1", free_port(), secure=True, cert_dir=certs,
                               users={"operator": "s3cret"}, period=0.05).start()
    sim.client_cert, sim.client_key = generate_certificate(certs, "gateway-client", "urn:edge-gateway:test-client",
                                                           server=False)
    yield sim
    await sim.stop()


def make_driver(endpoint: str, mode: str, tags=TAGS, **kw) -> OpcUaDriver:
    cfg = OpcUaConfig(name="oven", driver="opcua", endpoint=endpoint, mode=mode, poll_interval=0.1,
                      timeout=kw.pop("timeout", 2.0), reconnect_min=0.1, reconnect_max=0.5, tags=tags, **kw)
    return OpcUaDriver(cfg, DeviceHealth(cfg.name))


async def running(driver, timeout=15.0) -> Run:
    run = Run(driver).start()
    ok = await run.wait_for(lambda r: len(r.samples("oven.counter")) >= 3, timeout=timeout)
    if not ok:
        await run.stop()
        raise AssertionError(f"no values: {driver.health.to_dict()}")
    return run


def check_values(run: Run, driver: OpcUaDriver) -> None:
    temp = run.latest("oven.temp")
    assert temp.quality is Quality.GOOD and 170 < temp.value < 190 and temp.unit == "degC"
    assert abs(temp.ts - time.time()) < 5  # the server's source timestamp
    assert run.latest("oven.running").value is True
    assert run.latest("oven.state").value == "running"
    assert isinstance(run.latest("oven.parts").value, int)
    counters = [s.value for s in run.samples("oven.counter")]
    assert counters == sorted(counters) and len(set(counters)) >= 3
    broken = run.latest("oven.broken")
    assert broken.quality is Quality.BAD and broken.value is None
    ghost = run.latest("oven.ghost")
    assert ghost is not None and ghost.quality is Quality.BAD and ghost.value is None
    assert driver.health.connected and driver.health.bad_values >= 2


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_both_modes_against_a_plain_server(plain_server, mode):
    driver = make_driver(plain_server.endpoint, mode)
    run = await running(driver)
    try:
        await run.wait_for(lambda r: len(r.samples("oven.counter")) >= 5)
        check_values(run, driver)
        if mode == "subscribe":
            # data changes carry distinct source timestamps, one per server update
            stamps = [s.ts for s in run.samples("oven.counter")]
            assert len(set(stamps)) == len(stamps)
    finally:
        await run.stop()


async def test_deadband_filters_small_changes(plain_server):
    tags = [{"name": "counter", "node": "ns=2;s=Oven.Counter"},
            {"name": "coarse", "node": "ns=2;s=Oven.Counter", "deadband": 10}]
    driver = make_driver(plain_server.endpoint, "subscribe", tags=tags)
    run = await running(driver)
    try:
        await run.wait_for(lambda r: len(r.samples("oven.counter")) >= 25)
        fine = [s.value for s in run.samples("oven.counter")]
        coarse = [s.value for s in run.samples("oven.coarse")]
        assert coarse and len(coarse) < len(fine) / 4
        assert all(b - a > 10 for a, b in zip(coarse, coarse[1:]))
    finally:
        await run.stop()


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_basic256sha256_sign_and_encrypt_with_username(secure_server, mode):
    driver = make_driver(secure_server.endpoint, mode,
                         security={"policy": "Basic256Sha256", "mode": "SignAndEncrypt",
                                   "certificate": str(secure_server.client_cert),
                                   "private_key": str(secure_server.client_key)},
                         username="operator", password="s3cret")
    run = await running(driver)
    try:
        check_values(run, driver)
    finally:
        await run.stop()


async def test_wrong_password_is_refused_and_retried(secure_server):
    driver = make_driver(secure_server.endpoint, "subscribe",
                         security={"policy": "Basic256Sha256", "mode": "SignAndEncrypt",
                                   "certificate": str(secure_server.client_cert),
                                   "private_key": str(secure_server.client_key)},
                         username="operator", password="wrong")
    run = Run(driver).start()
    try:
        assert await run.wait_for(lambda r: driver.health.errors >= 2, timeout=15)
        assert not driver.health.connected and run.items == [] and not run.task.done()
    finally:
        await run.stop()


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_server_restart_values_flow_again(mode):
    port = free_port()
    sim = await OpcUaSimulator("127.0.0.1", port, period=0.05).start()
    driver = make_driver(sim.endpoint, mode, tags=TAGS[4:5], timeout=1.0)
    run = await running(driver)
    try:
        await sim.stop()
        assert await run.wait_for(lambda r: not driver.health.connected, timeout=10)
        errors = driver.health.errors
        assert errors >= 1
        n = len(run.samples("oven.counter"))
        sim = await OpcUaSimulator("127.0.0.1", port, period=0.05).start()
        assert await run.wait_for(lambda r: len(r.samples("oven.counter")) >= n + 3, timeout=20)
        assert driver.health.connected
        # the new server counts from 1 again: these are fresh values, not replays
        assert run.latest("oven.counter").value < 200
    finally:
        await run.stop()
        await sim.stop()
