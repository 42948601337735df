"""`edge-gateway watch -c FILE`: the demo's live view, for a real gateway.

Connects to the upstream broker of the configuration (its host, port, TLS and credentials, with a
client id of its own so the gateway is never pushed off) and shows what the gateway publishes:
status, health, summaries, features, alarms and events. `--plain` prints one line per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from gateway import view as live


async def _run(cfg, *, plain: bool, duration: float | None) -> int:
    scheme = "mqtts" if cfg.upstream.tls.enabled else "mqtt"
    where = f"{scheme}://{cfg.upstream.host}:{cfg.upstream.port}"
    view = live.LiveView(cfg.upstream, f"{cfg.client_id}-watch-{os.getpid()}", cfg.topic_prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if plain:
        print(f"watching {cfg.topic_prefix}/# on {where} (gateway {cfg.gateway.id})", flush=True)
    try:
        async with asyncio.TaskGroup() as tg:
            screen = tg.create_task(live.show(
                view, plain=plain, zones=live.iso_boundaries(cfg),
                title=lambda: f"edge-gateway watch - gateway {cfg.gateway.id} via {where} - Ctrl-C to stop"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration)
            screen.cancel()
    finally:
        view.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if plain:
        for line in view.take_lines():
            print(line, flush=True)
    return 0


def main(cfg, args) -> int:
    plain = args.plain or not sys.stdout.isatty()
    return asyncio.run(_run(cfg, plain=plain, duration=args.duration))
