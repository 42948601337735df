"""Windowing across blocks: sizes, overlap, gaps, rate changes, bad blocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.analytics.window import WindowAssembler
from gateway.model import Quality

FS = 1000.0


def feed(asm, x, blocks, t0=100.0, fs=FS):
    out, pos = [], 0
    for b in blocks:
        out += asm.push(x[pos:pos + b], t0 + pos / fs, fs)
        pos += b
    return out


@settings(max_examples=60, deadline=None)
@given(size=st.integers(2, 300), overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]),
       blocks=st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_windows_are_the_contiguous_slices_whatever_the_block_sizes(size, overlap, blocks):
    x = np.arange(sum(blocks), dtype=np.float32)
    asm = WindowAssembler(size, overlap)
    wins = feed(asm, x, blocks)
    hop = asm.hop
    expected_starts = list(range(0, len(x) - size + 1, hop))
    assert [int(w.samples[0]) for w in wins] == expected_starts
    for w, s in zip(wins, expected_starts):
        assert w.samples.dtype == np.float64 and len(w.samples) == size
        np.testing.assert_array_equal(w.samples, x[s:s + size])
        assert w.ts == pytest.approx(100.0 + s / FS, abs=1e-9)
        assert w.sample_rate == FS and w.quality is Quality.GOOD


def test_windows_own_their_data():
    asm = WindowAssembler(4)
    block = np.arange(10.0)
    wins = asm.push(block, 0.0, FS)
    block[:] = -1
    assert wins[0].samples.tolist() == [0, 1, 2, 3]


def test_gap_starts_a_new_window():
    asm = WindowAssembler(100, jitter_s=0.002)  # a sender with exact timestamps
    x = np.arange(1000.0)
    assert asm.push(x[:60], 0.0, FS) == []
    # next block 20 samples late (a lost block): the 60 pending samples are dropped
    wins = asm.push(x[80:280], 0.080, FS)
    assert [w.samples[0] for w in wins] == [80.0, 180.0]
    assert wins[0].ts == pytest.approx(0.080)
    assert asm.gaps == 1 and asm.dropped_samples == 60


def test_small_jitter_is_not_a_gap_but_a_missing_block_is():
    asm = WindowAssembler(100, jitter_s=0.002)
    x = np.arange(1000.0)
    asm.push(x[:50], 0.0, FS)
    wins = asm.push(x[50:150], 0.0505, FS)  # 0.5 ms late: arrival jitter
    assert len(wins) == 1 and wins[0].samples[0] == 0.0 and asm.gaps == 0
    # one 10-sample block lost: 10 ms > jitter, and more than half of the next block's duration
    asm2 = WindowAssembler(100, jitter_s=1.0)
    asm2.push(x[:50], 0.0, FS)
    asm2.push(x[60:70], 0.060, FS)
    assert asm2.gaps == 1


def test_timestamp_going_backwards_is_a_gap():
    asm = WindowAssembler(100)
    asm.push(np.zeros(50), 10.0, FS)
    asm.push(np.zeros(50), 9.0, FS)
    assert asm.gaps == 1 and asm.pending == 50


def test_sample_rate_change_starts_a_new_window():
    asm = WindowAssembler(100)
    asm.push(np.zeros(50), 0.0, FS)
    wins = asm.push(np.ones(120), 0.05, 2 * FS)
    assert asm.gaps == 1
    assert len(wins) == 1 and wins[0].sample_rate == 2 * FS and wins[0].samples.min() == 1.0


@pytest.mark.parametrize("bad", ["quality", "nan"])
def test_bad_block_breaks_the_window(bad):
    asm = WindowAssembler(100)
    asm.push(np.zeros(60), 0.0, FS)
    block = np.zeros(20)
    q = Quality.GOOD
    if bad == "nan":
        block[3] = np.nan
    else:
        q = Quality.BAD
    assert asm.push(block, 0.06, FS, q) == []
    wins = asm.push(np.arange(100.0), 0.08, FS)
    assert len(wins) == 1 and wins[0].samples[0] == 0.0 and wins[0].ts == pytest.approx(0.08)


def test_uncertain_block_marks_the_windows_it_touches():
    asm = WindowAssembler(100, overlap=0.5)
    wins = asm.push(np.zeros(100), 0.0, FS)
    wins += asm.push(np.zeros(30), 0.1, FS, Quality.UNCERTAIN)
    wins += asm.push(np.zeros(200), 0.13, FS)
    # windows start at 0, 50, 100, 150, 200: those starting before sample 130 hold uncertain data
    assert [(round(w.ts, 3), w.quality.value) for w in wins] == [
        (0.0, "good"), (0.05, "uncertain"), (0.1, "uncertain"), (0.15, "good"), (0.2, "good")]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        WindowAssembler(1)
    with pytest.raises(ValueError):
        WindowAssembler(10, overlap=1.0)


def test_arrival_stamped_blocks_with_jitter_and_one_lost_block():
    """What the MQTT driver produces: 300-sample blocks at 12 kHz (25 ms) stamped on arrival
    with a few ms of jitter; windows must not restart, except after the lost block."""
    fs, b = 12000.0, 300
    rng = np.random.default_rng(3)
    asm = WindowAssembler(4096)
    x = np.arange(300 * 60, dtype=np.float64)
    wins = []
    for i in range(60):
        if i == 40:
            continue  # lost
        wins += asm.push(x[i * b:(i + 1) * b], 50.0 + i * b / fs + rng.uniform(-0.005, 0.005), fs)
    assert asm.gaps == 1
    # 40 blocks = 12000 samples before the loss -> 2 windows; 19 blocks after -> 1 window
    assert [w.samples[0] for w in wins] == [0.0, 4096.0, 41 * 300.0]
