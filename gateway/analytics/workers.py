"""Feature computation off the event loop: a few worker threads behind a bounded queue.

The loop assembles windows (`AnalyticsEngine.assemble`) and hands them to `FeaturePool.submit`;
the threads run `AnalyticsEngine.compute`, whose FFTs release the GIL, so several threads use
several cores and the loop keeps ticking while a burst is computed.

Bound and drop policy: at most `capacity` windows are in flight (handed over, not yet routed).
A window that finds the pool full is dropped -- the newest go, the windows already queued keep
their place -- counted per analysis in `health.analyses.{name}.dropped_windows`, and logged once
when dropping starts (`analytics.queue_full`) and once when windows flow again.

Order: the admitted windows are cut into jobs of about one FFT batch, numbered, and any idle
thread takes the next job, so one busy stream uses every thread. Results are routed strictly in
job order (a finished job waits for the ones before it), hence per stream -- and across
streams -- records and rule samples leave in measurement order.

Stop: `close()` lets the queued windows finish for up to `stop_bound` seconds; jobs not started
by then are skipped and counted as dropped (`analytics.stop_dropped`). Each thread then ends
after its current job and is joined; a job cannot be interrupted, but one job is one batch.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from typing import Any, Callable

from gateway import logs
from gateway.analytics.engine import AnalyticsEngine, Closed
from gateway.model import Record, Sample

log = logs.get("analytics.workers")

JOB_SAMPLES = 65536  # samples per job: one cache-sized FFT batch (see vibration.features)

Deliver = Callable[[list[Record], list[Sample]], None]
_SKIPPED: Any = object()  # outcome of a job not started before the stop bound


class FeaturePool:
    """See the module docstring. `deliver(records, rule_samples)` is called on the event loop,
    in order; `run()` is the pool's task (it owns the threads)."""

    def __init__(self, engine: AnalyticsEngine, deliver: Deliver, *, workers: int, capacity: int,
                 stop_bound: float) -> None:
        self.engine = engine
        self.workers = int(workers)
        self.capacity = int(capacity)
        self.stop_bound = float(stop_bound)
        self._deliver = deliver
        self._jobs: queue.SimpleQueue[tuple[int, list[Closed]] | None] = queue.SimpleQueue()
        self._outbox: collections.deque[tuple[int, Any]] = collections.deque()  # from the threads
        self._sent: dict[int, list[Closed]] = {}  # job number -> its windows, until routed
        self._ready: dict[int, Any] = {}  # finished jobs waiting for an earlier one
        self._next_job = 0  # number given to the next job
        self._next_out = 0  # number of the next job to route
        self.in_flight = 0  # windows handed over and not yet routed
        self.dropped = 0  # windows refused or skipped, all analyses
        self._dropping = False
        self._skip = False  # set at the stop bound: threads skip the jobs they have not started
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def stats(self) -> dict[str, int]:
        return {"workers": self.workers, "capacity": self.capacity, "in_flight": self.in_flight,
                "dropped_windows": self.dropped}

    # ----- on the event loop -----

    def submit(self, windows: list[Closed]) -> None:
        """Hand windows over (in measurement order per stream); beyond the capacity the newest
        are dropped and counted."""
        room = max(0, self.capacity - self.in_flight)
        taken, refused = windows[:room], windows[room:]
        if refused:
            self._drop(refused)
            if not self._dropping:
                self._dropping = True
                log.warning("analytics.queue_full", capacity=self.capacity, workers=self.workers,
                            dropped_windows=len(refused), analyses=sorted({c.cfg.name for c in refused}),
                            hint="feature computation is slower than the windows arrive; "
                                 "health.analyses.*.dropped_windows counts what is lost")
        elif taken and self._dropping:
            self._dropping = False
            log.info("analytics.queue_flowing", dropped_windows=self.dropped)
        job: list[Closed] = []
        size = 0
        for c in taken:
            if job and size + c.samples > JOB_SAMPLES:
                self._send(job)
                job, size = [], 0
            job.append(c)
            size += c.samples
        if job:
            self._send(job)

    def close(self) -> None:
        """Finish what was handed over (up to `stop_bound`), then end the threads; `run` returns."""
        self._closing.set()

    def _send(self, job: list[Closed]) -> None:
        n = self._next_job
        self._next_job += 1
        self._sent[n] = job
        self.in_flight += len(job)
        self._idle.clear()
        self._jobs.put((n, job))

    def _drop(self, windows: list[Closed]) -> None:
        self.engine.count_dropped(windows)
        self.dropped += len(windows)

    def _collect(self) -> None:
        """Route the finished jobs that are next in order, as one delivery."""
        while self._outbox:
            n, outcome = self._outbox.popleft()
            self._ready[n] = outcome
        records: list[Record] = []
        samples: list[Sample] = []
        while self._next_out in self._ready:
            outcome = self._ready.pop(self._next_out)
            job = self._sent.pop(self._next_out)
            self._next_out += 1
            self.in_flight -= len(job)
            if isinstance(outcome, tuple):
                records += outcome[0]
                samples += outcome[1]
            else:  # skipped at the stop bound, or the computation failed (logged by the thread)
                self._drop(job)
        if not self._sent:
            self._idle.set()
        if records or samples:
            try:
                self._deliver(records, samples)
            except Exception:  # noqa: BLE001 - routing must not stop the pool
                log.exception("analytics.deliver_failed", records=len(records))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        threads = [threading.Thread(target=self._work, name=f"analytics.worker-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        try:
            await self._closing.wait()
            try:
                await asyncio.wait_for(self._idle.wait(), self.stop_bound)
            except TimeoutError:
                pass
        finally:
            before = self.dropped
            self._skip = bool(self._sent)
            for _ in threads:
                self._jobs.put(None)
            await self._join(threads)
            self._collect()
            if self._sent:  # a thread outlived the wait (only when cancelled again): its job is lost
                self._drop([c for job in self._sent.values() for c in job])
                self._sent.clear()
            if self.dropped > before:
                log.warning("analytics.stop_dropped", dropped_windows=self.dropped - before, bound_s=self.stop_bound,
                            hint="windows still queued at the stop bound were not computed")

    async def _join(self, threads: list[threading.Thread]) -> None:
        """Wait (without blocking the loop) until every thread has ended; a job cannot be
        interrupted, so a thread still busy after `stop_bound` is logged and waited for."""
        overdue = time.monotonic() + self.stop_bound
        while any(t.is_alive() for t in threads):
            if time.monotonic() > overdue:
                log.warning("analytics.workers_stop_overdue", bound_s=self.stop_bound,
                            still_running=[t.name for t in threads if t.is_alive()])
                overdue = time.monotonic() + self.stop_bound
            await asyncio.sleep(0.01)
        for t in threads:
            t.join()

    # ----- in the worker threads -----

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            n, job = item
            if self._skip:
                outcome = _SKIPPED
            else:
                try:
                    outcome = self.engine.compute(job)
                except Exception:  # noqa: BLE001 - one bad window must not stop the pool
                    log.exception("analytics.compute_failed", analyses=sorted({c.cfg.name for c in job}),
                                  windows=len(job))
                    outcome = None
            self._outbox.append((n, outcome))
            try:
                self._loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # the loop is closed: run() collects what is left
                pass
