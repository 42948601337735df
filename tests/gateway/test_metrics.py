"""The metrics section: its address validated like any key, a busy port a clear error at start,
prometheus_client loaded only when metrics are on, and the event-loop lag measured."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from gateway import config
from gateway.health import LoopLag
from tests.conftest import REPO, free_port, run_cli
from tests.gateway.test_config import write


@pytest.mark.parametrize("listen, host, port", [
    ("127.0.0.1:9108", "127.0.0.1", 9108),
    ("0.0.0.0:9108", "0.0.0.0", 9108),
    ("[::1]:9200", "::1", 9200),
    ("localhost:1", "localhost", 1),
])
def test_valid_listen_addresses(tmp_path, listen, host, port):
    cfg = config.load(write(tmp_path, f"metrics:\n  listen: \"{listen}\"\n"))
    assert cfg.metrics.address == (host, port)


def test_metrics_are_off_by_default_and_the_environment_can_turn_them_on(tmp_path, monkeypatch):
    path = write(tmp_path, "")
    assert config.load(path).metrics is None
    monkeypatch.setenv("EDGE_GATEWAY__METRICS__LISTEN", "127.0.0.1:9300")
    assert config.load(path).metrics.address == ("127.0.0.1", 9300)


@pytest.mark.parametrize("value, message", [
    ("9108", "expected HOST:PORT"),
    ("127.0.0.1:", "expected HOST:PORT"),
    ("::1:9108", "expected HOST:PORT"),
    ("127.0.0.1:70000", "out of range"),
    ("127.0.0.1:0", "out of range"),
])
def test_check_config_names_a_bad_listen_address_with_its_line(tmp_path, value, message):
    path = write(tmp_path, f"metrics:\n  listen: \"{value}\"\n")
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    line = result.stderr.splitlines()[0]
    assert line.startswith(f"{path}:8: metrics.listen: ") and message in line, result.stderr


def test_check_config_wants_listen_when_metrics_is_given(tmp_path):
    result = run_cli("check-config", "-c", str(write(tmp_path, "metrics: {}\n")))
    assert result.returncode == 2 and "metrics.listen: required key is missing" in result.stderr


def test_a_port_in_use_stops_the_start_with_a_clear_error(tmp_path):
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # someone else listens there
        path = write(tmp_path, f"metrics:\n  listen: 127.0.0.1:{port}\n")
        result = run_cli("run", "-c", str(path), timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "metrics.listen_failed" in result.stderr and "Traceback" not in result.stderr
    assert "gateway.started" not in result.stderr  # nothing was started


def test_prometheus_client_is_loaded_only_when_metrics_are_configured():
    code = ("import sys, gateway.app, gateway.config, gateway.metrics, gateway.cli; "
            "assert 'prometheus_client' not in sys.modules, 'imported without metrics'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


async def test_loop_lag_sees_a_blocked_loop():
    lag = LoopLag()
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.1)  # the timer runs: due at 0.5 s
        time.sleep(0.8)  # noqa: ASYNC251 - blocking the loop on purpose, past the timer's deadline
        await asyncio.sleep(0.05)
        assert 0.25 < lag.last_s < 0.6 and lag.max_s == lag.last_s
        await asyncio.sleep(LoopLag.INTERVAL * 2.5)
        assert lag.last_s < 0.2 and lag.max_s > 0.25  # the spike stays in the one-minute max
        assert lag.to_dict()["max_ms"] > 250
    finally:
        task.cancel()


def test_the_daemon_serves_metrics_and_sigterm_closes_them(tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.gateway.test_daemon import start, stop

    port = free_port()
    path = write(tmp_path, f"metrics:\n  listen: 127.0.0.1:{port}\n")
    path.write_text(path.read_text().replace("port: 1883", f"port: {free_port()}"))  # no broker there
    proc = start(path, tmp_path)
    try:
        deadline = time.monotonic() + 20
        body = None
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                time.sleep(0.2)
        assert body is not None, (tmp_path / "daemon.log").read_text()
        samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
        assert samples["edge_gateway_upstream_connected"] == 0 and samples["edge_gateway_event_loop_responsive"] == 1
    finally:
        rc, took = stop(proc) if proc.poll() is None else (proc.returncode, 0.0)  # SIGTERM
    assert rc == 0 and took < 5.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert "metrics.stopped" in (tmp_path / "daemon.log").read_text()


def test_a_scrape_after_the_loop_closed_reports_it_unresponsive():
    from gateway.metrics import _Collector

    loop = asyncio.new_event_loop()
    loop.close()
    families = list(_Collector(app=None, loop=loop).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("edge_gateway_event_loop_responsive", 0)]
