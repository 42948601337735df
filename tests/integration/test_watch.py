"""`edge-gateway watch` against a running gateway: a raised alarm shows within 2 s, as a line
(`--plain`) and on the screen (in a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time

from drivers.sim.modbus import ModbusSimulator
from tests.conftest import free_port
from tests.integration.conftest import running_gateway, until
from tests.integration.test_modbus_alarm import ControlledMachine


class Watcher:
    """`python -m gateway watch` as a process; what it prints, with the monotonic time of arrival."""

    def __init__(self, config, *args: str, tty: bool = False) -> None:
        self.chunks: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        cmd = [sys.executable, "-m", "gateway", "watch", "-c", str(config), "--duration", "60", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if tty:
            master, slave = pty.openpty()
            self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
            os.close(slave)
            read = lambda: os.read(master, 65536)  # noqa: E731 - EIO once the process has ended
            self._close = lambda: os.close(master)  # noqa: E731
        else:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            read = lambda: os.read(self.proc.stdout.fileno(), 65536)  # noqa: E731
            self._close = self.proc.stdout.close
        threading.Thread(target=self._pump, args=(read,), daemon=True).start()

    def _pump(self, read) -> None:
        while True:
            try:
                data = read()
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.chunks.append((time.monotonic(), data.decode(errors="replace")))

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(c for _, c in self.chunks)

    def first_time(self, needle: str) -> float | None:
        """When the output first contained `needle`."""
        with self._lock:
            seen = ""
            for t, chunk in self.chunks:
                seen += chunk
                if needle in seen:
                    return t
        return None

    def last_screen(self) -> str:
        frames = self.text.split("\x1b[H\x1b[2J")
        return frames[-2] if len(frames) > 2 else frames[-1]  # the last one may be half-written

    def stop(self) -> int:
        if self._close is None:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._close()
        self._close = None
        return rc


async def test_watch_shows_a_raised_alarm_within_2s(tmp_path, mosquitto, collector_factory, gateway_config):
    machine = ControlledMachine()
    port = free_port()
    sim = await ModbusSimulator(model=machine).start_tcp("127.0.0.1", port)
    collector = collector_factory(mosquitto, "edge/gw1/alarms/#")
    raw = gateway_config(
        devices=[{"name": "press1", "driver": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": "200ms",
                  "tags": [{"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "degC"}]}],
        rules=[{"name": "spindle_overtemp", "type": "threshold", "input": "press1.temperature", "above": 80,
                "clear": 75, "severity": "warning"}],
    )
    watchers: list[Watcher] = []
    try:
        async with running_gateway(tmp_path, raw):
            config = tmp_path / "gateway.yaml"
            plain, screen = Watcher(config, "--plain"), Watcher(config, tty=True)
            watchers += [plain, screen]
            # both see the gateway and its summaries before the alarm
            assert await until(lambda: "status gw1 online" in plain.text and "data press1: temperature=40degC" in plain.text, 20), plain.text
            assert await until(lambda: "press1.temperature" in screen.last_screen(), 20), screen.text[-2000:]
            assert "none active" in screen.last_screen()
            assert "ALARM" not in plain.text
            machine.value = 90.0
            assert await until(lambda: collector.messages, 10), "the gateway raised no alarm"
            published = time.monotonic()  # upper bound: the collector saw it no later than this
            line = "ALARM spindle_overtemp RAISED [warning] value=90 limit=80"
            assert await until(lambda: plain.first_time(line) is not None, 5), plain.text
            assert plain.first_time(line) - published < 2.0

            def on_screen() -> bool:
                alarms = screen.last_screen().split("ALARMS", 1)[-1]
                return "spindle_overtemp" in alarms and "warning" in alarms and "none active" not in alarms
            assert await until(on_screen, 5), screen.last_screen()
            assert time.monotonic() - published < 2.5  # the screen redraws twice a second
            assert "health: devices 1/1 connected" in plain.text
        for w in watchers:
            assert w.stop() == 0
        assert "Traceback" not in plain.text + screen.text
        assert "status gw1 offline" in plain.text  # a clean stop of the gateway is shown as well
    finally:
        for w in watchers:
            w.stop()
        await sim.stop()


def test_watch_with_a_broken_file_says_why_and_exits_2(tmp_path):
    from tests.conftest import run_cli

    path = tmp_path / "gw.yaml"
    path.write_text("gateway:\n  id: gw1\nupstream:\n  port: nine\n")
    result = run_cli("watch", "-c", str(path), "--plain", "--duration", "5")
    assert result.returncode == 2 and f"{path}:4: upstream.port: " in result.stderr, result.stderr
