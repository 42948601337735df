"""An overall time limit for a benchmark, kept by a thread so that it fires even when the event
loop is stuck: it says which phase it was waiting for, stops the helper processes and exits 3."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


class TimeLimit:
    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self.started = time.monotonic()
        self.waiting_for = "start-up"
        self.children: list[subprocess.Popen] = []
        self._timer = threading.Timer(seconds, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def phase(self, waiting_for: str) -> None:
        """Name what the benchmark waits for from now on (printed if the limit hits)."""
        self.waiting_for = waiting_for

    def child(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.children.append(proc)
        return proc

    def done(self) -> None:
        self._timer.cancel()

    def _give_up(self) -> None:
        print(f"{self.name}: gave up after {self.seconds:.0f} s (time limit) while waiting for: {self.waiting_for}",
              file=sys.stderr, flush=True)
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
        os._exit(3)
