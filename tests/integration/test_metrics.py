"""Prometheus /metrics of a running gateway: devices, alarms, and a broker outage seen as the
buffer filling, the link down, a reconnect, the buffer draining; a reload moves the address."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import yaml
from prometheus_client.parser import text_string_to_metric_families

from drivers.sim.modbus import ModbusSimulator
from tests.conftest import free_port
from tests.integration.conftest import running_gateway, until
from tests.integration.test_modbus_alarm import ControlledMachine


def scrape_sync(port: int) -> dict[tuple, float]:
    """{(sample name, (label, value), ...): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(port: int) -> dict[tuple, float]:
    return await asyncio.to_thread(scrape_sync, port)  # the gateway's loop must stay free to answer


async def eventually(port: int, predicate, timeout: float) -> dict[tuple, float]:
    """Scrape until `predicate(metrics)` holds; the last scrape either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            m = await scrape(port)
        except urllib.error.URLError:  # not listening yet (the gateway is starting)
            if loop.time() > deadline:
                raise
        else:
            if predicate(m) or loop.time() > deadline:
                return m
        await asyncio.sleep(0.2)


UP = ("upstream", "default")


async def test_metrics_show_devices_alarms_and_a_broker_outage(tmp_path, mosquitto, gateway_config):
    machine = ControlledMachine()
    machine.value = 90.0
    modbus_port, metrics_port = free_port(), free_port()
    sim = await ModbusSimulator(model=machine).start_tcp("127.0.0.1", modbus_port)
    raw = gateway_config(
        devices=[{"name": "press1", "driver": "modbus", "host": "127.0.0.1", "port": modbus_port,
                  "poll_interval": "200ms",
                  "tags": [{"name": "temperature", "table": "holding", "address": 0, "type": "float32"}]}],
        rules=[{"name": "hot", "type": "threshold", "input": "press1.temperature", "above": 80, "clear": 75,
                "severity": "warning"}],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    try:
        async with running_gateway(tmp_path, raw) as app:
            m = await eventually(metrics_port, lambda m: m.get(("edge_gateway_upstream_published_total", UP), 0) > 0
                                 and m.get(("edge_gateway_alarms_active", ("severity", "warning"))) == 1, 15)
            device = ("device", "press1")
            assert m[("edge_gateway_device_connected", device)] == 1
            assert m[("edge_gateway_device_errors_total", device)] == 0
            assert m[("edge_gateway_device_bad_values_total", device)] == 0
            assert 0 < m[("edge_gateway_device_poll_latency_seconds", device)] < 1
            assert m[("edge_gateway_alarms_active", ("severity", "warning"))] == 1
            assert m[("edge_gateway_alarms_active", ("severity", "critical"))] == 0
            assert m[("edge_gateway_upstream_connected", UP)] == 1
            assert m[("edge_gateway_upstream_reconnects_total", UP)] == 0
            assert m[("edge_gateway_event_loop_responsive",)] == 1
            assert 0 <= m[("edge_gateway_event_loop_lag_seconds",)] < 1
            assert m[("edge_gateway_info", ("gateway", "gw1"), ("version", "0.1.0"))] == 1
            assert ("process_resident_memory_bytes",) in m

            mosquitto.stop()
            m = await eventually(metrics_port, lambda m: m[("edge_gateway_upstream_connected", UP)] == 0
                                 and m[("edge_gateway_buffer_depth", UP)] >= 5, 20)
            assert m[("edge_gateway_upstream_connected", UP)] == 0, "the outage is not shown"
            depth = m[("edge_gateway_buffer_depth", UP)]
            assert depth >= 5, "summaries pile up in the buffer while the broker is away"
            assert m[("edge_gateway_buffer_bytes", UP)] > 0 and m[("edge_gateway_buffer_oldest_age_seconds", UP)] > 0
            published = m[("edge_gateway_upstream_published_total", UP)]

            mosquitto.start()
            m = await eventually(metrics_port, lambda m: m[("edge_gateway_upstream_reconnects_total", UP)] >= 1
                                 and m[("edge_gateway_buffer_depth", UP)] == 0, 20)
            assert m[("edge_gateway_upstream_reconnects_total", UP)] >= 1 and m[("edge_gateway_upstream_connected", UP)] == 1
            assert m[("edge_gateway_buffer_depth", UP)] == 0, "the backlog was not drained"
            assert m[("edge_gateway_upstream_published_total", UP)] >= published + depth
            assert m[("edge_gateway_buffer_oldest_age_seconds", UP)] == 0

            # a reload that moves the address: the new one serves, the old one is closed
            new_port = free_port()
            raw["metrics"]["listen"] = f"127.0.0.1:{new_port}"
            (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            assert app.request_reload() == []
            assert await until(lambda: app.metrics.listen == f"127.0.0.1:{new_port}", 10)
            # the new pipeline's driver connects anew (its counters start again, as in health)
            m = await eventually(new_port, lambda m: m.get(("edge_gateway_device_connected", device)) == 1, 10)
            assert m[("edge_gateway_device_connected", device)] == 1
            try:
                await scrape(metrics_port)
                raise AssertionError("the old metrics address still answers after the reload")
            except urllib.error.URLError:
                pass
        # stopped with the gateway
        try:
            await scrape(new_port)
            raise AssertionError("/metrics still answers after the gateway stopped")
        except urllib.error.URLError:
            pass
    finally:
        await sim.stop()
