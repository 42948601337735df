"""Prometheus `/metrics`, off by default: `metrics: {listen: "127.0.0.1:9108"}`.

Nothing is counted twice: a custom collector reads, at scrape time, the same objects the `health`
payload reads (device health, buffer, upstream link, analyses, rules, loop lag), so the hot path
pays nothing. prometheus_client's WSGI server answers in a thread of its own; the values are
read on the event loop (the buffer's SQLite connection and the pipeline belong to it), with a
bound, so a stuck loop gives `edge_gateway_event_loop_responsive 0` instead of a hung scrape.

prometheus_client is imported only when metrics are configured.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from gateway import __version__, logs
from gateway.schema import StrictModel

if TYPE_CHECKING:
    from gateway.app import App, Pipeline

log = logs.get("gateway.metrics")

SCRAPE_TIMEOUT = 3.0  # seconds a scrape waits for the event loop to hand over the values
UPSTREAM = "default"  # the `upstream` label with one upstream; with several, each is labelled by its name
_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Za-z:.%]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:9108`) -> (host, port)."""
    m = _LISTEN.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9108 (IPv6: [::1]:9108), not {text!r}")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return m["v6"] or m["host"], port


class MetricsConfig(StrictModel):
    listen: str = Field(description="HOST:PORT serving /metrics, e.g. 127.0.0.1:9108 or [::1]:9108; "
                                    "0.0.0.0:9108 for every interface")

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_listen(value)
        return value.strip()

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


class MetricsError(Exception):
    """The metrics address cannot be served (in use, not an address of this machine)."""


class Exporter:
    """The `/metrics` server of an App, for the life of the process; `apply` follows a reload."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.listen: str | None = None
        self._server = None
        self._thread = None

    def apply(self, cfg: MetricsConfig | None) -> None:
        """Serve `cfg.listen` (or nothing when None). Raises MetricsError, keeping what it served."""
        want = cfg.listen if cfg is not None else None
        if want == self.listen:
            return
        server = thread = None
        if cfg is not None:
            from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

            registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=registry)  # CPU, memory, open files of the daemon
            registry.register(_Collector(self.app, asyncio.get_running_loop()))
            host, port = cfg.address
            try:
                server, thread = start_http_server(port, addr=host, registry=registry)
            except OSError as exc:
                raise MetricsError(f"metrics.listen: cannot listen on {want}: {exc.strerror or exc}") from None
        self.close()
        self._server, self._thread, self.listen = server, thread, want
        if want is not None:
            log.info("metrics.listening", url=f"http://{want}/metrics")

    def reload(self, cfg: MetricsConfig | None) -> None:
        try:
            self.apply(cfg)
        except MetricsError as exc:
            log.error("metrics.listen_failed", error=str(exc), serving=self.listen,
                      hint="the previous metrics address (if any) keeps serving")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # ends serve_forever within its 0.5 s poll
            self._server.server_close()
            self._thread.join(2.0)
            log.info("metrics.stopped", listen=self.listen)
        self._server = self._thread = None
        self.listen = None


class _Collector:
    """Called in the server's thread at each scrape; builds the families on the event loop."""

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop

    async def _read(self) -> list:
        return families(self.app)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        read = self._read()
        try:
            future = asyncio.run_coroutine_threadsafe(read, self.loop)
        except RuntimeError:  # the loop has closed: the daemon is stopping
            read.close()
            future = None
        try:
            out = future.result(SCRAPE_TIMEOUT) if future else []
            responsive = int(future is not None)
        except TimeoutError:
            future.cancel()
            out, responsive = [], 0
            log.warning("metrics.loop_unresponsive", waited_s=SCRAPE_TIMEOUT)
        except Exception:  # noqa: BLE001 - a scrape must never take anything down
            log.exception("metrics.collect_failed")
            out, responsive = [], 1
        yield from out
        yield GaugeMetricFamily("edge_gateway_event_loop_responsive",
                                "1 when the event loop handed over the values within the scrape bound", value=responsive)


# What each family reads: (kind, name, help, value of one item). Counters count since the
# start or the last reload, as the health payload does; rate() and increase() treat a reload
# like a restart.
DEVICE = [
    ("gauge", "edge_gateway_device_connected", "1 while the device answers", lambda h: int(h.connected)),
    ("counter", "edge_gateway_device_errors_total", "failed exchanges with the device", lambda h: h.errors),
    ("counter", "edge_gateway_device_bad_values_total", "values that could not be used (malformed, NaN, bad status)", lambda h: h.bad_values),
    ("counter", "edge_gateway_device_missed_polls_total", "polls skipped because the previous one overran", lambda h: h.missed_polls),
    ("gauge", "edge_gateway_device_poll_latency_seconds", "round trip of the last successful exchange", lambda h: h.latency_ms / 1000 if h.latency_ms is not None else None),
    ("gauge", "edge_gateway_device_last_ok_timestamp_seconds", "wall time of the last successful exchange", lambda h: h.last_ok),
]
BUFFER = [  # per upstream: f(buffer, link name, now)
    ("gauge", "edge_gateway_buffer_depth", "records waiting to be forwarded", lambda b, link, now: b.link_depth(link)),
    ("gauge", "edge_gateway_buffer_bytes", "bytes of the records waiting", lambda b, link, now: b.link_bytes(link)),
    ("gauge", "edge_gateway_buffer_oldest_age_seconds", "age of the oldest record waiting (0 when empty)", lambda b, link, now: max(0.0, now - oldest) if (oldest := b.oldest_ts(link)) else 0.0),
    ("gauge", "edge_gateway_buffer_refused_records", "records the broker refused, waiting to be tried again", lambda b, link, now: b.refused_count(link)),
]
UPSTREAM_LINK = [
    ("gauge", "edge_gateway_upstream_connected", "1 while connected to the broker", lambda u: int(u.connected)),
    ("counter", "edge_gateway_upstream_published_total", "records the broker acknowledged", lambda u: u.published),
    ("counter", "edge_gateway_upstream_refused_total", "records the broker refused (PUBACK with a failure code)", lambda u: u.refused),
    ("counter", "edge_gateway_upstream_reconnects_total", "connections after the first", lambda u: max(0, u.connects - 1)),
]
ANALYSIS = [
    ("counter", "edge_gateway_analysis_windows_total", "feature windows computed", lambda s: s["windows"]),
    ("counter", "edge_gateway_analysis_gaps_total", "gaps in the waveform that restarted a window", lambda s: s["gaps"]),
    ("counter", "edge_gateway_analysis_dropped_samples_total", "samples thrown away by restarts", lambda s: s["dropped_samples"]),
]


def _family(kind: str, name: str, doc: str, labels: list[str], rows) -> Any:
    """One family from (label values, value) rows; a None value (not known yet) is left out."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)
    for label_values, value in rows:
        if value is not None:
            family.add_metric(label_values, value)
    return family


def families(app: App) -> list:
    """Every family, read now from the running pipeline (on the event loop's thread)."""
    out = [
        _family("gauge", "edge_gateway_info", "the gateway id and version", ["gateway", "version"],
                [([app.cfg.gateway.id, __version__], 1)]),
        _family("gauge", "edge_gateway_uptime_seconds", "seconds since the daemon started", [], [([], app.uptime())]),
    ]
    p: Pipeline | None = app.pipeline
    if p is None:
        return out
    now = time.time()
    devices = p.device_health
    stats = p.analytics.stats()
    out += [_family(k, n, d, ["device"], [([name], f(h)) for name, h in devices.items()]) for k, n, d, f in DEVICE]
    # One upstream keeps the label `default`; several are labelled by name, each with its own backlog.
    ups = [(UPSTREAM if len(p.upstreams) == 1 else u.name, u) for u in p.upstreams]
    out += [_family(k, n, d, ["upstream"], [([label], f(p.buffer, u.name, now)) for label, u in ups])
            for k, n, d, f in BUFFER]
    out += [_family(k, n, d, ["upstream"], [([label], f(u)) for label, u in ups]) for k, n, d, f in UPSTREAM_LINK]
    out += [_family(k, n, d, ["analysis"], [([name], f(s)) for name, s in stats.items()]) for k, n, d, f in ANALYSIS]
    rules = p.rules.health()
    out += [
        _family("gauge", "edge_gateway_buffer_max_bytes", "buffer.max_bytes", [], [([], p.buffer.max_bytes)]),
        _family("counter", "edge_gateway_buffer_dropped_total", "records dropped to keep the buffer under max_bytes",
                [], [([], p.buffer.dropped_total)]),
        _family("gauge", "edge_gateway_queue_depth", "samples and blocks waiting between drivers and processing",
                [], [([], p.queue.qsize())]),
        _family("gauge", "edge_gateway_alarms_active", "active alarms by severity", ["severity"],
                [([sev], n) for sev, n in rules["by_severity"].items()]),
        _family("gauge", "edge_gateway_event_loop_lag_seconds", "how late the event loop ran the last timer",
                [], [([], p.loop_lag.last_s)]),
        _family("gauge", "edge_gateway_event_loop_lag_max_seconds", "the worst event-loop lag of the last minute",
                [], [([], p.loop_lag.max_s)]),
    ]
    return out
