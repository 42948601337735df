"""OPC UA array nodes as waveform tags, against the real asyncua simulator, through the analytics.

The simulator writes short captures fast (`capture_every`) so that each test takes a second or
two. The driver's blocks are fed to the AnalyticsEngine the way the gateway core does.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import pytest_asyncio
from asyncua import ua

from drivers.opcua import OpcUaConfig, OpcUaDriver
from drivers.sim.opcua import NAMESPACE, OpcUaSimulator
from gateway.analytics import AnalyticsEngine
from gateway.analytics.config import AnalysisConfig, SummariesConfig
from gateway.health import DeviceHealth
from gateway.model import NEW_CAPTURE, Quality
from tests.conftest import free_port
from tests.drivers.conftest import Run

pytestmark = pytest.mark.asyncio(loop_scope="module")

FS = 12800.0
CAPTURE = 1024  # samples per separate capture
EVERY = 0.2  # s between separate captures
STREAM = 2048  # samples per array of the continuous stream (0.16 s, back to back)
RATE_NODE = "ns=2;s=Motor.SampleRate"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def captures():
    sim = await OpcUaSimulator("127.0.0.1", free_port(), period=0.5, capture_samples=CAPTURE,
                               capture_rate=FS, capture_every=EVERY).start()
    yield sim
    await sim.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stream():
    sim = await OpcUaSimulator("127.0.0.1", free_port(), period=0.5, capture_samples=STREAM,
                               capture_rate=FS, capture_every=None).start()
    yield sim
    await sim.stop()


def driver(sim: OpcUaSimulator, mode: str, tags: list[dict], poll_interval: float = 0.05) -> OpcUaDriver:
    cfg = OpcUaConfig(name="motor", driver="opcua", endpoint=sim.endpoint, mode=mode, poll_interval=poll_interval,
                      timeout=2.0, reconnect_min=0.1, reconnect_max=0.5, tags=tags)
    return OpcUaDriver(cfg, DeviceHealth(cfg.name))


async def blocks(drv: OpcUaDriver, count: int, timeout: float = 10.0) -> list:
    run = Run(drv).start()
    try:
        assert await run.wait_for(lambda r: len(r.waveforms()) >= count, timeout), drv.health.to_dict()
    finally:
        await run.stop()
    return run.waveforms()


def analyse(waveforms: list, **windows: int) -> tuple[dict, dict]:
    """Feed the blocks to an engine with one analysis per `name=window`: (records by analysis, stats)."""
    cfgs = [AnalysisConfig(name=name, input="motor.accel", window=size, features=["rms"])
            for name, size in windows.items()]
    engine = AnalyticsEngine(cfgs, SummariesConfig(), {"motor.accel": "g"})
    records: dict[str, list] = {name: [] for name in windows}
    for w in waveforms:
        for rec in engine.on_waveform(w)[0]:
            records[rec.payload["analysis"]].append(rec)
    return records, engine.stats()


def written(sim: OpcUaSimulator, ts: float, within: float = 1e-6) -> bool:
    return any(abs(ts - stamp) < within for stamp in sim.captures)


# The driver continues a continuous stream's clock exactly (first stamp + n/fs per array), while
# each stamp the simulator writes is rounded to the microsecond (datetime): the two drift apart by
# up to about 2 µs over a few arrays (1 in 9 runs went past 1 µs), far below a sample (78 µs).
CLOCK_ROUNDING = 5e-6


@pytest.mark.parametrize("mode, rate", [("poll", {"sample_rate": FS}), ("subscribe", {"sample_rate": FS}),
                                        ("subscribe", {"sample_rate_node": RATE_NODE})])
async def test_one_window_per_capture_stamped_with_the_source_timestamp(captures, mode, rate):
    drv = driver(captures, mode, [{"name": "accel", "node": "ns=2;s=Motor.Capture", "unit": "g", **rate}])
    waveforms = await blocks(drv, 5)
    n = len(waveforms)
    assert all(len(w.samples) == CAPTURE and w.sample_rate == FS and w.restart == NEW_CAPTURE for w in waveforms)
    assert all(written(captures, w.ts) for w in waveforms)
    # each capture once: polling at 50 ms reads every capture about four times
    assert np.allclose(np.diff([w.ts for w in waveforms]), EVERY, atol=1e-5)
    records, stats = analyse(waveforms, whole=CAPTURE, longer=2 * CAPTURE)
    assert [r.ts for r in records["whole"]] == [w.ts for w in waveforms]
    assert stats["whole"] == {"windows": n, "dropped_windows": 0, "gaps": 0, "dropped_samples": 0, "pending_samples": 0,
                              "restarts": {NEW_CAPTURE: n - 1}}
    # a capture shorter than the window is never padded or glued to the next: dropped, no gap
    assert records["longer"] == []
    assert stats["longer"] == {"windows": 0, "dropped_windows": 0, "gaps": 0, "dropped_samples": (n - 1) * CAPTURE,
                               "pending_samples": CAPTURE, "restarts": {NEW_CAPTURE: n - 1}}
    assert drv.health.bad_values == 0


async def test_continuous_arrays_are_glued_into_windows(stream):
    drv = driver(stream, "subscribe", [{"name": "accel", "node": "ns=2;s=Motor.Capture", "sample_rate": FS,
                                        "unit": "g", "capture": "continuous"}])
    waveforms = await blocks(drv, 7)
    assert [w.restart for w in waveforms] == [None] * len(waveforms)
    starts = [w.ts for w in waveforms]
    assert all(written(stream, ts, CLOCK_ROUNDING) for ts in starts)
    assert np.diff(starts).tolist() == [pytest.approx(STREAM / FS, abs=1e-6)] * (len(starts) - 1)
    records, stats = analyse(waveforms, win=2 * STREAM)
    assert [r.ts for r in records["win"]] == [starts[i] for i in range(0, len(starts) - 1, 2)]
    assert stats["win"]["gaps"] == 0 and stats["win"]["restarts"] == {}


async def test_continuous_arrays_missed_by_slow_polling_restart_the_windows(stream):
    # polling every 0.3 s misses arrays of 0.16 s: the sample clock sees the jump
    drv = driver(stream, "poll", [{"name": "accel", "node": "ns=2;s=Motor.Capture", "sample_rate": FS,
                                   "unit": "g", "capture": "continuous"}], poll_interval=0.3)
    waveforms = await blocks(drv, 4)
    assert waveforms[0].restart is None
    assert [w.restart for w in waveforms[1:]].count("ts gap") >= 2
    records, stats = analyse(waveforms, win=2 * STREAM)
    assert stats["win"]["restarts"].get("ts gap", 0) >= 2 and stats["win"]["dropped_samples"] >= STREAM


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def odd_nodes(captures):
    """Nodes a waveform tag must refuse, plus one good Int16 array; each value written once."""
    server = captures.server
    idx = await server.get_namespace_index(NAMESPACE)
    stamp = dt.datetime.now(dt.timezone.utc)
    values = {
        "Matrix": ua.DataValue(ua.Variant([[1.0, 2.0], [3.0, 4.0]], ua.VariantType.Double), SourceTimestamp=stamp),
        "Labels": ua.DataValue(ua.Variant(["a", "b"], ua.VariantType.String), SourceTimestamp=stamp),
        "Scalar": ua.DataValue(ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=stamp),
        "Broken": ua.DataValue(ua.Variant([0.0, 0.0], ua.VariantType.Float),
                               ua.StatusCode(ua.StatusCodes.BadSensorFailure), SourceTimestamp=stamp),
        "Ints": ua.DataValue(ua.Variant([-3, 0, 7, 32767], ua.VariantType.Int16), SourceTimestamp=stamp),
    }
    for name, value in values.items():
        node = await server.nodes.objects.add_variable(ua.NodeId(f"Test.{name}", idx), ua.QualifiedName(name, idx),
                                                       value.Value)
        await node.write_value(value)
    return stamp.timestamp()


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
async def test_values_that_are_not_blocks_are_counted_once_each(captures, odd_nodes, mode):
    tags = [{"name": name, "node": f"ns=2;s=Test.{name}", "sample_rate": FS}
            for name in ("Matrix", "Labels", "Scalar", "Broken", "Ints")]
    drv = driver(captures, mode, tags)
    run = Run(drv).start()
    try:
        assert await run.wait_for(lambda r: drv.health.bad_values >= 4 and r.waveforms(), 10)
        await run.wait_for(lambda r: False, 0.5)  # ten more polls of the same values
    finally:
        await run.stop()
    assert drv.health.bad_values == 4  # the 2-D, string and scalar values and the bad status, each once
    assert run.samples() == []  # nothing scalar comes out of a waveform tag
    (ints,) = run.waveforms()
    assert ints.source == "motor.Ints" and ints.quality is Quality.GOOD
    assert ints.samples.tolist() == [-3, 0, 7, 32767] and ints.ts == pytest.approx(odd_nodes, abs=1e-6)
