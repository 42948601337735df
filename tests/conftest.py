"""Shared fixtures: a real Mosquitto broker started by the test session on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pids: list[int]) -> list[int]:
    """The processes of `pids` that still run (a zombie, ended but not yet reaped, does not)."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class Mosquitto:
    """A Mosquitto process on 127.0.0.1:<free port>; stop()/start() keep the same port."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.binary):
            pytest.fail("mosquitto is not installed (.ci/run installs it with apt-get)")
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Deliveries are counted: no queue limit (the default 1000 drops silently). Not 0 for
            # "unlimited": Mosquitto 2.0.11 then drops an MQTT 5 client right after denying it a publish.
            "max_queued_messages 10000000",
            "max_inflight_messages 0",
            "persistence false",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n" + extra_conf)
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.proc.kill()
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"mosquitto did not start: {err} {self.log.read_text() if self.log.exists() else ''}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def mosquitto_factory(tmp_path):
    """Start brokers with extra config lines: `mosquitto_factory(extra_conf="...")`."""
    started: list[Mosquitto] = []

    def make(extra_conf: str = "", port: int | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path, extra_conf, port).start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory) -> Mosquitto:
    """A fresh broker for one test."""
    return mosquitto_factory()


class Collector:
    """A paho subscriber that records every message it receives (topic, payload bytes, retain)."""

    def __init__(self, host: str, port: int, topics: list[str] | str = "#", qos: int = 1, protocol: int = 5) -> None:
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        topics = [topics] if isinstance(topics, str) else topics
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe([(t, qos) for t in topics])

        def on_subscribe(client, userdata, mid, rcs, props=None):
            self._subscribed.set()

        def on_message(client, userdata, msg):
            with self._lock:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("collector did not subscribe")

    def json(self, prefix: str = "") -> list[tuple[str, dict]]:
        import json

        with self._lock:
            return [(t, json.loads(p)) for t, p, _ in self.messages if t.startswith(prefix) and p]

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def closing_factory(make):
    """A fixture's body: yields `make`, and closes whatever it made when the test ends."""
    made = []

    def tracked(*args, **kw):
        made.append(make(*args, **kw))
        return made[-1]

    yield tracked
    for thing in made:
        thing.close()


@pytest.fixture
def collector_factory():
    yield from closing_factory(lambda broker, topics="#", qos=1: Collector(broker.host, broker.port, topics, qos))


def run_cli(*args: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)
