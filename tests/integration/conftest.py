"""Helpers to run the whole gateway (App) in the test's event loop against real peers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import yaml

from gateway import config as config_mod
from gateway.app import App
from gateway.health import Notifier


@contextlib.asynccontextmanager
async def running_gateway(tmp_path, raw: dict):
    """Write `raw` as the config file, validate it like the CLI does, run App until the block ends."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = config_mod.load(path)
    app = App(cfg, str(path), notifier=Notifier(env={}))
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        app.request_stop()
        assert await asyncio.wait_for(task, 15) == 0


async def until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


def base_config(tmp_path, broker, **sections) -> dict:
    raw = {
        "gateway": {"id": "gw1", "state_dir": str(tmp_path / "state")},
        "upstream": {"host": "127.0.0.1", "port": broker.port, "health_interval": "1s", "reconnect_max": "1s"},
        "summaries": {"interval": "1s"},
    }
    raw.update(sections)
    return raw


@pytest.fixture
def gateway_config(tmp_path, mosquitto):
    return lambda **sections: base_config(tmp_path, mosquitto, **sections)
