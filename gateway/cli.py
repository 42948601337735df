"""`edge-gateway` / `python -m gateway`: run, check-config, buffer, simulate, demo, discover, watch."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from typing import TYPE_CHECKING

from gateway import __version__, discover, logs

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

# The one default main file; here, so that parsing arguments imports nothing heavy.
DEFAULT_CONFIG = "/etc/edge-gateway/gateway.yaml"


def _load(path: str, *, to_run: bool = False):
    """The validated configuration, or None after printing every problem. `to_run` adds what
    only the machine can tell (the state directory is writable): check-config and run agree."""
    from gateway import config

    try:
        cfg = config.load(path)
        problems = cfg.problems_at_runtime() if to_run else []
    except config.ConfigError as exc:
        problems = exc.problems
    if not problems:
        return cfg
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{path}: {len(problems)} problem(s); nothing was started", file=sys.stderr)
    return None


log = logs.get("gateway.cli")

FREEZE_AFTER = 5.0  # s after start: the drivers have connected and imported their libraries
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB instead of letting it grow: by default, each large
    block freed raises the threshold to its size, so that the next ones (a summary interval's
    dict of thousands of tags, its JSON, the MQTT packet: hundreds of KB every second) come
    from the heap, between small long-lived blocks, and the heap keeps its high-water mark
    (about 4 MB at 100,000 points/s). A fixed threshold serves them from mmap and gives the
    pages back when they are freed. A MALLOC_MMAP_THRESHOLD_ in the environment is left to
    rule; on a libc without mallopt (musl) nothing is done. True if it was set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def freeze_startup_objects() -> int:
    """What the start made (modules, the configuration, the first pipeline) mostly lives as long
    as the daemon: moved out of the collector's sight (gc.freeze), a full collection no longer
    walks it. Those passes, 50,000-60,000 objects, took 17-35 ms on the event loop at 100,000
    points/s and were its longest lags; afterwards they walk only what came since (a few
    thousand objects, 1-3 ms). Objects frozen are still freed when their last reference goes;
    only a cycle among them is not (the first pipeline's, once, after a reload). Returns how
    many were frozen (and logs it)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("gateway.gc_frozen", objects=frozen)
    return frozen


async def _run_daemon(app) -> int:
    asyncio.get_running_loop().call_later(FREEZE_AFTER, freeze_startup_objects)
    return await app.run()


def cmd_run(args) -> int:
    from gateway import statelock
    from gateway.app import App

    fix_mmap_threshold()
    cfg = _load(args.config, to_run=True)
    if cfg is None:
        return 2
    fmt = cfg.gateway.log_format
    logs.configure(args.log_level or cfg.gateway.log_level, json=None if fmt == "auto" else fmt == "json")
    try:
        # Held (the descriptor stays open) for the life of the process, across reloads.
        lock_fd = statelock.acquire(cfg.gateway.state_dir)
    except statelock.AlreadyRunning as exc:
        log.error("gateway.already_running", lock=str(exc.path), pid=exc.pid)
        print(f"edge-gateway: {exc}; nothing was started", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-gateway: cannot lock the state directory {cfg.gateway.state_dir}: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_daemon(App(cfg, args.config)))
    finally:
        os.close(lock_fd)


def config_summary(cfg: GatewayConfig) -> str:
    """The one-screen summary `check-config` prints for a valid configuration."""
    from gateway.analytics import AnalyticsEngine

    lines = [f"gateway {cfg.gateway.id}: configuration is valid"]
    if cfg.files:
        lines.append(f"  files     {', '.join(cfg.files)}")
    for up in cfg.all_upstreams:
        where = f"mqtt{'s' if up.tls.enabled else ''}://{up.host}:{up.port} (MQTT {up.protocol})"
        if up.format == "sparkplug":
            what = f"sparkplug, group {up.group_id}" + (f", primary host {up.primary_host_id}" if up.primary_host_id else "")
        else:
            what = f"json, topics under {cfg.topic_prefix_of(up)}/"
        label = "upstream" if len(cfg.all_upstreams) == 1 else "upstream " + up.name
        lines.append(f"  {label:<8}  {where}, {what}, client id {cfg.client_id_of(up)}")
    lines.append(f"  buffer    {cfg.buffer_path} (max {cfg.buffer.max_bytes / 2**20:.0f} MiB, {cfg.buffer.durability})")
    lines.append(f"  devices   {len(cfg.devices)}")
    for d in cfg.devices:
        lines.append(f"    {d.name:<16} {d.driver:<7} {len(d.tag_names())} tags: {', '.join(d.tag_names()[:8])}"
                     + (" ..." if len(d.tag_names()) > 8 else ""))
        if d.summary():
            lines.append(f"    {'':<16} {d.summary()}")
    token = ", token required" if cfg.commands.token_file else ""
    lines.append(f"  commands  writes {'ENABLED' if cfg.commands.write else 'disabled'}{token} "
                 f"(cmd/write, cmd/call; audit -> {cfg.topic_prefix}/events/commands)")
    for d in cfg.devices:
        writable = [t for t in getattr(d, "tags", []) if getattr(t, "writable", False)]
        methods = [m.name for m in getattr(d, "methods", [])]
        if writable or methods:
            described = [t.name + (f" [{t.min if t.min is not None else ''}..{t.max if t.max is not None else ''}]"
                                   if t.min is not None or t.max is not None else "")
                         + (f" {{{', '.join(map(str, t.allowed))}}}" if t.allowed else "") for t in writable]
            lines.append(f"    {d.name:<16} writable: {', '.join(described) or 'none'}"
                         + (f"; methods: {', '.join(methods)}" if methods else ""))
    lines.append(f"  summaries every {cfg.summaries.interval:g}s -> {cfg.topic_prefix}/data/<device>")
    lines.append(f"  analyses  {len(cfg.analyses)}, computed by {cfg.analytics.processes} worker process(es), "
                 f"at most {cfg.analytics.queue} windows queued")
    for a in cfg.analyses:
        lines.append(f"    {a.name:<16} {a.input} window {a.window} -> {cfg.topic_prefix}/features/{a.name}")
    lines.append(f"  rules     {len(cfg.rules)}")
    for r in cfg.rules:
        lines.append(f"    {r.name:<16} {r.type:<9} on {', '.join(r.inputs())}")
    for problem in cfg.warnings + AnalyticsEngine(cfg.analyses, cfg.summaries, cfg.tag_units()).problems():
        lines.append(f"  warning: {problem}")
    return "\n".join(lines)


def cmd_check_config(args) -> int:
    cfg = _load(args.config, to_run=True)
    if cfg is None:
        return 2
    print(config_summary(cfg))
    return 0


def cmd_buffer(args) -> int:
    from gateway.buffer import Buffer, BufferError

    cfg = _load(args.config)
    if cfg is None:
        return 2
    try:
        buf = Buffer(cfg.buffer_path, cfg.gateway.id, max_bytes=cfg.buffer.max_bytes, readonly=True)
    except BufferError as exc:
        print(f"edge-gateway: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "stats":
            stats = buf.stats()
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                per_upstream = stats.pop("by_upstream", {})
                width = max(len(k) for k in stats)
                for key, value in stats.items():
                    print(f"{key:<{width}}  {value}")
                for name, link in per_upstream.items():  # each upstream's own backlog
                    print(f"{'upstream ' + name:<{width}}  depth {link['depth']}, oldest {link['oldest_ts'] or '-'}"
                          f" (age {link['oldest_age_s'] if link['oldest_age_s'] is not None else '-'} s),"
                          f" refused {link['refused']}")
        else:
            for row in buf.dump(args.limit):
                if "encoded" in row:  # a values row stored as Sparkplug metrics
                    from gateway.sparkplug import read_stored  # noqa: PLC0415 - protobuf only when needed

                    row["payload"] = {"device": row["topic"].split("/", 1)[-1],
                                      **read_stored(row.pop("encoded"), buf.noted)}
                print(json.dumps(row, separators=(",", ":")))
    finally:
        buf.close()
    return 0


def cmd_simulate(args) -> int:
    from drivers.sim import run_simulator

    logs.configure("info")
    options = {k.removeprefix("sim_"): v for k, v in vars(args).items() if k.startswith("sim_") and v is not None}
    if "fault" in options:
        options["fault"] = {"none": None, "bpfo": "outer", "bpfi": "inner"}[options["fault"]]
    defaults = {"modbus": 5020, "opcua": 4840, "vibration": 1883}
    where = f"{options.get('host', '127.0.0.1')}:{options.get('port', defaults[args.kind])}"
    role = "publishing to the broker at" if args.kind == "vibration" else "listening on"
    print(f"{args.kind} simulator {role} {where} (Ctrl-C stops)", flush=True)
    try:
        asyncio.run(run_simulator(args.kind, **options))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args) -> int:
    from gateway.demo import main as demo_main

    return demo_main(args)


def cmd_watch(args) -> int:
    from gateway.watch import main as watch_main

    cfg = _load(args.config)
    return 2 if cfg is None else watch_main(cfg, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-gateway", description="Industrial IoT edge gateway")
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=os.environ.get("EDGE_GATEWAY_CONFIG") or DEFAULT_CONFIG,
                       help=f"main YAML file (default: $EDGE_GATEWAY_CONFIG or {DEFAULT_CONFIG})")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    with_config(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate the configuration without connecting to anything")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("buffer", help="inspect the store-and-forward buffer")
    p.add_argument("action", choices=["stats", "dump"])
    with_config(p)
    p.add_argument("--json", action="store_true", help="stats as JSON")
    p.add_argument("--limit", type=int, default=None, help="dump at most this many rows")
    p.set_defaults(func=cmd_buffer)

    p = sub.add_parser("simulate", help="run one simulated device alone, for field tests")
    p.add_argument("kind", choices=["modbus", "opcua", "vibration"])
    p.add_argument("--host", dest="sim_host", help="address to listen on (modbus, opcua) or broker host (vibration)")
    p.add_argument("--port", dest="sim_port", type=int, help="port to listen on, or the broker port (vibration)")
    p.add_argument("--fault", dest="sim_fault", choices=["none", "bpfo", "bpfi"],
                   help="vibration: bearing fault, outer race (bpfo) or inner race (bpfi)")
    p.add_argument("--severity", dest="sim_severity", type=float, help="vibration: initial fault severity (0..1)")
    p.add_argument("--grow", dest="sim_grow_s", type=float, help="vibration: seconds for the fault to grow to full")
    p.add_argument("--mode", dest="sim_mode", choices=["stream", "burst", "json"],
                   help="vibration: f32le blocks in real time (stream, the default), the same held back and pushed "
                        "in bursts (burst), or self-describing JSON blocks with ts, fs, seq and data (json)")
    p.add_argument("--burst-every", dest="sim_burst_s", type=float,
                   help="vibration, burst mode: seconds between bursts (default 10)")
    p.add_argument("--block", dest="sim_block", type=int, help="vibration: samples per block (default 4096)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="simulated devices + broker + gateway, live in the terminal")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")
    p.add_argument("--broker", default=None, help="HOST:PORT of an MQTT broker to use instead of the embedded one")
    p.add_argument("--state-dir", default=None, help="where the demo keeps its buffer (default: a temporary folder)")
    p.add_argument("--plain", action="store_true", help="print lines instead of refreshing the screen in place")
    p.set_defaults(func=cmd_demo)

    discover.add_parser(sub)  # its options and logic: gateway/discover.py
    p = sub.add_parser("watch", help="show live what a running gateway publishes upstream")
    with_config(p)
    p.add_argument("--plain", action="store_true", help="print one line per message (for a log) instead of a screen")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")
    p.set_defaults(func=cmd_watch)
    return parser


def _early_signals() -> None:
    """Until the event loop installs its handlers, a stop request is a clean exit (nothing has
    started yet) and a reload request is ignored, instead of the default: death by signal."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "demo"):
        _early_signals()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
