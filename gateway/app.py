"""Wiring: drivers -> analytics -> rules -> buffer -> upstream, signals, reload, health.

`App` owns the buffer and the process lifetime (signals, sd_notify). A `Pipeline` is one
configuration at work: its TaskGroup owns the drivers, the processing loop, the timers and the
upstream link. A reload builds a new Pipeline from a validated configuration and retires the old
one; the buffer (and what it holds) stays open across it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import sqlite3
import time
from typing import Any

import drivers.registry as driver_registry
from drivers.base import DriverContext
from gateway import __version__, config as config_mod, logs
from gateway.analytics import AnalyticsEngine, FeaturePool
from gateway.aio import first_of
from gateway.backoff import Backoff
from gateway.buffer import VALUES, Buffer, takes
from gateway.commands import COMMANDS, CommandRouter, RequestMemory
from gateway.config import GatewayConfig
from gateway.health import DeviceHealth, LoopLag, Notifier
from gateway.metrics import Exporter, MetricsError
from gateway.model import Record, Sample, Waveform, iso_ts
from gateway.report import ExceptionReporter
from gateway.upstream import Upstream
from gateway.upstream_format import FormatUnavailable, create as create_format
from rules.engine import RuleEngine

log = logs.get("gateway.app")

QUEUE_SIZE = 10_000  # samples and waveform blocks between drivers and processing
TICK = 0.5  # seconds between rule ticks (for/clear_for/stale timing resolution)
STOP_BOUND = 3.0  # seconds a stage may take to end when cancelled before it is named and cancelled again
DRIVER_RESTART = (1.0, 30.0)  # seconds: back-off between restarts of a driver that returned or raised
REBIRTH_INTERVAL = 5.0  # seconds: at most one cmd/rebirth writes the alarms into the buffer per interval


class Pipeline:
    def __init__(self, cfg: GatewayConfig, buffer: Buffer, *, started_at: float, app: "App") -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.app = app
        self.started_at = started_at
        # Drivers put a Sample, a Waveform, or a list of Samples read together (one per request).
        self.queue: asyncio.Queue[Sample | Waveform | list[Sample]] = asyncio.Queue(QUEUE_SIZE)
        self.analytics = AnalyticsEngine(cfg.analyses, cfg.summaries, cfg.tag_units())
        self.features = FeaturePool(self.analytics, self._route_features, workers=cfg.analytics.processes,
                                    capacity=cfg.analytics.queue, stop_bound=STOP_BOUND)
        self.rules = RuleEngine(cfg.rules, restored=buffer.load_state(), device_tags=cfg.device_tags())
        context = DriverContext()  # what this pipeline's drivers share (serial lines)
        self.drivers = [driver_registry.create(d, context) for d in cfg.devices if d.enabled]
        self.commands = CommandRouter(cfg.commands, {d.config.name: d for d in self.drivers}, self._store,
                                      memory=app.request_memory)
        # One Upstream per configured broker, each with its own link (cursor) in the buffer.
        self.upstreams: list[Upstream] = []
        for ucfg in cfg.all_upstreams:
            fmt = create_format(ucfg, cfg, started_at=started_at)
            self.upstreams.append(Upstream(
                ucfg, buffer, gateway_id=cfg.gateway.id, topic_prefix=cfg.topic_prefix_of(ucfg),
                client_id=cfg.client_id_of(ucfg), started_at=started_at,
                on_connected=functools.partial(self._on_connected, ucfg.name), on_command=app.command,
                format=fmt, devices=None if fmt.name == "json" else self._device_states,
            ))
        buffer.set_links([(u.name, u.format.kinds) for u in self.upstreams])
        # Per-tag values, reported by exception, only when an upstream takes them (Sparkplug).
        wants_values = any(takes(u.format.kinds, VALUES) for u in self.upstreams)
        self.reporter: ExceptionReporter | None = None
        if wants_values:
            # Sparkplug: values are encoded once, when stored (against a catalog kept with the rows,
            # to read them back after the configuration changed); births carry the newest reported.
            spb = [u.format for u in self.upstreams if hasattr(u.format, "value_encoder")]
            encoder = spb[0].value_encoder() if spb else None
            if encoder is not None and not encoder.keep_in(buffer):
                log.warning("sparkplug.values_as_json", reason="the catalog could not be written to the buffer",
                            hint="values are stored as JSON, which any configuration reads back")
                encoder = None
            self.reporter = ExceptionReporter(cfg.report_policy(), encode=encoder)
            for fmt in spb:
                fmt.reported = self.reporter.last
                fmt.stored_catalog = buffer.noted
        self.upstream = self.upstreams[0]  # the one `health.upstream` and the metrics describe
        self.loop_lag = LoopLag()
        self._stop = asyncio.Event()
        self._final = True  # False when a reload retires this pipeline: the gateway stays online
        self._acked_at_last_health = (time.monotonic(), 0)

    @property
    def device_health(self) -> dict[str, DeviceHealth]:
        return {d.config.name: d.health for d in self.drivers}

    def _device_states(self) -> dict[str, bool]:
        return {d.config.name: d.health.connected for d in self.drivers}

    def wake(self) -> None:
        for up in self.upstreams:
            up.wake()

    def stop(self, *, final: bool = True) -> None:
        self._final = final
        self._stop.set()

    # ----- writing to the buffer -----

    def _store(self, records: list[Record], link: str | None = None) -> None:
        state = self.rules.take_state()
        if records or state:
            try:
                # a full disk is handled (and counted) in there
                seqs = self.buffer.append(records, state=state, link=link)
            except (sqlite3.Error, OSError) as exc:  # anything else the file system says: never fatal
                lost = self.buffer.count_lost(r.kind for r in records)
                log.error("buffer.append_failed", error=f"{type(exc).__name__}: {exc}", lost=lost)
                return
            self.rules.numbered(records, seqs)
            self.wake()

    def _on_connected(self, name: str) -> None:
        """After each connect of upstream `name`: the last state of every alarm again (marked
        `replay`, owed to that upstream only), and a health report at once (the one sent right
        after start may have found the broker not yet connected)."""
        self._store(self.rules.retained(), link=name)
        for up in self.upstreams:
            if up.name == name:
                up.publish_direct("health", self.health_payload())

    def rebirth(self) -> int:
        records = self.rules.retained()
        self._store(records)
        return len(records)

    # ----- tasks -----

    async def run(self) -> None:
        for problem in self.analytics.problems():
            log.warning("analytics.problem", problem=problem)
        async with asyncio.TaskGroup() as tg:
            # Outputs first, inputs last (and the reverse on the way out).
            upstreams = [tg.create_task(u.run(), name=f"upstream.{u.name}.loop") for u in self.upstreams]
            features = tg.create_task(self.features.run(), name="analytics.workers")
            process = tg.create_task(self._process(), name="pipeline.process")
            timers = [
                tg.create_task(self._tick_loop(), name="rules.tick"),
                tg.create_task(self._summary_loop(), name="analytics.summaries"),
                tg.create_task(self._health_loop(), name="health.loop"),
                tg.create_task(self.loop_lag.run(), name="health.loop_lag"),
            ]
            inputs = [tg.create_task(self._supervise(d), name=f"driver.{d.config.name}") for d in self.drivers]
            await self._stop.wait()
            await retire(inputs)
            await self.queue.put(_DRAINED)  # processing handles everything queued before this
            await process
            self.features.close()  # the windows handed over are computed and routed (bounded)
            await features
            await retire(timers)
            self._store(self.analytics.flush_summaries(time.time()))
            for u in self.upstreams:
                u.stop(final=self._final)
            await asyncio.gather(*upstreams)

    async def _supervise(self, driver) -> None:
        """A driver should never return or raise; if it does, it is restarted, never the daemon."""
        backoff = Backoff(*DRIVER_RESTART)
        while True:
            try:
                await driver.run(self.queue.put)
                log.error("driver.returned", device=driver.config.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad driver must not stop the others
                driver.health.error(exc, disconnected=True)
                log.exception("driver.crashed", device=driver.config.name)
            await asyncio.sleep(backoff.next())

    async def _process(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < 1000 and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            records: list[Record] = []
            waveforms: list[Waveform] = []
            reporter = self.reporter
            reportable: list[Sample] = []
            done = False
            for item in batch:
                if item is _DRAINED:
                    done = True
                    continue
                if isinstance(item, list):  # the samples of one request: each stage takes them at once
                    self.analytics.on_samples(item, self._sample_failed)
                    records.extend(self.rules.on_samples(item, self._sample_failed))
                    if reporter is not None:
                        reportable.extend(item)
                    continue
                if isinstance(item, Waveform):
                    waveforms.append(item)  # computed together below: windows closing at once batch
                    continue
                try:
                    self.analytics.on_sample(item)
                    records.extend(self.rules.on_sample(item))
                except Exception:  # noqa: BLE001 - a value that breaks a stage is logged, not fatal
                    log.exception("pipeline.sample_failed", source=item.source)
                if reporter is not None:
                    reportable.append(item)
            if reportable:
                records.extend(reporter.offer(reportable))
            if waveforms:
                try:  # windows closing at once are computed together, in the worker processes
                    self.features.submit(self.analytics.assemble(waveforms))
                except Exception:  # noqa: BLE001
                    log.exception("pipeline.waveforms_failed", sources=sorted({w.source for w in waveforms}))
            self._store(records)
            if done:
                return

    @staticmethod
    def _sample_failed(sample: Sample) -> None:
        """Called inside the stage's `except`: a value that breaks a stage is logged, not fatal."""
        log.exception("pipeline.sample_failed", source=sample.source)

    def _route_features(self, records: list[Record], features: list[Sample]) -> None:
        """Called by the worker pool on the loop, in measurement order: feature records and the
        feature values as rule inputs."""
        for f in features:
            try:
                records.extend(self.rules.on_sample(f))
            except Exception:  # noqa: BLE001 - a value that breaks a rule is logged, not fatal
                log.exception("pipeline.sample_failed", source=f.source)
        self._store(records)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._store(self.rules.tick())

    async def _summary_loop(self) -> None:
        interval = self.cfg.summaries.interval
        while True:
            # Align to the wall clock so that intervals of several gateways line up.
            await asyncio.sleep(interval - (time.time() % interval))
            self._flush_summaries()

    def _flush_summaries(self) -> None:
        """The interval's summary records into the buffer. A function of its own, so that the
        records (a dict per tag: thousands for a large device) are freed once stored instead
        of living on in the loop's frame until the next interval's are made."""
        records = self.analytics.flush_summaries(time.time())
        for r in records:
            extra = self.rules.take_summary_fields(r.payload.get("device", r.topic.rsplit("/", 1)[-1]))
            r.payload.update(extra)
        self._store(records)

    async def _health_loop(self) -> None:
        while True:
            payload = self.health_payload()
            for up in self.upstreams:
                up.publish_direct("health", payload)  # JSON upstreams only
            links = ", ".join(f"{u.name} {'connected' if u.connected else 'DISCONNECTED'}" for u in self.upstreams) \
                if len(self.upstreams) > 1 else f"upstream {'connected' if self.upstream.connected else 'DISCONNECTED'}"
            self.app.notifier.status(f"{links}, buffer {payload['buffer']['depth']} rows, {len(self.drivers)} devices")
            await asyncio.sleep(self.cfg.upstream.health_interval)

    def health_payload(self) -> dict[str, Any]:
        now = time.time()
        mono = time.monotonic()
        then, acked_then = self._acked_at_last_health
        rate = (self.upstream.published - acked_then) / max(mono - then, 1e-3)
        self._acked_at_last_health = (mono, self.upstream.published)
        oldest = self.buffer.oldest_ts()
        return {
            "gateway": self.cfg.gateway.id,
            "ts": iso_ts(now),
            "version": __version__,
            "uptime_s": self.app.uptime(),
            "devices": {name: h.to_dict() for name, h in self.device_health.items()},
            "buffer": {
                "depth": self.buffer.depth,
                "bytes": self.buffer.bytes,
                "max_bytes": self.buffer.max_bytes,
                "oldest_ts": iso_ts(oldest) if oldest else None,
                "oldest_age_s": round(now - oldest, 3) if oldest else None,
                "refused": self.buffer.refused_count(),
                "disk_full": self.buffer.disk_full,
            },
            "dropped": self.buffer.dropped_total,
            "upstream": {
                "connected": self.upstream.connected,
                "published": self.upstream.published,
                "refused": self.upstream.refused,
                "response_topics_refused": self.upstream.response_topics_refused,
                "commands_dropped": self.upstream.commands_dropped,
                "publish_rate": round(rate, 2),
                "connects": self.upstream.connects,
                "last_error": self.upstream.last_error,
            },
            "upstreams": {u.name: self._upstream_health(u) for u in self.upstreams},
            "queue": self.queue.qsize(),
            "analyses": self.analytics.stats(),
            "analytics": self.features.stats(),
            "rules": self.rules.health(),
            "commands": self.commands.stats(),
            "report_by_exception": self.reporter.stats() if self.reporter is not None else None,
            "loop_lag": self.loop_lag.to_dict(),
        }


    def _upstream_health(self, up: Upstream) -> dict[str, Any]:
        oldest = self.buffer.oldest_ts(up.name)
        return {
            "connected": up.connected,
            "format": up.format.name,
            "broker": f"{up.cfg.host}:{up.cfg.port}",
            "depth": self.buffer.link_depth(up.name),
            "oldest_ts": iso_ts(oldest) if oldest else None,
            "published": up.published,
            "refused": up.refused,
            "dropped": self.buffer.dropped_by_link[up.name],
            "connects": up.connects,
            "last_error": up.last_error,
        }


_DRAINED: Any = object()


def format_problems(cfg: GatewayConfig) -> list[str]:
    """Formats this build cannot run (e.g. `format: sparkplug` before its module is installed)."""
    problems = []
    for ucfg in cfg.all_upstreams:
        try:
            create_format(ucfg, cfg, started_at=time.time())
        except FormatUnavailable as exc:
            problems.append(str(exc))
    return problems


def _log_warnings(cfg: GatewayConfig) -> None:
    for warning in cfg.warnings:  # the same FILE:LINE lines check-config prints
        log.warning("config.warning", warning=warning)


class App:
    def __init__(self, cfg: GatewayConfig, config_path: str, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.started_at = time.time()  # wall: `started_at` in status
        self._started_mono = time.monotonic()  # for uptime: an NTP step must not make it jump
        self._last_rebirth: float | None = None  # monotonic
        self._rebirth_due: asyncio.TimerHandle | None = None
        self.pipeline: Pipeline | None = None
        self._stopping = asyncio.Event()
        self._pending: GatewayConfig | None = None
        self._reload = asyncio.Event()
        self.metrics = Exporter(self)
        self.request_memory = RequestMemory()  # request ids already run: kept across reloads

    # ----- signals and commands -----

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("gateway.stopping")
            self.notifier.stopping()
        self._stopping.set()

    def request_reload(self) -> list[str]:
        """Validate the file now; switch only when it is valid. Returns the problems, if any."""
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            log.error("config.reload_rejected", file=self.config_path, problems=exc.problems,
                      hint="the previous configuration keeps running")
            self.notifier.ready("reload rejected: configuration invalid, previous one still running")
            return exc.problems
        problems = format_problems(new)
        if problems:
            log.error("config.reload_rejected", file=self.config_path, problems=problems,
                      hint="the previous configuration keeps running")
            self.notifier.ready("reload rejected: an upstream format is not available, previous one still running")
            return problems
        _log_warnings(new)
        self._pending = new
        self._reload.set()
        return []

    def uptime(self) -> float:
        return round(time.monotonic() - self._started_mono, 3)

    async def command(self, name: str, request: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        if name in COMMANDS:
            if self.pipeline is None:
                return {"ok": False, "error": "the gateway is starting", "reason": "disconnected"}
            return await self.pipeline.commands.handle(name, request, meta)
        if name == "ping":
            return {"ok": True, "pong": True, "uptime_s": self.uptime(), "version": __version__}
        if name == "reload":
            problems = self.request_reload()
            return {"ok": not problems, "error": "\n".join(problems) if problems else None}
        if name == "rebirth":
            return self._rebirth()
        return {"ok": False, "error": f"unknown command {name!r} (known: ping, reload, rebirth, write, call)"}

    def _rebirth(self) -> dict[str, Any]:
        """Every rebirth writes all alarms into the buffer again, so they are rate-limited: at
        most one per REBIRTH_INTERVAL. A request within the interval is merged into one rebirth
        at its end (so the requester still gets the state from after its request)."""
        wait = 0.0 if self._last_rebirth is None else self._last_rebirth + REBIRTH_INTERVAL - time.monotonic()
        if wait <= 0:
            return {"ok": True, "merged": False, "alarms": self._rebirth_now()}
        if self._rebirth_due is None:
            self._rebirth_due = asyncio.get_running_loop().call_later(wait, self._merged_rebirth)
        return {"ok": True, "merged": True, "due_in_s": round(wait, 3)}

    def _rebirth_now(self) -> int:
        self._last_rebirth = time.monotonic()
        return self.pipeline.rebirth() if self.pipeline else 0

    def _merged_rebirth(self) -> None:
        self._rebirth_due = None
        try:
            self._rebirth_now()
        except Exception:  # noqa: BLE001 - no requester is waiting for this one's reply
            log.exception("command.rebirth_failed", hint="the next cmd/rebirth tries again")

    # ----- lifetime -----

    async def run(self) -> int:
        try:
            self.metrics.apply(self.cfg.metrics)
        except MetricsError as exc:
            log.error("metrics.listen_failed", error=str(exc), hint="nothing was started")
            return 2
        problems = format_problems(self.cfg)
        if problems:
            log.error("upstream.format_unavailable", problems=problems, hint="nothing was started")
            self.metrics.close()
            return 2
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        buffer = Buffer(self.cfg.buffer_path, self.cfg.gateway.id, max_bytes=self.cfg.buffer.max_bytes,
                        durability=self.cfg.buffer.durability)
        log.info("gateway.started", gateway=self.cfg.gateway.id, version=__version__, config=self.config_path,
                 buffer=str(buffer.path), backlog=buffer.depth, next_seq=buffer.next_seq)
        _log_warnings(self.cfg)
        try:
            async with asyncio.TaskGroup() as tg:
                watchdog = (tg.create_task(self._watchdog(), name="systemd.watchdog")
                            if self.notifier.watchdog_interval else None)
                while not self._stopping.is_set():
                    self.pipeline = Pipeline(self.cfg, buffer, started_at=self.started_at, app=self)
                    running = tg.create_task(self.pipeline.run(), name="pipeline.run")
                    self.notifier.ready(f"running {len(self.cfg.devices)} devices")
                    await first_of(self._stopping.wait(), self._reload.wait(), running, name="gateway.wait")
                    self.pipeline.stop(final=not self._reload.is_set() or self._stopping.is_set())
                    await running
                    if self._reload.is_set() and not self._stopping.is_set():
                        self._reload.clear()
                        old, self.cfg = self.cfg, self._pending or self.cfg
                        if old.buffer != self.cfg.buffer or old.gateway.state_dir != self.cfg.gateway.state_dir:
                            log.warning("config.reload_partial", hint="buffer settings change at the next restart")
                        self.metrics.reload(self.cfg.metrics)
                        log.info("config.reloaded", file=self.config_path, devices=len(self.cfg.devices),
                                 rules=len(self.cfg.rules), analyses=len(self.cfg.analyses))
                    elif running.done() and not self._stopping.is_set():
                        break
                if watchdog is not None:
                    watchdog.cancel()
        finally:
            if self._rebirth_due is not None:
                self._rebirth_due.cancel()  # the buffer is closing: too late for a merged rebirth
            self.metrics.close()  # before the buffer: a scrape reads it
            buffer.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("gateway.stopped", gateway=self.cfg.gateway.id)
        return 0

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval or 1.0
        while not self._stopping.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=interval)


async def retire(tasks: list[asyncio.Task], bound: float = STOP_BOUND) -> None:
    """Cancel `tasks` and wait until they have ended. A stop or a reload must finish whatever a
    task is doing, so every `bound` seconds the ones still running are logged by name and
    cancelled again: a cancellation that a peer library swallowed lands at the next await."""
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=bound)
        if pending:
            log.warning("pipeline.stop_overdue", bound_s=bound, still_running=sorted(t.get_name() for t in pending),
                        hint="cancelled again")
            for task in pending:
                task.cancel()
    for task in tasks:  # retrieve outcomes, so that none is reported as never retrieved
        if not task.cancelled() and task.exception() is not None:
            log.error("pipeline.task_failed", task=task.get_name(), error=repr(task.exception()))
