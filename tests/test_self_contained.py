"""The repository is self-contained: nothing it runs reads a path outside the checkout.

A stranger's clone has none of the folders that sit beside ours, nor our parent folder, so any
such reference is a test, benchmark or demo that passes here and fails there. The patterns below
are assembled from parts, so that this file holds no such path itself."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from tests import cwru
from tests.conftest import REPO

SCANNED = ("tests", "bench", "gateway", "drivers", "rules")
SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini"}
# Literal references that leave the repository, whatever the file's place in the tree: the
# root's parent, and a relative path that goes up (to any folder beside the checkout).
OUTSIDE = re.compile("|".join([r"\b(?:REPO|ROOT)\.parent\b", r"['\"]\.\.['\"]", r"['\"]\.\./", r"[/}]\.\./"]))
UP_DIR = "." * 2  # spelled so, the samples below hold no such path ...
PARENT = ".par" + "ent"  # ... and no climb out of the checkout either
# Path(__file__)[.resolve()] followed by .parent / .parents[k] hops: count how far up it goes.
UP = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent(?!s)|\.parents\[\d+\])+)")


def hops(chain: str) -> int:
    n = 0
    for m in re.finditer(r"\.parents\[(\d+)\]|\.parent", chain):
        n += int(m.group(1)) + 1 if m.group(1) is not None else 1
    return n


def scanned_files():
    me = Path(__file__).resolve()
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and path.resolve() != me:
                yield path


def problems_in(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    found = []
    depth = len(path.relative_to(REPO).parts)  # this many hops from Path(__file__) reach the root
    for lineno, line in enumerate(text.splitlines(), 1):
        if OUTSIDE.search(line):
            found.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
        for m in UP.finditer(line):
            if hops(m.group(1)) > depth:
                found.append(f"{path.relative_to(REPO)}:{lineno}: climbs above the repository: {line.strip()}")
    return found


def test_no_file_refers_outside_the_repository():
    problems = [p for path in scanned_files() for p in problems_in(path)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_is_for(tmp_path):
    # The checker itself can fail: each of these lines must be reported.
    bad = tmp_path / "tests" / "analytics" / "test_x.py"
    bad.parent.mkdir(parents=True)
    lines = [f'CWRU = Path(__file__).resolve().parents[2]{PARENT} / "data"',
             f'CWRU = Path(__file__).resolve(){PARENT * 4}',
             f'DATA = "{UP_DIR}/beside/data/cwru"',
             f'X = REPO{PARENT} / "beside"',
             f'Y = f"{{ROOT}}/{UP_DIR}/beside/data"']
    bad.write_text("\n".join(lines) + "\nOK = Path(__file__).resolve().parents[2] / 'data'\n")
    import tests.test_self_contained as me
    old = me.REPO
    me.REPO = tmp_path
    try:
        assert len(problems_in(bad)) == len(lines)
    finally:
        me.REPO = old


# SHA-256 over the raw float64 bytes of each drive-end channel (tests/data/cwru/SOURCE.md).
DE_SHA256 = {
    97: "fdc4cfa19e86507a1abf26e07a60b7d0576faed9d21bbf0df070df3e97623b88",
    105: "4434354abec348a31f541557ef3bde6f3527cf954e422932f141e101b3b1c4f9",
    118: "6410b1813dcd7a2199322b486bda9951415b73072c7ccd827d8554d8c9abec64",
    130: "9fb9c867e75d007a3e66b5dc55f2f7e8ac13e317bfed204acf6817ecc84e7a7e",
    109: "2b9fc668b4ef0384355995eadef6c2bdb3d64d465cf760e7f01c0cd48db3e978",
    122: "cd18788cd52d2e06a86b84b4feb6c6c4c2900e217cf58e556b3c7d8f32090e57",
    135: "a59e2946c7769f58e98ae171fb466596d3a05fc48f237dae65a135dc65d02ac5",
}
# SOURCE.md reference table: p-p and skewness, the columns test_cwru.py does not check.
PP_SKEW = {97: (0.5979, -0.035), 105: (3.1189, 0.164), 118: (1.2110, -0.009), 130: (7.0391, 0.057),
           109: (6.4178, 0.010), 122: (1.3610, -0.022), 135: (12.6903, 0.076)}


@pytest.mark.parametrize("rec", cwru.RECORDS)
def test_shipped_recording_is_the_original_channel(rec):
    x, rpm, fs = cwru.load(rec)
    assert x.dtype == np.float64 and x.ndim == 1
    assert hashlib.sha256(x.tobytes()).hexdigest() == DE_SHA256[rec]
    assert rpm in (1796.0, 1797.0) and fs in (12000.0, 48000.0)
    pp, skew = PP_SKEW[rec]
    assert np.ptp(x) == pytest.approx(pp, rel=0.005)
    assert scipy.stats.skew(x) == pytest.approx(skew, abs=0.0015)
