"""Helpers for driver tests: run a driver as a task and collect what it emits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gateway.model import Sample, Waveform


class Run:
    """A driver running in the background; `items` is everything it emitted, in order."""

    def __init__(self, driver) -> None:
        self.driver = driver
        self.items: list[Sample | Waveform] = []
        self.task: asyncio.Task | None = None

    async def _emit(self, item: Sample | Waveform | list[Sample]) -> None:
        if isinstance(item, list):
            self.items.extend(item)
        else:
            self.items.append(item)

    def start(self) -> "Run":
        self.task = asyncio.create_task(self.driver.run(self._emit), name="test.driver")
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await asyncio.wait_for(self.task, 5)
            except asyncio.CancelledError:
                pass
            self.task = None

    def samples(self, source: str | None = None) -> list[Sample]:
        return [s for s in self.items if isinstance(s, Sample) and (source is None or s.source == source)]

    def waveforms(self, source: str | None = None) -> list[Waveform]:
        return [w for w in self.items if isinstance(w, Waveform) and (source is None or w.source == source)]

    def latest(self, source: str) -> Sample | None:
        found = self.samples(source)
        return found[-1] if found else None

    async def wait_for(self, predicate: Callable[["Run"], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            if self.task is not None and self.task.done():
                self.task.result()  # surfaces a driver crash in the test
            await asyncio.sleep(0.02)
        return predicate(self)


@pytest.fixture
async def run_driver():
    runs: list[Run] = []

    def start(driver) -> Run:
        run = Run(driver).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        await run.stop()
