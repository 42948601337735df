"""Cut a stream of waveform blocks of any size into analysis windows.

Windows are contiguous and start at the first sample received; with `overlap` the next window
starts `hop = window - round(overlap * window)` samples after the previous one. A gap (a block
whose timestamp does not continue the previous block), a sample-rate change, a bad-quality or
non-finite block starts over: the partial window is dropped rather than glued to unrelated data.

Copies: a block that holds whole windows yields them straight from the block (one owning
float64 copy per window, which the batch needs anyway); only the remainder goes through the
preallocated per-stream buffer, and overlap shifts that buffer in place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from gateway.model import NEW_CAPTURE, Quality


@dataclass(slots=True)
class Window:
    samples: np.ndarray  # float64, owned by the window
    ts: float  # epoch seconds of the first sample
    sample_rate: float
    quality: Quality = Quality.GOOD

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


class WindowAssembler:
    """Windows of one waveform stream.

    `jitter_s`: how far a block's timestamp may stray from the end of the previous block before
    it counts as a gap. Blocks stamped on arrival (the MQTT driver does) jitter by milliseconds,
    far more than 1.5 sample periods; the tolerance is capped at half the block's duration so
    that one missing block is always seen as a gap. Each block is compared with the previous
    one, not with the first, so arrival jitter and clock drift never accumulate. (For blocks
    shorter than about twice the arrival jitter, timestamps cannot tell a lost block from
    jitter; such senders need a sequence number or a driver-side sample clock.)
    """

    def __init__(self, size: int, overlap: float = 0.0, jitter_s: float = 0.05) -> None:
        if size < 2:
            raise ValueError("a window needs at least 2 samples")
        if not 0.0 <= overlap < 1.0:
            raise ValueError("overlap must be in [0, 1)")
        self.size = int(size)
        self.hop = max(1, self.size - int(round(overlap * self.size)))
        self.jitter_s = float(jitter_s)
        self._buf = np.empty(self.size, dtype=np.float64)
        self._fill = 0
        self._start_ts = 0.0
        self._fs: float | None = None
        self._next_ts: float | None = None
        self._count = 0  # samples accepted since the last restart
        self._uncertain_until = -1  # sample count at the end of the last uncertain block
        self._last_len = 0
        self.gaps = 0  # restarts caused by gaps, rate changes or bad blocks
        self.dropped_samples = 0  # samples of partial windows thrown away by restarts
        self.restarts: Counter[str] = Counter()  # every restart of the stream, by cause

    @property
    def pending(self) -> int:
        """Samples waiting in the current partial window."""
        return self._fill

    def restart(self, cause: str) -> None:
        """Start new windows at the next block; a cause other than NEW_CAPTURE is a gap."""
        self.restarts[cause] += 1
        if cause != NEW_CAPTURE:
            self.gaps += 1
        self.reset()

    def reset(self) -> None:
        if self._fill:
            self.dropped_samples += self._fill
        self._fill = 0
        self._fs = None
        self._next_ts = None
        self._count = 0
        self._uncertain_until = -1
        self._last_len = 0

    def tolerance(self, block_len: int, fs: float) -> float:
        shortest = min(block_len, self._last_len) if self._last_len else block_len
        return max(1.5 / fs, min(self.jitter_s, 0.5 * shortest / fs))

    def push(self, samples: np.ndarray, ts: float, sample_rate: float,
             quality: Quality = Quality.GOOD, restart: str | None = None) -> list[Window]:
        """Add a block (first sample at `ts`); returns the windows it completes, oldest first.

        `restart`: the sender's word that this block does not continue the previous one (see
        Waveform.restart); without it, the timestamps and sample rate decide."""
        x = np.asarray(samples)
        if x.ndim != 1:
            x = x.reshape(-1)
        n = len(x)
        fs = float(sample_rate)
        if n == 0:
            return []
        if quality is Quality.BAD or not (fs > 0) or not np.isfinite(x).all():
            # Never analyse made-up or missing values: the stream restarts after this block.
            self.restart("bad block")
            self.dropped_samples += n
            return []
        if restart is not None:
            if self._fs is not None or self._fill or restart != NEW_CAPTURE:
                self.restart(restart)
        elif self._fs is not None and fs != self._fs:
            self.restart("rate change")
        elif self._fs is not None and abs(ts - self._next_ts) > self.tolerance(n, fs):
            self.restart("late block")
        if self._fs is None:
            self._fs = fs
        self._next_ts = ts + n / fs
        self._last_len = n
        block_start = self._count
        self._count += n
        if quality is not Quality.GOOD:
            self._uncertain_until = self._count

        out: list[Window] = []
        size, hop, buf = self.size, self.hop, self._buf
        pos = 0
        while pos < n:
            if self._fill == 0:
                self._start_ts = ts + pos / fs
                if n - pos >= size:
                    # Whole window inside the block: no trip through the buffer.
                    out.append(self._window(x[pos:pos + size].astype(np.float64, copy=True),
                                            block_start + pos))
                    pos += hop
                    continue
            take = min(size - self._fill, n - pos)
            buf[self._fill:self._fill + take] = x[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == size:
                out.append(self._window(buf.copy(), block_start + pos - size))
                keep = size - hop
                if keep:
                    buf[:keep] = buf[hop:]  # numpy handles the overlapping move
                self._fill = keep
                self._start_ts += hop / fs
            elif pos >= n:
                break
        return out

    def _window(self, data: np.ndarray, first_index: int) -> Window:
        q = Quality.UNCERTAIN if first_index < self._uncertain_until else Quality.GOOD
        return Window(data, self._start_ts, self._fs or 0.0, q)
