"""The one reconnect/restart back-off, for drivers (drivers.base.supervise), the upstream link and
the pipeline's driver restarts."""

from __future__ import annotations

import random


class Backoff:
    """Jittered exponential back-off between `low` and `high` seconds.

    Jitter keeps many devices that failed together (a switch reboot) from reconnecting in lockstep.
    """

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low = max(0.01, low)
        self.high = max(self.low, high)
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.high, self.low * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(max(self.low, ceiling / 2), ceiling)

    def reset(self) -> None:
        self._attempt = 0
