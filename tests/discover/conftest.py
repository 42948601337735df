"""Helpers for discover tests: run the command beside an in-process simulator, turn its YAML into
a full configuration, and read every tag once with the real driver."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import yaml

from drivers.base import DriverContext
from drivers.registry import create
from gateway import config
from gateway.model import Quality, Sample, Waveform
from tests.conftest import free_port, run_cli


async def discover(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`edge-gateway discover ARGS` as a subprocess, while this event loop keeps serving."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "discover", *args,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def write_config(tmp_path, skeleton: str):
    """A full gateway configuration around the printed `devices:` block; check-config accepts it."""
    path = tmp_path / "gw.yaml"
    path.write_text(f"gateway:\n  id: gw1\n  state_dir: {tmp_path}/state\n"
                    f"upstream:\n  port: {free_port()}\n" + skeleton)
    checked = run_cli("check-config", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    return config.load(path)


async def read_all(device, timeout: float = 15.0, bad: frozenset[str] = frozenset()) -> dict[str, Sample | Waveform]:
    """The first good value of every tag of `device`, read by its driver (missing: not read).
    `bad`: tags known to read bad; the wait ends once each of them was read at all, and every
    other tag good (not at the timeout: a bad tag stays out of the result, or is in it if it
    came good, for the caller to tell)."""
    driver = create(device, DriverContext())
    got: dict[str, Sample | Waveform] = {}
    seen: set[str] = set()

    async def emit(item) -> None:
        for one in item if isinstance(item, list) else [item]:
            name = one.source.split(".", 1)[1]
            seen.add(name)
            if isinstance(one, Waveform) or one.quality is Quality.GOOD:
                got.setdefault(name, one)

    def done() -> bool:
        return bad <= seen and len(got.keys() - bad) >= len(device.tags) - len(bad)

    task = asyncio.create_task(driver.run(emit))
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return got


def parse(stdout: str) -> dict:
    data = yaml.safe_load(stdout)
    assert isinstance(data, dict) and list(data) == ["devices"], stdout
    return data
