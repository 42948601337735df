"""Feature computation off the event loop: a few worker processes behind a bounded queue.

The loop assembles windows (`AnalyticsEngine.assemble`) and hands them to `FeaturePool.submit`;
worker processes compute them (`FeatureComputer.compute`) and send back the records and rule
samples. Processes, not threads: most of a window's time is NumPy calls on small arrays and
Python between them, all under the GIL. Measured here, two threads computed fewer windows per
second than one, and the event loop waited up to 50 ms for the GIL. A process has its own GIL,
so the loop stays free and each worker has a core.

How the work travels, and why:
- The workers come from a fork server that has imported NumPy, SciPy and the feature code once
  (`multiprocessing` "forkserver"), so a worker starts in milliseconds and shares those pages.
  A gateway without analyses starts no process.
- Samples go through shared memory. When a job is sent, the loop copies its windows into a
  block (`_Blocks`, reused by size) and the worker reads them in place; only the block's name and each window's
  offset, time and spec are pickled. Pickling the samples themselves cost about 0.4 ms of GIL
  per 16,384-sample window: at 1,500 windows a second, most of a core.
- Each worker has one pipe. The loop writes jobs to it and reads results from it (`add_reader`),
  with no helper thread: `concurrent.futures.ProcessPoolExecutor`, with its two helper threads
  and only one job queued ahead per worker, left the worker idle four fifths of the time.
- Each worker is sent up to AHEAD jobs at once, so it never waits for the loop; the rest wait
  in the pool, in order.
- BLAS runs one thread per worker (BLAS_THREADS): OpenBLAS' own threads, one per core in every
  worker, measured 4x slower.
- Workers run at a lower CPU priority (WORKER_NICE): when the machine is busy, polling, MQTT
  keepalives and health win over features, whose losses are counted, never the other way round.

Bound and drop policy: at most `capacity` windows are in flight (handed over, not yet routed).
A window that finds the pool full is dropped -- the newest go, the windows already queued keep
their place -- counted per analysis in `health.analyses.{name}.dropped_windows`, and logged once
when dropping starts (`analytics.queue_full`) and once when windows flow again.

Order: the windows handed over are cut into jobs of about one FFT batch (windows handed over one
at a time are gathered until the loop next turns), numbered, and each goes to the worker with
the fewest jobs, so one busy stream uses every worker. Results are routed strictly in job order
(a finished job waits for the ones before it), hence per stream -- and across streams -- records
and rule samples leave in measurement order.

A worker that dies (killed, out of memory) loses the jobs it held: they are counted as dropped,
logged (`analytics.worker_died`), and a new worker takes its place (`health.analytics.restarts`).
One that cannot be started (fork fails) is logged (`analytics.worker_start_failed`) and tried
again REVIVE_S later; meanwhile the windows wait, and those beyond the bound are counted.
A job that raises is logged with the worker's traceback (`analytics.compute_failed`) and its
windows counted as dropped; the other jobs go on.

Stop: `close()` lets the queued windows finish for up to `stop_bound` seconds; jobs not started
by then are skipped and counted as dropped (`analytics.stop_dropped`). Each worker ends after
its current job and is waited for; a job cannot be interrupted, but one job is one batch.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
import traceback
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable

from gateway import logs
from gateway.analytics.engine import AnalyticsEngine, Closed, FeatureComputer
from gateway.lazy import lazy
from gateway.model import Record, Sample

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.shared_memory import SharedMemory

# A gateway without analyses never loads these (see gateway.lazy).
np = lazy("numpy")
windowing = lazy("gateway.analytics.window")
_mp = lazy("multiprocessing")
_shm = lazy("multiprocessing.shared_memory")

log = logs.get("analytics.workers")

JOB_SAMPLES = 65536  # samples per job: one cache-sized FFT batch (see vibration.features)
AHEAD = 4  # jobs sent to a worker before it has answered (a few kB each: far below a pipe's 64 kB)
MIN_BLOCK = 4096  # samples of the smallest shared-memory block
PRELOAD = ["gateway.analytics.workers", "gateway.analytics.vibration"]  # imported once, in the fork server
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
WORKER_NICE = 5  # added to the workers' nice value
REVIVE_S = 5.0  # seconds between tries to start a worker again when starting one failed

Deliver = Callable[[list[Record], list[Sample]], None]
SKIPPED = "skipped"  # a job's outcome when it was not started before the stop bound
FAILED = "failed"  # ... when it raised (with the worker's traceback)
LOST = "lost"  # ... when its worker died


class _Worker:
    """One worker process, its end of the pipe, and the job numbers it holds (in order)."""

    def __init__(self, index: int) -> None:
        context = _mp.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        ours, theirs = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(theirs,), name=f"analytics.worker-{index}", daemon=True)
        self.process.start()
        theirs.close()
        self.conn: Connection = ours
        self.jobs: collections.deque[int] = collections.deque()
        self.specs: set[int] = set()  # the feature specs (by number) this worker has been sent
        self.stopping = False


class FeaturePool:
    """See the module docstring. `deliver(records, rule_samples)` is called on the event loop,
    in order; `run()` is the pool's task (it owns the worker processes)."""

    def __init__(self, engine: AnalyticsEngine, deliver: Deliver, *, workers: int, capacity: int,
                 stop_bound: float) -> None:
        self.engine = engine
        self.workers = int(workers)
        self.capacity = int(capacity)
        self.stop_bound = float(stop_bound)
        self._deliver = deliver
        self._loop: asyncio.AbstractEventLoop | None = None
        self._procs: list[_Worker] = []  # started on the first job
        self._waiting: collections.deque[tuple[int, list[Closed]]] = collections.deque()  # jobs no worker has yet
        self._sent: dict[int, list[str]] = {}  # job number -> its windows' analyses, until routed
        self._held: dict[int, SharedMemory] = {}  # job number -> the block its samples are in
        self._ready: dict[int, Any] = {}  # finished jobs waiting for an earlier one
        self._blocks = _Blocks()
        self._spec_ids: dict[Any, int] = {}  # FeatureSpec -> its number: a spec travels once per worker
        self._next_job = 0  # number given to the next job
        self._next_out = 0  # number of the next job to route
        self._pending: list[Closed] = []  # windows handed over and not yet in a job
        self._pending_samples = 0
        self._flush_soon = False
        self.in_flight = 0  # windows handed over and not yet routed
        self.dropped = 0  # windows refused, skipped or lost, all analyses
        self.restarts = 0  # workers started again after one died
        self._revive_at = 0.0  # monotonic time before which no worker is started again
        self._dropping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = asyncio.Event()

    def stats(self) -> dict[str, int]:
        return {"workers": self.workers, "capacity": self.capacity, "in_flight": self.in_flight,
                "dropped_windows": self.dropped, "restarts": self.restarts}

    def pids(self) -> list[int]:
        """The worker processes now running (none before the first window, none after a stop)."""
        return [w.process.pid for w in self._procs if w.process.pid is not None]

    # ----- handing windows over -----

    def submit(self, windows: list[Closed]) -> None:
        """Hand windows over (in measurement order per stream); beyond the capacity the newest
        are dropped and counted."""
        room = max(0, self.capacity - self.in_flight)
        taken, refused = windows[:room], windows[room:]
        if refused:
            self._drop([c.analysis for c in refused])
            if not self._dropping:
                self._dropping = True
                log.warning("analytics.queue_full", capacity=self.capacity, workers=self.workers,
                            dropped_windows=len(refused), analyses=sorted({c.analysis for c in refused}),
                            hint="feature computation is slower than the windows arrive; "
                                 "health.analyses.*.dropped_windows counts what is lost")
        elif taken and self._dropping:
            self._dropping = False
            log.info("analytics.queue_flowing", dropped_windows=self.dropped)
        if not taken:
            return
        self.in_flight += len(taken)
        self._idle.clear()
        for c in taken:
            if self._pending and self._pending_samples + c.samples > JOB_SAMPLES:
                self._flush()
            self._pending.append(c)
            self._pending_samples += c.samples
        if self._pending and not self._flush_soon:
            # Windows handed over one at a time (a driver's blocks) make one job when the loop
            # next turns: a job per window measured a third of the throughput.
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close(self) -> None:
        """Finish what was handed over (up to `stop_bound`), then end the workers; `run` returns."""
        self._closing.set()

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._pending:
            return
        job, self._pending, self._pending_samples = self._pending, [], 0
        n = self._next_job
        self._next_job += 1
        self._sent[n] = [c.analysis for c in job]
        self._waiting.append((n, job))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give waiting jobs to the workers with the fewest, up to AHEAD each. A job's samples go
        into shared memory only now, so at most workers x AHEAD blocks are in use, and a burst
        handed over at once is copied a job at a time, as the workers take it."""
        if self._waiting and len(self._procs) < self.workers:
            self._start_workers()
        while self._waiting:
            live = [w for w in self._procs if not w.conn.closed]
            if not live:
                self._revive()  # every worker is gone and could not be started again: try now
                live = [w for w in self._procs if not w.conn.closed]
                if not live:
                    return  # the jobs wait; beyond the capacity windows are dropped and counted
            w = min(live, key=lambda w: len(w.jobs))
            if len(w.jobs) >= AHEAD or w.stopping:
                return
            n, job = self._waiting.popleft()
            block = self._held[n] = self._blocks.take(sum(c.samples for c in job))
            parts = _pack(job, block, self._spec_ids)
            specs = [(i, spec) for spec, i in self._spec_ids.items() if i not in w.specs]
            try:
                w.conn.send((n, block.name, specs, parts))
            except OSError as exc:  # it died since its last answer: this job waits for the next worker
                self._blocks.give(self._held.pop(n))
                self._waiting.appendleft((n, job))
                self._worker_gone(w, exc)
                continue
            w.jobs.append(n)
            w.specs.update(i for i, _ in specs)

    def _start_workers(self) -> None:
        """On the first job: the pool's workers (those not started yet, after a failed try)."""
        if time.monotonic() < self._revive_at:
            return
        self._loop = asyncio.get_running_loop()
        for var in BLAS_THREADS:  # read when the fork server imports NumPy; an operator's own setting wins
            os.environ.setdefault(var, "1")
        for i in range(len(self._procs), self.workers):
            if not self._start_worker(i):
                return

    def _start_worker(self, index: int) -> bool:
        try:
            w = _Worker(index)
        except OSError as exc:  # no memory, no process left: the next try is REVIVE_S later
            self._revive_at = time.monotonic() + REVIVE_S
            log.error("analytics.worker_start_failed", worker=index, error=str(exc), retry_s=REVIVE_S,
                      hint="windows wait, and beyond analytics.queue are dropped and counted")
            return False
        if index < len(self._procs):
            self._procs[index] = w
        else:
            self._procs.append(w)
        self._loop.add_reader(w.conn.fileno(), self._on_readable, w)
        return True

    def _revive(self) -> None:
        """Start again the workers that are gone (not those asked to stop), unless the last try
        failed less than REVIVE_S ago."""
        if time.monotonic() < self._revive_at:
            return
        for i, w in enumerate(self._procs):
            if w.conn.closed and not w.stopping and not self._start_worker(i):
                return

    # ----- results, on the loop -----

    def _on_readable(self, w: _Worker) -> None:
        try:
            while w.conn.poll():
                n, outcome = w.conn.recv()
                w.jobs.popleft()
                self._finish(n, outcome)
        except (EOFError, OSError) as exc:  # the worker is gone
            self._worker_gone(w, exc)
        self._dispatch()
        self._route()

    def _finish(self, n: int, outcome: Any) -> None:
        if isinstance(outcome, tuple) and outcome[0] == FAILED:
            log.error("analytics.compute_failed", analyses=sorted(set(self._sent[n])), windows=len(self._sent[n]),
                      traceback=outcome[1])
            outcome = FAILED
        elif isinstance(outcome, tuple):
            records, samples, problems = outcome
            if problems:
                self.engine.note_problems(problems)
            outcome = (records, samples)
        self._ready[n] = outcome

    def _worker_gone(self, w: _Worker, exc: BaseException) -> None:
        if w.conn.closed:
            return  # already seen
        self._loop.remove_reader(w.conn.fileno())
        w.conn.close()
        w.process.join(timeout=1.0)
        lost = list(w.jobs)
        w.jobs.clear()
        for n in lost:
            self._ready[n] = LOST
        if w.stopping:
            return  # it ended as asked (it answered everything first)
        self.restarts += 1
        log.error("analytics.worker_died", worker=w.process.name, exitcode=w.process.exitcode, jobs_lost=len(lost),
                  windows_lost=sum(len(self._sent[n]) for n in lost), error=str(exc) or type(exc).__name__,
                  hint="a feature worker process ended (killed, out of memory?); its windows are counted in "
                       "dropped_windows, and a new worker takes its place")
        self._revive()

    def _route(self) -> None:
        """Deliver the finished jobs that are next in order, as one delivery."""
        records: list[Record] = []
        samples: list[Sample] = []
        while self._next_out in self._ready:
            n = self._next_out
            outcome = self._ready.pop(n)
            analyses = self._sent.pop(n)
            block = self._held.pop(n, None)  # none if it was never sent
            if block is not None:
                self._blocks.give(block)  # no worker reads it any more
            self._next_out += 1
            self.in_flight -= len(analyses)
            if isinstance(outcome, tuple):
                records += outcome[0]
                samples += outcome[1]
            else:  # skipped at the stop bound, lost with its worker, or the computation failed
                self._drop(analyses)
        if not self._sent and not self._pending:
            self._idle.set()
        if records or samples:
            try:
                self._deliver(records, samples)
            except Exception:  # noqa: BLE001 - routing must not stop the pool
                log.exception("analytics.deliver_failed", records=len(records))

    def _drop(self, analyses: list[str]) -> None:
        self.engine.count_dropped(analyses)
        self.dropped += len(analyses)

    # ----- the task -----

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._closing.wait()
            try:
                await asyncio.wait_for(self._idle.wait(), self.stop_bound)
            except TimeoutError:
                pass
        finally:
            before = self.dropped
            self._flush()
            while self._waiting:  # never sent: skipped
                self._ready[self._waiting.popleft()[0]] = SKIPPED
            self._route()
            await self._stop_workers()
            for n in list(self._sent):  # still unanswered (only when cancelled again): lost
                self._ready.setdefault(n, LOST)
            self._route()
            self._blocks.close()  # the workers have ended: nobody reads a block any more
            if self.dropped > before:
                log.warning("analytics.stop_dropped", dropped_windows=self.dropped - before, bound_s=self.stop_bound,
                            hint="windows still queued at the stop bound were not computed")

    async def _stop_workers(self) -> None:
        """Ask each worker to skip what it has not started and end; wait (without blocking the
        loop) until each has answered and ended. A job cannot be interrupted, so a worker still
        busy after `stop_bound` is logged and waited for."""
        for w in self._procs:
            w.stopping = True
            try:
                w.conn.send(None)
            except OSError:
                pass  # already gone: its reader sees the end
        overdue = time.monotonic() + self.stop_bound
        while any(w.process.is_alive() or not w.conn.closed for w in self._procs):
            for w in self._procs:
                if not w.conn.closed and not w.process.is_alive():
                    self._on_readable(w)  # what it answered before it ended, then its end
            if time.monotonic() > overdue:
                log.warning("analytics.workers_stop_overdue", bound_s=self.stop_bound,
                            still_running=[w.process.name for w in self._procs if w.process.is_alive()])
                overdue = time.monotonic() + self.stop_bound
            await asyncio.sleep(0.01)
        self._procs.clear()


class _Blocks:
    """Shared-memory blocks of float64 samples, one per job a worker holds, kept and reused by
    size (powers of two from MIN_BLOCK): in steady state no block is created, and a worker maps
    each block once. At most workers x AHEAD are in use at a time."""

    def __init__(self) -> None:
        self._free: dict[int, list[SharedMemory]] = defaultdict(list)
        self._size: dict[str, int] = {}  # block name -> its size in samples
        self._all: list[SharedMemory] = []

    def take(self, samples: int) -> SharedMemory:
        size = max(MIN_BLOCK, 1 << (samples - 1).bit_length())
        free = self._free[size]
        if free:
            return free.pop()
        block = _shm.SharedMemory(create=True, size=size * 8)
        self._size[block.name] = size
        self._all.append(block)
        return block

    def give(self, block: SharedMemory) -> None:
        self._free[self._size[block.name]].append(block)

    def close(self) -> None:
        for block in self._all:
            block.close()
            block.unlink()
        self._all.clear()
        self._free.clear()
        self._size.clear()


# A window as it travels: where its samples are in the job's block, its spec's number, and the
# rest of Closed. (Records and samples come back as they are: they pickle as constructor calls.)
_Part = tuple[str, str, int, int, float, float, Any, "str | None", int, "float | None"]


def _pack(job: list[Closed], block: SharedMemory, spec_ids: dict[Any, int]) -> list[_Part]:
    into = np.ndarray((block.size // 8,), dtype=np.float64, buffer=block.buf)
    parts: list[_Part] = []
    offset = 0
    for c in job:
        w = c.window
        n = len(w.samples)
        into[offset:offset + n] = w.samples
        spec = spec_ids.setdefault(c.spec, len(spec_ids))
        parts.append((c.analysis, c.input, offset, n, w.ts, w.sample_rate, w.quality, c.unit, spec, c.shaft_hz))
        offset += n
    del into  # no view may outlive the call: a block with views cannot be closed
    return parts


# ----- in a worker process -----

def _serve(conn: Connection) -> None:
    """A worker: jobs in, outcomes out, in order, until the pool sends None or goes away. Before
    each job it reads what else has arrived, so a stop skips the jobs not started yet. A Ctrl-C
    or a SIGTERM meant for the gateway must not kill it in the middle of a job: the pool ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(WORKER_NICE)
    computer = FeatureComputer()
    mapped: dict[str, tuple[SharedMemory, Any]] = {}  # block name -> the block, as samples
    specs: dict[int, Any] = {}  # number -> FeatureSpec
    queue: collections.deque = collections.deque()
    while True:
        try:
            if not queue:
                queue.append(conn.recv())
            while conn.poll():
                queue.append(conn.recv())
        except (EOFError, OSError):
            return  # the gateway is gone
        if None in queue:  # stop: answer what was not started, then end
            for item in queue:
                if item is not None:
                    conn.send((item[0], SKIPPED))
            return
        n, block, new_specs, parts = queue.popleft()
        specs.update(new_specs)
        try:
            got = mapped.get(block)
            if got is None:
                shm = _shm.SharedMemory(name=block)
                got = mapped[block] = (shm, np.ndarray((shm.size // 8,), dtype=np.float64, buffer=shm.buf))
            samples = got[1]
            job = [Closed(analysis, input_, windowing.Window(samples[offset:offset + k], ts, fs, quality), unit,
                          specs[spec], shaft_hz)
                   for analysis, input_, offset, k, ts, fs, quality, unit, spec, shaft_hz in parts]
            outcome: Any = computer.compute(job)
            del job
        except Exception:  # noqa: BLE001 - one bad job must not end the worker
            outcome = (FAILED, traceback.format_exc())
        conn.send((n, outcome))
